"""Render text (a K-token chunk, or styled chat spans) into a fixed-size image.

VIST2 keeps its long context as *pictures of text*: every chunk of K tokens is
drawn into one image that a ViT reads.  This module is that drawing step.

Example::

    from vist2.render import RENDER_PRESETS, RenderConfig, Renderer, Span, chat_spans, render_text

    img = render_text("Hello, world!\\n你好，世界！")          # PIL.Image, 512x512, mode "L"
    r = Renderer.get(RENDER_PRESETS["paper"])                 # cached instance
    arr = r.render("some long text ...")                      # uint8 (256, 256)
    size = r.font_size_for("some long text ...")              # size the shrink rule picks
    chat = chat_spans([{"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello."},
                       {"role": "user", "content": "What is 2+2?"}])
    rgb = Renderer.get(RenderConfig()).render(chat)           # (512, 512, 3): question in red

Layout
------
Text is laid out on a monospace *cell grid*.  At font size ``s`` (pixels per
em of the main font) a cell is ``cell_w = round(advance("0"))`` pixels wide
(0.6 em for DejaVu Sans Mono) and ``cell_h = max(round(s * line_spacing),
2 * cell_w)`` pixels tall; the grid has ``(width - 2*margin) // cell_w``
columns and ``(height - 2*margin) // cell_h`` rows, anchored at the top-left
margin.  Characters whose Unicode East Asian width is Wide or Fullwidth (CJK,
kana, most emoji) take two cells and are drawn with the CJK font at about
92% of ``min(2 * cell_w, cell_h)`` pixels per em (at least 1 px less), nearly
filling the two-cell box; everything
else takes one cell (a glyph wider than its cell is squeezed to fit).  No
shaping and no bidi reordering is done: right-to-left scripts are drawn
character by character in logical order.  With the default 512x512 a
1024-token English chunk renders at 9 px on 5x11 px cells (101 x 46 grid).

* Layout characters are drawn as marks in the text flow (:func:`layout_marks`): a line
  break (``\\n``, ``\\r\\n``, ``\\r``, ``\\v``, ``\\f``, U+0085, U+2028, U+2029) is ``↵``
  (a line may break after it), a tab ``⇥``, a run of n >= 2 spaces ``␣`` + n in subscript
  digits.  No character starts a new row (``tab_size`` is no longer used).
* Long lines wrap greedily at the last break opportunity that fits: after
  spaces and hyphens, and between wide (CJK) characters, but never before
  closing punctuation (``，。」)`` ...) nor after opening punctuation.  A word
  longer than a line is broken between characters.  A space that falls just
  past the end of a line is not drawn (it is the line break).
* Text is NFC-normalised (so "e" + combining acute takes one cell as "é").
  Other control characters (Cc) and invisible format characters (Cf,
  variation selectors) are dropped; a character neither font has is drawn as
  an empty box ("tofu"), one or two cells wide.

Shrink rule
-----------
The renderer draws at the *largest* integer font size ``s`` with
``min_font_size <= s <= font_size`` at which the wrapped text fits in the grid
(number of lines <= rows).  Fitting only gets easier as ``s`` decreases (cells
never grow), so the size is found by bisection.  If the text does not fit even
at ``min_font_size`` a ``ValueError`` says how many characters and lines did
not fit and which ``RenderConfig`` fields to change; text is never truncated.

Speed
-----
Each (font, size) has a glyph atlas: every glyph is rasterised once with
FreeType (via Pillow) into fixed-size cell bitmaps (wide glyphs are split into
a left and a right half-cell).  A render is then: code points -> glyph ids via a
dense lookup table, greedy wrapping with ``bisect`` over cumulative cell
widths (a Python loop over *lines*, not characters), one scatter into a
``rows x cols`` id grid, and one gather ``np.take(atlas, ids)`` + transposed
copy into the canvas.  Glyphs are rasterised on first use per size.  Styled
(chat) renders add a per-cell style grid and a ``(style, coverage) -> colour``
lookup table.  About 1 ms per 512x512 image of 1024 English tokens on one core
(bench/render_speed.py).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import importlib.util
import os
import re
import threading
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .checks import is_int as _is_int

__all__ = [
    "RenderConfig",
    "RENDER_PRESETS",
    "DEFAULT_STYLES",
    "Span",
    "Renderer",
    "chat_spans",
    "render_text",
    "resolve_font",
    "layout_marks",
    "unmark",
    "LineFit",
]

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


# --------------------------------------------------------------------------- fonts

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
def _font_cmap(path: str) -> frozenset[int]:
    # fontTools comes with matplotlib; it tells us which code points a font
    # really has, which Pillow cannot (it silently draws .notdef instead).
    from fontTools.ttLib import TTFont

    kw = {"fontNumber": 0} if path.lower().endswith(".ttc") else {}
    with TTFont(path, lazy=True, **kw) as f:
        return frozenset(f.getBestCmap() or ())


# --------------------------------------------------------------------------- config


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
    three channels only for a render that uses a coloured style.
    """

    width: int = 512
    height: int = 512
    font: str = "DejaVuSansMono"
    cjk_font: str | None = "NotoSansSC"
    font_size: int = 16
    min_font_size: int = 8
    margin: int = 2
    line_spacing: float = 1.2
    background: int = 255
    foreground: int = 0
    tab_size: int = 4
    mode: str = "auto"
    # Accepts a mapping name -> (fg, bg); stored as a sorted tuple of (name, fg, bg).
    styles: Mapping[str, tuple[Color | None, Color | None]] | tuple = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_STYLES)
    )

    def __post_init__(self) -> None:
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
        for name in ("background", "foreground"):
            v = getattr(self, name)
            if not _is_int(v) or not 0 <= v <= 255:
                raise ValueError(f"RenderConfig.{name} must be a grey level int in 0..255, got {v!r}")
        if self.mode not in _MODES:
            raise ValueError(f"RenderConfig.mode must be one of {_MODES}, got {self.mode!r}")
        resolve_font(self.font, "font")
        if self.cjk_font is not None:
            resolve_font(self.cjk_font, "cjk_font")
        # Stored as a sorted tuple so the frozen config stays hashable.
        styles = self.styles
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
        object.__setattr__(self, "styles", tuple(sorted(norm)))

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
    # patches so the LLM still sees beta=256 tokens.  A 1024-token English
    # chunk (~4200 chars) lands at 9 px on 5x11 px cells, Chinese (~1200 chars)
    # at 12 px (CJK drawn at 14 px); rapidocr reads both back at CER < 2%.
    # 8 px (5x10 cells) is the smallest size that stays that legible.
    "default": RenderConfig(),
    # The paper's geometry: 256x256, 256 patches of 16 px.  A 1024-token chunk
    # only fits at 4-5 px glyphs (2x5 / 3x6 px cells), where OCR CER is 0.66-0.99:
    # kept for comparison, not legible (see bench/notes/render.md).
    "paper": RenderConfig(width=256, height=256, min_font_size=4, margin=1),
    # The tiny test model: K=64 tokens in 128x128 (64 patches, 2x2 merge, beta=16), about the
    # default's density (English lands at 7-8 px, Chinese at 10 px); min 4 px leaves room for
    # the long symbol runs a random model writes.
    "tiny": RenderConfig(width=128, height=128, font_size=10, min_font_size=4, margin=1),
    # The nano model trained from scratch (recipes/nano): 128x128 at one size, 7 px DejaVu Sans
    # Mono in 4x8 px cells, 32x16 characters and no margin, so every 8x8 patch of the nano vision
    # tower holds exactly two characters of one line (read with a 4x4 merge: beta=16, K=64).
    "nano": RenderConfig(width=128, height=128, font_size=7, min_font_size=7, margin=0),
}


# --------------------------------------------------------------------------- spans


@dataclass(frozen=True)
class Span:
    """A run of text drawn in one style (a name from ``RenderConfig.style_names``)."""

    text: str
    style: str = "plain"


_ROLE_STYLES = {"user": "user", "assistant": "assistant", "system": "plain", "question": "question"}


def chat_spans(
    messages: Sequence[Mapping[str, Any]],
    *,
    question: str = "last",
    role_styles: Mapping[str, str] | None = None,
    separator: str = "\n",
) -> list[Span]:
    """Chat messages ``[{"role": ..., "content": ...}]`` -> styled spans.

    Each message becomes one span ``content + separator`` whose style comes
    from its role (``user`` -> ``"user"``, ``assistant`` -> ``"assistant"``,
    ``system`` -> ``"plain"``, ``question`` -> ``"question"``; override with
    ``role_styles``).  With ``question="last"`` the last user message is the
    question being asked and gets the ``"question"`` style; ``question="none"``
    keeps it ``"user"``.  A message's own ``"style"`` key wins over both.
    """
    if question not in ("last", "none"):
        raise ValueError(f"chat_spans: question must be 'last' or 'none', got {question!r}")
    roles = dict(_ROLE_STYLES)
    if role_styles:
        roles.update(role_styles)
    last_user = -1
    if question == "last":
        for i, m in enumerate(messages):
            if m.get("role") == "user":
                last_user = i
    spans = []
    for i, m in enumerate(messages):
        role = m.get("role")
        content = m.get("content", "")
        if not isinstance(content, str):
            raise ValueError(f"chat_spans: message {i} content must be a string, got {type(content).__name__}")
        if "style" in m:
            style = m["style"]
        elif i == last_user:
            style = "question"
        elif role in roles:
            style = roles[role]
        else:
            raise ValueError(f"chat_spans: message {i} has unknown role {role!r} (known: {sorted(roles)})")
        spans.append(Span(content + separator, style))
    return spans


# --------------------------------------------------------------------------- layout marks

_MARK_NEWLINE = 0x21B5  # ↵
_MARK_TAB = "\u21e5"  # ⇥
_MARK_SPACES = "\u2423"  # ␣, followed by the run's width in subscript digits
_SUBSCRIPT = str.maketrans("0123456789", "\u2080\u2081\u2082\u2083\u2084\u2085\u2086\u2087\u2088\u2089")
_LAYOUT_RE = re.compile("\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]|\t| {2,}")


def _mark(m: "re.Match[str]") -> str:
    s = m.group()
    if s == "\t":
        return _MARK_TAB
    if s[0] == " ":
        return _MARK_SPACES + str(len(s)).translate(_SUBSCRIPT)
    return chr(_MARK_NEWLINE)


def layout_marks(text: str) -> str:
    """The text as drawn: layout characters become compact marks inside the text flow.

    A line break (``\\n``, ``\\r\\n``, ``\\r`` and the other Unicode line/paragraph
    separators) becomes ``↵``, a tab ``⇥``, and a run of n >= 2 spaces ``␣`` followed by n
    in subscript digits (8 spaces of indentation: ``␣₈``); a single space stays a space.
    Nothing starts a new row, so a line break costs one cell instead of the rest of a row,
    and the structure stays readable (and learnable) from the image.

    >>> layout_marks("def f():\\n        return 1\\tx")
    'def f():↵␣₈return 1⇥x'
    """
    if not _LAYOUT_RE.search(text):
        return text
    return _LAYOUT_RE.sub(_mark, text)


def _drawn(text: str) -> str:
    text = layout_marks(text)
    if not unicodedata.is_normalized("NFC", text):
        # One cell per character: compose "e" + U+0301 into "é" where possible.
        text = unicodedata.normalize("NFC", text)
    return text


def unmark(text: str) -> str:
    """Marks back to plain whitespace (a space each): what an OCR engine that cannot read the
    marks should be compared with."""
    return re.sub(_MARK_SPACES + "[\u2080-\u2089]+|[\u21b5\u21e5]", " ", text)


# --------------------------------------------------------------------------- character classes

_NEWLINES = frozenset(map(ord, "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"))

# Per-slot flags used by the line breaker.
_BA = 1  # a line may break after this character
_BB = 2  # a line may break before this character
_NB = 4  # never break before (closing punctuation must not start a line)
_NA = 8  # never break after (opening punctuation must not end a line)
_SP = 16  # space: may hang past the line end

# Kinds of slots; a slot is one distinct code point's treatment.
_K_DROP, _K_NEWLINE, _K_BLANK, _K_TOFU, _K_GLYPH = range(5)

# Fixed cell ids shared by all slots of a kind.
_ID_BLANK = 0
_ID_TOFU1 = 1
_ID_TOFU2 = 2  # and 3: left/right half of a wide box
_ID_BLANK2 = 4  # and 5
_N_FIXED_IDS = 6

_HYPHENS = frozenset(map(ord, "-\u2010\u2012\u2013\u2014"))


class _Geometry:
    """Everything that depends on the font size: cells, grid, fonts, atlas."""

    def __init__(self, renderer: "Renderer", size: int) -> None:
        cfg = renderer.config
        self.size = size
        # BASIC layout: glyphs are drawn one at a time, so shaping buys nothing,
        # and it keeps pixels identical whether or not Pillow has libraqm
        # (raqm would also add a dotted circle to a lone combining mark).
        self.font_main = ImageFont.truetype(renderer.font_path, size, layout_engine=ImageFont.Layout.BASIC)
        self.cell_w = max(1, int(self.font_main.getlength("0") + 0.5))
        # A CJK character fills a 2-cell box; if that box were wider than the
        # line pitch, gaps between lines would be narrower than gaps between
        # characters and the page would read as vertical columns (rapidocr
        # does exactly that).  So the pitch is at least two cell widths.
        self.cell_h = max(1, int(size * cfg.line_spacing + 0.5), 2 * self.cell_w)
        self.cols = (cfg.width - 2 * cfg.margin) // self.cell_w
        self.rows = (cfg.height - 2 * cfg.margin) // self.cell_h
        # The CJK em box nearly fills the two-cell box (CJK at the Latin pixel
        # size would waste ~20% of its width), leaving >= 1 px (~8%) so adjacent
        # characters and lines do not touch: measured with rapidocr on eight
        # 1024-token Chinese chunks at 6x12 px cells, filling the box exactly
        # gave CER 4.1%, one pixel less 1.0%.
        box = min(2 * self.cell_w, self.cell_h)
        self.cjk_size = max(1, min(box - 1, int(0.92 * box + 0.5)))
        self.font_cjk = (
            ImageFont.truetype(renderer.cjk_path, self.cjk_size, layout_engine=ImageFont.Layout.BASIC)
            if renderer.cjk_path is not None
            else None
        )
        # Baselines are per font (not per glyph) so punctuation keeps its place
        # in the line: centre a reference ink box vertically in the cell.
        self.baseline_main = self._baseline(self.font_main, "Hdgjpqy")
        self.baseline_cjk = self._baseline(self.font_cjk, "国") if self.font_cjk is not None else 0
        # Glyphs are rasterised on first use at this size, not for every
        # character the renderer has ever seen.
        self.alpha = np.zeros((max(64, renderer._n_ids), self.cell_h, self.cell_w), np.uint8)
        self.plain = np.full_like(self.alpha, cfg.background)  # alpha through the plain style's LUT
        self.ready = np.zeros(len(self.alpha), bool)

    def _baseline(self, font, ref: str) -> float:
        left, top, right, bottom = font.getbbox(ref, anchor="ls")
        return (self.cell_h - (bottom - top)) / 2.0 - top


class Renderer:
    """Draws text with one :class:`RenderConfig`.  Use :meth:`get` for a cached instance.

    Glyph tables and atlases grow lazily as new characters and sizes are seen,
    so an instance is not meant to be used from several threads at once (give
    each thread its own ``Renderer(config)``); separate processes (data loader
    workers) are fine.
    """

    _cache: dict[RenderConfig, "Renderer"] = {}
    _cache_lock = threading.Lock()

    @classmethod
    def get(cls, config: RenderConfig | None = None) -> "Renderer":
        """The shared renderer for ``config`` (glyph atlases are built once per process)."""
        config = RENDER_PRESETS["default"] if config is None else config
        r = cls._cache.get(config)
        if r is None:
            with cls._cache_lock:
                r = cls._cache.get(config)
                if r is None:
                    r = cls._cache[config] = cls(config)
        return r

    def __init__(self, config: RenderConfig) -> None:
        if not isinstance(config, RenderConfig):
            raise TypeError(f"Renderer needs a RenderConfig, got {type(config).__name__}")
        self.config = config
        self.font_path = resolve_font(config.font, "font")
        self.cjk_path = resolve_font(config.cjk_font, "cjk_font") if config.cjk_font is not None else None
        self._cmap_main = _font_cmap(self.font_path)
        self._cmap_cjk = _font_cmap(self.cjk_path) if self.cjk_path is not None else frozenset()

        # Dense code point -> slot table (4.4 MB) so mapping a whole chunk is one
        # numpy gather instead of a per-character dict lookup.
        self._cp2slot = np.full(0x110000, -1, np.int32)
        self._slot_width = np.zeros(64, np.int64)
        self._slot_id = np.zeros(64, np.int32)
        self._slot_flags = np.zeros(64, np.uint8)
        self._slot_newline = np.zeros(64, bool)
        self._n_slots = 0
        self._id_info: list[tuple[int, str, int, int]] = []  # per id >= _N_FIXED_IDS: (font, char, ncells, half)
        self._n_ids = _N_FIXED_IDS
        self._geoms: dict[int, _Geometry] = {}

        colors = config.style_colors()
        self._style_index = {n: i for i, n in enumerate(config.style_names)}
        self._style_rgb = np.array([[_as_rgb(c) for c in colors[n]] for n in config.style_names], np.int32)
        self._style_colored = np.array(
            [any(isinstance(c, tuple) for c in colors[n]) for n in config.style_names], bool
        )
        a = np.arange(256, dtype=np.int32)
        fg, bg = self._style_rgb[:, 0, :], self._style_rgb[:, 1, :]  # (S, 3)
        # (S, 256, 3): colour of a pixel with glyph coverage a in style s.
        self._lut_rgb = (bg[:, None, :] * 255 + (fg - bg)[:, None, :] * a[None, :, None] + 127) // 255
        self._lut_rgb = self._lut_rgb.astype(np.uint8)
        luma = (self._lut_rgb.astype(np.int32) @ np.array([299, 587, 114]) + 500) // 1000
        self._lut_l = luma.astype(np.uint8)  # (S, 256)
        self._lut_plain = self._lut_l[0].copy()

        geo = self._geometry(config.min_font_size)
        if geo.cols < 2 or geo.rows < 1:
            raise ValueError(
                f"RenderConfig: at min_font_size={config.min_font_size} the {config.width}x{config.height} "
                f"image (margin {config.margin}) holds {geo.cols} columns x {geo.rows} rows; need at least 2x1 "
                "(lower min_font_size/margin or enlarge width/height)"
            )

    def __reduce__(self):
        # Fonts do not pickle; a copy (e.g. in a spawned data-loader worker) is rebuilt from the config.
        return (Renderer, (self.config,))

    # ------------------------------------------------------------------ public API
    def render(self, text: str | Span | Sequence[Span | str]) -> np.ndarray:
        """Text or spans -> uint8 array ``(height, width)``, or ``(height, width, 3)`` in colour.

        Raises ``ValueError`` if the text does not fit at ``min_font_size`` or a
        span names an unknown style.
        """
        chars, styles = self._prepare(text)
        geo, lines = self._choose(chars)
        return self._compose(geo, chars, styles, lines)

    def render_image(self, text: str | Span | Sequence[Span | str]) -> Image.Image:
        arr = self.render(text)
        return Image.fromarray(arr, "RGB" if arr.ndim == 3 else "L")

    def fits(self, text: str | Span | Sequence[Span | str]) -> bool:
        """Whether the text fits at ``min_font_size`` (i.e. :meth:`render` will not raise)."""
        chars, _ = self._prepare(text)
        return self._fits_at(chars, self.config.min_font_size) is not None

    def font_size_for(self, text: str | Span | Sequence[Span | str]) -> int:
        """The font size the shrink rule picks; ``ValueError`` if none fits."""
        chars, _ = self._prepare(text)
        return self._choose(chars)[0].size

    def grid(self, font_size: int) -> tuple[int, int, int, int]:
        """``(cell_w, cell_h, cols, rows)`` of the cell grid at ``font_size``."""
        g = self._geometry(font_size)
        return g.cell_w, g.cell_h, g.cols, g.rows

    # ------------------------------------------------------------------ text -> slots
    def _prepare(self, text) -> tuple["_Chars", np.ndarray | None]:
        cfg = self.config
        if isinstance(text, str):
            parts = [(text, 0)]
            styled = False
        else:
            if isinstance(text, Span):
                text = [text]
            parts = []
            for item in text:
                if isinstance(item, str):
                    parts.append((item, 0))
                elif isinstance(item, Span):
                    sid = self._style_index.get(item.style)
                    if sid is None:
                        raise ValueError(
                            f"unknown style {item.style!r}; RenderConfig.styles defines {list(self._style_index)}"
                        )
                    parts.append((item.text, sid))
                else:
                    raise TypeError(f"render() takes str, Span or a sequence of them, got {type(item).__name__}")
            styled = any(s for _, s in parts)
        # The spans are drawn as their joined text would be (marks and NFC over the whole text), so a
        # style never changes the layout: a styled chunk fits exactly when its plain text fits.
        full = _drawn("".join(t for t, _ in parts))
        if styled:
            norm, done, raw = [], 0, ""
            for t, s in parts:
                raw += t
                end = max(done, min(len(full), len(_drawn(raw))))  # where this span's text ends when drawn
                norm.append((full[done:end], s))
                done = end
            if done < len(full):
                norm[-1] = (norm[-1][0] + full[done:], norm[-1][1])
        cps = np.frombuffer(full.encode("utf-32-le", "surrogatepass"), np.uint32)
        slots = self._cp2slot[cps]
        if len(slots) and slots.min() < 0:
            for cp in np.unique(cps[slots < 0]).tolist():
                self._register(cp)
            slots = self._cp2slot[cps]
        styles = None
        if styled:
            styles = np.repeat(
                np.array([s for _, s in norm], np.int32), np.array([len(t) for t, _ in norm], np.int64)
            )
        return _Chars(self, slots), styles

    def _register(self, cp: int) -> None:
        ch = chr(cp)
        cat = unicodedata.category(ch)
        # Python reports unassigned code points as Fullwidth; draw those as a narrow box.
        wide = 2 if cat != "Cn" and unicodedata.east_asian_width(ch) in ("W", "F") else 1
        flags = 0
        if cp in _NEWLINES:
            kind, width = _K_NEWLINE, 0
        elif cat == "Cc" or cat == "Cf" or 0xFE00 <= cp <= 0xFE0F or 0xE0100 <= cp <= 0xE01EF:
            kind, width = _K_DROP, 0
        elif cat == "Zs":
            kind, width = _K_BLANK, wide
            flags |= _BA | _SP
        elif cat != "Cs" and cp in self._cmap_main:
            kind, width, font = _K_GLYPH, wide, 0
        elif cat != "Cs" and cp in self._cmap_cjk:
            kind, width, font = _K_GLYPH, wide, 1
        else:
            kind, width = _K_TOFU, wide
        if cp == _MARK_NEWLINE:
            flags |= _BA  # a line break mark ends a line of text: wrapping prefers to break after it
        if kind in (_K_GLYPH, _K_TOFU):
            closing = cat in ("Pe", "Pf", "Po")
            opening = cat in ("Ps", "Pi")
            if closing:
                flags |= _NB
            if opening:
                flags |= _NA
            if cp in _HYPHENS:
                flags |= _BA
            if wide == 2:
                # CJK has no spaces: any boundary between wide characters may
                # break, except next to punctuation that must stick to its word.
                if not opening:
                    flags |= _BA
                if not closing:
                    flags |= _BB
        if kind == _K_GLYPH:
            first = self._n_ids
            for half in range(width):
                self._id_info.append((font, ch, width, half))
            self._n_ids += width
        elif kind == _K_TOFU:
            first = _ID_TOFU1 if width == 1 else _ID_TOFU2
        elif kind == _K_BLANK:
            first = _ID_BLANK if width == 1 else _ID_BLANK2
        else:
            first = _ID_BLANK
        i = self._n_slots
        if i == len(self._slot_width):
            n = 2 * i
            self._slot_width = _grow(self._slot_width, n)
            self._slot_id = _grow(self._slot_id, n)
            self._slot_flags = _grow(self._slot_flags, n)
            self._slot_newline = _grow(self._slot_newline, n)
        self._slot_width[i] = width
        self._slot_id[i] = first
        self._slot_flags[i] = flags
        self._slot_newline[i] = kind == _K_NEWLINE
        self._n_slots = i + 1
        self._cp2slot[cp] = i

    # ------------------------------------------------------------------ geometry / atlas
    def _geometry(self, size: int) -> _Geometry:
        g = self._geoms.get(size)
        if g is None:
            g = self._geoms[size] = _Geometry(self, size)
        return g

    def _ensure_glyphs(self, g: _Geometry, ids: np.ndarray) -> None:
        if self._n_ids > len(g.alpha):
            cap = max(self._n_ids, 2 * len(g.alpha))
            g.alpha = _grow(g.alpha, cap)
            g.plain = _grow(g.plain, cap, self.config.background)
            g.ready = _grow(g.ready, cap)
        if not g.ready[0]:
            self._draw_tofu(g, _ID_TOFU1, 1)
            self._draw_tofu(g, _ID_TOFU2, 2)
            g.plain[:_N_FIXED_IDS] = self._lut_plain[g.alpha[:_N_FIXED_IDS]]
            g.ready[:_N_FIXED_IDS] = True
        missing = ids[~g.ready[ids]]
        if not len(missing):
            return
        for i in np.unique(missing).tolist():
            if g.ready[i]:
                continue  # the other half of a wide glyph drawn just before
            font, ch, ncells, half = self._id_info[i - _N_FIXED_IDS]
            first = i - half
            bmp = self._draw_glyph(g, font, ch, ncells)
            for h in range(ncells):
                g.alpha[first + h] = bmp[:, h * g.cell_w : (h + 1) * g.cell_w]
            sl = slice(first, first + ncells)
            g.plain[sl] = self._lut_plain[g.alpha[sl]]
            g.ready[sl] = True

    def _draw_tofu(self, g: _Geometry, first: int, ncells: int) -> None:
        w, h = ncells * g.cell_w, g.cell_h
        img = Image.new("L", (w, h), 0)
        inset_x = 1 if w >= 4 else 0
        inset_y = max(0, int(round(h * 0.12)))
        ImageDraw.Draw(img).rectangle(
            (inset_x, inset_y, w - 1 - inset_x, h - 1 - inset_y), outline=255, width=1
        )
        a = np.asarray(img)
        for k in range(ncells):
            g.alpha[first + k] = a[:, k * g.cell_w : (k + 1) * g.cell_w]

    def _draw_glyph(self, g: _Geometry, font_idx: int, ch: str, ncells: int) -> np.ndarray:
        font = g.font_main if font_idx == 0 else g.font_cjk
        base = g.baseline_main if font_idx == 0 else g.baseline_cjk
        span, h = ncells * g.cell_w, g.cell_h
        pad = 2 * h + 4
        img = Image.new("L", (span + 2 * pad, h), 0)
        x0 = pad + (span - font.getlength(ch)) / 2.0
        ImageDraw.Draw(img).text((x0, base), ch, font=font, fill=255, anchor="ls")
        a = np.asarray(img)
        ink = np.flatnonzero(a.max(axis=0))
        if len(ink) == 0:
            return np.ascontiguousarray(a[:, pad : pad + span])
        left, right = int(ink[0]), int(ink[-1]) + 1
        if right - left <= span:
            # Keep the advance-centred position unless ink spills out of the
            # cell (zero-advance marks, wide italics); then slide it back in.
            start = pad
            if left < start:
                start = left
            elif right > start + span:
                start = right - span
            return np.ascontiguousarray(a[:, start : start + span])
        # Ink wider than its cells (e.g. "W" in a proportional main font): squeeze.
        squeezed = img.crop((left, 0, right, h)).resize((span, h), Image.LANCZOS)
        return np.asarray(squeezed)

    # ------------------------------------------------------------------ layout
    def _fits_at(self, chars: "_Chars", size: int):
        g = self._geometry(size)
        if not chars.may_fit(g.cols, g.rows):
            return None
        lines = chars.wrap(g.cols, g.rows)
        return lines

    def _choose(self, chars: "_Chars"):
        cfg = self.config
        # Sizes that pass the cheap area/paragraph test, largest first.  Most
        # chunks fit at the first candidate, so usually one wrap is enough.
        cands = []
        for size in range(cfg.font_size, cfg.min_font_size - 1, -1):
            g = self._geometry(size)
            if chars.may_fit(g.cols, g.rows):
                cands.append(size)
        if not cands:
            raise self._overflow_error(chars)
        for i in range(min(2, len(cands))):
            got = self._fits_at(chars, cands[i])
            if got is not None:
                return self._geometry(cands[i]), got
        best = self._fits_at(chars, cands[-1]) if len(cands) > 2 else None
        if best is None:
            raise self._overflow_error(chars)
        # Bisection over candidate indices; invariant: cands[lo] fits, cands[hi] does not.
        hi, lo = 1, len(cands) - 1
        while lo - hi > 1:
            mid = (hi + lo) // 2
            got = self._fits_at(chars, cands[mid])
            if got is None:
                hi = mid
            else:
                lo, best = mid, got
        return self._geometry(cands[lo]), best

    def _overflow_error(self, chars: "_Chars") -> ValueError:
        cfg = self.config
        g = self._geometry(cfg.min_font_size)
        lines = chars.wrap(g.cols, None)
        over = lines[g.rows :]
        n_chars = int(sum(chars.count_visible(s, e) for s, e in over))
        return ValueError(
            f"text does not fit a {cfg.width}x{cfg.height} image even at min_font_size={cfg.min_font_size} "
            f"({g.cols} columns x {g.rows} rows of {g.cell_w}x{g.cell_h} px cells): it needs {len(lines)} lines, "
            f"so {len(over)} line(s) holding {n_chars} character(s) did not fit. Render less text per image, "
            "or change RenderConfig: larger width/height, smaller min_font_size, line_spacing or margin."
        )

    # ------------------------------------------------------------------ compose
    def _compose(self, g: _Geometry, chars: "_Chars", styles: np.ndarray | None, lines) -> np.ndarray:
        cfg = self.config
        rows, cols = g.rows, g.cols
        ids = np.zeros((rows, cols), np.intp)
        sgrid = None
        colour = cfg.mode == "RGB"
        if len(lines):
            line_idx, col, pos = chars.place(lines, cols)
            first = self._slot_id[chars.slots[pos]]
            wide = chars.width[pos] == 2
            ids[line_idx, col] = first
            ids[line_idx[wide], col[wide] + 1] = first[wide] + 1
            if styles is not None:
                used = np.unique(styles)
                if cfg.mode == "auto" and self._style_colored[used].any():
                    colour = True
                tail = chars.tail_styles(lines, styles)
                sgrid = np.zeros((rows, cols), np.int32)
                sgrid[: len(lines)] = tail[:, None]
                st = styles[pos]
                sgrid[line_idx, col] = st
                sgrid[line_idx[wide], col[wide] + 1] = st[wide]
                if not sgrid.any():
                    sgrid = None
        self._ensure_glyphs(g, ids)
        H, W, m = cfg.height, cfg.width, cfg.margin
        gh, gw = rows * g.cell_h, cols * g.cell_w
        if sgrid is None:
            # The one gather that draws every glyph: (rows, cols, cell_h, cell_w).
            # np.take is ~4x faster than atlas[ids] here.
            cells = np.take(g.plain, ids, axis=0)
            canvas = np.full((H, W), cfg.background, np.uint8)
            canvas[m : m + gh, m : m + gw].reshape(rows, g.cell_h, cols, g.cell_w)[...] = cells.transpose(0, 2, 1, 3)
            if colour:
                canvas = np.repeat(canvas[:, :, None], 3, axis=2)
            return canvas
        alpha = np.take(g.alpha, ids, axis=0)
        sg = sgrid[:, :, None, None]
        if colour:
            cells = self._lut_rgb[sg, alpha]  # (rows, cols, ch, cw, 3)
            canvas = np.empty((H, W, 3), np.uint8)
            canvas[...] = cfg.background
            canvas[m : m + gh, m : m + gw].reshape(rows, g.cell_h, cols, g.cell_w, 3)[...] = cells.transpose(
                0, 2, 1, 3, 4
            )
        else:
            cells = self._lut_l[sg, alpha]
            canvas = np.full((H, W), cfg.background, np.uint8)
            canvas[m : m + gh, m : m + gw].reshape(rows, g.cell_h, cols, g.cell_w)[...] = cells.transpose(0, 2, 1, 3)
        return canvas


class LineFit:
    """Does the text so far still fit the image at ``min_font_size``?  Answered incrementally.

    Text arrives in pieces (a token's characters at a time).  Only the lines that are not
    final yet are re-wrapped on each :meth:`try_append`: greedy wrapping restarts at a line
    start, so lines that ended before a *safe* start (a letter that no later text can merge
    with: not a space run, a line break or a combining sequence) are counted and forgotten.
    The answer is exactly ``renderer.fits(everything appended)``; the cost per piece is one
    wrap of the last line or two.

    >>> fit = LineFit(Renderer.get(RENDER_PRESETS["tiny"]))
    >>> fit.try_append("hello "), fit.try_append("x" * 10_000)
    (True, False)
    """

    __slots__ = ("renderer", "cols", "rows", "done", "cur", "room")

    def __init__(self, renderer: "Renderer") -> None:
        g = renderer._geometry(renderer.config.min_font_size)
        self.renderer, self.cols, self.rows = renderer, g.cols, g.rows
        self.done = 0  # final lines already counted
        self.cur = ""  # the raw text of the lines that are not final yet
        self.room = self.cols  # free cells at the end of the last line

    def try_append(self, text: str) -> bool:
        """Append ``text`` if everything still fits (True); else change nothing (False)."""
        if not text:
            return True
        # Fast path: plain ASCII (one cell a character, no marks, nothing to compose) that fits the
        # rest of the last line adds no line: greedy wrapping never revisits earlier lines.
        if (len(text) <= self.room and text.isascii() and text.isprintable() and "  " not in text
                and not (text[0] == " " and self.cur.endswith(" "))):
            self.cur += text
            self.room -= len(text)
            return True
        cand = self.cur + text
        chars, _ = self.renderer._prepare(cand)
        lines = chars.wrap(self.cols, self.rows - self.done)
        if lines is None:
            return False
        self.cur = cand
        s, e = lines[-1]
        self.room = self.cols - int(chars.cum[e] - chars.cum[s])
        if len(lines) > 2 and unicodedata.is_normalized("NFC", cand):
            drawn = layout_marks(cand)
            for i in range(len(lines) - 1, 0, -1):
                b = lines[i][0]
                if b < len(drawn) and drawn[b].isalpha() and unicodedata.combining(drawn[b]) == 0 and (
                    unicodedata.is_normalized("NFC", drawn[b - 1 : b + 1])
                ):
                    self.done += i
                    self.cur = cand[_raw_index(cand, b) :]
                    break
        return True


def _raw_index(raw: str, drawn_index: int) -> int:
    """The index in ``raw`` of the character drawn at ``drawn_index`` of ``layout_marks(raw)``
    (which must not fall inside a mark)."""
    shift = 0  # drawn length - raw length so far
    for m in _LAYOUT_RE.finditer(raw):
        start_drawn = m.start() + shift
        if start_drawn >= drawn_index:
            break
        shift += len(_mark(m)) - len(m.group())
    return drawn_index - shift


class _Chars:
    """One text as slot arrays, with the line breaker."""

    __slots__ = ("slots", "width", "cum", "n", "_nl", "_opp", "_space", "_cum_list", "_hard_cells")

    def __init__(self, r: Renderer, slots: np.ndarray) -> None:
        self.slots = slots
        self.n = n = len(slots)
        self.width = r._slot_width[slots]
        cum = np.zeros(n + 1, np.int64)
        np.cumsum(self.width, out=cum[1:])
        self.cum = cum
        self._nl = np.flatnonzero(r._slot_newline[slots])
        flags = r._slot_flags[slots]
        self._space = (flags & _SP) != 0
        # Spaces can vanish at line ends, so only non-space cells bound the area.
        self._hard_cells = int(self.width[~self._space].sum())
        if n > 1:
            a, b = flags[:-1], flags[1:]
            ok = (((a & _BA) != 0) | ((b & _BB) != 0)) & ((a & _NA) == 0) & ((b & _NB) == 0)
            self._opp = (np.flatnonzero(ok) + 1).tolist()
        else:
            self._opp = []
        self._cum_list = None

    def may_fit(self, cols: int, rows: int) -> bool:
        # Cheap necessary conditions that skip the line loop for hopeless sizes.
        return len(self._nl) + 1 <= rows and self._hard_cells <= cols * rows

    def wrap(self, cols: int, max_rows: int | None):
        """Greedy line breaking -> list of (start, end) char ranges, or None if > max_rows lines."""
        if self._cum_list is None:
            self._cum_list = self.cum.tolist()
        cum, opp, space = self._cum_list, self._opp, self._space
        n = self.n
        lines: list[tuple[int, int]] = []
        ends = self._nl.tolist() + [n]
        ps = 0
        limit = max_rows if max_rows is not None else n + len(ends) + 1
        for pe in ends:
            s = ps
            while True:
                if cum[pe] - cum[s] <= cols:
                    lines.append((s, pe))
                    break
                # Last e with cum[e] <= cum[s] + cols: chars s..e-1 fit.
                e = bisect.bisect_right(cum, cum[s] + cols, s, pe + 1) - 1
                if space[e]:
                    b = e + 1  # the space that overflows is the break itself
                    if b == pe:  # ... and nothing follows it: no empty line after (keeps prefixes monotone)
                        lines.append((s, b))
                        break
                else:
                    k = bisect.bisect_right(opp, e) - 1
                    b = opp[k] if k >= 0 and opp[k] > s else e
                    if b <= s:
                        b = s + 1
                lines.append((s, b))
                s = b
                if len(lines) > limit:
                    return None
            if len(lines) > limit:
                return None
            ps = pe + 1
        return lines

    def place(self, lines, cols: int):
        """Line index, column and char position of every drawn character."""
        starts = np.fromiter((s for s, _ in lines), np.int64, len(lines))
        ends = np.fromiter((e for _, e in lines), np.int64, len(lines))
        lens = ends - starts
        pos = np.arange(self.n)
        if len(self._nl):
            keep = np.ones(self.n, bool)
            keep[self._nl] = False
            pos = pos[keep]
        line_idx = np.repeat(np.arange(len(lines)), lens)
        col = self.cum[pos] - self.cum[starts][line_idx]
        w = self.width[pos]
        ok = (w > 0) & (col + w <= cols)
        return line_idx[ok], col[ok], pos[ok]

    def tail_styles(self, lines, styles: np.ndarray) -> np.ndarray:
        """Style filling the empty end of each line: the style that continues past it."""
        out = np.zeros(len(lines), np.int32)
        n = self.n
        for i, (s, e) in enumerate(lines):
            if e < n and (e == s or styles[e - 1] == styles[e]):
                out[i] = styles[e]
        return out

    def count_visible(self, s: int, e: int) -> int:
        return int(np.count_nonzero(self.width[s:e]))


def _grow(a: np.ndarray, n: int, fill: int = 0) -> np.ndarray:
    out = np.full((n,) + a.shape[1:], fill, a.dtype)
    out[: len(a)] = a
    return out


def _as_rgb(c: Color) -> tuple[int, int, int]:
    return (c, c, c) if isinstance(c, int) else c


def render_text(text: str | Sequence[Span], config: RenderConfig | None = None) -> Image.Image:
    """Render with the shared :class:`Renderer` for ``config`` (default preset if None)."""
    return Renderer.get(config).render_image(text)
