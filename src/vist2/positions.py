"""Where a token sits: the one rule that gives every slot its position, kind and eviction.

A sample is laid out segment by segment (:func:`vist2.layout.build_sample`); each segment's slots
come from :func:`segment_slots` here, and nowhere else. Positions follow ``pos = sum |v_<i| + j``:
the visual tokens of a compressed chunk take the positions its text had, so once the text is
dropped the KV-cache index *is* the position and a key never needs its rotation recomputed.

Chunk kinds (paper §3):

===============  =====================  ========================================
kind             sequence               after the chunk
===============  =====================  ========================================
``interleaved``  ``c_i`` then ``v_i``   ``c_i`` is evicted: later tokens see
                                        only ``v_i`` (OLM, generated text,
                                        ``interleaved`` prompt encoding)
``visual``       ``v_i`` only           the text never enters the LLM
                                        (``visual`` prompt encoding, captions)
``ocr``          ``v_i`` then ``c_i``   nothing is evicted (MT-OCR, causal)
``open``         ``c_i`` only           not compressed yet (the last chunk)
===============  =====================  ========================================

Training and evaluation read these positions from the plan (:class:`vist2.layout.Plan`); the
engine feeds a prompt at the positions of its plan (``PromptPlan.sample``), closes a generated
window by the same rule (:func:`window_slots`, an ``interleaved`` chunk), and decodes each token at
the position that equals its cache index (the row's length). Visibility is the plan's too: a query
sees every earlier key of its own sample except the text of an evicted chunk
(:func:`vist2.attention.allowed_mask`); in the engine's cache evicted text is gone, so its mask is
plain causal over cache indices.

    >>> s = segment_slots("interleaved", base=10, n_text=4, n_visual=2)
    >>> [(k.name, list(p), e) for k, p, e in s.runs], s.end, s.peak
    ([('TEXT', [10, 11, 12, 13], True), ('VISUAL', [10, 11], False)], 12, 16)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

CHUNK_KINDS = ("interleaved", "visual", "ocr", "open")
ChunkKind = Literal["interleaved", "visual", "ocr", "open"]
CHUNK_MODES = CHUNK_KINDS  # the old name


class Kind(IntEnum):
    PAD = 0
    TEXT = 1
    VISUAL = 2


@dataclass(frozen=True)
class Slots:
    """One segment's slots in sequence order: runs of ``(kind, positions, evicted)``; ``end``: the
    position of the next slot that stays (the next segment's base); ``peak``: the most cache entries a
    causal feed holds while it writes this segment (an interleaved chunk's text and visual tokens,
    briefly, before the text is evicted)."""

    runs: tuple[tuple[Kind, range, bool], ...]
    end: int
    peak: int

    @property
    def visual(self) -> range:
        """The positions of the segment's visual tokens (empty for text)."""
        return next((p for k, p, _ in self.runs if k == Kind.VISUAL), range(0))


def segment_slots(kind: ChunkKind | None, base: int, n_text: int, n_visual: int = 0) -> Slots:
    """The slots of raw text (``kind`` None: ``n_text`` tokens that stay) or of a chunk of that kind,
    starting at position ``base``."""
    text, end = range(base, base + n_text), base + n_text
    if kind is None or kind == "open":
        return Slots(((Kind.TEXT, text, False),), end, end)
    visual = range(base, base + n_visual)
    if kind == "interleaved":
        return Slots(((Kind.TEXT, text, True), (Kind.VISUAL, visual, False)), base + n_visual,
                     base + n_text + n_visual)
    if kind == "visual":
        return Slots(((Kind.VISUAL, visual, False),), base + n_visual, base + n_visual)
    if kind == "ocr":
        after = range(base + n_visual, base + n_visual + n_text)
        return Slots(((Kind.VISUAL, visual, False), (Kind.TEXT, after, False)), after.stop, after.stop)
    raise ValueError(f"chunk kind must be one of {CHUNK_KINDS}, got {kind!r}")


def window_slots(start: int, n_text: int, n_visual: int) -> Slots:
    """A generated window closed at decode time: an ``interleaved`` chunk whose text began at cache
    index (= position) ``start``; its visual tokens take the positions its text had."""
    return segment_slots("interleaved", start, n_text, n_visual)
