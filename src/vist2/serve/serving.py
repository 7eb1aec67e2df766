"""Turns OpenAI requests into engine requests and engine events into OpenAI responses.

The router (:mod:`vist2.serve.app`) validates the body and calls :meth:`OpenAIServing.completions`
or :meth:`OpenAIServing.chat`; everything protocol-specific lives here, everything about sharing
the engine lives in :mod:`vist2.serve.engine_bridge`.

* ``n`` choices are ``n`` engine requests submitted together; with a ``seed``, choice ``i`` uses
  ``seed + i`` so the choices differ but the request is reproducible.
* A list of prompts on /v1/completions gives ``len(prompts) × n`` choices, prompt-major (OpenAI's order).
* Streams are Server-Sent Events ending in ``data: [DONE]``. A client that disconnects, streaming or
  not, has its engine requests aborted, which frees their cache rows.
* Every engine request carries a cache namespace (:func:`cache_namespace`): the caller's tenant (the
  name of its API key, set by :mod:`vist2.serve.guard`) and the body's ``cache_salt``, so the memory
  and prefix caches never hand one tenant's entries (or their speed) to another.
* Chat contents and (unless ``allow_special_tokens``) text prompts are tokenized as plain text
  (:mod:`vist2.chat`): only the chat template writes control tokens.

Example (a running server; see :mod:`vist2.serve`)::

    >>> from openai import OpenAI
    >>> client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")          # doctest: +SKIP
    >>> r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8,
    ...                               extra_body={"mode": "gcc"})                        # doctest: +SKIP
    >>> r.usage.compression["kv_entries"], r.usage.compression["kv_entries_uncompressed"]  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from ..chat import DEFAULT_MAX_CHAT_MESSAGES, prompt_parts
from ..engine import Engine, Request, SamplingParams, Stats
from .protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompressionUsage,
    MemoryCacheUsage,
    DeltaMessage,
    ModelCard,
    ModelList,
    Usage,
    new_id,
    now,
)
from .engine_bridge import Admission, EngineBridge, Submission
from .guard import TENANT

DEFAULT_CHAT_MAX_TOKENS = 1024  # OpenAI has no chat default; an untrained model may never write EOS
# Prompts up to this many characters are tokenized on a thread of their own, longer ones on another:
# a request near the length limit (seconds of tokenizing) never makes a short one wait behind it.
SHORT_PROMPT_CHARS = 32_768
SHORT_PROMPT_MESSAGES = 64  # chats with more messages go to the long prompts' thread too (a template pass each)

# SamplingParams field -> the request field a client sets (for error messages' `param`)
_PARAM_NAMES = {"max_new_tokens": "max_tokens"}


@dataclass
class ServingConfig:
    model_name: str
    default_mode: str = "gcc"
    max_prompt_tokens: int | None = None  # None: only the engine's memory limit applies
    max_tokens_limit: int | None = None  # generated tokens per choice; None: the model's context length
    chat_history: str = "raw"  # how chats are split (vist2.chat.chat_prompt): raw | compressed
    shared_cache: bool = False  # True: every tenant's requests share the caches (only cache_salt separates)
    max_chat_messages: int = DEFAULT_MAX_CHAT_MESSAGES
    allow_special_tokens: bool = False  # text prompts of /v1/completions may spell control tokens


def cache_namespace(tenant: str | None, cache_salt: str | None, shared: bool = False) -> str | None:
    """The cache namespace of a request (``Request.cache_salt``): a digest of the server-derived tenant
    (unless ``shared``) and the client's ``cache_salt``; None (the one shared namespace) when neither
    applies. The tenant comes from the API key, never from the body, so a client can narrow what it
    shares (a salt of its own) but never join another tenant's entries."""
    parts = ([] if shared or tenant is None else [f"tenant:{tenant}"]) + (
        [] if cache_salt is None else [f"salt:{cache_salt}"])
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest() if parts else None


def template_tokens_per_message(tokenizer) -> int:
    """The fewest tokens the chat template writes around one message (an empty one, of any role): counted
    per message by the cheap size check, so a chat of many empty messages is not free. 0 when unknown."""
    best = None
    for role in ("user", "assistant", "system"):
        try:
            one = tokenizer.apply_chat_template([{"role": role, "content": ""}], tokenize=False)
            two = tokenizer.apply_chat_template([{"role": role, "content": ""}] * 2, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that refuses this role: no bound from it
            continue
        if two.startswith(one):
            n = len(tokenizer(two[len(one):], add_special_tokens=False)["input_ids"])
            best = n if best is None else min(best, n)
    return best or 0


def model_max_tokens(engine: Engine) -> int:
    """The default cap on generated tokens: the LLM's positions (gcc would otherwise never stop)."""
    return int(engine.model.config.text_config.max_position_embeddings)


def prompt_token_bound(engine: Engine, max_prompt_tokens: int | None) -> int:
    """The most prompt tokens any request can have: ``--max-prompt-tokens``, else what the memory limit
    holds once compressed (every K tokens become n_visual visual tokens)."""
    if max_prompt_tokens is not None:
        return max_prompt_tokens
    return engine.max_cache_tokens * max(1, math.ceil(engine.K / engine.n_visual))


def max_token_chars(tokenizer) -> int:
    """The longest vocabulary entry in characters; byte-level BPE spells each byte as one character,
    so no token covers more text than this (a cheap lower bound on a text's token count)."""
    return max(len(t) for t in tokenizer.get_vocab())


def _finish_reason(stats: Stats | None) -> str:
    return "length" if stats is not None and stats.finish_reason == "length" else "stop"


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always runs ``on_close`` when it ends, however it ends.

    The body generator's own ``finally`` does not run if the client goes away before the first
    chunk (the generator was never started); this does, so an abandoned request is always aborted.
    """

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _client_gone(raw: HTTPRequest) -> None:
    """Returns when the client disconnects (the body has been read, so only disconnect can arrive)."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


class OpenAIServing:
    def __init__(self, bridge: EngineBridge, config: ServingConfig):
        self.bridge = bridge
        self.engine: Engine = bridge.engine
        self.config = config
        self.created = now()
        self.max_tokens_limit = config.max_tokens_limit or model_max_tokens(self.engine)
        self.prompt_limit = prompt_token_bound(self.engine, config.max_prompt_tokens)
        # Prompts are tokenized and planned (Engine.plan: chunks and KV footprint) on threads of their
        # own, off the event loop (other requests keep being answered) and off the engine thread
        # (running streams keep decoding): one for short prompts, one for long ones. Each has its own
        # tokenizer: a fast tokenizer is not safe to share across threads.
        self._workers = {"short": self._worker("short"), "long": self._worker("long")}
        self._chars_per_token = max_token_chars(self.engine.processor.tokenizer)
        self._message_tokens = template_tokens_per_message(self.engine.processor.tokenizer)

    def _worker(self, name: str) -> tuple[ThreadPoolExecutor, Engine]:
        processor = copy.copy(self.engine.processor)
        processor.tokenizer = copy.deepcopy(processor.tokenizer)
        view = copy.copy(self.engine)  # a view for Engine.request() / plan() only: they read the processor
        view.processor = processor
        return ThreadPoolExecutor(1, thread_name_prefix=f"vist2-tokenize-{name}"), view

    def close(self) -> None:
        for pool, _ in self._workers.values():
            pool.shutdown(wait=False, cancel_futures=True)

    # -- /v1/models ---------------------------------------------------------------------

    def models(self) -> ModelList:
        e = self.engine
        return ModelList(data=[ModelCard(
            id=self.config.model_name, created=self.created, max_cache_tokens=e.max_cache_tokens,
            chunk_tokens=e.K, visual_tokens_per_chunk=e.n_visual, default_mode=self.config.default_mode,
        )])

    # -- request -> engine requests -------------------------------------------------------

    def _check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.config.model_name!r}",
                           param="model", code="model_not_found")

    def _params(self, body, max_tokens: int, n: int, field: str = "max_tokens") -> list[SamplingParams]:
        if max_tokens > self.max_tokens_limit:
            raise APIError(400, f"{field} is {max_tokens}; this server generates at most {self.max_tokens_limit} "
                           "tokens per choice (--max-tokens-limit)", param=field)
        out = []
        for i in range(n):
            p = SamplingParams(
                max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                seed=None if body.seed is None else body.seed + i, repetition_penalty=body.repetition_penalty,
                no_repeat_ngram_size=body.no_repeat_ngram_size, stop=body.stops,
                stop_token_ids=tuple(body.stop_token_ids), ignore_eos=body.ignore_eos,
            )
            try:
                out.append(p.validate())
            except ValueError as e:
                field = str(e).split(" ", 1)[0]
                raise APIError(400, str(e), param=_PARAM_NAMES.get(field, field)) from e
        return out

    def _too_long(self, n_tokens: int, param: str, at_least: bool = False) -> APIError:
        limit = self.prompt_limit
        flag = "--max-prompt-tokens" if self.config.max_prompt_tokens is not None else "the memory limit"
        return APIError(413, f"the prompt has {'at least ' if at_least else ''}{n_tokens} tokens; this server "
                        f"accepts at most {limit} ({flag})", param=param, code="context_length_exceeded")

    @staticmethod
    def _chars(prompt: dict) -> int:
        """Characters of a prompt's text that become tokens (0 for token ids): content and question."""
        if "prompt" in prompt:
            return len(prompt["prompt"])
        return sum(len(m["content"]) + len(m.get("question") or "") for m in prompt.get("messages") or ())

    def _check_length(self, prompt: dict) -> None:
        """The cheap check, on the event loop before any tokenizing: no token covers more than
        ``_chars_per_token`` characters, so a longer text is over the limit whatever it says; token
        ids are counted as they are."""
        param = "messages" if "messages" in prompt else "prompt"
        if "ids" in prompt:
            if len(prompt["ids"]) > self.prompt_limit:
                raise self._too_long(len(prompt["ids"]), param)
            return
        # a lower bound on the tokens: the text's, plus the template's around each message
        least = math.ceil(self._chars(prompt) / self._chars_per_token) + self._message_tokens * len(
            prompt.get("messages") or ())
        if least > self.prompt_limit:
            raise self._too_long(least, param, at_least=True)

    def _request(self, view: Engine, params: SamplingParams, mode: str, salt: str | None, *,
                 prompt: str | None = None, ids: list[int] | None = None,
                 messages: list[dict] | None = None) -> Admission:
        """Tokenize, check and plan one prompt (on a tokenizer thread, with its own ``view`` of the
        engine); its cache namespace is ``salt``. Raises APIError 400 / 413."""
        param = "messages" if messages is not None else "prompt"
        try:
            if ids is not None:
                vocab = len(view.processor.tokenizer)
                if any(not 0 <= t < vocab for t in ids):
                    raise ValueError(f"token ids must be in [0, {vocab})")
                req = Request(query=list(ids), params=params, mode=mode)
            elif messages is not None:
                req = view.request(messages=messages, params=params, mode=mode, history=self.config.chat_history)
            elif self.config.allow_special_tokens:  # the prompt may write its own template
                p = prompt_parts(view.processor.tokenizer, prompt, special_tokens=True)
                req = Request(query=p.query, params=params, mode=mode)
            else:
                req = view.request(prompt, params=params, mode=mode)
        except ValueError as e:
            raise APIError(400, str(e), param=param) from e
        req.cache_salt = salt
        # prompt_limit bounds every accepted prompt (memory limit x compression), so a longer one is
        # refused here rather than by the engine's footprint count on the engine thread
        if len(req.prompt_ids) > self.prompt_limit:
            raise self._too_long(len(req.prompt_ids), param)
        plan = view.plan(req)  # the prompt's chunks and footprint, counted here instead of on the engine thread
        if plan.footprint > self.engine.max_cache_tokens:
            hint = ""
            if messages is not None and self.config.chat_history == "raw" and self._fits_compressed(
                    view, messages, params, mode):
                hint = ("; with --chat-history compressed it would fit (the server's option: every earlier turn "
                        "becomes memory)")
            raise APIError(413, f"the prompt needs {plan.footprint} KV entries ({len(req.prompt_ids)} tokens, "
                           f"mode {req.mode}), over the memory limit of {self.engine.max_cache_tokens} "
                           f"(--max-cache-tokens){hint}", param=param, code="context_length_exceeded")
        return Admission(req, param, plan)

    def _fits_compressed(self, view: Engine, messages: list[dict], params: SamplingParams, mode: str) -> bool:
        """Whether a chat over the memory limit as raw history would fit with ``--chat-history compressed``."""
        try:
            req = view.request(messages=messages, params=params, mode=mode, history="compressed")
        except ValueError:  # e.g. a template that rewrites earlier turns
            return False
        return (len(req.prompt_ids) <= self.prompt_limit
                and view.plan(req).footprint <= self.engine.max_cache_tokens)

    async def _admissions(self, params: list[SamplingParams], mode: str, prompts: list[dict],
                          salt: str | None = None) -> list[Admission]:
        """One admission per (prompt, choice), prompt-major, in the cache namespace ``salt``; each prompt is
        tokenized once, off the loop, on the short or the long prompts' thread. Every prompt passes the
        cheap length check first."""
        for pr in prompts:
            self._check_length(pr)
        loop = asyncio.get_running_loop()
        out = []
        for pr in prompts:
            long = self._chars(pr) > SHORT_PROMPT_CHARS or len(pr.get("messages") or ()) > SHORT_PROMPT_MESSAGES
            pool, view = self._workers["long" if long else "short"]
            first = await loop.run_in_executor(pool, lambda pr=pr: self._request(view, params[0], mode, salt, **pr))
            out.append(first)
            # the n choices share the prompt, its tokens and its plan; only the sampling differs
            out += [dataclasses.replace(first, request=dataclasses.replace(first.request, params=p))
                    for p in params[1:]]
        return out

    def _usage(self, sub: Submission, stats: list[Stats | None], n: int, mode: str) -> Usage:
        prompt = sum(sub.prompt_tokens[k] for k in range(0, len(stats), n))  # each prompt counted once
        done = [s for s in stats if s is not None]
        completion = sum(s.generated_tokens for s in done)
        held = sum(s.kv_tokens for s in done)
        plain = sum(s.kv_tokens_uncompressed for s in done)
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
            compression=CompressionUsage(
                mode=mode, chunks_compressed=sum(s.chunks_compressed for s in done),
                visual_tokens=sum(s.visual_tokens for s in done), kv_entries=held,
                kv_entries_peak=sum(s.kv_tokens_peak for s in done), kv_entries_uncompressed=plain,
                kv_ratio=round(held / plain, 4) if plain else 1.0,
            ),
            memory_cache=MemoryCacheUsage(hits=sum(s.memory_hits for s in done),
                                          misses=sum(s.memory_misses for s in done),
                                          prefix_hit_chunks=sum(s.prefix_hit_chunks for s in done),
                                          prefix_hit_tokens=sum(s.prefix_hit_tokens for s in done))
            if getattr(self.engine, "encoder_cache_stats", lambda: None)() is not None else None,
        )

    async def _collect(self, sub: Submission, raw: HTTPRequest) -> tuple[list[str], list[Stats | None]]:
        """Wait for every choice; abort them if the client disconnects first."""
        k = len(sub.finished)
        texts: list[list[str]] = [[] for _ in range(k)]
        stats: list[Stats | None] = [None] * k

        async def consume():
            async for i, ev in sub.events():
                texts[i].append(ev.delta)
                if ev.done:
                    stats[i] = ev.stats

        work = asyncio.ensure_future(consume())
        watch = asyncio.ensure_future(_client_gone(raw))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # nobody will read the answer
                raise APIError(499, "the client closed the request", code="client_closed_request")
            work.result()  # re-raise an engine failure
            return ["".join(t) for t in texts], stats
        finally:
            watch.cancel()
            work.cancel()
            self.bridge.cancel(sub)  # no-op when everything finished

    def _stream(self, sub: Submission, chunks: AsyncIterator[str]) -> SSEResponse:
        async def body():
            try:
                async for chunk in chunks:
                    yield chunk
            except APIError as e:  # the engine failed or the server stops: the status line is long gone
                yield _sse(e.response().model_dump())
            yield "data: [DONE]\n\n"

        return SSEResponse(body(), on_close=lambda: self.bridge.cancel(sub))

    def _namespace(self, body, raw: HTTPRequest) -> str | None:
        return cache_namespace(raw.scope.get(TENANT), body.cache_salt, self.config.shared_cache)

    # -- /v1/completions ------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, raw: HTTPRequest):
        self._check_model(body.model)
        mode = body.mode or self.config.default_mode
        params = self._params(body, body.max_tokens or 16, body.n)
        p = body.prompt
        if isinstance(p, str):
            prompts = [dict(prompt=p)]
        elif all(isinstance(x, int) for x in p):
            prompts = [dict(ids=p)]
        else:
            prompts = [dict(prompt=x) if isinstance(x, str) else dict(ids=x) for x in p]
        admissions = await self._admissions(params, mode, prompts, self._namespace(body, raw))
        sub = await self.bridge.submit(admissions)
        rid, created, name = new_id("cmpl"), now(), self.config.model_name

        if not body.stream:
            texts, stats = await self._collect(sub, raw)
            return JSONResponse(CompletionResponse(
                id=rid, created=created, model=name,
                choices=[CompletionChoice(index=i, text=t, finish_reason=_finish_reason(s))
                         for i, (t, s) in enumerate(zip(texts, stats))],
                usage=self._usage(sub, stats, body.n, mode),
            ).model_dump())

        async def chunks():
            stats: list[Stats | None] = [None] * len(admissions)
            async for i, ev in sub.events():
                if ev.done:
                    stats[i] = ev.stats
                if ev.delta or ev.done:
                    yield _sse(CompletionResponse(id=rid, created=created, model=name, choices=[CompletionChoice(
                        index=i, text=ev.delta, finish_reason=_finish_reason(ev.stats) if ev.done else None,
                    )]).model_dump())
            if body.include_usage:
                yield _sse(CompletionResponse(id=rid, created=created, model=name, choices=[],
                                              usage=self._usage(sub, stats, body.n, mode)).model_dump())

        return self._stream(sub, chunks())

    # -- /v1/chat/completions ---------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, raw: HTTPRequest):
        self._check_model(body.model)
        mode = body.mode or self.config.default_mode
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        max_tokens = body.max_completion_tokens or body.max_tokens or min(DEFAULT_CHAT_MAX_TOKENS,
                                                                          self.max_tokens_limit)
        if len(body.messages) > self.config.max_chat_messages:
            raise APIError(400, f"the chat has {len(body.messages)} messages; this server takes at most "
                           f"{self.config.max_chat_messages} (--max-chat-messages)", param="messages",
                           code="too_many_messages")
        params = self._params(body, max_tokens, body.n, field)
        # the chat template knows system/user/assistant; OpenAI's "developer" is the newer name for system
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(),
                     **({"question": m.question} if m.question is not None else {})} for m in body.messages]
        admissions = await self._admissions(params, mode, [dict(messages=messages)], self._namespace(body, raw))
        sub = await self.bridge.submit(admissions)
        rid, created, name = new_id("chatcmpl"), now(), self.config.model_name

        if not body.stream:
            texts, stats = await self._collect(sub, raw)
            return JSONResponse(ChatCompletionResponse(
                id=rid, created=created, model=name,
                choices=[ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=_finish_reason(s))
                         for i, (t, s) in enumerate(zip(texts, stats))],
                usage=self._usage(sub, stats, body.n, mode),
            ).model_dump())

        def chunk(i: int, delta: DeltaMessage, finish: str | None = None, usage: Usage | None = None) -> str:
            choices = [] if i < 0 else [ChatChunkChoice(index=i, delta=delta, finish_reason=finish)]
            obj = ChatCompletionChunk(id=rid, created=created, model=name, choices=choices, usage=usage).model_dump()
            for c in obj["choices"]:  # OpenAI leaves unset delta fields out rather than sending null
                c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
            return _sse(obj)

        async def chunks():
            stats: list[Stats | None] = [None] * body.n
            for i in range(body.n):
                yield chunk(i, DeltaMessage(role="assistant", content=""))
            async for i, ev in sub.events():
                if ev.delta:
                    yield chunk(i, DeltaMessage(content=ev.delta))
                if ev.done:
                    stats[i] = ev.stats
                    yield chunk(i, DeltaMessage(), _finish_reason(ev.stats))
            if body.include_usage:
                yield chunk(-1, DeltaMessage(), usage=self._usage(sub, stats, body.n, mode))

        return self._stream(sub, chunks())
