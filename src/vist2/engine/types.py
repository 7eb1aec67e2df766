"""The engine's public types: what a request is, what it reports, and the compression modes.

    >>> from vist2.engine.types import Mode, Request
    >>> Request(query=[1, 2, 3], mode=Mode.PCC).mode == "pcc"
    True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ..modes import MODES, Mode
from .sampling import SamplingParams

if TYPE_CHECKING:
    import torch

__all__ = ["MODES", "Event", "Mode", "Request", "Result", "Stats", "StepReport"]


@dataclass
class Request:
    """A prompt as ids: ``prefix`` and ``suffix`` stay raw, ``query`` is compressed by the tail rule.
    ``question = (start, end)``: ``query[start:end]`` is the user's question, drawn in red (paper Fig. 7).
    ``styles``: one render style per query token (default ``user``; a chat history: by role).
    ``cache_salt``: the namespace of its memory- and prefix-cache entries (a server's tenant); requests
    with different salts never share an entry (None: the shared namespace)."""

    query: list[int]
    prefix: list[int] = field(default_factory=list)
    suffix: list[int] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    mode: Mode = Mode.GCC
    question: tuple[int, int] | None = None
    styles: tuple[str, ...] | None = None
    cache_salt: str | None = None

    def __post_init__(self):
        self.mode = Mode.parse(self.mode)

    @property
    def prompt_ids(self) -> list[int]:
        return [*self.prefix, *self.query, *self.suffix]


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    chunks_compressed: int = 0  # prompt and generated chunks turned into visual tokens
    visual_tokens: int = 0  # visual tokens in the cache now
    kv_tokens: int = 0  # cache entries held now
    kv_tokens_peak: int = 0
    kv_tokens_uncompressed: int = 0  # what a plain LLM would hold for the same tokens
    kv_bytes: int = 0
    kv_bytes_peak: int = 0
    # the encoder cache (named memory_* as in --stats-json files and the served usage.memory_cache):
    memory_hits: int = 0  # prompt chunks found in the encoder cache (not rendered or read again)
    memory_misses: int = 0  # prompt chunks read by the vision tower while the encoder cache is on
    prefix_hit_chunks: int = 0  # prompt chunks whose K/V came from the prefix cache (not rendered, read or fed)
    prefix_hit_tokens: int = 0  # prompt cache entries copied from the prefix cache (those chunks and raw text)
    ttft_s: float = 0.0
    tokens_per_s: float = 0.0
    finish_reason: str = ""  # stop | length | eos | error (this request failed; the others carry on)
    error: str = ""  # what failed, with finish_reason "error"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Event:
    """One step's news for one request: new text (never half a character), and whether it is done."""

    request_id: int
    delta: str
    token_id: int | None
    done: bool
    stats: Stats | None = None
    result: "Result | None" = None  # on the last event of Engine.stream()


@dataclass
class Result:
    request_id: int
    text: str
    token_ids: list[int]
    stats: Stats
    memory: list[str]  # the text of every chunk held as an image, in cache order
    logits: list[torch.Tensor] | None = None  # the distribution each token was drawn from (record_logits)


@dataclass
class StepReport:
    """What one :meth:`Engine.step` did, handed to the engine's ``observer`` (timing, monitoring).

    ``seconds`` holds the wall time of each phase of the step (``prefill``: prompt tokens through
    the LLM; ``render``: chunk images drawn; ``vision``: images through the ViT and aligner;
    ``compress``: generated windows closed, render and vision included; ``decode``: the step's
    token through the LLM; ``sample``). The device is synchronised at phase edges only while an
    observer is set, so the phases are honest and an unobserved engine never waits on it.
    """

    step: int
    prefill_tokens: int = 0  # prompt entries run through the LLM this step (text and visual)
    prefill_chunks: int = 0  # prompt chunks read by the vision tower this step (encoder cache hits not counted)
    prefill_rows: list[int] = field(default_factory=list)  # rows in each prefill forward (prompts fed together)
    decode_rows: int = 0  # rows that fed a token
    decode_chunks: int = 0  # generated windows compressed
    compress_kv: list[int] = field(default_factory=list)  # live entries of each such row before its compression
    kv_tokens: dict[int, int] = field(default_factory=dict)  # request id -> live cache entries after the step
    seconds: dict[str, float] = field(default_factory=dict)
