"""Where chunks end: the types every layout function cuts with, and the rule that a cut chunk is
compressed only where that pays.

The fit rule itself (a chunk ends after K tokens, or before the first token whose text would no
longer fit the image) is :meth:`vist2.processing.VIST2Processor.cuts`, handed to the layout
functions as a :data:`Chunker` by :meth:`~vist2.processing.VIST2Processor.chunker`; generation
keeps one running :class:`~vist2.processing.ChunkFit` per open window. :func:`fixed_chunker` cuts
every K tokens with no image to fit (pure layout tests, slot counting).

    >>> fixed_chunker(4)(list(range(10))).closed, pays(3, 2), pays(2, 2)
    ([[0, 1, 2, 3], [4, 5, 6, 7]], True, False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Cuts:
    """How a token sequence is cut into chunks: ``closed`` chunks and the open ``tail`` after the last
    cut (shorter than a chunk, possibly empty). ``fit_cut[i]``: chunk i was closed by the fit rule,
    before K tokens. ``carries[i]``: the bytes of a split character before chunk i (drawn first in
    its image; None where the chunker does not track them). ``carry`` / ``carry_tail``: the bytes
    left after the closed chunks / after the tail too, for the sample's next chunk."""

    closed: list[list[int]]
    fit_cut: list[bool]
    tail: list[int]
    carry: bytes = b""
    carry_tail: bytes = b""
    carries: list[bytes | None] | None = None

    def carry_before(self, i: int) -> bytes | None:
        return self.carries[i] if self.carries is not None else None


def pays(n_tokens: int, n_visual: int) -> bool:
    """Whether compressing ``n_tokens`` text tokens into ``n_visual`` visual tokens shrinks the cache:
    the paper's tail rule, applied to every chunk (a chunk the fit rule closed early may hold fewer
    tokens than its image has visual tokens; it then stays text)."""
    return n_tokens > n_visual


# (tokens, carry) -> Cuts. The processor's fit rule (``VIST2Processor.chunker``) is the real one;
# without one, chunks are cut every ``chunk_tokens`` tokens (pure layout tests, slot counting).
Chunker = Callable[[Sequence[int], bytes], Cuts]


def fixed_chunker(chunk_tokens: int) -> Chunker:
    """Cut every ``chunk_tokens`` tokens (no image to fit)."""

    def cut(tokens: Sequence[int], carry: bytes = b"") -> Cuts:
        t = [int(x) for x in tokens]
        n_full = len(t) // chunk_tokens * chunk_tokens
        closed = [t[i : i + chunk_tokens] for i in range(0, n_full, chunk_tokens)]
        return Cuts(closed, [False] * len(closed), t[n_full:])

    return cut
