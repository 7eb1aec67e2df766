"""Scheduling: which requests hold cache rows, and how a prompt is fed in bounded pieces.

- :func:`plan_prompt` lays a request's prompt out (:func:`vist2.layout.prompt_segments`: query chunks
  cut by the fit rule, the tail rule, raw prefix/suffix) and counts the cache entries it needs at its
  peak. It reads no engine state, so it can run off the engine thread (tokenizer pools, servers).
- :class:`PromptFeed` turns that layout into prefill operations (raw text; a chunk's visual tokens,
  after its text in the interleaved encoding) and hands them out in pieces of at most a budget of
  cache entries (:meth:`PromptFeed.take`), so a long prompt enters over several steps.
- :class:`Scheduler` keeps the waiting queue, the running rows and the finished results.

    >>> plan = plan_prompt(request, processor, K=64, n_visual=16, prompt_encoding="visual")  # doctest: +SKIP
    >>> plan.footprint                                                                        # doctest: +SKIP
"""

from __future__ import annotations

from collections import deque
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..layout import Raw, Segment, prompt_layout
from ..processing import VIST2Processor
from ..text import StreamDecoder
from .compress import Window
from .sampling import Sampler
from .types import Mode, Request, Result, Stats


@dataclass(frozen=True)
class PromptPlan:
    """A prompt's layout, the cache entries it needs at its peak (a compressed chunk briefly holds
    its text and its visual tokens; one more entry for the first generated token), and what each of
    its images shows: ``(text, style)`` per compressed chunk, in order (a style per character where
    they differ). All of it is made off the engine thread when a server plans its requests."""

    segments: tuple[Segment, ...]
    footprint: int
    carry: bytes = b""  # bytes of a character split at the query's end: the response's first image draws them
    chunks: tuple[tuple[str, Any], ...] = ()


def plan_prompt(req: Request, processor: VIST2Processor, chunk_tokens: int, n_visual: int,
                prompt_encoding: str) -> PromptPlan:
    """Lay out a request's prompt as the engine will feed it (mode ``none``: one raw run)."""
    carry = b""
    if req.mode == Mode.NONE:
        segments: list[Segment] = [Raw(tuple(req.prompt_ids))]
    else:
        segments, carry = prompt_layout(req.prefix, req.query, req.suffix, chunk_tokens, n_visual, prompt_encoding,
                                        processor.chunker(chunk_tokens), req.question, req.styles)
    kept, peak, chunks, cy = 0, 0, [], b""
    for seg in segments:
        if isinstance(seg, Raw):
            kept += len(seg.tokens)
            peak = max(peak, kept)
            continue
        cy = cy if seg.carry is None else seg.carry
        style = processor.char_styles(cy, seg.tokens, seg.style)  # before the carry moves
        text, cy = processor.chunk_text(cy, seg.tokens)
        chunks.append((text, style))
        if seg.mode == "interleaved":
            peak = max(peak, kept + len(seg.tokens) + seg.n_visual)
            kept += seg.n_visual
        else:
            kept += seg.n_visual
        peak = max(peak, kept)
    return PromptPlan(tuple(segments), peak + 1, carry, tuple(chunks))


@dataclass
class PrefillOp:
    """One piece of a prompt's prefill: text tokens, or one chunk's visual tokens (``n_text`` > 0:
    the chunk's text was fed just before, interleaved, and is evicted after them)."""

    kind: str  # "text" | "visual"
    tokens: list[int] = field(default_factory=list)
    chunk: int = -1  # the chunk it feeds (an interleaved chunk's text too); -1: raw text
    n_text: int = 0


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
        n_chunks, skip = 0, reused  # the first `reused` entries are in the row already (the prefix cache)
        for seg in plan.segments:
            if isinstance(seg, Raw):
                cut = min(skip, len(seg.tokens))
                skip -= cut
                if cut < len(seg.tokens):
                    self.ops.append(PrefillOp("text", list(seg.tokens[cut:])))
                continue
            if skip:
                assert skip >= seg.n_visual, "a chunk is reused whole or not at all"
                skip -= seg.n_visual
                n_chunks += 1
                continue
            n_text = len(seg.tokens) if seg.mode == "interleaved" else 0
            if n_text:
                self.ops.append(PrefillOp("text", list(seg.tokens), chunk=n_chunks))
            self.ops.append(PrefillOp("visual", chunk=n_chunks, n_text=n_text))
            n_chunks += 1
        self.first_chunk = next((op.chunk for op in self.ops if op.chunk >= 0), n_chunks)  # chunks before: reused

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
                del op.tokens[: len(take)]
                p.items.append(take)
                p.positions += range(p.end, p.end + len(take))
                p.end += len(take)
                self.settled += len(take) if op.chunk < 0 else 0  # a chunk's text is evicted, not kept
                if not op.tokens:
                    self.ops.popleft()
                continue
            if p.used + n_visual > budget:
                break
            self.ops.popleft()
            p.items.append(op.chunk)
            p.positions += range(p.end - op.n_text, p.end - op.n_text + n_visual)
            p.end += n_visual
            self.settled += n_visual
            if op.n_text:
                p.evict = (p.end - n_visual - op.n_text, p.end - n_visual)
                break
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
        for c in range(p.feed.next_chunk, len(p.feed.chunks)):  # not those fed already, nor those reused
            if room <= 0:
                break
            if c not in p.feed.visual and (id(p.feed), c) not in seen:
                need.append((p.feed, c))
                seen.add((id(p.feed), c))
                room -= 1
    return need


class Row:
    """A request's state while it occupies a cache row: its sampler and text decoder, what it generated,
    its prompt (being prefilled), its open window of generated text, its memory and its stats."""

    def __init__(self, rid: int, req: Request, row: int, processor: VIST2Processor, eos: Sequence[int]):
        p = req.params
        self.rid, self.req, self.row = rid, req, row
        self.sampler = Sampler(p)
        self.stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos))
        self.decoder = StreamDecoder(processor.tokenizer, stop=p.stop)
        self.history = list(req.prompt_ids)  # what the sampler's penalties see
        self.generated: list[int] = []
        self.plan: PromptPlan | None = None  # the prompt's layout
        self.feed: PromptFeed | None = None  # the prompt, while it is prefilled
        self.window: Window | None = None  # generated text not yet compressed (gcc, once the prompt is in)
        self.memory: list[str] = []  # the text of every chunk held as an image
        self.logits: torch.Tensor | None = None  # what the next token is sampled from
        self.recorded: list[torch.Tensor] = []
        self.stats = Stats(prompt_tokens=len(req.prompt_ids))
        self.t_start = time.perf_counter()
        self.t_first = 0.0

    @property
    def prefilling(self) -> bool:
        return self.feed is not None and not self.feed.done

    def finish_reason(self, tok: int) -> str:
        """Why the row ends after taking ``tok`` ("" if it goes on)."""
        if self.decoder.stopped:
            return "stop"
        if tok in self.stop_ids:
            return "eos"
        if len(self.generated) >= self.req.params.max_new_tokens:
            return "length"
        return ""

    def begin(self, plan: PromptPlan, n_visual: int, reused: int = 0) -> None:
        """Start feeding the prompt; its first ``reused`` cache entries are in the row already (the prefix
        cache): their chunks enter the memory as if fed."""
        self.plan, self.feed = plan, PromptFeed(plan, n_visual, reused)
        k = self.feed.first_chunk
        self.memory += [text for text, _ in plan.chunks[:k]]
        st = self.stats
        st.chunks_compressed += k
        st.visual_tokens += k * n_visual
        st.prefix_hit_chunks, st.prefix_hit_tokens = k, reused
        st.kv_tokens_peak = max(st.kv_tokens_peak, reused)


class Scheduler:
    """The waiting queue (FIFO), the running rows (``row -> state``) and the results not yet collected."""

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.waiting: deque[tuple[int, Request, PromptPlan]] = deque()
        self.running: dict[int, Row] = {}
        self.finished: dict[int, Result] = {}
        self._next_id = 0

    def add(self, request: Request, plan: PromptPlan) -> int:
        rid = self._next_id
        self._next_id += 1
        self.waiting.append((rid, request, plan))
        return rid

    def admissions(self, limit: int):
        """Yield ``(rid, request, plan, row)`` for waiting requests that get a free row now, at most
        ``limit``; the caller puts each one's state in ``running[row]``."""
        for _ in range(limit):
            if not self.waiting or len(self.running) >= self.max_batch:
                return
            rid, req, plan = self.waiting.popleft()
            yield rid, req, plan, min(set(range(self.max_batch)) - set(self.running))

    def remove_waiting(self, request_id: int) -> bool:
        for i, (rid, _, _) in enumerate(self.waiting):
            if rid == request_id:
                del self.waiting[i]
                return True
        return False
