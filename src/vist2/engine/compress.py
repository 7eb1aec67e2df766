"""Decode-time compression: the open window of generated text and how it becomes visual tokens.

A gcc row's newest generated tokens form the open window (the chunk being written). The fit
rule (:class:`vist2.chunking.ChunkFit`, the same object that cuts training text) says whether
the next token still belongs to it; the window closes when it holds K tokens or when a token
would not fit its image. Closing it renders its text, reads it with the vision tower + aligner,
runs the β visual tokens through the LLM after the window (they attend to it, as the layout's
mask says), and moves their K/V to where the window began: the window's text entries are gone.

    >>> w = Window(processor.chunker(64).window())                      # doctest: +SKIP
    >>> w.push(token_id), w.full                                        # doctest: +SKIP
"""

from __future__ import annotations

import torch

from ..chunking import ChunkFit
from ..positions import window_slots
from ..processing import VIST2Processor
from .kv_rows import KVRows
from .runner import ModelRunner


class Window:
    """The open chunk of a row's generated text: its tokens and running fit state (``fit``), and the
    bytes of a character split by the previous chunk's end (``carry_in``: drawn in this window's image)."""

    def __init__(self, fit: ChunkFit):
        self.fit = fit
        self.carry_in = fit.carry

    @property
    def tokens(self) -> list[int]:
        return self.fit.tokens

    @property
    def full(self) -> bool:
        return self.fit.full

    def push(self, token_id: int) -> bool:
        """Take the token if the window's image has room for it; False leaves the window as it was."""
        return self.fit.push(token_id)

    def fits(self, token_id: int) -> bool:
        """Whether the token would fit, leaving the window as it is (the window's text is fitted again
        on a fresh state: only asked at a fit cut's boundary token)."""
        trial = self.fit.chunker.window(self.carry_in)
        return all(trial.push(t) for t in self.tokens) and trial.push(token_id)


class Compressor:
    """Closes windows: ``K`` text tokens in, ``n_visual`` cache entries out."""

    def __init__(self, runner: ModelRunner, kv: KVRows, processor: VIST2Processor, chunk_tokens: int, n_visual: int):
        self.runner, self.kv, self.processor = runner, kv, processor
        self.K, self.n_visual = chunk_tokens, n_visual

    def open(self, carry: bytes = b"") -> Window:
        """An empty window after a chunk that left ``carry`` (the bytes of a split character)."""
        return Window(self.processor.chunker(self.K).window(carry))

    @torch.no_grad()
    def close(self, rows: list[int], windows: list[Window]) -> tuple[list[str], torch.Tensor]:
        """Compress the open windows of these rows (each ends the row's cache). Returns each window's
        text and the logits after its visual tokens ``(b, V)`` (the next token is sampled from them).
        Raises :class:`~vist2.engine.kv_rows.CacheFull` first if a row has no room for the visual tokens."""
        runner, kv, n_visual = self.runner, self.kv, self.n_visual
        kv.check_room(rows, n_visual)
        with runner.phase("compress"):
            texts = []
            for w in windows:
                text, after = self.processor.chunk_text(w.carry_in, w.tokens)
                assert after == w.fit.carry  # the fit state saw exactly the bytes the image shows
                texts.append(text)
            visual = runner.read_chunks(texts, ["plain"] * len(windows))
            ends = [kv.length(r) for r in rows]
            bases = [e - len(w.tokens) for e, w in zip(ends, windows)]  # where each window began
            # the visual tokens' positions are those the window's text had (the layout's rule); their K/V
            # are written after the window, then moved where it began
            positions = [list(window_slots(b, len(w.tokens), n_visual).visual) for b, w in zip(bases, windows)]
            logits = runner.forward(rows, visual, positions, [list(range(e, e + n_visual)) for e in ends])
        for row, b, e in zip(rows, bases, ends):
            kv.evict(row, b, e, n_visual)
        return texts, logits
