"""Generation with global context compression: the engine's public API and its loop.

The engine's core speaks token ids: text enters at its edge (:meth:`Engine.request` tokenizes, and
splits a chat with :func:`vist2.chat.prompt_parts`) and leaves through each request's streaming
decoder. Chunk images are drawn from text, not ids, so a prompt chunk's text is made with its plan
and a closed window's by the compressor (both :func:`vist2.text.chunk_text`). Its parts, one file each:

- :mod:`.scheduler` — a prompt's layout and footprint (:func:`~.scheduler.plan_prompt`), and each step's
  decisions (:meth:`~.scheduler.Scheduler.schedule` → :class:`~.scheduler.StepPlan`: admissions into
  cache rows, prefill in pieces of at most ``prefill_budget`` entries, the rows that decode);
- :mod:`.request` — a request's state inside the engine, its status and finish reason;
- :mod:`.kv_rows` — the cache rows: allocation, every length change, the prefix cache;
- :mod:`.runner` — runs the model: prefill and compression forwards, the decode step and its CUDA
  graphs, padding, chunk images through the vision tower (and the encoder cache);
- :mod:`.compress` — the open window of generated text, closed into visual tokens;
- :mod:`.encoder_cache`, :mod:`.prefix_cache` — prompt chunks' visual tokens, and the K/V of prompts' starts,
  kept across requests (a prompt that starts as a cached one is fed from where the cache ends);
- :mod:`.types` — requests, results, stats, the compression :class:`~vist2.modes.Mode`.

Per sequence:

1. **prefill** — the prompt's chunks are rendered and read by the vision tower in batches; with
   the ``visual`` prompt encoding the raw prefix and every chunk's visual tokens are one causal
   run (one forward when it fits the budget). Rows prefilling at the same time share each forward
   (left-padded) and each vision-tower batch. While other rows decode, at most ``prefill_budget``
   entries per step are fed (chunked prefill), so an admission never stalls them for long;
2. **decode** — one token at a time; in ``gcc`` mode the text window is closed when it holds
   K tokens, or when a sampled token's text would no longer fit the image (the processor's
   running fit state decides; the token then begins the next window). The closed window is
   rendered, read by the vision tower and aligner, and its β visual tokens run through the
   LLM attending to the cache; their K/V replace the window. Chunks are cut exactly where
   ``VIST2Processor.chunker(K)`` cuts them in training.

Modes share this one code path: ``gcc`` (prompt and output compressed, the paper), ``pcc`` (prompt
only, the Glyph-style baseline) and ``none`` (a plain LLM).

Example::

    >>> from vist2.engine import Engine, SamplingParams
    >>> engine = Engine.from_pretrained("runs/tiny")                       # doctest: +SKIP
    >>> out = engine.generate_text(["Once upon a time"], SamplingParams(max_new_tokens=200))  # doctest: +SKIP
    >>> out[0].text, out[0].stats.kv_tokens, out[0].stats.kv_tokens_uncompressed   # doctest: +SKIP
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, Iterator, Sequence

import torch

from ..chat import prompt_parts
from ..layout import PROMPT_ENCODINGS, pays
from ..modeling import VIST2ForCausalLM
from ..processing import VIST2Processor
from ..runtime import eos_ids, load_checkpoint
from .compress import Compressor, Window
from .kv_rows import CacheFull, KVRows
from .prefix_cache import PrefixCache
from .request import FinishReason, RequestState
from .runner import ModelRunner, pad_left
from .sampling import SamplingParams
from .scheduler import PrefillBatch, PromptPlan, Scheduler, chunks_to_read, plan_prompt
from .types import Event, Mode, Request, Result, StepReport


_REDRAWS = 16  # draws of a fit-cut boundary token before it falls back to the proposal (see Engine._redraw)


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
        vision_batch: images the vision tower reads at once (a batch of chunks is read in micro-batches
            of this size, so its activations stay bounded however long the prompt).
        encoder_cache_bytes: keep prompt chunks' visual tokens across requests, up to this many bytes
            (:class:`~.encoder_cache.EncoderCache`): a chunk seen before (same text, style, render config
            and weights) is not rendered or read again. 0 (the default) turns it off, so a library
            engine computes every request from scratch: benchmarks and evaluations that repeat a
            prompt measure the vision tower, not a lookup. ``vist2 serve`` turns it on. (Its old name,
            ``memory_cache_bytes``, still works and warns.)
        prefix_cache_bytes: keep the LLM's K/V of prompts' starts (whole chunks, raw text in blocks) across
            requests, up to this many bytes (:class:`~.prefix_cache.PrefixCache`): a prompt that begins as
            a cached one copies those entries and feeds only the rest. None: the encoder cache's bound
            (a bound of its own; both on or both off); needs the encoder cache on.
        prompt_encoding: how a prompt's compressed chunks enter the LLM (``visual`` or ``interleaved``,
            :func:`vist2.layout.prompt_segments`); None: the model's ``prompt_encoding``. Evaluations
            that write after a context in another layout than the model's set it.
    """

    def __init__(self, model: VIST2ForCausalLM, processor: VIST2Processor, max_batch: int = 8,
                 max_cache_tokens: int | None = None, record_logits: bool = False, prefill_budget: int = 2048,
                 max_prefills_per_step: int = 1, cuda_graphs: bool | None = None,
                 observer: Callable[[StepReport], None] | None = None, render_workers: int = 1,
                 encoder_cache_bytes: int = 0, vision_batch: int = 4, prefix_cache_bytes: int | None = None,
                 prompt_encoding: str | None = None, memory_cache_bytes: int | None = None):
        if max_batch <= 0:
            raise ValueError(f"max_batch must be > 0, got {max_batch}")
        cfg = model.config
        self.processor = processor
        self.K, self.n_visual = cfg.chunk_tokens, cfg.n_visual
        self.prompt_encoding = prompt_encoding or cfg.prompt_encoding
        if self.prompt_encoding not in PROMPT_ENCODINGS:
            raise ValueError(f"prompt_encoding must be one of {', '.join(PROMPT_ENCODINGS)}, got {prompt_encoding!r}")
        self.max_batch = max_batch
        self.max_cache_tokens = max_cache_tokens or cfg.text_config.max_position_embeddings
        self.record_logits = record_logits
        if prefill_budget < self.n_visual:
            raise ValueError(f"prefill_budget must be >= n_visual={self.n_visual} (one chunk's visual tokens "
                             f"are fed together), got {prefill_budget}")
        self.prefill_budget = prefill_budget
        if memory_cache_bytes is not None:  # the old name
            warnings.warn("Engine(memory_cache_bytes=...) is deprecated: use encoder_cache_bytes", DeprecationWarning,
                          stacklevel=2)
            if encoder_cache_bytes:
                raise ValueError("pass encoder_cache_bytes only (memory_cache_bytes is its old name)")
            encoder_cache_bytes = memory_cache_bytes
        prefix_cache_bytes = encoder_cache_bytes if prefix_cache_bytes is None else prefix_cache_bytes
        if prefix_cache_bytes and not encoder_cache_bytes:
            raise ValueError("prefix_cache_bytes needs the encoder cache on (encoder_cache_bytes > 0)")
        self.max_prefills_per_step = max(1, max_prefills_per_step)
        self.runner = ModelRunner(model, processor, max_batch, self.max_cache_tokens, cuda_graphs, render_workers,
                                  encoder_cache_bytes, vision_batch)
        # the K/V of prompts' starts kept across requests (None: off), owned by the row manager
        prefix = (PrefixCache(prefix_cache_bytes, (processor.render_config, self.prompt_encoding, cfg.n_visual))
                  if prefix_cache_bytes else None)
        self.kv = KVRows(lambda: self.runner.cache, max_batch, self.max_cache_tokens, prefix, self.runner.scope)
        self.compressor = Compressor(self.runner, self.kv, processor, self.K, self.n_visual)
        self.eos = eos_ids(cfg.text_config, processor.tokenizer)
        self.scheduler = Scheduler(max_batch, self.kv, processor, self.eos, self.n_visual, prefill_budget,
                                   self.max_prefills_per_step)
        self.observer = observer
        self._report: StepReport | None = None
        self._n_steps = 0

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype | None = None, device: str | None = None, **kwargs) -> "Engine":
        model, processor = load_checkpoint(folder, device, dtype or torch.float32)
        return cls(model, processor, **kwargs)

    @property
    def model(self) -> VIST2ForCausalLM:
        return self.runner.model

    @property
    def device(self) -> torch.device:
        return self.runner.device

    # -- requests ---------------------------------------------------------------------

    def request(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                params: SamplingParams | None = None, mode: Mode | str = Mode.GCC,
                question: str | None = None, history: str = "raw") -> Request:
        """Tokenize a plain prompt, or chat ``messages`` (:func:`vist2.chat.prompt_parts`: the last user
        turn is the compressed query, or with ``history="compressed"`` the whole chat through it, styled
        by role; its optional ``question`` field is the question). With a plain prompt, ``question`` is
        appended to it the same way: ``prompt + "\\n" + question``."""
        params = (params or SamplingParams()).validate()
        mode = Mode.parse(mode)
        p = prompt_parts(self.processor.tokenizer, prompt, messages, question, history)
        return Request(query=p.query, prefix=p.prefix, suffix=p.suffix, params=params, mode=mode,
                       question=p.question, styles=p.styles)

    def plan(self, request: Request) -> PromptPlan:
        """The prompt's layout and footprint (:func:`~.scheduler.plan_prompt`). Reads no engine state:
        callers may compute it on other threads and hand it to :meth:`add`."""
        request.mode = Mode.parse(request.mode)
        return plan_prompt(request, self.processor, self.K, self.n_visual, self.prompt_encoding)

    def footprint(self, request: Request) -> int:
        """Cache entries the prompt needs at its peak (the row's memory limit must hold them)."""
        return self.plan(request).footprint

    def add(self, request: Request, plan: PromptPlan | None = None) -> int:
        """Queue a request; returns its id. ``plan``: its :meth:`plan`, if already made. Raises ValueError
        if its prompt cannot fit the memory limit."""
        request.params.validate()
        request.mode = Mode.parse(request.mode)
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        plan = plan or self.plan(request)
        if plan.footprint > self.max_cache_tokens:
            raise ValueError(
                f"the prompt needs {plan.footprint} KV entries ({len(request.prompt_ids)} tokens, mode "
                f"{request.mode}), over the memory limit max_cache_tokens={self.max_cache_tokens}"
            )
        return self.scheduler.add(request, plan)

    # -- running ------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def encoder_cache_stats(self) -> dict | None:
        """The encoder cache's counters and occupancy (:meth:`EncoderCache.stats`), the prefix cache's under
        ``prefix`` (:meth:`PrefixCache.stats`, None when off); None when the encoder cache is off."""
        encoder, prefix = self.runner.encoder_cache, self.kv.prefix
        return None if encoder is None else encoder.stats() | {"prefix": None if prefix is None else prefix.stats()}

    memory_cache_stats = encoder_cache_stats  # the old name

    def cache_usage(self) -> dict:
        """Cache occupancy: live entries per running request, capacity, bytes per entry and allocated."""
        c = self.runner.cache
        return {"kv_tokens": {s.rid: c.host_length[r] for r, s in self.scheduler.running.items()},
                "capacity": c.capacity, "rows": c.rows, "bytes_per_token": c.bytes_per_token,
                "bytes_allocated": c.bytes_allocated}

    def step(self) -> list[Event]:
        """One scheduler step: the scheduler decides it (:meth:`Scheduler.schedule`: admissions into free
        rows, the prompt pieces to feed, at most ``prefill_budget`` entries while other rows decode, and
        the rows that decode); the engine runs it: prefill forwards, then a token sampled and fed for
        every row whose prompt is in."""
        self._n_steps += 1
        report = self._report = StepReport(self._n_steps) if self.observer else None
        self.runner.timings = report.seconds if report is not None else None
        plan = self.scheduler.schedule()
        events = [Event(s.rid, "", None, True, s.stats) for s in plan.failed]
        for batch in plan.prefill:
            with self.runner.phase("prefill"):
                self._prefill_rows(batch)
            for seq, piece in batch.pieces:
                if piece.last:  # the prompt is in
                    if seq.req.mode == Mode.GCC:
                        seq.window = self.compressor.open(seq.plan.carry)  # the response goes on from the prompt
                    self._update_kv_stats(seq)
        if plan.decode:
            feed = self._sample(plan.decode, events)
            if feed:
                self._decode(feed)
        if report is not None:
            report.kv_tokens = {s.rid: self.kv.length(r) for r, s in self.scheduler.running.items()}
            self.observer(report)
        return events

    def _sample(self, seqs: list[RequestState], events: list[Event]) -> list[RequestState]:
        """Draw every row's next token and report it; returns the rows that go on (their token is fed).

        The paper's rule at every chunk boundary: the first token of a chunk is predicted from the
        memory, never from the chunk before it. A window of K tokens is closed right after its last
        token is fed; one that the fit rule closes learns it only now, when the drawn token does not
        fit its image: it is closed first (compressed where that pays) and the token drawn again from
        what the cache then holds, among the tokens that would not have fitted the closed window
        (:meth:`_redraw`). So the cuts of the generated text are the ones the fit rule makes on it, and
        every boundary token is predicted where training labels it."""
        with self.runner.phase("sample"):
            drawn = {s: self._draw(s, events) for s in seqs}
        seqs = [s for s in seqs if drawn[s] is not None]
        overflow = [s for s in seqs if s.window is not None and s.window.tokens and not s.window.push(drawn[s])]
        if overflow:
            squeezed = {s: s.window for s in overflow if pays(len(s.window.tokens), self.n_visual)}
            going = set(self._close(overflow))
            seqs = [s for s in seqs if s in going or s not in overflow]
            with self.runner.phase("sample"):
                for s in going.intersection(squeezed):  # a short window stays text: its token stands as drawn
                    drawn[s] = self._redraw(s, squeezed[s], drawn[s], events)
            seqs = [s for s in seqs if drawn[s] is not None]
        return [s for s in seqs if self._accept(s, drawn[s], events)]

    def _redraw(self, seq: RequestState, closed: Window, proposal: int, events: list[Event]) -> int | None:
        """The boundary token after a fit cut, drawn from the logits after the memory, conditioned on
        what made the cut: it does not fit the closed window. Tokens drawn that would fit are masked
        and the draw repeated (at most ``_REDRAWS`` times; then the proposal, which does not fit)."""
        if self.record_logits:
            seq.recorded.pop()  # the proposal's distribution: the token is drawn again from the new one
        logits = seq.logits
        for i in range(_REDRAWS):
            tok = self._draw(seq, events, logits, record=i == 0)
            if tok is None or not closed.fits(tok):
                return tok
            logits = logits.clone() if i == 0 else logits
            logits[tok] = float("-inf")
        return proposal

    def _draw(self, seq: RequestState, events: list[Event], logits: torch.Tensor | None = None,
              record: bool = True) -> int | None:
        """A token drawn from the row's logits (not yet its own); None if drawing failed (the row is finished)."""
        logits = seq.logits if logits is None else logits
        if self.record_logits and record:
            seq.recorded.append(logits.detach().cpu().clone())
        try:
            return seq.sampler(logits, seq.history)
        except Exception as e:  # noqa: BLE001 - one row's sampling failing must not end the other rows
            seq.stats.error = f"{type(e).__name__}: {e}"
            self._finish(seq, FinishReason.ERROR)
            events.append(Event(seq.rid, "", None, True, seq.stats))
            return None

    def _accept(self, seq: RequestState, tok: int, events: list[Event]) -> bool:
        """The token is the row's: report it; True if the row goes on."""
        if not seq.generated:
            seq.t_first = time.perf_counter()
            seq.stats.ttft_s = seq.t_first - seq.t_start
        seq.generated.append(tok)
        seq.history.append(tok)
        seq.stats.generated_tokens += 1
        # what a plain LLM would hold at this moment: every token fed so far (the newest is not fed yet)
        seq.stats.kv_tokens_uncompressed = seq.stats.prompt_tokens + seq.stats.generated_tokens - 1
        # an end-of-sequence token ends the text; it is not part of it
        delta = "" if tok in seq.stop_ids else seq.decoder.push(tok)
        reason = seq.stop_reason(tok)
        if reason:
            delta += seq.decoder.finish() if reason != FinishReason.STOP else ""
            self._finish(seq, reason)
            events.append(Event(seq.rid, delta, tok, True, seq.stats))
            return False
        events.append(Event(seq.rid, delta, tok, False))
        return True

    def abort(self, request_id: int) -> Result | None:
        """Drop a request (waiting or running), freeing its row. Returns its final result (finish reason
        ``abort``, what it generated so far), or None if it is not waiting or running."""
        return self.scheduler.abort(request_id, self.record_logits)

    def stream(self, requests: Sequence[Request]) -> Iterator[Event]:
        """Run requests to completion, yielding events as they happen."""
        ids = [self.add(r) for r in requests]
        pending = set(ids)
        while pending:
            for ev in self.step():
                if ev.request_id in pending:
                    if ev.done:
                        pending.discard(ev.request_id)
                        ev.result = self.scheduler.finished.pop(ev.request_id, None)
                    yield ev

    def generate(self, requests: Sequence[Request]) -> list[Result]:
        """Run requests to completion; results in request order."""
        ids = [self.add(r) for r in requests]
        while any(i not in self.scheduler.finished for i in ids):
            self.step()
        return [self.scheduler.finished.pop(i) for i in ids]

    def result(self, request_id: int) -> Result | None:
        """The result of a finished request (handed out once)."""
        return self.scheduler.finished.pop(request_id, None)

    def generate_text(self, prompts: Sequence[str], params: SamplingParams | None = None,
                      mode: Mode | str = Mode.GCC) -> list[Result]:
        return self.generate([self.request(p, params=params, mode=mode) for p in prompts])

    # -- prefill ---------------------------------------------------------------------------

    def _prefill_rows(self, batch: PrefillBatch) -> None:
        """One LLM forward over one prompt piece of each row (as the scheduler cut them), left-padded to
        the longest; every prompt chunk the pieces hold is read in one vision-tower batch."""
        runner, kv = self.runner, self.kv
        rows, pieces = [s for s, _ in batch.pieces], [p for _, p in batch.pieces]
        assert all(p.start == kv.length(s.row) for s, p in batch.pieces), "a piece starts where its row ends"
        self._read_chunks(pieces, batch.limit)
        embeds = [torch.cat([runner.embed_text(torch.tensor([x]))[0] if isinstance(x, list)
                             else self._chunk_visual(seq, x) for x in p.items]) for seq, p in zip(rows, pieces)]
        logits = runner.forward([s.row for s in rows], pad_left(embeds), [p.positions for p in pieces],
                                [list(range(p.start, p.end)) for p in pieces])
        for seq, p, lg in zip(rows, pieces, logits):
            seq.logits = lg
            seq.stats.kv_tokens_peak = max(seq.stats.kv_tokens_peak, p.end)
            if p.evict is not None:
                kv.evict(seq.row, p.evict[0], p.evict[1], self.n_visual)
            else:
                kv.wrote(seq.row, p.end)
            kv.settle(seq.row, p.settled)
        if self._report is not None:
            self._report.prefill_tokens += sum(p.used for p in pieces)
            self._report.prefill_rows.append(len(pieces))

    def _read_chunks(self, pieces, limit: int) -> None:
        """Render and read, in one vision-tower batch, the prompt chunks the pieces need (and some ahead)."""
        need = chunks_to_read(pieces, limit, self.n_visual)
        if not need:
            return
        texts, styles = zip(*(f.chunks[c] for f, c in need))
        salt = {id(s.feed): s.req.cache_salt for s in self.scheduler.running.values()}
        visual, hits = self.runner.read_prompt_chunks(list(texts), list(styles), [salt[id(f)] for f, _ in need])
        owner = {id(s.feed): s.stats for s in self.scheduler.running.values()}
        for (f, c), v, hit in zip(need, visual, hits):
            f.visual[c] = v
            if hit:
                owner[id(f)].memory_hits += 1
            else:
                owner[id(f)].memory_misses += 1
        if self._report is not None:
            self._report.prefill_chunks += len(need) - sum(hits)  # read by the vision tower

    def _chunk_visual(self, seq: RequestState, chunk: int) -> torch.Tensor:
        """A prompt chunk's visual tokens ``(n_visual, D)`` (read by :meth:`_read_chunks`); the chunk
        enters the row's memory."""
        seq.memory.append(seq.feed.chunks[chunk][0])
        seq.stats.chunks_compressed += 1
        seq.stats.visual_tokens += self.n_visual
        return seq.feed.visual.pop(chunk)

    # -- decode ----------------------------------------------------------------------------

    def _decode(self, seqs: list[RequestState]) -> None:
        """Feed every row's newest token (it begins a new window where the last one closed); close the
        windows it fills (K tokens)."""
        for s in seqs:
            if s.window is not None and not s.window.tokens:
                taken = s.window.push(s.generated[-1])  # or raises if it never fits an image
                assert taken
        try:
            self.kv.check_room([s.row for s in seqs], 1)
        except CacheFull:
            for s in seqs:  # the memory limit is reached: these rows cannot continue
                self._finish(s, FinishReason.LENGTH)
            return
        with self.runner.phase("decode"):
            logits = self.runner.decode({s.row: s.generated[-1] for s in seqs})
        if self._report is not None:
            self._report.decode_rows += len(seqs)
        for s in seqs:
            s.logits = logits[s.row]
            self._update_kv_stats(s)
        full = [s for s in seqs if s.window is not None and s.window.full]  # K tokens: closed right away
        if full:
            self._close(full)

    def _close(self, seqs: list[RequestState]) -> list[RequestState]:
        """Close the open windows of these rows: compressed where that pays (:func:`vist2.layout.pays`),
        else their text stays in the cache as it is. Returns the rows that go on (the others reached
        the memory limit and are finished)."""
        squeeze = [s for s in seqs if pays(len(s.window.tokens), self.n_visual)]
        for s in seqs:
            if s not in squeeze:  # a short window the fit rule closed: its text stays, a new window begins
                s.window = self.compressor.open(s.window.fit.carry)
        if not squeeze:
            return seqs
        rows = [s.row for s in squeeze]
        ends = [self.kv.length(r) for r in rows]
        peaks = [e + self.n_visual for e in ends]  # text and visual, briefly
        try:
            texts, logits = self.compressor.close(rows, [s.window for s in squeeze])
        except CacheFull:
            for s in squeeze:
                self._finish(s, FinishReason.LENGTH)
            return [s for s in seqs if s not in squeeze]
        if self._report is not None:
            self._report.decode_chunks += len(rows)
            self._report.compress_kv += ends
        for s, lg, peak, text in zip(squeeze, logits, peaks, texts):
            s.logits = lg
            s.stats.kv_tokens_peak = max(s.stats.kv_tokens_peak, peak)
            s.memory.append(text)
            s.stats.chunks_compressed += 1
            s.stats.visual_tokens += self.n_visual
            s.window = self.compressor.open(s.window.fit.carry)
            self._update_kv_stats(s)
        return seqs

    def _update_kv_stats(self, seq: RequestState) -> None:
        st, n, per = seq.stats, self.kv.length(seq.row), self.runner.cache.bytes_per_token
        st.kv_tokens = n
        st.kv_tokens_peak = max(st.kv_tokens_peak, n)
        st.kv_bytes = n * per
        st.kv_bytes_peak = st.kv_tokens_peak * per

    def _finish(self, seq: RequestState, reason: FinishReason) -> None:
        self.scheduler.finish(seq, reason, self.record_logits)
