"""Character classes: how each distinct code point is laid out (cells, line-break flags) and drawn.

A *slot* is one code point's treatment: dropped (controls, invisible format characters),
a line break, a blank, a glyph from the main or the CJK font, or an empty box ("tofu") when
neither font has it.  Characters whose East Asian width is Wide/Fullwidth take two cells.

    >>> from vist2.render.chars import BREAK_AFTER, K_GLYPH, K_TOFU, classify
    >>> classify(ord("A"), {ord("A")}, set())                  # (kind, cells, font, flags)
    (4, 1, 0, 0)
    >>> classify(ord("中"), set(), {ord("中")})[:3] == (K_GLYPH, 2, 1)
    True
    >>> classify(ord("-"), set(), set())[0] == K_TOFU, bool(classify(ord("-"), set(), set())[3] & BREAK_AFTER)
    (True, True)
"""

from __future__ import annotations

import unicodedata
from collections.abc import Container

import numpy as np

from .marks import LINE_BREAKS, MARK_NEWLINE

_NEWLINES = frozenset(map(ord, LINE_BREAKS))
_HYPHENS = frozenset(map(ord, "-\u2010\u2012\u2013\u2014"))

# Per-slot flags used by the line breaker.
BREAK_AFTER = 1  # a line may break after this character
BREAK_BEFORE = 2  # a line may break before this character
NO_BREAK_BEFORE = 4  # closing punctuation must not start a line
NO_BREAK_AFTER = 8  # opening punctuation must not end a line
SPACE = 16  # may hang past the line end

# Kinds of slots.
K_DROP, K_NEWLINE, K_BLANK, K_TOFU, K_GLYPH = range(5)

# Fixed cell ids shared by all slots of a kind.
ID_BLANK = 0
ID_TOFU1 = 1
ID_TOFU2 = 2  # and 3: left/right half of a wide box
ID_BLANK2 = 4  # and 5
N_FIXED_IDS = 6


def classify(cp: int, cmap_main: Container[int], cmap_cjk: Container[int]) -> tuple[int, int, int, int]:
    """``(kind, cells, font, flags)`` of a code point; ``font`` is 0 (main) or 1 (CJK) for a glyph."""
    ch = chr(cp)
    cat = unicodedata.category(ch)
    # Python reports unassigned code points as Fullwidth; draw those as a narrow box.
    wide = 2 if cat != "Cn" and unicodedata.east_asian_width(ch) in ("W", "F") else 1
    font = 0
    if cp in _NEWLINES:
        kind, width = K_NEWLINE, 0
    elif cat == "Cc" or cat == "Cf" or 0xFE00 <= cp <= 0xFE0F or 0xE0100 <= cp <= 0xE01EF:
        kind, width = K_DROP, 0
    elif cat == "Zs":
        kind, width = K_BLANK, wide
    elif cat != "Cs" and cp in cmap_main:
        kind, width = K_GLYPH, wide
    elif cat != "Cs" and cp in cmap_cjk:
        kind, width, font = K_GLYPH, wide, 1
    else:
        kind, width = K_TOFU, wide
    return kind, width, font, _break_flags(cp, cat, kind, wide)


def _break_flags(cp: int, cat: str, kind: int, wide: int) -> int:
    flags = 0
    if kind == K_BLANK:
        flags |= BREAK_AFTER | SPACE
    if cp == MARK_NEWLINE:
        flags |= BREAK_AFTER  # a line break mark ends a line of text: wrapping prefers to break after it
    if kind in (K_GLYPH, K_TOFU):
        closing = cat in ("Pe", "Pf", "Po")
        opening = cat in ("Ps", "Pi")
        if closing:
            flags |= NO_BREAK_BEFORE
        if opening:
            flags |= NO_BREAK_AFTER
        if cp in _HYPHENS:
            flags |= BREAK_AFTER
        if wide == 2:
            # CJK has no spaces: any boundary between wide characters may
            # break, except next to punctuation that must stick to its word.
            if not opening:
                flags |= BREAK_AFTER
            if not closing:
                flags |= BREAK_BEFORE
    return flags


def grow(a: np.ndarray, n: int, fill: int = 0) -> np.ndarray:
    """``a`` extended to ``n`` rows, the new ones set to ``fill``."""
    out = np.full((n,) + a.shape[1:], fill, a.dtype)
    out[: len(a)] = a
    return out


class SlotTable:
    """Code point -> slot, filled as characters are first seen.

    Per slot: ``width`` (cells), ``first_id`` (its first atlas cell id), ``flags`` (line
    breaking), ``newline``.  ``id_info[i - N_FIXED_IDS]`` is ``(font, char, cells, half)``
    of glyph cell id ``i``; ``n_ids`` counts all ids so far.

    >>> t = SlotTable({ord("a")}, set())
    >>> t.lookup(np.array([ord("a"), ord("\\n"), ord("a")], np.uint32)).tolist()  # new ones in code point order
    [1, 0, 1]
    >>> t.width[:2].tolist(), t.newline[:2].tolist(), t.n_ids
    ([0, 1], [True, False], 7)
    """

    def __init__(self, cmap_main: Container[int], cmap_cjk: Container[int]) -> None:
        self.cmap_main, self.cmap_cjk = cmap_main, cmap_cjk
        # Dense code point -> slot table (4.4 MB) so mapping a whole chunk is one
        # numpy gather instead of a per-character dict lookup.
        self._cp2slot = np.full(0x110000, -1, np.int32)
        self.width = np.zeros(64, np.int64)
        self.first_id = np.zeros(64, np.int32)
        self.flags = np.zeros(64, np.uint8)
        self.newline = np.zeros(64, bool)
        self.n = 0
        self.id_info: list[tuple[int, str, int, int]] = []
        self.n_ids = N_FIXED_IDS

    def lookup(self, cps: np.ndarray) -> np.ndarray:
        """Code points (uint32) -> slots, registering the ones not seen before."""
        slots = self._cp2slot[cps]
        if len(slots) and slots.min() < 0:
            for cp in np.unique(cps[slots < 0]).tolist():
                self.register(cp)
            slots = self._cp2slot[cps]
        return slots

    def register(self, cp: int) -> None:
        kind, width, font, flags = classify(cp, self.cmap_main, self.cmap_cjk)
        if kind == K_GLYPH:
            first = self.n_ids
            for half in range(width):
                self.id_info.append((font, chr(cp), width, half))
            self.n_ids += width
        elif kind == K_TOFU:
            first = ID_TOFU1 if width == 1 else ID_TOFU2
        elif kind == K_BLANK:
            first = ID_BLANK if width == 1 else ID_BLANK2
        else:
            first = ID_BLANK
        i = self.n
        if i == len(self.width):
            self.width, self.first_id = grow(self.width, 2 * i), grow(self.first_id, 2 * i)
            self.flags, self.newline = grow(self.flags, 2 * i), grow(self.newline, 2 * i)
        self.width[i] = width
        self.first_id[i] = first
        self.flags[i] = flags
        self.newline[i] = kind == K_NEWLINE
        self.n = i + 1
        self._cp2slot[cp] = i
