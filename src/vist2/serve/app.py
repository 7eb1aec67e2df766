"""The FastAPI application: routes, API-key check, and errors in OpenAI's JSON shape.

Routes stay thin; they hand validated bodies to :class:`~vist2.serve.serving.OpenAIServing`.
Every error a client can cause leaves as ``{"error": {"message", "type", "param", "code"}}`` with
its status (400, 401, 404, 413, 429, 503); an unexpected exception becomes a 500 with the same
shape and no traceback (the traceback goes to the server log), and the server keeps serving.

Example (in-process, without a socket)::

    >>> from fastapi.testclient import TestClient                                    # doctest: +SKIP
    >>> from vist2.engine import Engine
    >>> from vist2.serve.app import create_app
    >>> app = create_app(Engine.from_pretrained("runs/tiny"), model_name="tiny")      # doctest: +SKIP
    >>> with TestClient(app) as c:                                                    # doctest: +SKIP
    ...     c.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 4}).json()
"""

from __future__ import annotations

import json
import logging
import secrets
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine
from .metrics import ServerMetrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, ErrorResponse
from .scheduler import Scheduler
from .serving import OpenAIServing, ServingConfig

log = logging.getLogger(__name__)

_ENDPOINTS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics"}


def _error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse.of(message, type, param, code).model_dump(), status_code=status,
                        headers=headers)


class _Gate:
    """Pure ASGI middleware: the API key on /v1/*, and request counts by endpoint and status.

    Pure ASGI rather than a FastAPI dependency so the key is checked before the body is parsed
    (a malformed body without a key is a 401, not a 400) and streams pass through untouched.
    """

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"
        status = {}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and path.startswith("/v1") and not self._authorized(scope):
                response = _error(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, counting_send)
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.http_requests.labels(endpoint, str(status.get("code", 499))).inc()

    def _authorized(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(),
                                                                             self.api_key.encode())
        return False


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


async def _parse(raw: HTTPRequest, model: type[BaseModel]) -> BaseModel:
    """Read the body as JSON whatever the Content-Type says (curl -d sends form-encoded), then validate."""
    data = await raw.body()
    try:
        obj = json.loads(data)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise APIError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise APIError(400, "the body must be a JSON object")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        message, param = _describe(e.errors(include_url=False))
        raise APIError(400, message, param=param) from None


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None, max_queue: int = 256,
               max_prompt_tokens: int | None = None, default_mode: str = "gcc") -> FastAPI:
    """The app serving ``engine``; its scheduler thread starts and stops with the app's lifespan."""
    if default_mode not in ("gcc", "pcc", "none"):
        raise ValueError(f"default_mode must be gcc, pcc or none, got {default_mode!r}")
    metrics = ServerMetrics()
    scheduler = Scheduler(engine, max_queue=max_queue, metrics=metrics)
    serving = OpenAIServing(scheduler, ServingConfig(model_name, default_mode, max_prompt_tokens))

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="vist2", description="OpenAI-compatible server with global context compression",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serving, app.state.scheduler, app.state.metrics = serving, scheduler, metrics

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request, exc: RequestValidationError):
        message, param = _describe(list(exc.errors()))
        return _error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return _error(500, f"internal server error ({type(exc).__name__})", type="server_error")

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            return _error(503, "the scheduler is not running", type="service_unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_endpoint():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return serving.models().model_dump()

    @app.post("/v1/completions")
    async def completions(raw: HTTPRequest):
        return await serving.completions(await _parse(raw, CompletionRequest), raw)

    @app.post("/v1/chat/completions")
    async def chat(raw: HTTPRequest):
        return await serving.chat(await _parse(raw, ChatCompletionRequest), raw)

    app.add_middleware(_Gate, api_key=api_key, metrics=metrics)
    return app
