"""Does text still fit the image?  Answered per piece as text arrives, in a few microseconds.

The fit rule (a chunk closes before the token that would not fit its image) asks this once per token.

    >>> from vist2.render import RENDER_PRESETS, LineFit, Renderer
    >>> fit = LineFit(Renderer.get(RENDER_PRESETS["tiny"]))
    >>> fit.try_append("hello "), fit.try_append("x" * 10_000), fit.try_append("world")
    (True, False, True)
"""

from __future__ import annotations

import unicodedata

import numpy as np

from .chars import BREAK_AFTER, BREAK_BEFORE, NO_BREAK_AFTER, NO_BREAK_BEFORE, SPACE
from .marks import drawn_text
from .renderer import Renderer

# _OPP[(a << 5) | b]: may a line start between a character with flags a and one with flags b
# (the pair rule of ``Chars.__init__``; flags fit in 5 bits).
_OPP = [bool(((a & BREAK_AFTER) or (b & BREAK_BEFORE)) and not ((a & NO_BREAK_AFTER) or (b & NO_BREAK_BEFORE)))
        for a in range(32) for b in range(32)]
_MAX_PIECES = 200_000  # bound on a renderer's cache of pieces already measured


class _Tables:
    """Per renderer: each character's (cells, flags), whether text can be split before it, and the
    measure of every piece of text seen (its drawn characters' cells and flags)."""

    __slots__ = ("table", "chars", "safe", "pieces")

    def __init__(self, renderer: Renderer) -> None:
        self.table = renderer._table
        self.chars: dict[str, tuple[int, int]] = {}
        self.safe: dict[str, bool] = {}
        self.pieces: dict[str, tuple] = {}

    def char(self, ch: str) -> tuple[int, int]:
        got = self.chars.get(ch)
        if got is None:
            t = self.table
            slot = int(t.lookup(np.array([ord(ch)], np.uint32))[0])
            # drawn text never holds a line break slot (they all become the ↵ mark)
            assert not t.newline[slot], ch
            got = self.chars[ch] = (int(t.width[slot]), int(t.flags[slot]))
        return got

    def piece(self, raw: str) -> tuple:
        """``(widths, flags, cells, last)`` of ``drawn_text(raw)``; ``last`` is the last index j >= 1
        at which a line may start inside the piece (0: none)."""
        got = self.pieces.get(raw)
        if got is None:
            ws, fs, last = [], [], 0
            for j, ch in enumerate(drawn_text(raw)):
                w, f = self.char(ch)
                if j and _OPP[(fs[-1] << 5) | f]:
                    last = j
                ws.append(w)
                fs.append(f)
            if len(self.pieces) >= _MAX_PIECES:
                self.pieces.clear()
            got = self.pieces[raw] = (ws, fs, sum(ws), last)
        return got

    def splits_before(self, prev: str, ch: str) -> bool:
        """Whether ``drawn_text(a + b) == drawn_text(a) + drawn_text(b)`` for every ``a`` ending in
        ``prev`` and ``b`` starting with ``ch``: no layout mark spans the seam (a space run, ``\\r\\n``)
        and NFC cannot join across it (``ch`` is a starter that no character composes with)."""
        if ch == " ":
            return prev != " "
        if ch == "\n":
            return prev != "\r"
        got = self.safe.get(ch)
        if got is None:
            got = self.safe[ch] = _nfc_boundary(ch)
        return got


def _nfc_boundary(ch: str) -> bool:
    # NFC(a + b) == NFC(a) + NFC(b) when b starts with a character that NFC leaves alone, of combining
    # class 0, whose decomposition starts with a character nothing composes with (Unicode's
    # "boundary before" for NFC).
    if unicodedata.combining(ch) or unicodedata.normalize("NFC", ch) != ch:
        return False
    first = unicodedata.normalize("NFD", ch)[0]
    return not unicodedata.combining(first) and ord(first) not in _composes_back()


_BACK: set[int] | None = None


def _composes_back() -> set[int]:
    """Code points that compose with a character before them: the second character of every
    two-character canonical decomposition, and the Hangul medial vowels and final consonants."""
    global _BACK
    if _BACK is None:
        back = set(range(0x1161, 0x1176)) | set(range(0x11A8, 0x11C3))
        for cp in range(0x2FA20):
            d = unicodedata.decomposition(chr(cp))
            if d and d[0] != "<":
                parts = d.split()
                if len(parts) == 2:
                    back.add(int(parts[1], 16))
        _BACK = back
    return _BACK


class LineFit:
    """Does the text so far still fit the image at ``min_font_size``?  Answered incrementally.

    Text arrives in pieces (a token's characters at a time).  Greedy wrapping is a stream: a line
    closes at the first character that overflows it, at the last break opportunity before that
    character, and never changes afterwards.  So the state is the number of closed lines and the
    open line's start, width and last break opportunity; each drawn character costs a table lookup,
    and a piece that fits the rest of the open line (most tokens) costs one cached measure.  Only the
    last piece can still change how it is drawn (a space run grows, ``\\r`` meets ``\\n``, a combining
    mark composes with the character before it): when the next piece starts with such a character,
    the last piece is fed again with it.  The answer is exactly ``renderer.fits(everything appended)``.

    >>> from vist2.render import RENDER_PRESETS, Renderer
    >>> fit = LineFit(Renderer.get(RENDER_PRESETS["tiny"]))
    >>> fit.try_append("hello "), fit.try_append("x" * 10_000)
    (True, False)
    """

    __slots__ = ("cols", "rows", "by_char", "_t", "_w", "_f", "_state", "_base", "_tail")

    def __init__(self, renderer: Renderer) -> None:
        _, _, self.cols, self.rows = renderer.grid(renderer.config.min_font_size)
        self.by_char = renderer.config.wrap == "char"
        t = renderer._fit_tables
        if t is None:
            t = renderer._fit_tables = _Tables(renderer)
        self._t = t
        self._w: list[int] = []  # cells of every drawn character so far
        self._f: list[int] = []  # its line-break flags
        # (line start, cells in the open line, last break opportunity in it or -1, closed lines,
        #  whether the open line started after a space that hung past the previous line's end)
        self._state = (0, 0, -1, 0, False)
        self._base = (0, self._state)  # (characters, state) before the last piece
        self._tail = ""  # the last piece (raw), from a point where text can be split

    @property
    def lines(self) -> int:
        """How many lines the text so far wraps into at ``min_font_size``."""
        s, _, _, done, hang = self._state
        return done + (0 if hang and len(self._w) == s else 1)

    def try_append(self, text: str) -> bool:
        """Append ``text`` if everything still fits (True); else change nothing (False)."""
        if not text:
            return True
        tables, w, f, tail = self._t, self._w, self._f, self._tail
        saved = (self._state, self._base, tail)
        cut = None
        if tail and tables.splits_before(tail[-1], text[0]):
            self._base = (len(w), self._state)
            raw = text
        else:  # the last piece's drawing may change: feed it again, with this text
            n0, self._state = self._base
            cut = (n0, w[n0:], f[n0:])
            del w[n0:], f[n0:]
            raw = tail + text
        ws, fs, cells, last = tables.piece(raw)
        n = len(w)
        s, used, opp, done, hang = self._state
        if used + cells <= self.cols and done < self.rows:
            # fits the rest of the open line: no line closes
            if last:
                opp = n + last
            elif n > s and _OPP[(f[-1] << 5) | fs[0]]:
                opp = n
            w += ws
            f += fs
            self._state = (s, used + cells, opp, done, hang)
        else:
            w += ws
            f += fs
            self._run(n)
        if self.lines <= self.rows:
            self._tail = raw
            return True
        self._state, self._base, self._tail = saved
        del w[n:], f[n:]
        if cut is not None:
            w[cut[0]:] = cut[1]
            f[cut[0]:] = cut[2]
        return False

    def _run(self, j: int) -> None:
        """Wrap the drawn characters from index ``j`` on into the open line, closing lines as they fill."""
        w, f, cols, rows = self._w, self._f, self.cols, self.rows
        n = len(w)
        s, used, opp, done, hang = self._state
        if self.by_char:  # every line full: a character that does not fit starts the next one
            while j < n:
                wj = w[j]
                if used + wj <= cols:
                    used += wj
                else:
                    done, used, s = done + 1, wj, j
                j += 1
            self._state = (s, used, opp, done, hang)
            return
        while j < n and done <= rows:
            wj, fj = w[j], f[j]
            if j > s and _OPP[(f[j - 1] << 5) | fj]:
                opp = j
            if used + wj <= cols:
                used += wj
                j += 1
            elif fj & SPACE:  # the space that overflows is the break itself: it hangs past the end
                done, s, used, opp, hang = done + 1, j + 1, 0, -1, True
                j += 1
            else:  # break at the last opportunity, or before this character; wrap the rest again
                b = opp if opp > s else j
                if b <= s:
                    b = s + 1
                done, s, used, opp, hang = done + 1, b, 0, -1, False
                j = b
        self._state = (s, used, opp, done, hang)
