"""Prometheus metrics of one server, in a registry of its own (several servers can share a process).

Example::

    >>> from vist2.serve.metrics import ServerMetrics
    >>> m = ServerMetrics()
    >>> m.queue_depth.set(3)
    >>> b"vist2_queue_depth 3.0" in m.render()[0]
    True
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# TTFT spans a tiny model on a GPU (ms) to a long prompt queued behind others on a CPU (tens of s)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class ServerMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter("vist2_http_requests", "HTTP requests answered, by endpoint and status",
                                     ["endpoint", "status"], registry=r)
        self.requests = Counter("vist2_requests_finished", "engine requests (one per choice) that ended, by reason "
                                "(stop, length, eos, abort, error)", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("vist2_prompt_tokens", "prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("vist2_generation_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge("vist2_queue_depth", "engine requests waiting for a cache row", registry=r)
        self.running = Gauge("vist2_running_requests", "engine requests holding a cache row", registry=r)
        self.ttft = Histogram("vist2_time_to_first_token_seconds", "from arrival to the first token (queue included)",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.kv_saved = Counter("vist2_kv_entries_saved", "KV entries a plain LLM would have held minus those held, "
                                "at the end of each finished request", registry=r)
        self.kv_uncompressed = Counter("vist2_kv_entries_uncompressed", "KV entries a plain LLM would have held at "
                                       "the end of each finished request", registry=r)
        self.chunks = Counter("vist2_chunks_compressed", "chunks turned into visual tokens", registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
