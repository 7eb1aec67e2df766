"""The FastAPI application: routes, body parsing, and errors in OpenAI's JSON shape.

Routes stay thin; they hand validated bodies to :class:`~vist2.serve.serving.OpenAIServing`. The API
keys (tenants) and the body's size and time limits are checked before any route, in
:mod:`vist2.serve.guard`. Every error a client can cause leaves as ``{"error": {"message", "type",
"param", "code"}}`` with its status (400, 401, 404, 408, 413, 415, 429, 503); an unexpected exception
becomes a 500 with the same shape and no traceback (the traceback goes to the server log), and the
server keeps serving. A body nested deeper than :data:`MAX_JSON_DEPTH` is a 400 before validation.

Cross-site requests: a web page may POST to any address its visitor's browser reaches, without asking
first, only with a form-like Content-Type (``text/plain``, form encodings) or none. Bodies must
therefore say ``application/json`` (415 otherwise), which a browser sends cross-site only after a CORS
preflight; the preflight is answered for the ``cors_origins`` given and refused for every other page.

Example (in-process, without a socket)::

    >>> from fastapi.testclient import TestClient                                    # doctest: +SKIP
    >>> from vist2.engine import Engine
    >>> from vist2.serve.app import create_app
    >>> app = create_app(Engine.from_pretrained("runs/tiny"), model_name="tiny")      # doctest: +SKIP
    >>> with TestClient(app) as c:                                                    # doctest: +SKIP
    ...     c.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 4}).json()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from contextlib import asynccontextmanager

import uvicorn

from fastapi import APIRouter, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import HISTORIES
from ..engine import Engine
from ..modes import MODES
from .metrics import ServerMetrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest
from .engine_bridge import EngineBridge
from .guard import DEFAULT_TENANT, OPENABLE, AuthAndLimits, error_response
from .serving import DEFAULT_MAX_CHAT_MESSAGES, OpenAIServing, ServingConfig, prompt_token_bound

BODY_BYTES_PER_TOKEN = 32  # JSON-escaped text is rarely over 8 bytes a token; the rest is headroom
BODY_BYTES_BASE = 1 << 20  # room for the other fields and short prompts
MAX_JSON_DEPTH = 32  # the deepest body any endpoint takes is 4 levels; deeper is refused before validating

log = logging.getLogger(__name__)

_error = error_response


def default_max_body_bytes(engine: Engine, max_prompt_tokens: int | None) -> int:
    """The body-size limit when none is given: sized from the longest prompt the server accepts."""
    return BODY_BYTES_BASE + BODY_BYTES_PER_TOKEN * prompt_token_bound(engine, max_prompt_tokens)


def _describe(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic errors -> one message naming the fields, and the first field as OpenAI's ``param``."""
    parts, param = [], None
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if param is None and loc:
            param = loc[0]
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc) or 'body'}: {msg}")
    return "; ".join(parts), param


def _depth_over(obj, limit: int) -> bool:
    """Whether lists and objects nest more than ``limit`` deep (iterative: no recursion to exhaust)."""
    todo = [(obj, 1)]
    while todo:
        x, d = todo.pop()
        if isinstance(x, (dict, list)):
            if d > limit:
                return True
            todo += [(v, d + 1) for v in (x.values() if isinstance(x, dict) else x)]
    return False


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check_content_type(raw: HTTPRequest) -> None:
    """415 unless the body says ``application/json`` (parameters such as ``charset`` allowed): a
    cross-site page can send a form-like type or none without a CORS preflight, never this one."""
    media = raw.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise APIError(415, f"the body must be JSON sent as 'Content-Type: application/json', got "
                       f"{media or 'no Content-Type'!r}", code="unsupported_media_type")


async def _parse(raw: HTTPRequest, model: type[BaseModel]) -> BaseModel:
    """Check the Content-Type, read the body as JSON, then validate it."""
    _check_content_type(raw)
    data = await raw.body()
    try:
        obj = json.loads(data, parse_constant=_no_constant)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise APIError(400, f"the body is not valid JSON: {e}") from None
    except RecursionError:  # nested past the interpreter's recursion limit
        raise APIError(400, f"the body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    if not isinstance(obj, dict):
        raise APIError(400, "the body must be a JSON object")
    if _depth_over(obj, MAX_JSON_DEPTH):
        raise APIError(400, f"the body is nested more than {MAX_JSON_DEPTH} levels deep")
    try:  # "\ud800" is valid JSON but no valid text: the tokenizer cannot take it
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"the body contains a lone UTF-16 surrogate ({e.object[e.start:e.end]!a}), "
                       "which is not valid Unicode text") from None
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        message, param = _describe(e.errors(include_url=False))
        raise APIError(400, message, param=param) from None


def _check_options(default_mode: str, max_tokens_limit: int | None, max_body_bytes: int | None,
                   shutdown_grace: float) -> None:
    if default_mode not in MODES:
        raise ValueError(f"default_mode must be one of {', '.join(MODES)}, got {default_mode!r}")
    for name, value in (("max_tokens_limit", max_tokens_limit), ("max_body_bytes", max_body_bytes)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if shutdown_grace < 0:
        raise ValueError(f"shutdown_grace must be >= 0, got {shutdown_grace}")


def _drain(bridge: EngineBridge, shutdown_grace: float):
    """The app's graceful shutdown (called by :class:`Server` while the socket is still open)."""

    async def drain() -> None:
        """Refuse new requests (503), give the running ones ``shutdown_grace`` seconds, end the rest."""
        bridge.begin_drain()
        log.info("shutdown: new requests get 503; %d in flight get up to %.1f s", bridge.in_flight, shutdown_grace)
        deadline = time.monotonic() + shutdown_grace
        while not bridge.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not bridge.idle:
            log.warning("shutdown: ending %d request(s) still running after %.1f s", bridge.in_flight,
                        shutdown_grace)
        await asyncio.to_thread(bridge.stop)  # what is left ends with a 503 error (an error event in streams)

    return drain


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure as OpenAI's error JSON. (No ``RequestValidationError`` handler: no route declares
    a parameter or body model for FastAPI to validate; bodies go through :func:`_parse`.)"""

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        if exc.status == 408:  # the body never came: nothing more will be read on this connection
            headers = {"Connection": "close"}
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return _error(500, f"internal server error ({type(exc).__name__})", type="server_error")


# the routes: thin; they read the app's serving, bridge and metrics from ``app.state``
router = APIRouter()


@router.get("/health")
async def health(raw: HTTPRequest):
    if not raw.app.state.bridge.alive:
        return _error(503, "the server is not accepting requests (starting or shutting down)",
                      type="service_unavailable")
    return {"status": "ok"}


@router.get("/metrics")
async def metrics_endpoint(raw: HTTPRequest):
    body, content_type = raw.app.state.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/models")
async def models(raw: HTTPRequest):
    return raw.app.state.serving.models().model_dump()


@router.post("/v1/completions")
async def completions(raw: HTTPRequest):
    return await raw.app.state.serving.completions(await _parse(raw, CompletionRequest), raw)


@router.post("/v1/chat/completions")
async def chat(raw: HTTPRequest):
    return await raw.app.state.serving.chat(await _parse(raw, ChatCompletionRequest), raw)


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None, max_queue: int = 256,
               max_prompt_tokens: int | None = None, default_mode: str = "gcc", max_tokens_limit: int | None = None,
               max_body_bytes: int | None = None, shutdown_grace: float = 10.0, cors_origins: list[str] | None = None,
               protect_metrics: bool = False, chat_history: str = "raw", api_keys: dict[str, str] | None = None,
               shared_cache: bool = False, open_metrics: bool = False,
               max_chat_messages: int = DEFAULT_MAX_CHAT_MESSAGES, allow_special_tokens: bool = False,
               body_timeout: float = 60.0) -> FastAPI:
    """The app serving ``engine``; its engine thread starts and stops with the app's lifespan.

    ``api_key`` (one tenant, ``default``) or ``api_keys`` (``{tenant name: key}``): with either, every
    path but ``/health`` needs a key, ``/metrics`` and ``/openapi.json`` too unless ``open_metrics``
    (``protect_metrics``, the old opt-in, is now what a key implies). Each tenant's requests share the
    memory and prefix caches only among themselves (a request's ``cache_salt`` narrows that further);
    ``shared_cache`` shares them across tenants (one namespace, as before tenants existed).
    ``max_tokens_limit``: generated tokens a choice may ask for (default: the LLM's positions).
    ``max_body_bytes``: larger bodies get 413 (default: sized from the longest prompt accepted);
    ``body_timeout``: seconds a body may take to arrive (408 after). ``shutdown_grace``: seconds
    in-flight requests may still run once shutdown begins (see :class:`Server`). ``cors_origins``: web
    origins (``https://app.example``, or ``*``) whose pages may call the API from a browser (default:
    none). ``chat_history``: how chat requests are split (:func:`vist2.chat.chat_prompt`): ``raw`` keeps
    earlier turns as text, ``compressed`` makes them memory. ``max_chat_messages``: longer chats get 400.
    ``allow_special_tokens``: a text prompt on /v1/completions may spell control tokens (chat contents
    never can).
    """
    _check_options(default_mode, max_tokens_limit, max_body_bytes, shutdown_grace)
    if chat_history not in HISTORIES:
        raise ValueError(f"chat_history must be one of {', '.join(HISTORIES)}, got {chat_history!r}")
    if api_key is not None and api_keys is not None:
        raise ValueError("give api_key or api_keys, not both")
    keys = {DEFAULT_TENANT: api_key} if api_key is not None else api_keys
    if protect_metrics and not keys:
        raise ValueError("protect_metrics needs an api_key")
    if max_chat_messages < 1 or body_timeout <= 0:
        raise ValueError(f"max_chat_messages must be >= 1 and body_timeout > 0, got {max_chat_messages}, "
                         f"{body_timeout}")
    metrics = ServerMetrics()
    metrics.watch_encoder_cache(engine)
    bridge = EngineBridge(engine, max_queue=max_queue, metrics=metrics)
    serving = OpenAIServing(bridge, ServingConfig(model_name, default_mode, max_prompt_tokens, max_tokens_limit,
                                                  chat_history, shared_cache, max_chat_messages,
                                                  allow_special_tokens))

    @asynccontextmanager
    async def lifespan(app):
        bridge.start()
        try:
            yield
        finally:
            bridge.stop()
            serving.close()

    app = FastAPI(title="vist2", description="OpenAI-compatible server with global context compression",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serving, app.state.bridge, app.state.metrics = serving, bridge, metrics
    app.state.drain = _drain(bridge, shutdown_grace)
    _add_error_handlers(app)
    app.include_router(router)
    app.add_middleware(AuthAndLimits, api_keys=keys, metrics=metrics,
                       max_body_bytes=max_body_bytes or default_max_body_bytes(engine, max_prompt_tokens),
                       open_paths=OPENABLE if open_metrics else (), body_timeout=body_timeout)
    if cors_origins:  # added last, so outermost: preflights are answered before the key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    return app


class Server(uvicorn.Server):
    """``uvicorn.Server`` that shuts a vist2 app down gracefully.

    uvicorn alone cancels the handlers still running after its grace period (a plain-text 500, a
    stream cut without ``[DONE]``). This first runs the app's drain while the socket is still open:
    new requests get a 503 JSON error, requests in flight get ``shutdown_grace`` seconds to finish,
    and whatever is left ends with a 503 error (streams: an error event, then ``data: [DONE]``).
    """

    async def shutdown(self, sockets=None):
        drain = getattr(getattr(self.config.app, "state", None), "drain", None)
        if drain is not None:
            await drain()
        await super().shutdown(sockets=sockets)

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn re-raises the signal that stopped it once it is down, so a drained SIGTERM ends the
        process as killed (143). A SIGTERM is how service managers ask for this very shutdown: once
        the drain has run, the exit is a clean 0. (Ctrl-C still exits as interrupted.)"""
        with super().capture_signals():
            yield
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]
