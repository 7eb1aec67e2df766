"""Where chunks end: the fit rule, the cuts it makes, the carry of split characters, and the running
state of one chunk filled token by token.

The one entry point is :meth:`vist2.processing.VIST2Processor.chunker`: ``processor.chunker(K)`` is a
:class:`FitChunker`, the fit rule of that processor's tokenizer and renderer at K. A chunk ends after
K tokens, or before the first token whose text would no longer fit the image at ``min_font_size``.

- ``chunker(ids, carry)`` cuts a token sequence (:class:`Cuts`); training, prefill, the layout
  functions (which take any :data:`Chunker`) and evaluation cut through it;
- ``chunker.window(carry)`` opens the running state of one chunk (:class:`ChunkFit`); generation
  keeps one per open window, and the cuts above are made by the very same object, so both cut in
  the same place;
- :func:`pays` says whether a cut chunk is compressed at all.

:func:`fixed_chunker` cuts every K tokens with no text to fit: for laying out token *counts* (slot
budgets, KV footprints of synthetic prompts), never a stand-in for the fit rule on real text.

    >>> fixed_chunker(4)(list(range(10))).chunks, pays(3, 2), pays(2, 2)
    ([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]], True, False)
    >>> fit = processor.chunker(64)                    # doctest: +SKIP
    >>> cuts = fit(processor.encode(text))             # doctest: +SKIP
    >>> window = fit.window(cuts.carry_tail)           # doctest: +SKIP
    >>> window.push(token_id), window.full             # doctest: +SKIP
"""

from __future__ import annotations

import unicodedata
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

from .render import LineFit, Renderer
from .text import chunk_text, split_complete, token_bytes


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

    @property
    def chunks(self) -> list[list[int]]:
        """Every closed chunk, then the open tail (possibly empty)."""
        return [list(c) for c in self.closed] + [list(self.tail)]


def pays(n_tokens: int, n_visual: int) -> bool:
    """Whether compressing ``n_tokens`` text tokens into ``n_visual`` visual tokens shrinks the cache:
    the paper's tail rule, applied to every chunk (a chunk the fit rule closed early may hold fewer
    tokens than its image has visual tokens; it then stays text)."""
    return n_tokens > n_visual


# (tokens, carry) -> Cuts: what the layout functions cut with (a FitChunker, or fixed_chunker for
# token counts with no text)
Chunker = Callable[[Sequence[int], bytes], Cuts]


def fixed_chunker(chunk_tokens: int) -> Chunker:
    """Cut every ``chunk_tokens`` tokens, no image to fit: the layout of token counts (the OLM window
    budget in slots, KV footprints of synthetic prompts), where there is no text the fit rule could
    measure."""

    def cut(tokens: Sequence[int], carry: bytes = b"") -> Cuts:
        t = [int(x) for x in tokens]
        n_full = len(t) // chunk_tokens * chunk_tokens
        closed = [t[i : i + chunk_tokens] for i in range(0, n_full, chunk_tokens)]
        return Cuts(closed, [False] * len(closed), t[n_full:])

    return cut


class FitChunker:
    """The fit rule of one tokenizer and renderer at K tokens a chunk (``VIST2Processor.chunker(K)``).

    Calling it cuts a token sequence (:meth:`__call__`); :meth:`window` opens the running state of
    one chunk filled token by token (generation). A token whose text cannot fit even alone raises
    ``ValueError`` naming it.
    """

    __slots__ = ("tokenizer", "renderer", "K", "_bytes")

    # tokenizer -> {token id: its bytes}: the fit rule runs once per token, so its bytes are looked up once
    _BYTES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __init__(self, tokenizer, renderer: Renderer, chunk_tokens: int):
        if not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be a positive int (the model's K), got {chunk_tokens!r}")
        self.tokenizer, self.renderer, self.K = tokenizer, renderer, chunk_tokens
        try:
            self._bytes = FitChunker._BYTES.setdefault(tokenizer, {})
        except TypeError:  # a tokenizer that takes no weak reference: no cache shared across chunkers
            self._bytes = {}

    def window(self, carry: bytes = b"") -> ChunkFit:
        """An empty chunk after one that left ``carry`` (the bytes of a split character)."""
        return ChunkFit(self, carry)

    def __call__(self, ids: Sequence[int], carry: bytes = b"") -> Cuts:
        """Cut ``ids`` into chunks, starting with the bytes ``carry`` left by an earlier chunk of the
        same sample. ``chunker(ids).chunks`` lists them: every list but the last is a closed chunk
        (compressed), the last the open tail (possibly empty).

        >>> processor.chunker(1024)(ids).chunks      # doctest: +SKIP
        [[...1024 ids], [...981 ids], [...37 ids]]
        """
        K = self.K
        ids = [int(i) for i in ids]
        closed, by_fit, carries = [], [], []
        i = 0
        while True:
            window = ids[i : i + K]
            text, after = chunk_text(self.tokenizer, carry, window)
            # fast path: every prefix of a window that fits fits too (greedy wrapping is monotone)
            if unicodedata.is_normalized("NFC", text) and self.renderer.fits(text):
                if len(window) < K:
                    return Cuts(closed, by_fit, window, carry, after, carries)
                closed.append(window)
                by_fit.append(False)
                carries.append(carry)
                carry, i = after, i + K
                continue
            fit = self.window(carry)
            for j, t in enumerate(window):
                if not fit.push(t):
                    break
            else:  # only reached when NFC made the fast path unsure: the whole window fits
                if len(window) < K:
                    return Cuts(closed, by_fit, window, carry, fit.carry, carries)
                closed.append(window)
                by_fit.append(False)
                carries.append(carry)
                carry, i = fit.carry, i + K
                continue
            closed.append(window[:j])
            by_fit.append(True)
            carries.append(carry)
            carry, i = fit.carry, i + j


class ChunkFit:
    """The fit rule for one chunk filled token by token (``chunker.window(carry)``): :meth:`push` says
    whether the next token still belongs to it.

    The chunk's text is ``carry`` + its tokens' bytes, up to the last complete character (a split
    character is shown by the next chunk), as :func:`vist2.text.chunk_text` defines it.
    """

    __slots__ = ("chunker", "tokens", "carry", "_fit")

    def __init__(self, chunker: FitChunker, carry: bytes = b""):
        self.chunker = chunker
        self.tokens: list[int] = []
        self.carry = bytes(carry)  # incomplete bytes at the end so far (the next chunk's carry)
        self._fit = LineFit(chunker.renderer)

    @property
    def K(self) -> int:
        return self.chunker.K

    @property
    def full(self) -> bool:
        """K tokens: the chunk is closed without waiting for the next token."""
        return len(self.tokens) >= self.chunker.K

    def push(self, token_id: int) -> bool:
        """Add the token if the chunk has room for it (True); else leave the state as it was (False).

        Raises ``ValueError`` if the token does not fit even as the first token of a chunk.
        """
        if self.full:
            return False
        token_id = int(token_id)
        chunker = self.chunker
        data = chunker._bytes.get(token_id)
        if data is None:
            data = chunker._bytes[token_id] = token_bytes(chunker.tokenizer, [token_id])
        if self.carry:
            data = self.carry + data
        try:  # whole characters (nearly every token): nothing to carry
            text, pending = data.decode("utf-8"), b""
        except UnicodeDecodeError:
            complete, pending = split_complete(data)
            text = complete.decode("utf-8", errors="replace")
        if not self._fit.try_append(text):
            if not self.tokens:
                rc = chunker.renderer.config
                raise ValueError(
                    f"token {token_id} ({text[:40]!r}{'...' if len(text) > 40 else ''}) does not fit a "
                    f"{rc.width}x{rc.height} image even alone at min_font_size={rc.min_font_size}"
                )
            return False
        self.tokens.append(token_id)
        self.carry = pending
        return True
