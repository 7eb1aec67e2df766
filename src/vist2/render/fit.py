"""Does text still fit the image?  Answered per piece as text arrives, without re-wrapping all of it.

The fit rule (a chunk closes before the token that would not fit its image) asks this once per token.

    >>> from vist2.render import RENDER_PRESETS, LineFit, Renderer
    >>> fit = LineFit(Renderer.get(RENDER_PRESETS["tiny"]))
    >>> fit.try_append("hello "), fit.try_append("x" * 10_000), fit.try_append("world")
    (True, False, True)
"""

from __future__ import annotations

import unicodedata

from .marks import layout_marks, raw_index
from .renderer import Renderer


class LineFit:
    """Does the text so far still fit the image at ``min_font_size``?  Answered incrementally.

    Text arrives in pieces (a token's characters at a time).  Only the lines that are not
    final yet are re-wrapped on each :meth:`try_append`: greedy wrapping restarts at a line
    start, so lines that ended before a *safe* start (a letter that no later text can merge
    with: not a space run, a line break or a combining sequence) are counted and forgotten.
    The answer is exactly ``renderer.fits(everything appended)``; the cost per piece is one
    wrap of the last line or two.

    >>> from vist2.render import RENDER_PRESETS, Renderer
    >>> fit = LineFit(Renderer.get(RENDER_PRESETS["tiny"]))
    >>> fit.try_append("hello "), fit.try_append("x" * 10_000)
    (True, False)
    """

    __slots__ = ("renderer", "cols", "rows", "done", "cur", "room")

    def __init__(self, renderer: "Renderer") -> None:
        _, _, cols, rows = renderer.grid(renderer.config.min_font_size)
        self.renderer, self.cols, self.rows = renderer, cols, rows
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
                    self.cur = cand[raw_index(cand, b) :]
                    break
        return True
