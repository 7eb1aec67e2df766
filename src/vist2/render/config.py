"""RenderConfig: how text becomes an image (size, fonts, margins, colours, chat styles), and named presets.

    >>> from vist2.render.config import RENDER_PRESETS, RenderConfig
    >>> RENDER_PRESETS["paper"].width, RenderConfig(width=256).replace(height=128).height
    (256, 128)
    >>> RenderConfig(margin=300)
    Traceback (most recent call last):
    ...
    ValueError: RenderConfig.margin (300) leaves no room in a 512x512 image
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from ..checks import is_int as _is_int
from .fonts import resolve_font


Color = Union[int, tuple[int, int, int]]

# Paper Fig. 7: the user's turns sit on a grey background, the user's question
# is red (on the same grey, since it is still the user speaking), the
# assistant is plain.  ``None`` means "use RenderConfig.foreground/background".
DEFAULT_STYLES: dict[str, tuple[Color | None, Color | None]] = {
    "user": (None, 224),
    "question": ((200, 0, 0), 224),
    "assistant": (None, None),
}

_MODES = ("auto", "L", "RGB")
_WRAPS = ("word", "char")


def _check_color(value: Any, what: str, allow_none: bool) -> Color | None:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{what} must be a colour, got None")
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what} must be an int 0..255 or an (r, g, b) triple, got {value!r}")
    if isinstance(value, (int, np.integer)):
        if not 0 <= int(value) <= 255:
            raise ValueError(f"{what} must be in 0..255, got {value!r}")
        return int(value)
    if isinstance(value, (tuple, list)) and len(value) == 3:
        out = []
        for v in value:
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) <= 255:
                raise ValueError(f"{what} must be an (r, g, b) triple of ints in 0..255, got {value!r}")
            out.append(int(v))
        if out[0] == out[1] == out[2]:
            return out[0]
        return (out[0], out[1], out[2])
    raise ValueError(f"{what} must be an int 0..255 or an (r, g, b) triple, got {value!r}")


def _normalize_styles(styles: Any) -> tuple[tuple[str, Color | None, Color | None], ...]:
    """``RenderConfig.styles`` as given (a mapping name -> (fg, bg), or (name, fg, bg) entries) ->
    a sorted tuple of ``(name, fg, bg)`` with checked colours."""
    items = styles.items() if isinstance(styles, Mapping) else styles
    norm = []
    try:
        items = list(items)
    except TypeError:
        raise ValueError(f"RenderConfig.styles must be a mapping name -> (fg, bg), got {styles!r}") from None
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise ValueError(f"RenderConfig.styles: bad entry {item!r}")
        if len(item) == 2:
            name, colors = item
            if not isinstance(colors, (tuple, list)) or len(colors) != 2:
                raise ValueError(f"RenderConfig.styles[{name!r}] must be (foreground, background), got {colors!r}")
            fg, bg = colors
        else:
            name, fg, bg = item
        if not isinstance(name, str) or not name:
            raise ValueError(f"RenderConfig.styles: style names must be non-empty strings, got {name!r}")
        if name == "plain":
            raise ValueError(
                "RenderConfig.styles must not define 'plain'; it is (foreground, background)"
            )
        fg = _check_color(fg, f"RenderConfig.styles[{name!r}] foreground", True)
        bg = _check_color(bg, f"RenderConfig.styles[{name!r}] background", True)
        norm.append((name, fg, bg))
    names = [n for n, _, _ in norm]
    if len(set(names)) != len(names):
        raise ValueError(f"RenderConfig.styles: duplicate style names in {names}")
    return tuple(sorted(norm))


@dataclass(frozen=True)
class RenderConfig:
    """How text becomes an image.  Frozen and hashable (it keys the renderer cache).

    ``font_size`` is the largest size tried and ``min_font_size`` the smallest
    (pixels per em of the main font); see the module docstring for the shrink
    rule.  ``styles`` maps a style name to ``(foreground, background)`` where a
    colour is an int (grey level) or an ``(r, g, b)`` triple and ``None`` means
    the config's ``foreground`` / ``background``; the style ``"plain"`` is always
    ``(foreground, background)``.  ``mode``: ``"L"`` always returns grey images
    (colours become their luma), ``"RGB"`` always three channels, ``"auto"``
    three channels only for a render that uses a coloured style.  ``wrap``: ``"word"`` breaks
    long lines at spaces and hyphens (what people read); ``"char"`` fills every line and breaks
    anywhere, spaces included, so one-cell text is a strict raster (character i in row
    i // columns, column i % columns), the layout a model trained from scratch aligns most easily.
    """

    width: int = 512
    height: int = 512
    font: str = "DejaVuSansMono"
    cjk_font: str | None = "NotoSansSC"
    font_size: int = 16
    min_font_size: int = 9  # legible for code too (see RENDER_PRESETS["default"]); saved configs keep theirs
    margin: int = 2
    line_spacing: float = 1.2
    background: int = 255
    foreground: int = 0
    tab_size: int = 4
    mode: str = "auto"
    wrap: str = "word"
    # Accepts a mapping name -> (fg, bg); stored as a sorted tuple of (name, fg, bg).
    styles: Mapping[str, tuple[Color | None, Color | None]] | tuple = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_STYLES)
    )


    def __post_init__(self) -> None:
        self._check_geometry()
        for name in ("background", "foreground"):
            v = getattr(self, name)
            if not _is_int(v) or not 0 <= v <= 255:
                raise ValueError(f"RenderConfig.{name} must be a grey level int in 0..255, got {v!r}")
        if self.mode not in _MODES:
            raise ValueError(f"RenderConfig.mode must be one of {_MODES}, got {self.mode!r}")
        if self.wrap not in _WRAPS:
            raise ValueError(f"RenderConfig.wrap must be one of {_WRAPS}, got {self.wrap!r}")
        resolve_font(self.font, "font")
        if self.cjk_font is not None:
            resolve_font(self.cjk_font, "cjk_font")
        # Stored as a sorted tuple so the frozen config stays hashable.
        object.__setattr__(self, "styles", _normalize_styles(self.styles))

    def _check_geometry(self) -> None:
        for name in ("width", "height", "font_size", "min_font_size", "tab_size"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ValueError(f"RenderConfig.{name} must be a positive int, got {v!r}")
        if self.min_font_size > self.font_size:
            raise ValueError(
                f"RenderConfig.min_font_size ({self.min_font_size}) must be <= font_size ({self.font_size})"
            )
        if not _is_int(self.margin) or self.margin < 0:
            raise ValueError(f"RenderConfig.margin must be an int >= 0, got {self.margin!r}")
        if 2 * self.margin >= min(self.width, self.height):
            raise ValueError(
                f"RenderConfig.margin ({self.margin}) leaves no room in a {self.width}x{self.height} image"
            )
        ls = self.line_spacing
        if isinstance(ls, bool) or not isinstance(ls, (int, float)) or not 0.5 <= ls <= 4.0:
            raise ValueError(f"RenderConfig.line_spacing must be a number in [0.5, 4], got {ls!r}")
        object.__setattr__(self, "line_spacing", float(ls))

    # -- helpers -----------------------------------------------------------------
    @property
    def style_names(self) -> tuple[str, ...]:
        """All style names, ``"plain"`` first (its id is 0)."""
        return ("plain",) + tuple(n for n, _, _ in self.styles)

    def style_colors(self) -> dict[str, tuple[Color, Color]]:
        """Style name -> resolved ``(foreground, background)``."""
        out: dict[str, tuple[Color, Color]] = {"plain": (self.foreground, self.background)}
        for name, fg, bg in self.styles:
            out[name] = (self.foreground if fg is None else fg, self.background if bg is None else bg)
        return out

    def replace(self, **changes: Any) -> "RenderConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["styles"] = {
            n: [list(fg) if isinstance(fg, tuple) else fg, list(bg) if isinstance(bg, tuple) else bg]
            for n, fg, bg in self.styles
        }
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "RenderConfig":
        if not isinstance(d, Mapping):
            raise ValueError(f"RenderConfig.from_dict expects a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(f"RenderConfig.from_dict: unknown key {key!r} (known: {', '.join(sorted(known))})")
        return cls(**dict(d))


RENDER_PRESETS: dict[str, RenderConfig] = {
    # 512x512 read by a patch-16 ViT is 1024 patches; the model merges 2x2
    # patches so the LLM still sees n_visual=256 tokens.  A 1024-token English
    # chunk (~4200 chars) lands at 9 px on 5x11 px cells, Chinese (~1200 chars)
    # at 12 px (CJK drawn at 14 px); rapidocr reads both back at CER < 2%.
    # Code is the limit: at 8 px (5x10 cells) symbol runs read back at CER up to 0.54, at 9 px
    # (5x11) <= 0.15 with fill 0.99, and 10 px reads no better but fills 0.77 (bench/notes/render.md).
    "default": RenderConfig(),
    # The paper's geometry: 256x256, 256 patches of 16 px.  A 1024-token chunk
    # only fits at 4-5 px glyphs (2x5 / 3x6 px cells), where OCR CER is 0.66-0.99:
    # kept for comparison, not legible (see bench/notes/render.md).
    "paper": RenderConfig(width=256, height=256, min_font_size=4, margin=1),
    # The tiny test model: K=64 tokens in 128x128 (64 patches, 2x2 merge, n_visual=16), about the
    # default's density (English lands at 7-8 px, Chinese at 10 px); min 4 px leaves room for
    # the long symbol runs a random model writes.
    "tiny": RenderConfig(width=128, height=128, font_size=10, min_font_size=4, margin=1),
    # The nano model trained from scratch (recipes/nano): 128x128 at one size, 7 px DejaVu Sans
    # Mono in 4x8 px cells, 32x16 characters and no margin, so every 8x8 patch of the nano vision
    # tower holds exactly two characters of one line (read with a 4x4 merge: n_visual=16, K=64).
    "nano": RenderConfig(width=128, height=128, font_size=7, min_font_size=7, margin=0),
    # The nano model of round 3 (bench/notes/nano.md): one byte a token, and a strict raster of
    # 16x4 cells (4x16 px, 7 px DejaVu Sans Mono) on 64x64 read by 16 px patches with no merge,
    # so visual token i holds exactly characters 4i..4i+3 of its 64-token chunk (n_visual=16, r=4).
    "nano-char": RenderConfig(width=64, height=64, font_size=7, min_font_size=7, margin=0,
                              line_spacing=2.3, wrap="char"),
    # The first nano page (bench/notes/nano.md, round 1): 9 px in 5x11 px cells, 25x11 characters,
    # read with 16 px patches and a 2x2 merge.
    "nano9": RenderConfig(width=128, height=128, font_size=9, min_font_size=9, margin=1),
}
