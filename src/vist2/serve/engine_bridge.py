"""The bridge between asyncio and the engine: one thread owns the engine; HTTP handlers talk to it
through queues.

The engine is synchronous and not thread-safe, so every call into it (``add``, ``step``, ``abort``,
``result``) happens on the engine thread. Prompts arrive as :class:`Admission` s, tokenized and already
planned (``Engine.plan``: cut into chunks, their KV footprint counted; the server does both on
tokenizer threads of its own), so nothing slow but the model runs here. Handlers run on the
asyncio event loop: they :meth:`EngineBridge.submit` a group of admissions (the ``n`` choices of one
HTTP request, added all or none), then read ``(choice index, Event)`` pairs from the submission's asyncio queue, which
the thread fills through ``loop.call_soon_threadsafe``. The thread loops ``engine.step()`` while
anything is waiting or running and sleeps on its inbox otherwise. :meth:`EngineBridge.cancel` (a
client that went away) aborts the group's engine requests, which frees their cache rows at once.

Admission control is counted here: the queue depth (the ``vist2_queue_depth`` metric) is the number
of engine requests accepted but not yet holding a cache row; a submission that would push it over
``max_queue`` is refused with 429 before it touches the engine.

Example::

    >>> import asyncio
    >>> from vist2.engine import Engine, SamplingParams
    >>> from vist2.serve.engine_bridge import Admission, EngineBridge
    >>> engine = Engine.from_pretrained("runs/tiny", max_batch=4)                    # doctest: +SKIP
    >>> bridge = EngineBridge(engine, max_queue=16); bridge.start()                   # doctest: +SKIP
    >>> async def one():
    ...     req = engine.request("Once upon a time", params=SamplingParams(max_new_tokens=8))
    ...     sub = await bridge.submit([Admission(req)])
    ...     return "".join([ev.delta async for _, ev in sub.events()])
    >>> asyncio.run(one())                                                            # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from ..engine import Engine, Event, Request
from .metrics import ServerMetrics
from .protocol import APIError

log = logging.getLogger(__name__)


@dataclass
class Admission:
    """One engine request ready to add: its prompt tokenized and planned (``Engine.plan``: segments
    and KV footprint) off the engine thread; ``plan=None`` lets ``Engine.add`` plan it. ``param`` is
    the body field the prompt came from, named when the memory limit refuses it."""

    request: Request
    param: str = "prompt"
    plan: Any = None


class Submission:
    """The engine requests of one HTTP request, and the queue their events arrive on."""

    def __init__(self, admissions: list[Admission], loop: asyncio.AbstractEventLoop):
        self.admissions = admissions
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.t_submit = time.perf_counter()
        n = len(admissions)
        self.ids: list[int | None] = [None] * n
        self.prompt_tokens: list[int] = [0] * n
        self.started = [False] * n  # holds a cache row (its first token was sampled)
        self.finished = [False] * n
        self.cancelled = False
        self.reserved = n  # slots of the queue this submission still counts against

    @property
    def done(self) -> bool:
        return all(self.finished)

    def post(self, item) -> None:
        """From the engine thread: hand an item to the handler's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop has closed (server shutting down): nobody is listening
            pass

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """``(choice index, Event)`` until every choice is done; raises the APIError of a failure."""
        left = len(self.finished)
        while left:
            item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            yield item
            if item[1].done:
                left -= 1


_STOP = object()


class EngineBridge:
    """Owns the engine on a thread of its own; the event loop submits, cancels and reads events."""

    def __init__(self, engine: Engine, max_queue: int = 256, metrics: ServerMetrics | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics or ServerMetrics()
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # guards _depth: reserved on the loop, released on the thread
        self._depth = 0
        self._by_id: dict[int, tuple[Submission, int]] = {}  # engine thread only
        self._running = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False

    # -- event-loop side ----------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not (self._stopping or self._draining)

    @property
    def in_flight(self) -> int:
        """Engine requests accepted and not finished (queued or holding a row)."""
        return self._depth + self._running

    @property
    def idle(self) -> bool:
        return self.in_flight == 0

    def begin_drain(self) -> None:
        """Refuse new submissions (503) from now on; those accepted carry on."""
        self._draining = True

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vist2-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End everything in flight with a 503 error and the thread (idempotent)."""
        self._stopping = True
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout)

    async def submit(self, admissions: list[Admission]) -> Submission:
        """Queue the requests of one HTTP request (all or none). Raises APIError (400/413/429/503)."""
        n = len(admissions)
        if not self.alive:
            raise APIError(503, "the server is not accepting requests (starting or shutting down)",
                           type="service_unavailable", code="service_unavailable")
        if n > self.max_queue:
            raise APIError(400, f"the request asks for {n} sequences; this server queues at most {self.max_queue}",
                           param="n")
        with self._lock:
            if self._depth + n > self.max_queue:
                raise APIError(429, f"the queue is full ({self._depth} requests waiting, limit {self.max_queue}); "
                               "retry later", type="rate_limit_error", code="queue_full")
            self._depth += n
            self.metrics.queue_depth.set(self._depth)
        sub = Submission(admissions, asyncio.get_running_loop())
        self._inbox.put(("add", sub))
        try:
            item = await sub.queue.get()  # "accepted" or the APIError that refused it
        except BaseException:  # the handler was cancelled (client gone) while the thread was adding
            self.cancel(sub)
            raise
        if isinstance(item, Exception):
            raise item
        return sub

    def cancel(self, sub: Submission) -> None:
        """Abort whatever of ``sub`` is still queued or running (idempotent, any thread)."""
        if not sub.cancelled and not sub.done:
            sub.cancelled = True
            self._inbox.put(("abort", sub))

    # -- engine thread --------------------------------------------------------------------

    def _release(self, sub: Submission, k: int) -> None:
        with self._lock:
            self._depth -= k
            sub.reserved -= k
            self.metrics.queue_depth.set(self._depth)

    def _run(self) -> None:
        while True:
            try:
                # block only when there is nothing to step; otherwise take what arrived and keep going
                cmd = self._inbox.get(block=not self.engine.busy)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if cmd is _STOP:
                    self._fail_all(APIError(503, "the server is shutting down", type="service_unavailable",
                                            code="service_unavailable"))
                    return
                kind, sub = cmd
                if kind == "add":
                    self._add(sub)
                else:
                    self._abort(sub)
                try:
                    cmd = self._inbox.get_nowait()
                except queue.Empty:
                    cmd = None
            if self.engine.busy:
                self._step()

    def _add(self, sub: Submission) -> None:
        if sub.cancelled:
            self._release(sub, sub.reserved)
            return
        added: list[int] = []
        for i, adm in enumerate(sub.admissions):
            try:
                # with a plan made on a tokenizer thread, add() only queues: no chunking here
                rid = self.engine.add(adm.request, plan=adm.plan)
            except Exception as e:  # noqa: BLE001 - a bug must not kill the thread or reach the client as a traceback
                for a in added:
                    self.engine.abort(a)
                    self._by_id.pop(a, None)
                if isinstance(e, ValueError):  # params were validated when built: what is left is the memory limit
                    err = APIError(413, str(e), param=adm.param, code="context_length_exceeded")
                else:
                    log.exception("adding a request failed")
                    err = APIError(500, f"internal error: {type(e).__name__}", type="server_error")
                return self._refuse(sub, err)
            added.append(rid)
            sub.ids[i] = rid
            sub.prompt_tokens[i] = len(adm.request.prompt_ids)
            self._by_id[rid] = (sub, i)
        self.metrics.prompt_tokens.inc(sum(sub.prompt_tokens))
        sub.post("accepted")

    def _refuse(self, sub: Submission, err: APIError) -> None:
        self._release(sub, sub.reserved)
        sub.finished = [True] * len(sub.finished)
        sub.post(err)

    def _abort(self, sub: Submission) -> None:
        n = 0
        for i, rid in enumerate(sub.ids):
            if rid is None or sub.finished[i]:
                continue
            self.engine.abort(rid)
            self._by_id.pop(rid, None)
            if sub.started[i]:
                self._running -= 1
            sub.finished[i] = True
            n += 1
        if n:
            self.metrics.requests.labels("abort").inc(n)
        if sub.reserved:
            self._release(sub, sub.reserved)
        self.metrics.running.set(self._running)

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as e:  # noqa: BLE001
            # the engine's state for the rows in flight is unknown: end them all, keep serving new ones
            log.exception("engine step failed")
            self._fail_all(APIError(500, f"the engine failed: {type(e).__name__}: {e}", type="server_error"))
            return
        now = time.perf_counter()
        self.metrics.generation_tokens.inc(len(events))
        for ev in events:
            entry = self._by_id.get(ev.request_id)
            if entry is None:
                continue
            sub, i = entry
            if not sub.started[i]:
                sub.started[i] = True
                self._running += 1
                self._release(sub, 1)
                self.metrics.ttft.observe(now - sub.t_submit)
            if ev.done:
                self.engine.result(ev.request_id)  # the engine keeps results until collected: drop it
                self._by_id.pop(ev.request_id, None)
                self._running -= 1
                sub.finished[i] = True
                self._count_finished(ev)
            if sub.cancelled:
                continue
            if ev.done and ev.stats is not None and ev.stats.finish_reason == "error":
                # this row failed alone (say, its sampling): its request gets the error, the others go on
                log.error("request %d failed: %s", ev.request_id, ev.stats.error)
                sub.post(APIError(500, f"generating this request failed: {ev.stats.error}", type="server_error"))
                self.cancel(sub)
            else:
                sub.post((i, ev))
        self.metrics.running.set(self._running)

    def _count_finished(self, ev: Event) -> None:
        s = ev.stats
        m = self.metrics
        m.requests.labels(s.finish_reason or "stop").inc()
        m.kv_uncompressed.inc(s.kv_tokens_uncompressed)
        m.kv_saved.inc(max(0, s.kv_tokens_uncompressed - s.kv_tokens))
        m.chunks.inc(s.chunks_compressed)

    def _fail_all(self, err: APIError) -> None:
        subs = {id(sub): sub for sub, _ in self._by_id.values()}.values()
        for rid in list(self._by_id):
            self.engine.abort(rid)
        n = len(self._by_id)
        self._by_id.clear()
        self._running = 0
        for sub in subs:
            sub.finished = [True] * len(sub.finished)
            if sub.reserved:
                self._release(sub, sub.reserved)
            sub.post(err)
        if n:
            self.metrics.requests.labels("error").inc(n)
        self.metrics.running.set(0)
        # submissions still in the inbox are refused too when stopping; otherwise they get their turn
        if self._stopping:
            while True:
                try:
                    cmd = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if cmd is not _STOP and cmd[0] == "add":
                    self._refuse(cmd[1], err)
