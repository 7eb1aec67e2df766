"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

One model per endpoint and direction, so FastAPI validates every request before any engine work
and a bad field becomes a 400 naming it. Fields OpenAI defines but this server cannot honour
(``logprobs``, ``echo``, penalties, tools ...) are accepted only at their neutral value: a client
asking for them gets a clear 400 instead of a silently different answer. Unknown fields are
rejected for the same reason (a typo such as ``"mdoe"`` must not fall back to the default).

VIST2 extras ride in the request body next to the OpenAI fields (``extra_body`` in the ``openai``
client): ``mode`` (``gcc`` | ``pcc`` | ``none``), ``ignore_eos``, ``top_k``, ``repetition_penalty``,
``no_repeat_ngram_size``, ``stop_token_ids``, ``cache_salt``.

Example::

    >>> from vist2.serve.protocol import CompletionRequest, ErrorResponse
    >>> r = CompletionRequest.model_validate({"model": "tiny", "prompt": "Hi", "max_tokens": 4, "mode": "pcc"})
    >>> r.mode, r.max_tokens, r.temperature
    ('pcc', 4, 1.0)
    >>> ErrorResponse.of("bad", param="n").model_dump()["error"]["param"]
    'n'
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..modes import MODES

Mode = Literal[MODES]  # the compression modes' names (strict JSON validation takes strings, not the enum)


# -- errors -----------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}`` (every non-2xx answer)."""

    error: ErrorInfo

    @classmethod
    def of(cls, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> "ErrorResponse":
        return cls(error=ErrorInfo(message=message, type=type, param=param, code=code))


class APIError(Exception):
    """An error meant for the client: its HTTP status and OpenAI error fields (never a traceback)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> ErrorResponse:
        return ErrorResponse.of(self.message, self.type, self.param, self.code)


# -- requests ---------------------------------------------------------------------------


class _Strict(BaseModel):
    # strict: JSON types as OpenAI takes them ("stream": "yes" or "max_tokens": "3" are 400s, not converted)
    model_config = ConfigDict(extra="forbid", strict=True)


# Bounds of what the engine can take. Outside them a value either overflows (a seed beyond 64 bits,
# a temperature or penalty so small that logits divided by it are inf) or only costs memory.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # OpenAI's seed is an int64; seed + i (i < n <= 128) still fits torch
MIN_TEMPERATURE = 1e-4  # below it (but > 0) logits / temperature overflow float32: use 0 for greedy
PENALTY_MIN, PENALTY_MAX = 0.01, 100.0
MAX_TOKEN_ID = 2**31 - 1
# A stop string is matched against the generated text at every token on the engine thread, in time
# that grows with its length squared: long ones would slow every stream, and none needs to be long.
MAX_STOP_CHARS = 256


class StreamOptions(_Strict):
    include_usage: bool = False


def _neutral(name: str, value, neutral) -> None:
    if value is not None and value != neutral:
        raise ValueError(f"{name} is not supported by this server (leave it unset)")


class _GenerationRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)  # OpenAI's default; 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    user: Optional[str] = Field(None, max_length=256)  # accepted, not used: a client could claim any name
    # the request's cache entries are shared only with requests of the same tenant and the same salt
    # (as vLLM's cache_salt; the tenant, from the API key, always applies unless --shared-cache)
    cache_salt: Optional[str] = Field(None, min_length=1, max_length=256)
    # OpenAI fields accepted only at their neutral value
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    # VIST2 extras
    mode: Optional[Mode] = None  # None: the server's default (gcc unless started otherwise)
    ignore_eos: bool = False
    top_k: int = Field(0, ge=0, le=MAX_TOKEN_ID)
    repetition_penalty: float = Field(1.0, ge=PENALTY_MIN, le=PENALTY_MAX, allow_inf_nan=False)
    no_repeat_ngram_size: int = Field(0, ge=0, le=1024)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {v!r}")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v):
        if not all(0 <= t <= MAX_TOKEN_ID for t in v):
            raise ValueError(f"stop_token_ids must be token ids in [0, {MAX_TOKEN_ID}]")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 16 or not all(stops):
            raise ValueError("stop must be a non-empty string or a list of at most 16 non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalties(cls, v, info):
        _neutral(info.field_name, v, 0)
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        _neutral("logit_bias", v or None, None)
        return v

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: a text prompt (or a list of prompts, or token ids)."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions
    echo: Optional[bool] = None
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and len(v) > 128 and not all(isinstance(t, int) for t in v):
            raise ValueError("prompt: at most 128 prompts per request")
        return v

    @field_validator("echo", "logprobs", "suffix")
    @classmethod
    def _unsupported(cls, v, info):
        _neutral(info.field_name, v, {"echo": False, "logprobs": None, "suffix": None}[info.field_name])
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v):
        _neutral("best_of", v, 1)
        return v


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """``question`` (vist2's extension, on the last user message only): the question asked about the
    document in ``content``; it is drawn red on the query's grey background (paper Fig. 7)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    question: Optional[str] = Field(None, min_length=1)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``: the last user message is the query that gets compressed."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[dict]] = None
    tool_choice: Optional[Union[str, dict]] = None
    response_format: Optional[dict] = None
    parallel_tool_calls: Optional[bool] = None

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        _neutral("logprobs", v, False)
        return v

    @field_validator("top_logprobs", "tools", "tool_choice", "parallel_tool_calls")
    @classmethod
    def _unsupported(cls, v, info):
        _neutral(info.field_name, v, {"tool_choice": "none", "tools": []}.get(info.field_name))
        return v

    @field_validator("response_format")
    @classmethod
    def _format(cls, v):
        if v is not None and v.get("type") != "text":
            raise ValueError("only {'type': 'text'} is supported")
        return v


# -- responses --------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class CompressionUsage(BaseModel):
    """What global context compression did, summed over the request's choices."""

    mode: Mode
    chunks_compressed: int = 0  # prompt and generated chunks turned into images
    visual_tokens: int = 0  # visual tokens in the KV cache at the end
    kv_entries: int = 0  # KV entries held at the end
    kv_entries_peak: int = 0
    kv_entries_uncompressed: int = 0  # what a plain LLM would hold for the same tokens
    kv_ratio: float = 1.0  # kv_entries / kv_entries_uncompressed


class MemoryCacheUsage(BaseModel):
    """Prompt chunks of the request's choices found in the server's encoder cache (not rendered or read
    by the vision tower again) and read anew; present when the server runs one (--encoder-cache-bytes).
    Served as ``usage.memory_cache`` (and this name in /openapi.json): the encoder cache's old name, kept
    so that clients do not break.
    ``prefix_hit_chunks`` / ``prefix_hit_tokens``: the prompt chunks and cache entries whose K/V came from
    the prefix cache (a cached prompt start: not rendered, read or run through the LLM; counted in
    neither ``hits`` nor ``misses``)."""

    hits: int = 0
    misses: int = 0
    prefix_hit_chunks: int = 0
    prefix_hit_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    compression: Optional[CompressionUsage] = None
    memory_cache: Optional[MemoryCacheUsage] = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vist2"
    # VIST2 extras: how the served model compresses
    max_cache_tokens: int
    chunk_tokens: int  # K
    visual_tokens_per_chunk: int  # the model's n_visual
    default_mode: Mode


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
