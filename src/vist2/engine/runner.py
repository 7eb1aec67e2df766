"""The model runner: the only part of the engine that runs the model and owns CUDA graphs.

It executes what the scheduler planned: new cache entries of some rows through the LLM at given
positions and cache indices (:meth:`ModelRunner.forward`: prefill pieces, compressed chunks' visual
tokens), the one-token decode step over every row at once (:meth:`ModelRunner.decode`, captured as
CUDA graphs on a GPU), and chunk texts turned into visual tokens (:meth:`ModelRunner.read_chunks`: render,
vision tower, aligner; :meth:`ModelRunner.read_prompt_chunks` through the encoder cache). Padding
(left-padded prefill rows, batch and span buckets of the decode step) lives here too. It knows
nothing of requests: the scheduler says which rows, which ids, which positions. It allocates the KV
cache buffers; the row manager (:mod:`.kv_rows`) keeps the rows' lengths (the decode step aside,
which advances them as it runs) and its prefix cache copies K/V in and out of rows.

    >>> runner = ModelRunner(model, processor, max_batch=2, max_cache_tokens=512)   # doctest: +SKIP
    >>> logits_BV = runner.forward([0], runner.embed_text(ids_1T), [[0, 1, 2]], [[0, 1, 2]])  # doctest: +SKIP
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import torch

from ..modeling import VIST2ForCausalLM, cache_kwarg
from ..processing import VIST2Processor
from ..runtime import kv_geometry
from .cache import CompressedKVCache
from .encoder_cache import EncoderCache
from .kv_rows import CacheFull  # noqa: F401 - kept importable from here
from .rendering import ChunkRenderer
from .weights_scope import model_scope


class _CapturedStep:
    """The decode step as CUDA graphs, one per (batch bucket, span bucket), captured on first use.

    Inputs are copied into the graph's static tensors and the graph replayed; the returned logits
    live in the graph's output buffer until the next replay. The cache buffers never move (they are
    allocated once), so the graphs stay valid for the engine's life.
    """

    def __init__(self, fn):
        self.fn = fn
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.pool = None

    def __call__(self, ids_B1: torch.Tensor, active_B: torch.Tensor, span: int) -> torch.Tensor:
        key = (ids_B1.shape[0], span)
        if key not in self.graphs:
            self.graphs[key] = self._capture(ids_B1, active_B, span)
        graph, ids, active, out = self.graphs[key]
        ids.copy_(ids_B1, non_blocking=True)
        active.copy_(active_B, non_blocking=True)
        graph.replay()
        return out

    def _capture(self, ids_B1, active_B, span):
        ids, active = ids_B1.clone(), torch.zeros_like(active_B)  # no row active: lengths stay, writes go to scratch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up runs: lazy inits and allocator pools happen outside the capture
                self.fn(ids, active, span)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(ids, active, span)
        self.pool = graph.pool()
        return graph, ids, active, out


def span_bucket(n: int, capacity: int) -> int:
    """How many cache entries a step reads so that ``n`` are covered: ``n`` rounded up to a quarter
    of its power of two (at least 64), at most ``capacity``. Few distinct spans (graphs to capture),
    at most ~25 % read past the live entries."""
    q = max(64, 1 << max(0, n.bit_length() - 3))
    return min(capacity, -(-n // q) * q)


class ModelRunner:
    """Owns the model, the compressed KV cache (allocated on first use at ``max_batch x max_cache_tokens``)
    and the decode step (eager, or CUDA graphs with ``cuda_graphs``).

    ``timings``: the step's phase times (``StepReport.seconds``) while an observer is set (phases are
    timed into it, synchronised); None otherwise, and then :meth:`phase` costs nothing.
    """

    def __init__(self, model: VIST2ForCausalLM, processor: VIST2Processor, max_batch: int, max_cache_tokens: int,
                 cuda_graphs: bool | None = None, render_workers: int = 1, encoder_cache_bytes: int = 0,
                 vision_batch: int = 4):
        self.model = model.eval()
        self.max_batch, self.max_cache_tokens = max_batch, max_cache_tokens
        if vision_batch < 1:
            raise ValueError(f"vision_batch must be >= 1, got {vision_batch}")
        self.vision_batch = vision_batch  # images read by the vision tower at once
        self.device = next(model.parameters()).device
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs the model on a CUDA device, it is on {self.device}")
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.renderer = ChunkRenderer(processor, render_workers)
        # the decode step: the function captured as CUDA graphs (or run eagerly on CPU)
        self.step_fn: Callable = _CapturedStep(self.decode_fn) if self.cuda_graphs else self.decode_fn
        self.timings: dict[str, float] | None = None
        self._cache: CompressedKVCache | None = None
        self._batch_buckets = sorted({min(max_batch, 1 << i) for i in range(max_batch.bit_length() + 1)})
        self._n_tokens = len(processor.tokenizer)
        # prompt chunks' visual tokens kept across requests (None: off)
        self.encoder_cache = (EncoderCache(encoder_cache_bytes, processor.render_config) if encoder_cache_bytes
                              else None)

    @property
    def cache(self) -> CompressedKVCache:
        if self._cache is None:
            g = kv_geometry(self.model.config.text_config)
            p = next(self.model.parameters())
            self._cache = CompressedKVCache(g.layers, self.max_batch, g.kv_heads, g.head_dim, self.max_cache_tokens,
                                            p.dtype, p.device)
        return self._cache

    def scope(self) -> tuple:
        """The weights the LLM's K/V belong to (the prefix cache's scope)."""
        return model_scope([self.model.model])

    @contextmanager
    def phase(self, name: str):
        """Time a phase of the step into :attr:`timings` (synchronised); free when unobserved."""
        if self.timings is None:
            yield
            return
        _sync(self.device)
        t = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            sec = self.timings
            sec[name] = sec.get(name, 0.0) + time.perf_counter() - t

    # -- embeddings ---------------------------------------------------------------------------

    def embed_text(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return self.model.model.get_input_embeddings()(ids_BT.to(self.device))

    @torch.no_grad()  # the vision tower's activations are not kept for a backward pass
    def read_chunks(self, texts: list[str], styles: list) -> torch.Tensor:
        """Render chunk texts and read them with the vision tower + aligner: ``(n, n_visual, D)``."""
        with self.phase("render"):
            pixels = self.renderer.pixels(texts, styles)
        with self.phase("vision"):
            # in micro-batches: the tower's activations grow with the images read at once, and a long
            # prompt's prefill must not need more memory than a plain LLM's (each batch is freed before the next)
            return torch.cat([self.model.model.encode_images(px.to(self.device, self.model.dtype))
                              for px in pixels.split(self.vision_batch)])

    def read_prompt_chunks(self, texts: list[str], styles: list,
                           salts: list | None = None) -> tuple[torch.Tensor, list[bool]]:
        """:meth:`read_chunks` through the encoder cache (when on): ``(n, n_visual, D)`` and whether each chunk was
        a hit (neither rendered nor read). Only prompt chunks come here: a generated window is new text.
        ``salts``: each chunk's request's ``cache_salt`` (its cache namespace)."""
        if self.encoder_cache is None:
            return self.read_chunks(texts, styles), [False] * len(texts)
        m = self.model.model
        return self.encoder_cache.fetch(texts, styles, self.read_chunks, model_scope([m.vision, m.aligner]), salts)

    # -- the LLM ------------------------------------------------------------------------------

    def _lm(self, embeds_BTD: torch.Tensor, positions_BT: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The LLM over new tokens whose cache slots were planned; the last token's logits ``(b, V)``."""
        out = self.model.model.language_model(
            inputs_embeds=embeds_BTD, position_ids=positions_BT, attention_mask=mask, use_cache=True,
            **cache_kwarg(self.model.model.language_model, self.cache),
        )
        logits = self.model.lm_head(out.last_hidden_state[:, -1]).float()
        logits[:, self._n_tokens :] = float("-inf")  # padded vocabulary rows the tokenizer cannot decode
        return logits

    @torch.no_grad()
    def forward(self, rows: list[int], embeds_BTD: torch.Tensor, positions: list[list[int]],
                write: list[list[int]]) -> torch.Tensor:
        """Run new entries of some rows (prefill, compression) through the LLM at the given positions
        and cache indices; the rows' lengths are the caller's to set. Rows with fewer entries than
        ``embeds_BTD`` holds are left-padded (see :func:`pad_left`): the padding writes to the scratch
        row and no real entry attends to it."""
        dev, cache, T = self.device, self.cache, embeds_BTD.shape[1]
        span = span_bucket(max(max(w) for w in write) + 1, cache.capacity)
        pad = [T - len(w) for w in write]
        write_rows = None
        if any(pad):  # padding sits at the row's first write index (so its mask row is not empty), in scratch
            write_rows = torch.tensor([[cache.scratch] * n + [r] * len(w) for r, w, n in zip(rows, write, pad)],
                                      device=dev)
            write = [w[:1] * n + w for w, n in zip(write, pad)]
            positions = [p[:1] * n + p for p, n in zip(positions, pad)]
        mask = cache.prepare(rows, torch.tensor(write, device=dev), span, write_rows=write_rows)
        return self._lm(embeds_BTD, torch.tensor(positions, device=dev), mask)

    def decode_fn(self, ids_B1: torch.Tensor, active_B: torch.Tensor, span: int) -> torch.Tensor:
        """The decode step of rows ``0..b-1`` (captured on CUDA): every row's token at its length,
        inactive rows writing to the scratch row; active rows' lengths advance on the device."""
        cache, b = self.cache, ids_B1.shape[0]
        # (b, 1): a token's position is its cache index (an idle row's length may be any; clamped)
        write = cache.length[:b, None].clamp(max=cache.capacity - 1)
        write_rows = torch.where(active_B, torch.arange(b, device=ids_B1.device), cache.scratch)
        mask = cache.prepare(slice(0, b), write, span, write_rows=write_rows)
        logits = self._lm(self.embed_text(ids_B1), write, mask)
        cache.length[:b] += active_B.long()
        return logits

    @torch.no_grad()
    def decode(self, tokens: dict[int, int]) -> torch.Tensor:
        """Feed one token per row (``row -> id``): one (captured) step over the smallest batch bucket that
        holds the rows, reading the smallest span bucket that holds the longest of them. Returns the
        logits ``(b, V)`` indexed by row (valid until the next step)."""
        cache = self.cache
        top = max(tokens) + 1
        b = next(x for x in self._batch_buckets if x >= top)
        span = span_bucket(max(cache.host_length[:b]) + 1, cache.capacity)
        ids, active = [0] * b, [False] * b
        for row, tok in tokens.items():
            ids[row], active[row] = tok, True
        pin = self.device.type == "cuda"
        ids_B1 = torch.tensor(ids, pin_memory=pin)[:, None].to(self.device, non_blocking=True)
        active_B = torch.tensor(active, pin_memory=pin).to(self.device, non_blocking=True)
        logits = self.step_fn(ids_B1, active_B, span)
        cache.advanced(list(tokens), 1)
        return logits


def pad_left(embeds: list[torch.Tensor]) -> torch.Tensor:
    """Rows ``(T_i, D)`` -> ``(b, max T_i, D)``, zeros first: every row's last entry is the last one,
    whose logits the forward returns."""
    return torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True, padding_side="left")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
