"""Chunk images for the engine, drawn by a small pool of threads.

A :class:`~vist2.render.Renderer` grows its glyph atlases lazily and is not safe to share
between threads, so every worker thread draws with its own processor (same tokenizer, same
render config, its own renderer); the images are the same as the serial ones, pixel for pixel.
Whether threads pay off depends on the machine: the drawing is numpy work that releases the
GIL only in part (see ``bench/notes/engine.md`` for what was measured).

    >>> from vist2.engine.rendering import ChunkRenderer
    >>> pixels = ChunkRenderer(processor, workers=2).pixels(["one chunk", "another"], ["plain", "plain"])  # doctest: +SKIP
    >>> pixels.shape  # (2, 1, H, W), float in [0, 1]                                                        # doctest: +SKIP
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

from ..processing import VIST2Processor, to_pixels


class ChunkRenderer:
    """Renders chunk texts to pixels, serially (``workers=1``) or with ``workers`` threads."""

    def __init__(self, processor: VIST2Processor, workers: int = 1):
        if workers < 1:
            raise ValueError(f"render_workers must be >= 1, got {workers}")
        self.processor, self.workers = processor, workers
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()

    def pixels(self, texts: Sequence[str], styles: Sequence) -> torch.Tensor:
        """``(n, C, H, W)`` float pixels of the chunk texts, each in its style (as
        :meth:`VIST2Processor.render_chunk` takes it), in order."""
        if self.workers == 1 or len(texts) < 2:
            return self.processor.pixels_from_texts(texts, styles)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="vist2-render")
        return to_pixels(list(self._pool.map(self._render, texts, styles)))

    def _render(self, text: str, style) -> np.ndarray:
        proc = getattr(self._local, "processor", None)
        if proc is None:  # this thread's own renderer
            p = self.processor
            proc = self._local.processor = VIST2Processor(p.tokenizer, p.renderer.config, p.chunk_tokens)
        return proc.render_chunk(text, style)

    def close(self) -> None:
        """Stop the worker threads (they also stop when the process exits)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
