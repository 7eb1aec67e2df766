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

Modules
-------
``config`` (``RenderConfig``, presets), ``fonts`` (font files and their code
points), ``spans`` (styled text, chat messages), ``marks`` (layout marks),
``chars`` (each character's cells and break flags), ``lines`` (line breaking),
``atlas`` (cell grid and glyph atlas per font size), ``renderer``
(``Renderer``: pick the size, then draw), ``fit`` (``LineFit``).
"""

from .config import DEFAULT_STYLES, RENDER_PRESETS, Color, RenderConfig
from .fonts import resolve_font
from .fit import LineFit
from .marks import layout_marks, unmark
from .renderer import Renderer, render_text
from .spans import Span, chat_spans

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
    "Color",
]
