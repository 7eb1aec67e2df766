"""Inference with global context compression: a compressed KV cache, chunked prefill, decode.

    >>> from vist2.engine import Engine, SamplingParams
    >>> engine = Engine.from_pretrained("runs/tiny")                                   # doctest: +SKIP
    >>> [r] = engine.generate_text(["Once upon a time"], SamplingParams(max_new_tokens=64))  # doctest: +SKIP
"""

from ..chat import chat_prompt  # kept here for callers of vist2.engine.chat_prompt
from .engine import Engine
from .request import FinishReason, RequestStatus
from .types import MODES, Event, Mode, Request, Result, Stats, StepReport
from .sampling import Sampler, SamplingParams

__all__ = ["MODES", "Engine", "Event", "FinishReason", "Mode", "Request", "RequestStatus", "Result", "Stats",
           "StepReport", "chat_prompt", "Sampler", "SamplingParams"]
