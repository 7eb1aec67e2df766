"""The edges of the model: text <-> token ids, chunk tokens -> images -> pixel tensors.

The model and the layout plan speak token ids and tensors only; this module
owns the tokenizer and the renderer.

Example::

    >>> from vist2.processing import VIST2Processor
    >>> proc = VIST2Processor.from_pretrained("runs/tiny")  # doctest: +SKIP
    >>> pixels = proc.pixels_for(plan.chunks)                 # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .build import load_tokenizer
from .config import VIST2Config
from .layout import ChunkInfo
from .render import Renderer, RenderConfig
from .text import chunk_text

log = logging.getLogger(__name__)


def to_pixels(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 images, each ``(H, W)`` or ``(H, W, 3)`` -> float ``(N, C, H, W)`` in [0, 1]."""
    if not images:
        raise ValueError("no images")
    arrs = [np.asarray(im) for im in images]
    if any(a.ndim == 3 for a in arrs):  # mixed grey and colour: promote all to RGB
        arrs = [a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=-1) for a in arrs]
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
    else:
        x = torch.from_numpy(np.stack(arrs))[:, None]
    return x.float().div_(255.0)


class VIST2Processor:
    """Tokenizer + renderer of one model (the render config comes from the model's config)."""

    def __init__(self, tokenizer, render_config: RenderConfig):
        self.tokenizer = tokenizer
        self.renderer = Renderer(render_config)
        self.overflows = 0  # chunks cut to fit the image (see render_chunk)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "VIST2Processor":
        config = VIST2Config.from_pretrained(str(folder))
        return cls(load_tokenizer(folder), config.render_config)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def chunk_text(self, carry: bytes, ids: Sequence[int]) -> tuple[str, bytes]:
        """The text an image of a chunk shows, and the bytes carried to the next chunk.

        A chunk boundary can split a multi-byte character; it is shown whole in the later
        chunk. The rule only looks backwards, so generation can apply it the moment a chunk
        is full, and training applies the very same rule (:meth:`pixels_for`).
        """
        return chunk_text(self.tokenizer, carry, ids)

    def render_chunk(self, text: str) -> np.ndarray:
        """Render one chunk's text.

        A chunk of K tokens fits the image for ordinary text; text that cannot fit even at
        ``min_font_size`` (say, K tokens of long symbol runs from an untrained model) keeps its
        longest prefix that fits, with a warning, and is counted in ``self.overflows``.
        Training and generation both render through here, so they see the same pixels.
        """
        try:
            return self.renderer.render(text)
        except ValueError:
            if self.renderer.fits(text):
                raise  # not an overflow
        lo, hi = 0, len(text)
        while lo < hi:  # longest prefix that fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.renderer.fits(text[:mid]) else (lo, mid - 1)
        self.overflows += 1
        log.warning("chunk text of %d characters does not fit the image; %d characters rendered", len(text), lo)
        return self.renderer.render(text[:lo])

    def pixels_from_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return to_pixels([self.render_chunk(t) for t in texts])

    def chunk_texts(self, chunks: Sequence[ChunkInfo]) -> list[str | None]:
        """The text of every chunk of a plan (None for an external image), carrying split
        characters forward within each sample."""
        carries: dict[tuple[int, int], bytes] = {}
        out: list[str | None] = []
        for c in chunks:
            if not c.tokens:
                out.append(None)
                continue
            key = (c.row, c.sample)
            text, carries[key] = self.chunk_text(carries.get(key, b""), c.tokens)
            out.append(text)
        return out

    def pixels_for(self, chunks: Sequence[ChunkInfo], images: Sequence[np.ndarray] | None = None) -> torch.Tensor:
        """Pixels for every chunk of a plan, in slot order.

        Chunks with text are rendered; chunks without text (captioning) take the
        next of ``images`` (external pictures, already at the model's size).
        """
        external = list(images or [])
        out = []
        for text in self.chunk_texts(chunks):
            if text is not None:
                out.append(self.render_chunk(text))
            elif external:
                out.append(external.pop(0))
            else:
                raise ValueError("the plan has an image slot without text, and no image was given for it")
        if external:
            raise ValueError(f"{len(external)} image(s) left over: the plan has fewer image slots")
        return to_pixels(out)
