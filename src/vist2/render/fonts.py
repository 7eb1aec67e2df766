"""Where the renderer's fonts come from: names of shipped fonts -> files, and which code points a font has.

    >>> from vist2.render.fonts import font_cmap, resolve_font
    >>> path = resolve_font("DejaVuSansMono")        # a .ttf shipped with matplotlib
    >>> ord("A") in font_cmap(path), ord("中") in font_cmap(path)
    (True, False)
"""

from __future__ import annotations

import functools
import importlib.util
import os

# Fonts ship inside Python packages we depend on; they are located through the
# import system (without importing the packages) so no machine path is baked in.
_FONT_PACKAGES = (
    ("matplotlib", ("mpl-data", "fonts", "ttf")),
    ("pylopdf_fonts_zh_cn", ()),
)
_FONT_EXTS = (".ttf", ".otf", ".ttc")


def _package_dir(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


@functools.lru_cache(maxsize=None)
def _named_fonts() -> dict[str, str]:
    found: dict[str, str] = {}
    for pkg, sub in _FONT_PACKAGES:
        base = _package_dir(pkg)
        if base is None:
            continue
        folder = os.path.join(base, *sub)
        if not os.path.isdir(folder):
            continue
        for fn in sorted(os.listdir(folder)):
            stem, ext = os.path.splitext(fn)
            if ext.lower() not in _FONT_EXTS:
                continue
            found.setdefault(stem, os.path.join(folder, fn))
            # "NotoSansSC-Regular.otf" is also reachable as "NotoSansSC".
            if stem.endswith("-Regular"):
                found.setdefault(stem[: -len("-Regular")], os.path.join(folder, fn))
    return found


def resolve_font(name: str, field: str = "font") -> str:
    """Font name (``"DejaVuSansMono"``, ``"NotoSansSC"``, ...) or file path -> path.

    Names are looked up among the fonts shipped by matplotlib (DejaVu, STIX, ...)
    and pylopdf-fonts-zh-cn (Noto Sans/Serif SC).  Raises ``ValueError`` naming
    ``field`` when nothing matches.

    >>> resolve_font("NotoSansSC").endswith(".otf")
    True
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"RenderConfig.{field} must be a non-empty string, got {name!r}")
    if name.lower().endswith(_FONT_EXTS) or os.sep in name or (os.altsep and os.altsep in name):
        if os.path.isfile(name):
            return name
        raise ValueError(f"RenderConfig.{field}: font file {name!r} does not exist")
    fonts = _named_fonts()
    if name in fonts:
        return fonts[name]
    raise ValueError(
        f"RenderConfig.{field}: unknown font name {name!r}; known names: "
        f"{', '.join(sorted(fonts)) or '(none found)'}; or pass a path to a .ttf/.otf file"
    )


@functools.lru_cache(maxsize=None)
def font_cmap(path: str) -> frozenset[int]:
    """The code points the font at ``path`` has a glyph for.

    fontTools comes with matplotlib; it tells us which code points a font really has,
    which Pillow cannot (it silently draws .notdef instead).
    """
    from fontTools.ttLib import TTFont

    kw = {"fontNumber": 0} if path.lower().endswith(".ttc") else {}
    with TTFont(path, lazy=True, **kw) as f:
        return frozenset(f.getBestCmap() or ())
