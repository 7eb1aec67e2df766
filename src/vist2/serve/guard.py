"""The HTTP edge, before any route runs: who is calling (API keys, each naming a tenant), what they may
reach, and how long and how much a connection may take.

* Keys: ``--api-key KEY`` (one tenant, ``default``) or ``--api-key-file FILE`` (one ``name:key`` a
  line; ``#`` comments and blank lines skipped). The key's name is the request's *tenant*; the
  serving layer namespaces the shared caches by it (:func:`vist2.serve.serving.cache_namespace`).
  Clients never choose it: ``user`` and ``cache_salt`` in a body can only narrow what they share.
* With any key set, every path but ``/health`` needs one (``/v1/*``, ``/metrics``, ``/openapi.json``),
  unless ``open_paths`` opens the last two.
* Bodies: over ``max_body_bytes`` is a 413 from ``Content-Length`` (the body is discarded for at
  most :data:`DISCARD_SECONDS`, then the connection closes); the whole body must arrive within
  ``body_timeout`` seconds of the headers (408 otherwise); a response sent before its request's body
  was read closes the connection, so nobody holds it open by trickling a body nobody reads.
* Headers: :func:`uvicorn_protocol` closes a connection whose request headers take longer than
  ``header_timeout`` (uvicorn has no such limit; its keep-alive timer stops at the first byte).

    >>> import pathlib, tempfile
    >>> keys = pathlib.Path(tempfile.mkdtemp()) / "keys.txt"
    >>> _ = keys.write_text("alice:key-a\\nbob:key-b\\n")
    >>> read_api_key_file(keys)
    {'alice': 'key-a', 'bob': 'key-b'}
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from pathlib import Path

from fastapi.responses import JSONResponse

from .metrics import ServerMetrics
from .protocol import APIError, ErrorResponse

log = logging.getLogger(__name__)

TENANT = "vist2.tenant"  # the ASGI scope key the middleware sets: the caller's tenant name (None: no keys)
DEFAULT_TENANT = "default"  # the tenant of the one --api-key
DISCARD_SECONDS = 2.0  # how long an over-limit body is read and dropped before the 413 (so the client sees it)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
ENDPOINTS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics", "/openapi.json"}
OPENABLE = ("/metrics", "/openapi.json")  # behind the key unless opened explicitly


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse.of(message, type, param, code).model_dump(), status_code=status,
                        headers=headers)


def read_api_key_file(path: str | Path) -> dict[str, str]:
    """``name:key`` lines -> ``{name: key}``. Raises ValueError naming the line of any mistake."""
    keys: dict[str, str] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the API key file {path}: {e}") from e
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, key = line.partition(":")
        name, key = name.strip(), key.strip()
        if not sep or not _NAME.fullmatch(name) or not key or any(c.isspace() for c in key):
            raise ValueError(f"{path}:{n}: expected 'name:key' (a name of letters, digits, _.@- and a key "
                             "without spaces)")
        if name in keys:
            raise ValueError(f"{path}:{n}: the tenant {name!r} is named twice")
        if key in keys.values():
            raise ValueError(f"{path}:{n}: this key is given to two tenants")
        keys[name] = key
    if not keys:
        raise ValueError(f"the API key file {path} holds no 'name:key' line")
    return keys


def _bearer(scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip().encode() if scheme.lower() == "bearer" else None
    return None


def _header(scope, wanted: bytes) -> bytes | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return value
    return None


class AuthAndLimits:
    """Pure ASGI middleware: the API keys (and the caller's tenant into ``scope[TENANT]``), the body's
    size and time limits, and request counts.

    Pure ASGI rather than a FastAPI dependency so the key is checked before the body is parsed (a
    malformed body without a key is a 401, not a 400), an oversized body is refused from its
    Content-Length before it is read into memory, and streams pass through untouched.
    """

    def __init__(self, app, api_keys: dict[str, str] | None, metrics: ServerMetrics, max_body_bytes: int,
                 open_paths: tuple[str, ...] = (), body_timeout: float = 60.0):
        self.app, self.metrics, self.max_body, self.body_timeout = app, metrics, max_body_bytes, body_timeout
        self.keys = [(name, key.encode()) for name, key in (api_keys or {}).items()]
        self.open_paths = set(open_paths)

    def needs_key(self, path: str) -> bool:
        return bool(self.keys) and path != "/health" and path not in self.open_paths

    def tenant(self, scope) -> str | None:
        """The name of the key the request carries; every key is compared (in constant time each)."""
        token, found = _bearer(scope), None
        for name, key in self.keys:
            if token is not None and secrets.compare_digest(token, key):
                found = name
        return found

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        length = _header(scope, b"content-length")
        try:
            length = None if length is None else int(length)
        except ValueError:
            length = None
        chunked = b"chunked" in (_header(scope, b"transfer-encoding") or b"").lower()
        body = {"done": not (chunked or (length or 0) > 0), "seen": 0}
        status = {}

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if not body["done"]:  # answered before the body was read: close rather than wait for the rest
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            scope[TENANT] = self.tenant(scope) if self.keys else None
            if scope[TENANT] is None and self.needs_key(path):
                return await error_response(
                    401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})(scope, receive, guarded_send)
            if length is not None and length > self.max_body:
                await self._discard(receive, body)
                return await error_response(413, _too_large(self.max_body).message, code="request_too_large")(
                    scope, receive, guarded_send)
            deadline = asyncio.get_running_loop().time() + self.body_timeout

            async def limited_receive():
                if body["done"]:  # the body is in: what comes now is a disconnect, however late
                    return await receive()
                left = deadline - asyncio.get_running_loop().time()
                try:
                    message = await asyncio.wait_for(receive(), max(left, 0.0))
                except asyncio.TimeoutError:
                    raise APIError(408, f"the request body did not arrive within {self.body_timeout:g} s "
                                   "(--body-timeout)", code="request_timeout") from None
                if message["type"] == "http.request":
                    body["seen"] += len(message.get("body", b""))
                    if body["seen"] > self.max_body:  # a body without Content-Length (chunked): counted as it comes
                        raise _too_large(self.max_body)
                    body["done"] = not message.get("more_body", False)
                else:
                    body["done"] = True
                return message

            await self.app(scope, limited_receive, guarded_send)
        finally:
            self.metrics.http_requests.labels(endpoint, str(status.get("code", 499))).inc()

    @staticmethod
    async def _discard(receive, body: dict) -> None:
        """Read and drop the body for at most DISCARD_SECONDS (a client that sends it whole then reads the
        answer gets the 413; one that trickles it is cut off)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + DISCARD_SECONDS
        while loop.time() < end:
            try:
                message = await asyncio.wait_for(receive(), end - loop.time())
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                body["done"] = True
                return


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over {limit} bytes (--max-body-bytes)", code="request_too_large")


def uvicorn_protocol(header_timeout: float):
    """uvicorn's HTTP protocol class (httptools or h11, as uvicorn would pick) with a deadline on request
    headers: a connection that has not sent a complete request head ``header_timeout`` seconds after it
    opened, or after its last response ended, is closed (slow-header clients cannot hold it)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderDeadlineProtocol(AutoHTTPProtocol):
        _header_timer = None
        _seen_cycle = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _arm(self):
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._too_slow)

        def _disarm(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self):
            self._header_timer = None
            if not self.transport.is_closing():
                log.info("closing a connection whose request headers took over %g s (--header-timeout)",
                         header_timeout)
                self.transport.close()

        def _headers_done(self) -> bool:
            """A request head completed since last asked (each request gets a cycle of its own)."""
            if self.cycle is not None and self.cycle is not self._seen_cycle:
                self._seen_cycle = self.cycle
                return True
            return False

        def data_received(self, data):
            super().data_received(data)
            if self._headers_done():
                self._disarm()

        def on_response_complete(self):
            super().on_response_complete()
            self._headers_done()
            last = self._seen_cycle
            if (last is None or last.response_complete) and not self.transport.is_closing():
                self._arm()  # waiting for the next request's head on a kept-alive connection

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineProtocol
