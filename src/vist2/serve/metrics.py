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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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

    def watch_encoder_cache(self, engine) -> None:
        """Export the engine's encoder cache (``Engine.encoder_cache_stats``), read at every scrape: the
        engine keeps the counters, so they are exact however requests end. All zero when it is off."""
        self.registry.register(_EncoderCacheCollector(engine))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EncoderCacheCollector:
    """``vist2_memory_cache_*`` (the encoder cache's old name, kept for dashboards): prompt chunks found in /
    missing from the encoder cache, entries evicted for the byte bound or dropped when the weights changed,
    and what it holds."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = getattr(self.engine, "encoder_cache_stats", lambda: None)() or {}
        for name, doc in (("hits", "prompt chunks whose visual tokens came from the encoder cache"),
                          ("misses", "prompt chunks read by the vision tower with the encoder cache on"),
                          ("evictions", "encoder cache entries evicted to stay within its byte bound"),
                          ("invalidations", "times the encoder cache was emptied because the weights changed")):
            yield CounterMetricFamily(f"vist2_memory_cache_{name}", doc, value=stats.get(name, 0))
        for name, doc in (("entries", "chunks the encoder cache holds"),
                          ("bytes", "bytes the encoder cache holds (visual tokens and chunk texts)"),
                          ("max_bytes", "the encoder cache's byte bound (--encoder-cache-bytes; 0: off)")):
            yield GaugeMetricFamily(f"vist2_memory_cache_{name}", doc, value=stats.get(name, 0))
        prefix = stats.get("prefix") or {}  # vist2_prefix_cache_*: the K/V of cached prompt starts
        for name, doc in (("hit_tokens", "prompt cache entries copied from the prefix cache instead of computed"),
                          ("miss_tokens", "prompt cache entries computed that the prefix cache could have held"),
                          ("hit_chunks", "prompt chunks whose K/V came from the prefix cache"),
                          ("miss_chunks", "prompt chunks prefilled that the prefix cache could have held"),
                          ("evictions", "prefix cache nodes evicted to stay within its byte bound"),
                          ("invalidations", "times the prefix cache was emptied because the weights changed")):
            yield CounterMetricFamily(f"vist2_prefix_cache_{name}", doc, value=prefix.get(name, 0))
        for name, doc in (("nodes", "prompt pieces (chunks, raw blocks) the prefix cache holds"),
                          ("bytes", "bytes the prefix cache holds (K/V and keys)"),
                          ("max_bytes", "the prefix cache's byte bound (that of --encoder-cache-bytes; 0: off)")):
            yield GaugeMetricFamily(f"vist2_prefix_cache_{name}", doc, value=prefix.get(name, 0))
