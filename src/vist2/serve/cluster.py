"""``vist2 serve --replicas N``: the server as a Ray Serve application of N engine replicas.

    vist2 serve --model models/vist2-nano --replicas 2                          # a local Ray, 2 replicas
    ray start --head && vist2 serve --model /models/m --replicas 8 --ray-address auto --host 0.0.0.0

Two deployments behind Ray Serve's HTTP proxy (one address, ``--host``/``--port``):

- ``Engine`` (N replicas, one device each: ``num_gpus=1`` on CUDA, one CPU otherwise): each replica builds
  the very app the one-process server serves (:func:`vist2.serve.build_app`: the same routes, streaming,
  error shapes, limits and API key) and runs every request through it in-process. Its memory and prefix
  caches, queue and metrics are its own.
- ``Ingress`` (one replica, no device): reads the body, derives the conversation key
  (:func:`vist2.serve.router.conversation_key`) and hands the request to ``Engine`` through a
  ``DeploymentHandle`` with the key as its ``session_id``; Ray Serve's request router
  (:class:`ConversationRouter`, on Ray's ``RequestRouter`` API) picks the replica. The ingress relays the
  replica's response as it comes. When a replica dies, Ray starts another; its requests in flight end
  with an OpenAI-shaped 503 error (a stream: an error event, then ``data: [DONE]``), the other replicas'
  requests go on, and the conversation's next turn works anywhere (the history is in the request).

Responses carry ``x-vist2-replica`` (the replica's id). ``GET /metrics`` is every replica's metrics in
one page, each sample labelled ``replica="<id>"`` (replicas report every :data:`METRICS_PUSH_S` s).
"""


import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import AsyncIterator

try:
    import ray
except ImportError as e:  # the optional extra
    raise ImportError("vist2 serve --replicas needs Ray Serve: pip install 'vist2[cluster]'") from e
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import RequestRouter

from .protocol import ErrorResponse
from .router import conversation_key, rank_replicas

log = logging.getLogger(__name__)

APP_NAME = "vist2"
NAMESPACE = "serve"  # Ray Serve's actors' namespace
METRICS_PUSH_S = 1.0  # how often a replica reports its metrics to the ingress
METRICS_STALE_S = 15.0  # a replica silent this long (dead, replaced) leaves /metrics
REPLICA_HEADER = b"x-vist2-replica"


class ConversationRouter(RequestRouter):
    """Ray Serve request router: requests with the same conversation key (the request's ``session_id``)
    go to the same replica unless it is overloaded (:func:`vist2.serve.router.rank_replicas`).

    ``request_router_kwargs``: ``overload_at``, the requests the preferred replica may hold before a
    less-loaded one takes the request (``vist2 serve`` sets its ``--max-batch``).
    """

    overload_at = 8

    def initialize_state(self, overload_at: int = 8, **kwargs) -> None:
        if not isinstance(overload_at, int) or overload_at < 1:
            raise ValueError(f"overload_at must be a positive int, got {overload_at!r}")
        self.overload_at = overload_at

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        key = None
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # every replica full: back off, not spin
            key = pending_request.metadata.session_id or None
        lens = {}
        for r in candidate_replicas:
            q = self._replica_queue_len_cache.get(r.replica_id)
            if q is not None:
                lens[r] = q
        return rank_replicas(key, candidate_replicas, lens, self.overload_at, name=lambda r: r.replica_id.unique_id)


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(ErrorResponse.of(message, "service_unavailable", None, code).model_dump(),
                        status_code=status, headers={"Retry-After": "1"})


def _sse_error(message: str, code: str) -> bytes:
    obj = ErrorResponse.of(message, "service_unavailable", None, code).model_dump()
    return f"data: {json.dumps(obj)}\n\ndata: [DONE]\n\n".encode()


# -- metrics -----------------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class MetricsBoard:
    """The replicas' latest /metrics pages, kept for the ingress (a named actor the ingress owns)."""

    def __init__(self):
        self.pages: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, page: str) -> None:
        self.pages[replica] = (time.monotonic(), page)

    def pages_since(self, stale_s: float) -> dict[str, str]:
        now = time.monotonic()
        return {r: p for r, (t, p) in self.pages.items() if now - t < stale_s}


class _Labelled:
    """A collector re-exporting Prometheus pages with a ``replica`` label on every sample."""

    def __init__(self, pages: dict[str, str]):
        self.pages = pages

    def collect(self):
        families: dict[str, Metric] = {}
        for replica, page in sorted(self.pages.items()):
            for fam in text_string_to_metric_families(page):
                out = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
                for s in fam.samples:
                    out.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp)
        yield from families.values()


def merge_metrics(pages: dict[str, str]) -> bytes:
    """Prometheus pages of several replicas as one page, each sample labelled with its replica."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Labelled(pages))
    return generate_latest(registry)


def _board_name(app_name: str) -> str:
    return f"vist2-metrics-{app_name}"


# -- the engine replicas ----------------------------------------------------------------------


class EngineReplica:
    """One engine and the one-process server's app, driven request by request through ASGI."""

    async def __init__(self, args, build):
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id
        self.args = args
        self.app, self.engine, _ = build(args)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # starts the engine thread, as uvicorn's lifespan would
        self._board_name = _board_name(ctx.app_name)
        self._push = asyncio.get_running_loop().create_task(self._push_metrics())

    async def _push_metrics(self) -> None:
        board = None
        while True:
            try:
                if board is None:
                    board = ray.get_actor(self._board_name, namespace=NAMESPACE)
                await board.put.remote(self.replica, self.app.state.metrics.render()[0].decode())
            except Exception:  # noqa: BLE001 - the ingress (and its board) may not be up yet, or restarting
                board = None
            await asyncio.sleep(METRICS_PUSH_S)

    def body_limit(self) -> int:
        """The request-body limit this replica's app enforces (the ingress reads no more than this)."""
        from .app import default_max_body_bytes

        return self.args.max_body_bytes or default_max_body_bytes(self.engine, self.args.max_prompt_tokens)

    def check_health(self) -> None:
        if not self.app.state.bridge.alive:
            raise RuntimeError("the engine thread is not running")

    async def handle(self, method: str, path: str, query: bytes, headers: list, body: bytes,
                     client: tuple | None) -> AsyncIterator[dict]:
        """Run one HTTP request through the app; yields its ASGI response messages as they are sent."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": query,
                 "headers": [(bytes(k), bytes(v)) for k, v in headers], "client": client, "server": None}
        out: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body_sent = False

        async def receive():
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()  # after the body only a disconnect can come: when the caller goes away
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REPLICA_HEADER, self.replica.encode())]}
            await out.put(message)

        end = object()
        task = asyncio.ensure_future(self.app(scope, receive, send))
        task.add_done_callback(lambda _: out.put_nowait(end))
        try:
            while (message := await out.get()) is not end:
                yield message
        finally:
            gone.set()  # the caller went away (or all is sent): the app aborts what is left
            if not task.done():
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(task), 1.0)
                task.cancel()
            elif not task.cancelled() and task.exception() is not None:
                log.error("the app raised after answering %s %s", method, path, exc_info=task.exception())

    async def __del__(self):
        """Ray stops the replica: the app's own graceful shutdown (--shutdown-grace), then its lifespan."""
        self._push.cancel()
        await self.app.state.drain()
        await self._lifespan.__aexit__(None, None, None)


# -- the ingress -------------------------------------------------------------------------------

ingress_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


class _Relay(Response):
    """The replica's response, relayed message by message; a replica that dies mid-answer ends it
    with an OpenAI error (for a stream: an error event and ``[DONE]``)."""

    def __init__(self, start: dict, rest):
        super().__init__()
        self.start, self.rest = start, rest
        self.sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                       for k, v in start.get("headers", []))

    async def __call__(self, scope, receive, send):
        await send(self.start)
        ended = False
        try:
            async for message in self.rest:
                if message["type"] == "http.response.body":
                    ended = not message.get("more_body", False)
                await send(message)
        except ray.exceptions.RayError as e:
            if not ended:
                log.warning("a replica stopped mid-answer: %s", type(e).__name__)
                tail = _sse_error("the replica serving this request stopped; retry (the conversation can "
                                  "go on on any replica)", "replica_unavailable") if self.sse else b""
                await send({"type": "http.response.body", "body": tail, "more_body": False})
                ended = True
        finally:
            if not ended:  # the client went away: stop the replica's work
                self.rest.cancel()


@serve.ingress(ingress_app)
class Ingress:
    """Routes each request to an ``Engine`` replica by its conversation key and relays the answer."""

    def __init__(self, engine, app_name: str = APP_NAME):
        self.engine = engine
        self.board = MetricsBoard.options(name=_board_name(app_name), namespace=NAMESPACE,
                                          get_if_exists=True).remote()
        self._body_limit: int | None = None

    async def _read_body(self, request: HTTPRequest) -> tuple[bytes, list]:
        """The body, unless it is over the replicas' limit: then none, and a Content-Length that makes
        the replica refuse it (413) as the one-process server would."""
        headers = list(request.scope["headers"])
        if request.method not in ("POST", "PUT", "PATCH"):
            return b"", headers
        if self._body_limit is None:
            self._body_limit = await self.engine.body_limit.remote()
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._body_limit:
            return b"", headers
        parts, seen = [], 0
        async for part in request.stream():
            seen += len(part)
            if seen > self._body_limit:
                headers = [(k, v) for k, v in headers if k != b"content-length"]
                return b"", [*headers, (b"content-length", str(seen).encode())]
            parts.append(part)
        return b"".join(parts), headers

    async def _call(self, request: HTTPRequest, path: str):
        body, headers = await self._read_body(request)
        key = conversation_key(request.headers, path, body)
        handle = self.engine.options(stream=True, **({"session_id": key} if key else {}))
        rest = handle.handle.remote(request.method, path, request.scope.get("query_string", b""), headers, body,
                                    request.scope.get("client"))
        try:
            start = await rest.__anext__()
        except ray.exceptions.RayError as e:
            log.warning("a replica stopped before answering: %s", type(e).__name__)
            return None, _error(503, "the replica serving this request stopped; retry (the conversation can go "
                                "on on any replica)", "replica_unavailable")
        except StopAsyncIteration:  # the app ended without a response (it always sends one, even a 500)
            return None, JSONResponse(ErrorResponse.of("internal server error (no response)", "server_error")
                                      .model_dump(), status_code=500)
        return rest, start

    @ingress_app.get("/metrics")
    async def metrics(self, request: HTTPRequest):
        """Every replica's metrics, labelled by replica (the request itself goes to one replica first, so
        its API-key rule applies as in the one-process server)."""
        rest, start = await self._call(request, "/metrics")
        if rest is None:
            return start
        if start.get("status") != 200:
            return _Relay(start, rest)
        rest.cancel()
        pages = await self.board.pages_since.remote(METRICS_STALE_S)
        if not pages:
            return _error(503, "no replica has reported its metrics yet", "metrics_unavailable")
        return Response(merge_metrics(pages), media_type="text/plain; version=0.0.4; charset=utf-8")

    @ingress_app.api_route("/{path:path}", methods=_METHODS)
    async def forward(self, request: HTTPRequest, path: str):
        rest, start = await self._call(request, "/" + path)
        return start if rest is None else _Relay(start, rest)


# -- building and running the application --------------------------------------------------------


def build_application(args, build, router_class=ConversationRouter) -> serve.Application:
    """The Ray Serve application of ``vist2 serve``'s flags (``args.replicas`` engine replicas).

    ``build``: :func:`vist2.serve.build_app`, what each replica serves (passed in: this module is imported
    by ``vist2.serve`` and does not import it back). ``router_class``: the engine deployment's request
    router (the benchmark compares Ray's round-robin).
    """
    cuda = (args.device or ("cuda" if _cuda_visible() else "cpu")).startswith("cuda")
    engine = serve.deployment(EngineReplica, name="Engine").options(
        num_replicas=args.replicas,
        ray_actor_options={"num_gpus": 1, "num_cpus": 1} if cuda else {"num_cpus": 1},
        # Ray's own limit on what a replica holds stays above vist2's (rows + queue): the replica's app
        # answers 429 when its queue is full, as the one-process server does
        max_ongoing_requests=args.max_batch + args.max_queue + 1,
        graceful_shutdown_timeout_s=args.shutdown_grace + 5,
        health_check_period_s=5,
        request_router_config=RequestRouterConfig(request_router_class=router_class,
                                                  request_router_kwargs={"overload_at": args.max_batch}
                                                  if router_class is ConversationRouter else {}),
    )
    ingress = serve.deployment(Ingress, name="Ingress").options(
        num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    return ingress.bind(engine.bind(args, build))


def _cuda_visible() -> bool:
    return bool(ray.cluster_resources().get("GPU", 0))


def connect(args, ray_init: dict | None = None) -> None:
    """Join ``--ray-address``, or start a local Ray (``ray_init``: extra ``ray.init`` arguments for it)."""
    if ray.is_initialized():
        return
    if args.ray_address:
        ray.init(address=args.ray_address)
    else:
        ray.init(**{"num_cpus": max(args.replicas, os.cpu_count() or 1), "include_dashboard": False,
                    **(ray_init or {})})


def start(args, build, router_class=ConversationRouter, ray_init: dict | None = None) -> str:
    """Start (or join) Ray, deploy the application and wait until every replica is up. Returns the base URL.

    Example (what the tests do)::

        >>> from vist2.serve import build_app, cluster                                  # doctest: +SKIP
        >>> url = cluster.start(args, build_app, ray_init={"num_cpus": 2})              # doctest: +SKIP
        >>> ...; cluster.stop()                                                         # doctest: +SKIP
    """
    connect(args, ray_init)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_application(args, build, router_class), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{args.host}:{args.port}"


def stop() -> None:
    """Delete the application (its replicas drain first) and leave Ray (a local Ray ends with it)."""
    with contextlib.suppress(Exception):
        serve.delete(APP_NAME)
    serve.shutdown()
    ray.shutdown()


def serve_cluster(args, build) -> int:
    """``vist2 serve --replicas N``: deploy, print the address, serve until SIGINT/SIGTERM, then stop.
    ``build``: :func:`vist2.serve.build_app`."""
    connect(args)
    stopping = threading.Event()  # handlers set after Ray's own: a signal while deploying stops cleanly too
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    url = start(args, build)
    print(f"vist2 serve: {args.model} on {url}/v1 as a Ray Serve application ({args.replicas} replicas, "
          f"ray {ray.__version__}, cluster {ray.get_runtime_context().gcs_address}); Ctrl-C stops it",
          file=sys.stderr, flush=True)
    while not stopping.wait(1.0):
        pass
    print("vist2 serve: stopping the replicas", file=sys.stderr, flush=True)
    stop()
    return 0
