"""Scheduling: which requests hold cache rows, and what each step runs.

- :func:`plan_prompt` lays a request's prompt out (:func:`vist2.layout.prompt_layout`: query chunks
  cut by the fit rule, the tail rule, raw prefix/suffix) and counts the cache entries it needs at its
  peak. It reads no engine state, so it can run off the engine thread (tokenizer pools, servers).
- :class:`PromptFeed` turns that layout into prefill operations (raw text; a chunk's visual tokens,
  after its text in the interleaved encoding) and hands them out in pieces of at most a budget of
  cache entries (:meth:`PromptFeed.take`), so a long prompt enters over several steps.
- :class:`Scheduler` keeps the waiting queue, the running requests and the finished results, and
  decides each step (:meth:`Scheduler.schedule`): a :class:`StepPlan` of the requests admitted into
  free rows, the prefill pieces of the step (in forwards of rows fed together) and the requests that
  sample and decode. The engine executes the plan; the row manager (:mod:`.kv_rows`) gives the rows.

    >>> plan = plan_prompt(request, processor, K=64, n_visual=16, prompt_encoding="visual")  # doctest: +SKIP
    >>> plan.footprint                                                                        # doctest: +SKIP
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..layout import Raw, Sample, Segment, build_sample, prompt_layout
from ..positions import Kind
from ..processing import VIST2Processor
from .kv_rows import KVRows
from .request import FinishReason, RequestState, RequestStatus
from .types import Mode, Request, Result

Row = RequestState  # the former name of a request's state in its cache row


@dataclass(frozen=True)
class PromptPlan:
    """A prompt's layout: its segments and their laid-out sample (:func:`vist2.layout.build_sample`: every
    slot's position, kind and chunk, the one source the prompt is fed from), the cache entries it needs at
    its peak (a compressed chunk briefly holds its text and its visual tokens; one more entry for the
    first generated token), and what each of its images shows: ``(text, style)`` per compressed chunk, in
    order (a style per character where they differ). All of it is made off the engine thread when a
    server plans its requests."""

    segments: tuple[Segment, ...]
    footprint: int
    carry: bytes = b""  # bytes of a character split at the query's end: the response's first image draws them
    chunks: tuple[tuple[str, Any], ...] = ()
    sample: Sample | None = None  # the layout of `segments` (build_sample); None: laid out when fed


def plan_prompt(req: Request, processor: VIST2Processor, chunk_tokens: int, n_visual: int,
                prompt_encoding: str) -> PromptPlan:
    """Lay out a request's prompt as the engine will feed it (mode ``none``: one raw run)."""
    carry = b""
    if req.mode == Mode.NONE:
        segments: list[Segment] = [Raw(tuple(req.prompt_ids))]
    else:
        segments, carry = prompt_layout(req.prefix, req.query, req.suffix, chunk_tokens, n_visual, prompt_encoding,
                                        processor.chunker(chunk_tokens), req.question, req.styles)
    sample = build_sample(segments)
    chunks, cy = [], b""
    for c in sample.chunks:  # what each image shows (the carries the chunker recorded)
        cy = cy if c.carry is None else c.carry
        style = processor.char_styles(cy, c.tokens, c.style)  # before the carry moves
        text, cy = processor.chunk_text(cy, c.tokens)
        chunks.append((text, style))
    return PromptPlan(tuple(segments), sample.peak + 1, carry, tuple(chunks), sample)


@dataclass
class PrefillOp:
    """One piece of a prompt's prefill: text tokens, or one chunk's visual tokens (``n_text`` > 0:
    the chunk's text was fed just before, interleaved, and is evicted after them), at the positions
    the prompt's layout gives them."""

    kind: str  # "text" | "visual"
    tokens: list[int] = field(default_factory=list)
    chunk: int = -1  # the chunk it feeds (an interleaved chunk's text too); -1: raw text
    n_text: int = 0
    positions: list[int] = field(default_factory=list)


def _runs(sample: Sample) -> list[tuple[int, int, int, int]]:
    """``(kind, chunk, start, end)`` of each run of slots of one kind and chunk, in order."""
    out, t, n = [], 0, len(sample)
    while t < n:
        u = t
        while u < n and sample.kind[u] == sample.kind[t] and sample.chunk[u] == sample.chunk[t]:
            u += 1
        out.append((sample.kind[t], sample.chunk[t], t, u))
        t = u
    return out


@dataclass
class PrefillPiece:
    """What one prefill forward feeds of one row: cache entries ``[start, end)``; ``items`` are text
    token lists and chunk numbers (their visual tokens), in order; ``evict``: an interleaved chunk's
    text span, dropped after the forward."""

    feed: "PromptFeed"
    start: int
    end: int
    items: list[list[int] | int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    evict: tuple[int, int] | None = None
    settled: int = 0  # the prompt's first entries whose K/V is final once this piece is fed
    ahead: int = 0  # the feed's first chunk not taken after this piece (chunks read ahead start there)
    last: bool = False  # the prompt's last piece

    @property
    def length_after(self) -> int:
        """The row's length once the piece is fed (an interleaved chunk's text evicted)."""
        return self.end if self.evict is None else self.evict[0] + self.feed.n_visual

    @property
    def used(self) -> int:
        return self.end - self.start


class PromptFeed:
    """A prompt while it is prefilled: the operations left, every chunk's (text, style) in order (from its
    :class:`PromptPlan`), and the visual tokens of chunks read ahead."""

    def __init__(self, plan: PromptPlan, n_visual: int, reused: int = 0):
        self.n_visual = n_visual
        self.ops: deque[PrefillOp] = deque()
        self.chunks = plan.chunks  # (text, style: one or per character)
        self.visual: dict[int, torch.Tensor] = {}  # chunk -> its (n_visual, D) tokens, read ahead
        self.settled = reused  # the prompt's first cache entries whose K/V is final once the pieces taken are fed
        sample = plan.sample if plan.sample is not None else build_sample(plan.segments)
        pos, ids = sample.position, sample.input_ids
        # the first `reused` entries are in the row already (the prefix cache): a kept slot's cache index is
        # its position, so the slots at positions below `reused` are skipped
        text: PrefillOp | None = None  # an interleaved chunk's text, waiting for its visual tokens
        for kind, chunk, t, u in _runs(sample):
            if kind == Kind.TEXT and chunk < 0:  # raw text
                cut = max(0, min(u - t, reused - pos[t]))
                if t + cut < u:
                    self.ops.append(PrefillOp("text", list(ids[t + cut : u]), positions=list(pos[t + cut : u])))
            elif kind == Kind.TEXT:
                assert sample.evicted[t], "a prompt chunk's text is evicted (interleaved) or never fed (visual)"
                text = PrefillOp("text", list(ids[t:u]), chunk=chunk, positions=list(pos[t:u]))
            else:
                n_text = len(text.tokens) if text is not None and text.chunk == chunk else 0
                if pos[t] < reused:
                    assert pos[u - 1] < reused, "a chunk is reused whole or not at all"
                else:
                    if n_text:
                        self.ops.append(text)
                    self.ops.append(PrefillOp("visual", chunk=chunk, n_text=n_text, positions=list(pos[t:u])))
                text = None
        self.first_chunk = next((op.chunk for op in self.ops if op.chunk >= 0), len(self.chunks))  # before: reused

    @property
    def done(self) -> bool:
        return not self.ops

    @property
    def next_chunk(self) -> int:
        """The first chunk not yet taken (all chunks: their number)."""
        return next((op.chunk for op in self.ops if op.chunk >= 0), len(self.chunks))

    def take(self, start: int, budget: int) -> PrefillPiece:
        """The next prompt entries, at most ``budget``, written from cache index ``start``. A piece ends
        after an interleaved chunk's visual tokens (its text is then evicted). With the visual encoding
        a whole prompt of chunks is one causal run of visual tokens."""
        p, n_visual = PrefillPiece(self, start, start), self.n_visual
        while self.ops and p.used < budget:
            op = self.ops[0]
            if op.kind == "text":
                take = op.tokens[: budget - p.used]
                assert op.positions[0] == p.end, "a text entry's cache index is its position"
                p.positions += op.positions[: len(take)]
                del op.tokens[: len(take)], op.positions[: len(take)]
                p.items.append(take)
                p.end += len(take)
                self.settled += len(take) if op.chunk < 0 else 0  # a chunk's text is evicted, not kept
                if not op.tokens:
                    self.ops.popleft()
                continue
            if p.used + n_visual > budget:
                break
            self.ops.popleft()
            p.items.append(op.chunk)
            assert op.positions[0] == p.end - op.n_text, "visual tokens take the positions of their chunk's text"
            p.positions += op.positions
            p.end += n_visual
            self.settled += n_visual
            if op.n_text:
                p.evict = (p.end - n_visual - op.n_text, p.end - n_visual)
                break
        p.settled, p.ahead, p.last = self.settled, self.next_chunk, self.done
        return p


def chunks_to_read(pieces: Sequence[PrefillPiece], limit: int, n_visual: int) -> list[tuple[PromptFeed, int]]:
    """The prompt chunks to read in one vision-tower batch: every chunk the pieces hold that was not read
    yet, and ahead of them each row's next chunks while the batch holds at most as many images as
    ``limit`` entries would (interleaved pieces hold one chunk each)."""
    need = [(p.feed, c) for p in pieces for c in p.items if isinstance(c, int) and c not in p.feed.visual]
    if not need:
        return []
    room = max(limit // n_visual, len(need)) - len(need)
    seen = {(id(f), c) for f, c in need}
    for p in pieces:
        for c in range(p.ahead, len(p.feed.chunks)):  # not those fed already, nor those reused
            if room <= 0:
                break
            if c not in p.feed.visual and (id(p.feed), c) not in seen:
                need.append((p.feed, c))
                seen.add((id(p.feed), c))
                room -= 1
    return need


@dataclass
class PrefillBatch:
    """One prefill forward: a piece of each of some rows, fed together (left-padded), their prompt chunks
    read in one vision-tower batch; ``limit``: the padded entries it was allowed (chunks are read ahead
    up to as many images as that many entries would hold)."""

    pieces: list[tuple[RequestState, PrefillPiece]]
    limit: int

    @property
    def padded(self) -> int:
        """Entries the LLM computes: rows x longest piece."""
        return len(self.pieces) * max(p.used for _, p in self.pieces)


@dataclass
class StepPlan:
    """What one engine step runs, decided by :meth:`Scheduler.schedule` before anything runs.

    ``admitted``: requests that took a free row (their cached start already copied in); ``failed``:
    requests refused at admission (their result is final); ``prefill``: the step's prefill forwards
    in order (:class:`PrefillBatch`); ``decode``: the requests that sample a token and decode it. Which windows
    close is decided as the step runs, by the rule in :mod:`.compress`: a window closes when it holds
    K tokens (after the decode) or when the drawn token does not fit its image (after sampling)."""

    admitted: list[RequestState] = field(default_factory=list)
    failed: list[RequestState] = field(default_factory=list)
    prefill: list[PrefillBatch] = field(default_factory=list)
    decode: list[RequestState] = field(default_factory=list)


class Scheduler:
    """The waiting queue (FIFO), the running requests (``row -> state``), the results not yet collected,
    and the step's decisions (:meth:`schedule`).

    ``prefill_budget``: prompt entries (padded: rows x longest piece) per step while other rows decode;
    with none decoding, prompts are fed to their end in forwards of at most this many entries.
    ``max_prefills_per_step``: admissions per step."""

    def __init__(self, max_batch: int, kv: KVRows, processor: VIST2Processor, eos: Sequence[int], n_visual: int,
                 prefill_budget: int = 2048, max_prefills_per_step: int = 1):
        self.max_batch, self.kv, self.processor, self.eos = max_batch, kv, processor, tuple(eos)
        self.n_visual, self.prefill_budget = n_visual, prefill_budget
        self.max_prefills_per_step = max(1, max_prefills_per_step)
        self.waiting: deque[RequestState] = deque()
        self.running: dict[int, RequestState] = {}
        self.finished: dict[int, Result] = {}
        self._next_id = 0

    def add(self, request: Request, plan: PromptPlan) -> int:
        rid = self._next_id
        self._next_id += 1
        self.waiting.append(RequestState(rid, request, plan))
        return rid

    def schedule(self) -> StepPlan:
        """Decide the step: admit waiting requests into free rows, split the prefill budget into pieces
        (while any row decodes at most ``prefill_budget`` padded entries, else every prompt to its end),
        and name the requests that decode (those whose prompt is in after this step's pieces)."""
        step = StepPlan()
        self._admit(step)
        decoding = [s for s in self.running.values() if not s.prefilling]
        budget = self.prefill_budget if decoding else None
        lengths: dict[int, int] = {}  # rows' lengths once the pieces planned so far are fed
        while True:
            seqs = [s for s in self.running.values() if s.prefilling]
            limit = self.prefill_budget if budget is None else min(budget, self.prefill_budget)
            if not seqs or limit < self.n_visual:
                break
            batch = PrefillBatch(self._pieces(seqs, limit, lengths), limit)
            assert batch.pieces, "a forward of at least n_visual entries always feeds a piece"
            step.prefill.append(batch)
            if budget is not None:
                budget -= batch.padded
        step.decode = [s for s in self.running.values() if not s.prefilling]
        for s in step.decode:
            s.status = RequestStatus.DECODING
        return step

    def _admit(self, step: StepPlan) -> None:
        for _ in range(self.max_prefills_per_step):
            if not self.waiting or self.kv.n_free == 0:
                return
            state = self.waiting.popleft()
            row = self.kv.allocate()
            try:
                state.admit(row, self.processor, self.eos)
            except Exception as e:  # noqa: BLE001 - e.g. its sampler refused its params: fail this request only
                self.kv.release(row)
                state.stats.error = f"{type(e).__name__}: {e}"
                self.finished[state.rid] = state.finish(FinishReason.ERROR, keep_logits=False)
                step.failed.append(state)
                continue
            self.running[row] = state
            reused = self.kv.begin(row, state.plan, state.req.cache_salt)  # its cached start copied in
            state.begin(state.plan, PromptFeed(state.plan, self.n_visual, reused), reused)
            step.admitted.append(state)

    def _pieces(self, seqs: list[RequestState], limit: int,
                lengths: dict[int, int]) -> list[tuple[RequestState, PrefillPiece]]:
        """The next prompt piece of each row for one forward, of at most ``limit`` padded entries: the rows
        share ``limit`` evenly (each piece at least one chunk's visual tokens, the rows in admission order
        while they fit), so every prompt admitted together advances."""
        share = max(limit // len(seqs), self.n_visual)
        batch: list[tuple[RequestState, PrefillPiece]] = []
        for seq in seqs:
            if (len(batch) + 1) * share > limit:
                break
            piece = seq.feed.take(lengths.get(seq.row, self.kv.length(seq.row)), share)
            if piece.used:
                batch.append((seq, piece))
                lengths[seq.row] = piece.length_after
        return batch

    def finish(self, state: RequestState, reason: FinishReason | str, keep_logits: bool) -> None:
        """End a running request: its row is freed and its result kept until collected."""
        self.running.pop(state.row, None)
        self.kv.free(state.row)
        self.finished[state.rid] = state.finish(reason, keep_logits)

    def abort(self, request_id: int, keep_logits: bool = False) -> Result | None:
        """Drop a request, waiting or running (its row freed); returns its final result (finish reason
        ``abort``), or None if no such request is waiting or running."""
        for i, state in enumerate(self.waiting):
            if state.rid == request_id:
                del self.waiting[i]
                return state.finish(FinishReason.ABORT, keep_logits)
        for row, state in list(self.running.items()):
            if state.rid == request_id:
                self.running.pop(row)
                self.kv.free(row)
                return state.finish(FinishReason.ABORT, keep_logits)
        return None
