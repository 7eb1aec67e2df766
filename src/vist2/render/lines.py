"""Line breaking on the cell grid: where each line of a text ends.

Long lines wrap greedily at the last break opportunity that fits: after spaces and hyphens, and
between wide (CJK) characters, but never before closing punctuation nor after opening punctuation
(flags from :mod:`vist2.render.chars`).  A word longer than a line is broken between characters;
a space that falls just past the end of a line is not drawn (it is the line break).

    >>> from vist2.render import RENDER_PRESETS, Renderer
    >>> chars, _ = Renderer.get(RENDER_PRESETS["tiny"])._prepare("aaaa bbbb cc")
    >>> chars.wrap(cols=6, max_rows=None)          # (start, end) of each line; the space ends a line
    [(0, 5), (5, 10), (10, 12)]
"""

from __future__ import annotations

import bisect

import numpy as np

from .chars import BREAK_AFTER, BREAK_BEFORE, NO_BREAK_AFTER, NO_BREAK_BEFORE, SPACE, SlotTable


class Chars:
    """One text as slot arrays, with the line breaker."""

    __slots__ = ("slots", "width", "cum", "n", "_nl", "_opp", "_space", "_cum_list", "_hard_cells", "by_char")

    def __init__(self, table: SlotTable, slots: np.ndarray, by_char: bool = False) -> None:
        self.slots = slots
        self.by_char = by_char  # RenderConfig.wrap == "char": fill every line, break anywhere
        self.n = n = len(slots)
        self.width = table.width[slots]
        cum = np.zeros(n + 1, np.int64)
        np.cumsum(self.width, out=cum[1:])
        self.cum = cum
        self._nl = np.flatnonzero(table.newline[slots])
        flags = table.flags[slots]
        self._space = (flags & SPACE) != 0
        # Spaces can vanish at line ends, so only non-space cells bound the area.
        self._hard_cells = int(self.width.sum() if by_char else self.width[~self._space].sum())
        if n > 1:
            a, b = flags[:-1], flags[1:]
            may = ((a & BREAK_AFTER) != 0) | ((b & BREAK_BEFORE) != 0)
            never = ((a & NO_BREAK_AFTER) != 0) | ((b & NO_BREAK_BEFORE) != 0)
            self._opp = (np.flatnonzero(may & ~never) + 1).tolist()  # i: a line may start at char i
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
        if self.by_char:
            return self._wrap_by_char(cols, max_rows)
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

    def _wrap_by_char(self, cols: int, max_rows: int | None):
        """Every line full: a line ends where the next character no longer fits (a two-cell
        character that would straddle the edge starts the next line), spaces included, so on
        one-cell text character i sits in row i // cols, column i % cols."""
        cum, n = self._cum_list, self.n
        limit = max_rows if max_rows is not None else n + 1
        lines: list[tuple[int, int]] = []
        s = 0
        while s < n or not lines:
            e = max(bisect.bisect_right(cum, cum[s] + cols, s, n + 1) - 1, min(s + 1, n))
            lines.append((s, e))
            if len(lines) > limit:
                return None
            s = e
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
