"""A request inside the engine: its status, its cache row, and everything it accumulates.

:class:`RequestState` is created when a request is queued (status ``WAITING``); the scheduler admits
it into a cache row (``PREFILLING``: its sampler and text decoder are built then, so a request whose
sampling parameters fail fails alone), its prompt is fed (``DECODING`` once the last piece of its
prompt is scheduled), and it ends with a finish reason (``FINISHED``). The status is one field, not
implied by which container holds the request.

    >>> s = RequestState(0, Request(query=[1, 2, 3]), plan=None)
    >>> s.status is RequestStatus.WAITING, s.finished
    (True, False)
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Sequence

from ..text import StreamDecoder
from .sampling import Sampler
from .types import Request, Result, Stats

if TYPE_CHECKING:  # the feed, plan and window types live in modules that import this one (no cycle)
    import torch

    from ..processing import VIST2Processor


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, no cache row yet
    PREFILLING = "prefilling"  # holds a row; its prompt is being fed
    DECODING = "decoding"  # its prompt is in (or its last piece is scheduled this step): it samples and decodes
    FINISHED = "finished"  # done; ``RequestState.finish_reason`` says why


class FinishReason(str, enum.Enum):
    """Why a request ended (``Stats.finish_reason`` holds the value as a plain string)."""

    STOP = "stop"  # a stop string
    EOS = "eos"  # an end-of-sequence token
    LENGTH = "length"  # max_new_tokens, or the row reached max_cache_tokens
    ERROR = "error"  # this request failed (``Stats.error``); the others carry on
    ABORT = "abort"  # dropped by Engine.abort


class RequestState:
    """A request's state from queueing to its result: status, cache row, sampler and text decoder, what
    it generated, its prompt feed, its open window of generated text, its memory and its stats."""

    def __init__(self, rid: int, req: Request, plan: "PromptPlan | None"):
        self.rid, self.req, self.plan = rid, req, plan
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.row = -1  # the cache row, once admitted
        self.sampler: Sampler | None = None
        self.stop_ids: set[int] = set()
        self.decoder: StreamDecoder | None = None
        self.history = list(req.prompt_ids)  # what the sampler's penalties see
        self.generated: list[int] = []
        self.feed: "PromptFeed | None" = None  # the prompt, while it is prefilled
        self.window: "Window | None" = None  # generated text not yet compressed (gcc, once the prompt is in)
        self.memory: list[str] = []  # the text of every chunk held as an image
        self.logits: "torch.Tensor | None" = None  # what the next token is sampled from
        self.recorded: list["torch.Tensor"] = []
        self.stats = Stats(prompt_tokens=len(req.prompt_ids))
        self.t_start = 0.0
        self.t_first = 0.0

    def admit(self, row: int, processor: "VIST2Processor", eos: Sequence[int]) -> None:
        """Take cache row ``row``: build the sampler and the text decoder (raises if the sampling
        parameters are refused; the request then fails alone)."""
        p = self.req.params
        self.sampler = Sampler(p)
        self.stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos))
        self.decoder = StreamDecoder(processor.tokenizer, stop=p.stop)
        self.row = row
        self.status = RequestStatus.PREFILLING
        self.t_start = time.perf_counter()

    @property
    def prefilling(self) -> bool:
        """Prompt entries are left to schedule (the feed is not done)."""
        return self.feed is not None and not self.feed.done

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def stop_reason(self, tok: int) -> FinishReason | None:
        """Why the request ends after taking ``tok`` (None if it goes on)."""
        if self.decoder.stopped:
            return FinishReason.STOP
        if tok in self.stop_ids:
            return FinishReason.EOS
        if len(self.generated) >= self.req.params.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def begin(self, plan: "PromptPlan", feed: "PromptFeed", reused: int = 0) -> None:
        """Start feeding the prompt; its first ``reused`` cache entries are in the row already (the prefix
        cache): their chunks enter the memory as if fed."""
        self.plan, self.feed = plan, feed
        k = feed.first_chunk
        self.memory += [text for text, _ in plan.chunks[:k]]
        st = self.stats
        st.chunks_compressed += k
        st.visual_tokens += k * feed.n_visual
        st.prefix_hit_chunks, st.prefix_hit_tokens = k, reused
        st.kv_tokens_peak = max(st.kv_tokens_peak, reused)

    def finish(self, reason: FinishReason | str, keep_logits: bool) -> Result:
        """End the request: status, finish reason, throughput; returns its :class:`Result`."""
        reason = FinishReason(reason)
        self.status, self.finish_reason = RequestStatus.FINISHED, reason
        st = self.stats
        st.finish_reason = reason.value
        elapsed = time.perf_counter() - self.t_first if self.t_first else 0.0
        if elapsed > 0 and st.generated_tokens > 1:
            st.tokens_per_s = (st.generated_tokens - 1) / elapsed
        text = self.decoder.text if self.decoder is not None else ""
        return Result(self.rid, text, list(self.generated), st, list(self.memory),
                      self.recorded if keep_logits else None)
