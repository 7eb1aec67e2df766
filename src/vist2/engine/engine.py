"""Generation with global context compression.

The engine speaks token ids; a :class:`~vist2.processing.VIST2Processor` at its
edge turns chunk tokens into pixels and generated ids into text. Per sequence:

1. **prefill** — the prompt is laid out by :func:`vist2.layout.prompt_segments`
   (query chunks compressed, the tail rule, raw prefix/suffix) and fed in pieces of at most
   ``prefill_budget`` entries: prompt chunks are rendered and read by the vision tower in
   batches, and with the ``visual`` prompt encoding the raw prefix and every chunk's visual
   tokens are one causal run (one forward when it fits the budget). Rows prefilling at the same
   time share each forward (left-padded) and each vision-tower batch. While other rows decode,
   at most ``prefill_budget`` entries per step are fed (chunked prefill), so an admission never
   stalls them for long;
2. **decode** — one token at a time; in ``gcc`` mode the text window is closed when it holds
   K tokens, or when a sampled token's text would no longer fit the image (the processor's
   running fit state decides; the token then begins the next window). The closed window is
   rendered, read by the vision tower and aligner, and its β visual tokens run through the
   LLM attending to the cache; their K/V replace the window. Chunks are cut exactly where
   ``VIST2Processor.chunk_ids`` cuts them in training.

Modes share this one code path: ``gcc`` (prompt and output compressed, the
paper), ``pcc`` (prompt only, the Glyph-style baseline) and ``none`` (a plain LLM).

Example::

    >>> from vist2.engine import Engine, SamplingParams
    >>> engine = Engine.from_pretrained("runs/tiny")                       # doctest: +SKIP
    >>> out = engine.generate_text(["Once upon a time"], SamplingParams(max_new_tokens=200))  # doctest: +SKIP
    >>> out[0].text, out[0].stats.kv_tokens, out[0].stats.kv_tokens_uncompressed   # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from ..chat import chat_prompt, query_ids
from ..layout import Chunk, Raw, Segment, prompt_segments
from ..modeling import VIST2ForCausalLM
from ..processing import VIST2Processor
from ..runtime import eos_ids, kv_geometry, load_checkpoint
from .cache import CompressedKVCache
from .rendering import ChunkRenderer
from .sampling import Sampler, SamplingParams
from .types import Event, Mode, Request, Result, Stats, StepReport
from ..text import StreamDecoder

@dataclass
class _Op:
    """One piece of a prompt's prefill: text tokens, or one chunk's visual tokens (``n_text`` > 0:
    the chunk's text was fed just before, interleaved, and is evicted after them)."""

    kind: str  # "text" | "visual"
    tokens: list[int] = field(default_factory=list)
    chunk: int = -1
    n_text: int = 0

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class _Piece:
    """What one prefill forward feeds of one row: cache entries ``[start, end)``; ``items`` are text
    token lists and chunk numbers (their visual tokens), in order; ``evict``: an interleaved chunk's
    text span, dropped after the forward."""

    seq: "_Seq"
    start: int
    end: int
    items: list[list[int] | int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    evict: tuple[int, int] | None = None

    @property
    def used(self) -> int:
        return self.end - self.start


class _Seq:
    """Mutable per-request state while it occupies a cache row."""

    def __init__(self, rid: int, req: Request, row: int, processor: VIST2Processor, eos: Sequence[int]):
        p = req.params
        stop_ids = tuple(p.stop_token_ids) + (() if p.ignore_eos else tuple(eos))
        self.rid, self.req, self.row = rid, req, row
        self.sampler = Sampler(p)
        self.stop_ids = set(stop_ids)
        self.decoder = StreamDecoder(processor.tokenizer, stop=p.stop)
        self.history = list(req.prompt_ids)
        self.generated: list[int] = []
        self.window: list[int] = []  # generated text tokens not yet compressed (gcc)
        self.carry = b""  # bytes of a character split by a chunk boundary, shown in the next image
        self.fit = None  # the open window's fit state (gcc), from the processor
        self.memory: list[str] = []
        self.logits: torch.Tensor | None = None
        self.recorded: list[torch.Tensor] = []
        self.stats = Stats(prompt_tokens=len(req.prompt_ids))
        self.t_start = time.perf_counter()
        self.t_first = 0.0
        self.done = False
        # the prompt, while it is being prefilled: what is left to feed, and its chunks' images
        self.ops: deque[_Op] = deque()
        self.chunks: list[tuple[str, Any]] = []  # (text, style: one or per character) of every prompt chunk
        self.visual: dict[int, torch.Tensor] = {}  # chunk -> its (n_visual, D) tokens, read ahead

    @property
    def prefilling(self) -> bool:
        return bool(self.ops)


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


class Engine:
    """Runs requests on one model with a compressed KV cache; several requests share it as cache rows.

    Args:
        model: a VIST2ForCausalLM (eval mode is set here).
        processor: its tokenizer + renderer.
        max_batch: cache rows (requests decoded together).
        max_cache_tokens: KV entries a row may hold (the memory limit; the cache is allocated at
            ``max_batch x max_cache_tokens`` entries up front); a prompt that needs more is refused,
            a generation that reaches it stops with finish_reason ``length``.
        record_logits: keep the distribution behind every sampled token (tests, evaluation).
        prefill_budget: prompt entries (text and visual) run through the LLM per :meth:`step` while
            other rows are decoding, as in chunked prefill: a long prompt is admitted over several
            steps and never stalls the running rows for more than one bounded piece. With no row
            decoding, a prompt is fed in pieces of this size within one step (bounded activations).
            Prompts fed together share it evenly and count padded (rows x longest piece).
        max_prefills_per_step: requests admitted into free rows per :meth:`step` (their prompts are then
            fed under ``prefill_budget``); a burst of arrivals enters over several steps. Prompts
            admitted together are fed together: one left-padded forward per piece, their chunks in
            one vision-tower batch.
        cuda_graphs: capture the decode step as CUDA graphs (default: on when the model is on CUDA).
            On CPU the very same step function runs eagerly.
        observer: called with a :class:`StepReport` after every step (timings, cache occupancy).
        render_workers: threads drawing a batch of chunk images (:class:`ChunkRenderer`); 1 draws
            them in the calling thread.
    """

    def __init__(self, model: VIST2ForCausalLM, processor: VIST2Processor, max_batch: int = 8,
                 max_cache_tokens: int | None = None, record_logits: bool = False, prefill_budget: int = 2048,
                 max_prefills_per_step: int = 1, cuda_graphs: bool | None = None,
                 observer: Callable[[StepReport], None] | None = None, render_workers: int = 1):
        if max_batch <= 0:
            raise ValueError(f"max_batch must be > 0, got {max_batch}")
        self.model = model.eval()
        self.processor = processor
        cfg = model.config
        self.K, self.n_visual = cfg.chunk_tokens, cfg.n_visual
        self.prompt_encoding = cfg.prompt_encoding
        self.max_batch = max_batch
        self.max_cache_tokens = max_cache_tokens or cfg.text_config.max_position_embeddings
        self.record_logits = record_logits
        if prefill_budget < self.n_visual:
            raise ValueError(f"prefill_budget must be >= n_visual={self.n_visual} (one chunk's visual tokens "
                             f"are fed together), got {prefill_budget}")
        self.prefill_budget = prefill_budget
        self.max_prefills_per_step = max(1, max_prefills_per_step)
        self.device = next(model.parameters()).device
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs the model on a CUDA device, it is on {self.device}")
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.observer = observer
        self.renderer = ChunkRenderer(processor, render_workers)
        self.eos = eos_ids(cfg.text_config, processor.tokenizer)
        self._cache: CompressedKVCache | None = None
        self._step_fn = _CapturedStep(self._decode_fn) if self.cuda_graphs else self._decode_fn
        self._batch_buckets = sorted({min(max_batch, 1 << i) for i in range(max_batch.bit_length() + 1)})
        self._waiting: deque[tuple[int, Request]] = deque()
        self._running: dict[int, _Seq] = {}  # row -> seq
        self._finished: dict[int, Result] = {}  # until collected by generate() / result()
        self._next_id = 0
        self._n_steps = 0
        self._report: StepReport | None = None
        self._n_tokens = len(processor.tokenizer)

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype | None = None, device: str | None = None, **kwargs) -> "Engine":
        model, processor = load_checkpoint(folder, device, dtype or torch.float32)
        return cls(model, processor, **kwargs)

    # -- requests ---------------------------------------------------------------------

    def request(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                params: SamplingParams | None = None, mode: Mode | str = Mode.GCC, question: str | None = None) -> Request:
        """Tokenize a plain prompt, or chat ``messages`` (the last user turn is the compressed query;
        its optional ``question`` field is the question, see :func:`chat_prompt`). With a plain prompt,
        ``question`` is appended to it the same way: ``prompt + "\n" + question``."""
        params = (params or SamplingParams()).validate()
        mode = Mode.parse(mode)
        tok = self.processor.tokenizer
        if messages is not None:
            if question is not None:
                raise ValueError("with messages, give the question as the last user message's 'question' field")
            prefix, query, suffix, span = chat_prompt(tok, messages)
        else:
            if prompt is None:
                raise ValueError("give a prompt or messages")
            (query, span), prefix, suffix = query_ids(tok, prompt, question), [], []
        if not (prefix or query or suffix):
            raise ValueError("the prompt is empty")
        return Request(query=query, prefix=prefix, suffix=suffix, params=params, mode=mode, question=span)

    def add(self, request: Request) -> int:
        """Queue a request; returns its id. Raises ValueError if its prompt cannot fit the memory limit."""
        request.params.validate()
        request.mode = Mode.parse(request.mode)
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        need = self._prompt_footprint(request)
        if need > self.max_cache_tokens:
            raise ValueError(
                f"the prompt needs {need} KV entries ({len(request.prompt_ids)} tokens, mode {request.mode}), "
                f"over the memory limit max_cache_tokens={self.max_cache_tokens}"
            )
        rid = self._next_id
        self._next_id += 1
        self._waiting.append((rid, request))
        return rid

    def _segments(self, req: Request) -> list[Segment]:
        if req.mode == Mode.NONE:
            return [Raw(tuple(req.prompt_ids))]
        return prompt_segments(req.prefix, req.query, req.suffix, self.K, self.n_visual, self.prompt_encoding,
                               chunker=self.processor.chunker(self.K), question=req.question)

    def _prompt_footprint(self, req: Request) -> int:
        """Cache entries the prompt needs at its peak (a compressed chunk briefly holds text + visual)."""
        kept, peak = 0, 0
        for seg in self._segments(req):
            if isinstance(seg, Raw):
                kept += len(seg.tokens)
            elif seg.mode == "interleaved":
                peak = max(peak, kept + len(seg.tokens) + seg.n_visual)
                kept += seg.n_visual
            else:
                kept += seg.n_visual
            peak = max(peak, kept)
        return peak + 1  # room for the first generated token

    # -- running ------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._running)

    def cache_usage(self) -> dict:
        """Cache occupancy: live entries per running request, capacity, bytes per entry and allocated."""
        self._ensure_cache()
        c = self._cache
        return {"kv_tokens": {s.rid: c.host_length[r] for r, s in self._running.items()},
                "capacity": c.capacity, "rows": c.rows, "bytes_per_token": c.bytes_per_token,
                "bytes_allocated": c.bytes_allocated}

    def step(self) -> list[Event]:
        """One scheduler step: admit waiting requests into free rows, feed prompts (at most
        ``prefill_budget`` entries while other rows decode), then sample and feed one token for every
        row whose prompt is in."""
        self._ensure_cache()
        self._n_steps += 1
        self._report = StepReport(self._n_steps) if self.observer else None
        events = self._admit()
        decoding = [s for s in self._running.values() if not s.prefilling]
        self._prefill(budget=self.prefill_budget if decoding else None)
        ready = [s for s in self._running.values() if not s.prefilling]
        if ready:
            with self._phase("sample"):
                feed = [s for s in ready if self._sample_one(s, events)]
            if feed:
                self._decode(feed)
        if self._report is not None:
            self._report.kv_tokens = {s.rid: self._cache.host_length[r] for r, s in self._running.items()}
            self.observer(self._report)
        return events

    def _admit(self) -> list[Event]:
        events: list[Event] = []
        admitted = 0
        while self._waiting and len(self._running) < self.max_batch and admitted < self.max_prefills_per_step:
            admitted += 1
            rid, req = self._waiting.popleft()
            row = min(set(range(self.max_batch)) - set(self._running))
            try:
                seq = _Seq(rid, req, row, self.processor, self.eos)
            except Exception as e:  # noqa: BLE001 - e.g. its sampler refused its params: fail this request only
                stats = Stats(prompt_tokens=len(req.prompt_ids), finish_reason="error",
                              error=f"{type(e).__name__}: {e}")
                self._finished[rid] = Result(rid, "", [], stats, [], None)
                events.append(Event(rid, "", None, True, stats))
                continue
            self._running[row] = seq
            self._cache.set_length(row, 0)
            self._plan_prompt(seq)
        return events

    def _sample_one(self, seq: _Seq, events: list[Event]) -> bool:
        """Sample a row's next token and report it; True if the row goes on (its token is to be fed)."""
        try:
            tok = self._sample(seq)
        except Exception as e:  # noqa: BLE001 - one row's sampling failing must not end the other rows
            seq.stats.error = f"{type(e).__name__}: {e}"
            self._finish(seq, "error")
            events.append(Event(seq.rid, "", None, True, seq.stats))
            return False
        # an end-of-sequence token ends the text; it is not part of it
        delta = "" if tok in seq.stop_ids else seq.decoder.push(tok)
        reason = self._finish_reason(seq, tok)
        if reason:
            delta += seq.decoder.finish() if reason != "stop" else ""
            self._finish(seq, reason)
            events.append(Event(seq.rid, delta, tok, True, seq.stats))
            return False
        events.append(Event(seq.rid, delta, tok, False))
        return True

    def abort(self, request_id: int) -> bool:
        """Drop a request (waiting or running), freeing its row. Returns whether it was found."""
        for i, (rid, _) in enumerate(self._waiting):
            if rid == request_id:
                del self._waiting[i]
                return True
        for row, seq in list(self._running.items()):
            if seq.rid == request_id:
                self._running.pop(row)
                self._cache.set_length(row, 0)
                return True
        return False

    def stream(self, requests: Sequence[Request]) -> Iterator[Event]:
        """Run requests to completion, yielding events as they happen."""
        ids = [self.add(r) for r in requests]
        pending = set(ids)
        while pending:
            for ev in self.step():
                if ev.request_id in pending:
                    if ev.done:
                        pending.discard(ev.request_id)
                        ev.result = self._finished.pop(ev.request_id, None)
                    yield ev

    def generate(self, requests: Sequence[Request]) -> list[Result]:
        """Run requests to completion; results in request order."""
        ids = [self.add(r) for r in requests]
        while any(i not in self._finished for i in ids):
            self.step()
        return [self._finished.pop(i) for i in ids]

    def result(self, request_id: int) -> Result | None:
        """The result of a finished request (handed out once)."""
        return self._finished.pop(request_id, None)

    def generate_text(self, prompts: Sequence[str], params: SamplingParams | None = None,
                      mode: Mode | str = Mode.GCC) -> list[Result]:
        return self.generate([self.request(p, params=params, mode=mode) for p in prompts])

    # -- internals: the cache and the LLM ------------------------------------------------

    def _ensure_cache(self) -> None:
        if self._cache is not None:
            return
        g = kv_geometry(self.model.config.text_config)
        p = next(self.model.parameters())
        self._cache = CompressedKVCache(g.layers, self.max_batch, g.kv_heads, g.head_dim, self.max_cache_tokens,
                                        p.dtype, p.device)

    @contextmanager
    def _phase(self, name: str):
        """Time a phase of the step into the observer's report (synchronised); free when unobserved."""
        if self._report is None:
            yield
            return
        _sync(self.device)
        t = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            sec = self._report.seconds
            sec[name] = sec.get(name, 0.0) + time.perf_counter() - t

    def _lm(self, embeds_BTD: torch.Tensor, positions_BT: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The LLM over new tokens whose cache slots were planned; the last token's logits ``(b, V)``."""
        out = self.model.model.language_model(
            inputs_embeds=embeds_BTD, position_ids=positions_BT, attention_mask=mask,
            past_key_values=self._cache, use_cache=True,
        )
        logits = self.model.lm_head(out.last_hidden_state[:, -1]).float()
        logits[:, self._n_tokens :] = float("-inf")  # padded vocabulary rows the tokenizer cannot decode
        return logits

    @torch.no_grad()
    def _forward(self, rows: list[int], embeds_BTD: torch.Tensor, positions: list[list[int]],
                 write: list[list[int]]) -> torch.Tensor:
        """Run new entries of some rows (prefill, compression) through the LLM at the given positions
        and cache indices; the rows' lengths are the caller's to set. Rows with fewer entries than
        ``embeds_BTD`` holds are left-padded (see :func:`_pad_left`): the padding writes to the scratch
        row and no real entry attends to it."""
        dev, cache, T = self.device, self._cache, embeds_BTD.shape[1]
        span = span_bucket(max(max(w) for w in write) + 1, cache.capacity)
        pad = [T - len(w) for w in write]
        write_rows = None
        if any(pad):  # padding sits at the row's first write index (so its mask row is not empty), in scratch
            write_rows = torch.tensor([[cache.scratch] * n + [r] * len(w) for r, w, n in zip(rows, write, pad)],
                                      device=dev)
            write = [w[:1] * n + w for w, n in zip(write, pad)]
            positions = [p[:1] * n + p for p, n in zip(positions, pad)]
        mask = cache.plan(rows, torch.tensor(write, device=dev), span, write_rows=write_rows)
        return self._lm(embeds_BTD, torch.tensor(positions, device=dev), mask)

    def _decode_fn(self, ids_B1: torch.Tensor, active_B: torch.Tensor, span: int) -> torch.Tensor:
        """The decode step of rows ``0..b-1`` (captured on CUDA): every row's token at its length,
        inactive rows writing to the scratch row; active rows' lengths advance on the device."""
        cache, b = self._cache, ids_B1.shape[0]
        # (b, 1): a token's position is its cache index (an idle row's length may be any; clamped)
        write = cache.length[:b, None].clamp(max=cache.capacity - 1)
        write_rows = torch.where(active_B, torch.arange(b, device=ids_B1.device), cache.scratch)
        mask = cache.plan(slice(0, b), write, span, write_rows=write_rows)
        logits = self._lm(self._embed_text(ids_B1), write, mask)
        cache.length[:b] += active_B.long()
        return logits

    @torch.no_grad()
    def _decode_step(self, seqs: list[_Seq]) -> None:
        """Feed each row's last sampled token: one (captured) step over the smallest batch bucket that
        holds the rows, reading the smallest span bucket that holds the longest of them."""
        cache = self._cache
        top = max(s.row for s in seqs) + 1
        b = next(x for x in self._batch_buckets if x >= top)
        span = span_bucket(max(cache.host_length[:b]) + 1, cache.capacity)
        ids, active = [0] * b, [False] * b
        for s in seqs:
            ids[s.row], active[s.row] = s.generated[-1], True
        pin = self.device.type == "cuda"
        ids_B1 = torch.tensor(ids, pin_memory=pin)[:, None].to(self.device, non_blocking=True)
        active_B = torch.tensor(active, pin_memory=pin).to(self.device, non_blocking=True)
        logits = self._step_fn(ids_B1, active_B, span)
        cache.advanced([s.row for s in seqs], 1)
        for s in seqs:
            s.logits = logits[s.row]

    def _embed_text(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return self.model.model.get_input_embeddings()(ids_BT.to(self.device))

    def _encode(self, texts: list[str], styles: list) -> torch.Tensor:
        """Render chunk texts and read them with the vision tower + aligner: ``(n, n_visual, D)``."""
        with self._phase("render"):
            pixels = self.renderer.pixels(texts, styles)
        with self._phase("vision"):
            return self.model.model.encode_images(pixels.to(self.device, self.model.dtype))

    def _check_room(self, rows: Sequence[int], n: int) -> None:
        if max(self._cache.host_length[r] for r in rows) + n > self.max_cache_tokens:
            # only generation can get here: prompts were checked when they were added
            raise _CacheFull()

    # -- internals: prefill ----------------------------------------------------------------

    def _plan_prompt(self, seq: _Seq) -> None:
        """Lay the prompt out as prefill pieces: raw text, and per chunk its visual tokens (after its
        text in the interleaved encoding). Chunk texts are cut here, in order (carried bytes)."""
        for seg in self._segments(seq.req):
            if isinstance(seg, Raw):
                seq.ops.append(_Op("text", list(seg.tokens)))
                continue
            style = self.processor.char_styles(seq.carry, seg.tokens, seg.style)  # before the carry moves
            seq.chunks.append((self._chunk_text(seq, seg.tokens), style))
            n_text = len(seg.tokens) if seg.mode == "interleaved" else 0
            if n_text:
                seq.ops.append(_Op("text", list(seg.tokens)))
            seq.ops.append(_Op("visual", chunk=len(seq.chunks) - 1, n_text=n_text))

    def _prefill(self, budget: int | None) -> None:
        """Feed prompts of rows still prefilling: forwards of at most ``budget`` padded entries in all
        (None: every prompt to its end). Each forward takes the next piece of the rows, within
        ``prefill_budget`` entries (or what is left of ``budget``)."""
        while True:
            seqs = [s for s in self._running.values() if s.prefilling]
            limit = self.prefill_budget if budget is None else min(budget, self.prefill_budget)
            if not seqs or limit < self.n_visual:
                return
            with self._phase("prefill"):
                used = self._prefill_rows(seqs, limit)
            if budget is not None:
                budget -= used
            for seq in seqs:
                if not seq.prefilling:
                    seq.fit = self.processor.chunk_fit(self.K, seq.carry)
                    self._update_kv_stats(seq)

    def _prefill_rows(self, seqs: list[_Seq], limit: int) -> int:
        """One LLM forward over the next prompt piece of each row, left-padded to the longest; returns
        its padded size (rows x longest piece, what the LLM computes), at most ``limit``. The rows share
        ``limit`` evenly (each piece at least one chunk's visual tokens, the rows in admission order
        while they fit), so every prompt admitted together advances; every prompt chunk the pieces hold
        is read in one vision-tower batch."""
        share = max(limit // len(seqs), self.n_visual)
        pieces = []
        for seq in seqs:
            if (len(pieces) + 1) * share > limit:
                break
            piece = self._take_piece(seq, share)
            if piece.used:
                pieces.append(piece)
        self._read_chunks(pieces, limit)
        embeds, positions, write = [], [], []
        for p in pieces:
            embeds.append(torch.cat([self._embed_text(torch.tensor([x]))[0] if isinstance(x, list)
                                     else self._chunk_visual(p.seq, x) for x in p.items]))
            positions.append(p.positions)
            write.append(list(range(p.start, p.end)))
        logits = self._forward([p.seq.row for p in pieces], _pad_left(embeds), positions, write)
        for p, lg in zip(pieces, logits):
            p.seq.logits = lg
            p.seq.stats.kv_tokens_peak = max(p.seq.stats.kv_tokens_peak, p.end)
            if p.evict is not None:
                self._cache.evict(p.seq.row, p.evict[0], p.evict[1], self.n_visual)
            else:
                self._cache.set_length(p.seq.row, p.end)
        if self._report is not None:
            self._report.prefill_tokens += sum(p.used for p in pieces)
            self._report.prefill_rows.append(len(pieces))
        return len(pieces) * max(p.used for p in pieces)

    def _take_piece(self, seq: _Seq, budget: int) -> "_Piece":
        """Take a row's next prompt entries off its plan, at most ``budget``. A piece ends after an
        interleaved chunk's visual tokens (its text is then evicted). With the visual encoding a
        whole prompt of chunks is one causal run of visual tokens."""
        start = self._cache.host_length[seq.row]
        p = _Piece(seq, start, start)
        while seq.ops and p.used < budget:
            op = seq.ops[0]
            if op.kind == "text":
                take = op.tokens[: budget - p.used]
                del op.tokens[: len(take)]
                p.items.append(take)
                p.positions += range(p.end, p.end + len(take))
                p.end += len(take)
                if not op.tokens:
                    seq.ops.popleft()
                continue
            if p.used + self.n_visual > budget:
                break
            seq.ops.popleft()
            p.items.append(op.chunk)
            p.positions += range(p.end - op.n_text, p.end - op.n_text + self.n_visual)
            p.end += self.n_visual
            if op.n_text:
                p.evict = (p.end - self.n_visual - op.n_text, p.end - self.n_visual)
                break
        return p

    def _read_chunks(self, pieces: list["_Piece"], limit: int) -> None:
        """Render and read, in one vision-tower batch, every prompt chunk the pieces hold that was not
        read yet, and ahead of them each row's next chunks while the batch holds at most as many
        images as ``limit`` entries would (interleaved pieces hold one chunk each)."""
        need = [(p.seq, c) for p in pieces for c in p.items if isinstance(c, int) and c not in p.seq.visual]
        if not need:
            return
        room = max(limit // self.n_visual, len(need)) - len(need)
        seen = {(id(s), c) for s, c in need}
        for p in pieces:
            nxt = max((c for c in p.items if isinstance(c, int)), default=-1) + 1
            for c in range(nxt, len(p.seq.chunks)):
                if room <= 0:
                    break
                if c not in p.seq.visual and (id(p.seq), c) not in seen:
                    need.append((p.seq, c))
                    seen.add((id(p.seq), c))
                    room -= 1
        texts, styles = zip(*(s.chunks[c] for s, c in need))
        for (s, c), v in zip(need, self._encode(list(texts), list(styles))):
            s.visual[c] = v
        if self._report is not None:
            self._report.prefill_chunks += len(need)

    def _chunk_visual(self, seq: _Seq, chunk: int) -> torch.Tensor:
        """A prompt chunk's visual tokens ``(n_visual, D)`` (read by :meth:`_read_chunks`); the chunk
        enters the row's memory."""
        seq.memory.append(seq.chunks[chunk][0])
        seq.stats.chunks_compressed += 1
        seq.stats.visual_tokens += self.n_visual
        return seq.visual.pop(chunk)

    # -- internals: decode -----------------------------------------------------------------

    def _chunk_text(self, seq: _Seq, ids: Sequence[int]) -> str:
        text, seq.carry = self.processor.chunk_text(seq.carry, ids)
        return text

    def _decode(self, seqs: list[_Seq]) -> None:
        # the fit rule: a token whose text would not fit the open window's image closes the window
        # first (it was sampled with the window's text in sight, as the layout's fit_cut says)
        overflow = [s for s in seqs if s.req.mode == Mode.GCC and s.window and not s.fit.push(s.generated[-1])]
        if overflow and not self._compress(overflow):
            seqs = [s for s in seqs if s not in overflow]
            if not seqs:
                return
        for s in overflow:
            assert s.fit.push(s.generated[-1])  # it begins the new window (or raises if it never fits)
        for s in seqs:
            if s.req.mode == Mode.GCC and not s.window and s not in overflow:
                s.fit.push(s.generated[-1])
        try:
            self._check_room([s.row for s in seqs], 1)
        except _CacheFull:
            for s in seqs:  # the memory limit is reached: these rows cannot continue
                self._finish(s, "length")
            return
        with self._phase("decode"):
            self._decode_step(seqs)
        if self._report is not None:
            self._report.decode_rows += len(seqs)
        for s in seqs:
            s.window.append(s.generated[-1])
            self._update_kv_stats(s)
        full = [s for s in seqs if s.req.mode == Mode.GCC and s.fit.full]  # K tokens: closed right away
        if full:
            self._compress(full)

    @torch.no_grad()
    def _compress(self, seqs: list[_Seq]) -> bool:
        """Close the open windows of these rows: render, read, and run their visual tokens through the
        LLM after the window (they attend to it), then evict the window. False if the memory limit was
        reached (the rows are finished)."""
        cache, n_visual = self._cache, self.n_visual
        try:
            self._check_room([s.row for s in seqs], n_visual)
        except _CacheFull:
            for s in seqs:
                self._finish(s, "length")
            return False
        with self._phase("compress"):
            texts = [self._chunk_text(s, s.window) for s in seqs]
            visual = self._encode(texts, ["plain"] * len(seqs))
            ends = [cache.host_length[s.row] for s in seqs]
            bases = [e - len(s.window) for e, s in zip(ends, seqs)]  # where the window began
            logits = self._forward([s.row for s in seqs], visual, [list(range(b, b + n_visual)) for b in bases],
                                   [list(range(e, e + n_visual)) for e in ends])
        if self._report is not None:
            self._report.decode_chunks += len(seqs)
            self._report.compress_kv += ends
        for s, lg, b, e, text in zip(seqs, logits, bases, ends, texts):
            cache.evict(s.row, b, e, n_visual)
            s.logits = lg
            s.stats.kv_tokens_peak = max(s.stats.kv_tokens_peak, e + n_visual)  # text and visual, briefly
            s.memory.append(text)
            s.stats.chunks_compressed += 1
            s.stats.visual_tokens += n_visual
            assert s.carry == s.fit.carry  # the fit state saw exactly the bytes the image shows
            s.window = []
            s.fit = self.processor.chunk_fit(self.K, s.carry)
            self._update_kv_stats(s)
        return True

    def _sample(self, seq: _Seq) -> int:
        if self.record_logits:
            seq.recorded.append(seq.logits.detach().cpu().clone())
        tok = seq.sampler(seq.logits, seq.history)
        if not seq.generated:
            seq.t_first = time.perf_counter()
            seq.stats.ttft_s = seq.t_first - seq.t_start
        seq.generated.append(tok)
        seq.history.append(tok)
        seq.stats.generated_tokens += 1
        # what a plain LLM would hold at this moment: every token fed so far (the newest is not fed yet)
        seq.stats.kv_tokens_uncompressed = seq.stats.prompt_tokens + seq.stats.generated_tokens - 1
        return tok

    def _finish_reason(self, seq: _Seq, tok: int) -> str:
        if seq.decoder.stopped:
            return "stop"
        if tok in seq.stop_ids:
            return "eos"
        if len(seq.generated) >= seq.req.params.max_new_tokens:
            return "length"
        return ""

    def _update_kv_stats(self, seq: _Seq) -> None:
        st, n = seq.stats, self._cache.host_length[seq.row]
        st.kv_tokens = n
        st.kv_tokens_peak = max(st.kv_tokens_peak, n)
        st.kv_bytes = n * self._cache.bytes_per_token
        st.kv_bytes_peak = st.kv_tokens_peak * self._cache.bytes_per_token

    def _finish(self, seq: _Seq, reason: str) -> None:
        seq.done = True
        seq.stats.finish_reason = reason
        elapsed = time.perf_counter() - seq.t_first if seq.t_first else 0.0
        if elapsed > 0 and seq.stats.generated_tokens > 1:
            seq.stats.tokens_per_s = (seq.stats.generated_tokens - 1) / elapsed
        self._running.pop(seq.row, None)
        self._cache.set_length(seq.row, 0)
        self._finished[seq.rid] = Result(
            seq.rid, seq.decoder.text, list(seq.generated), seq.stats, list(seq.memory),
            seq.recorded if self.record_logits else None,
        )


def _pad_left(embeds: list[torch.Tensor]) -> torch.Tensor:
    """Rows ``(T_i, D)`` -> ``(b, max T_i, D)``, zeros first: every row's last entry is the last one,
    whose logits the forward returns."""
    return torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True, padding_side="left")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _CacheFull(Exception):
    pass
