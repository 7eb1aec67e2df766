"""The KV row manager: which cache rows are taken, how many live entries each holds, and the prefix cache.

Every change of a row's length goes through here (the decode step's own advance aside: the runner
moves the device and host counts together inside the step it executes): a prompt entering a row
(its cached start copied in, :meth:`KVRows.begin`), prefill pieces written (:meth:`KVRows.wrote`), a
compressed chunk's text evicted (:meth:`KVRows.evict`), a row freed (:meth:`KVRows.free`). The
scheduler asks it for free rows and lengths; it never touches the model.

    >>> kv = KVRows(lambda: cache, max_batch=2)              # doctest: +SKIP
    >>> row = kv.allocate(); kv.begin(row, plan)             # doctest: +SKIP
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

from .cache import CompressedKVCache
from .prefix_cache import PrefixCache, prompt_pieces


class CacheFull(Exception):
    """A row would grow past ``max_cache_tokens`` (only generation can: prompts are checked on admission)."""


class KVRows:
    """Rows of a :class:`CompressedKVCache` (reached through ``cache()``: the runner allocates the
    buffers on first use) and the :class:`PrefixCache` that fills a row's start (None: off; ``scope()``
    names the weights its K/V belong to)."""

    def __init__(self, cache: Callable[[], CompressedKVCache], max_batch: int, max_cache_tokens: int | None = None,
                 prefix: PrefixCache | None = None, scope: Callable[[], Hashable] | None = None):
        self._cache = cache
        self.max_batch, self.max_cache_tokens = max_batch, max_cache_tokens
        self.prefix, self._scope = prefix, scope
        self._taken: set[int] = set()

    @property
    def cache(self) -> CompressedKVCache:
        return self._cache()

    # -- rows -------------------------------------------------------------------------------

    @property
    def n_free(self) -> int:
        return self.max_batch - len(self._taken)

    def allocate(self) -> int:
        """The lowest free row, now taken."""
        row = min(set(range(self.max_batch)) - self._taken)
        self._taken.add(row)
        return row

    def release(self, row: int) -> None:
        """Give a row back without touching its entries (an admission that failed before any was written)."""
        self._taken.discard(row)

    def free(self, row: int) -> None:
        """The row's request is done: its entries are dropped and the row is free."""
        self._taken.discard(row)
        self.cache.set_length(row, 0)

    # -- lengths ------------------------------------------------------------------------------

    def length(self, row: int) -> int:
        """Live entries of a row (counted on the host)."""
        return self.cache.host_length[row]

    def check_room(self, rows: Sequence[int], n: int) -> None:
        """Raise :class:`CacheFull` if any of ``rows`` cannot take ``n`` more entries."""
        if max(self.cache.host_length[r] for r in rows) + n > self.max_cache_tokens:
            raise CacheFull()

    def wrote(self, row: int, end: int) -> None:
        """Entries up to ``end`` of the row were written (a prefill piece): its length is ``end``."""
        self.cache.set_length(row, end)

    def evict(self, row: int, text_start: int, visual_start: int, n_visual: int) -> None:
        """A compressed chunk's text ``[text_start, visual_start)`` is dropped; its visual tokens move
        where the text began (:meth:`CompressedKVCache.evict`)."""
        self.cache.evict(row, text_start, visual_start, n_visual)

    # -- the prefix cache -----------------------------------------------------------------------

    def begin(self, row: int, plan, salt: str | None = None) -> int:
        """A prompt enters ``row``: its longest cached start in the namespace ``salt`` (the request's
        ``cache_salt``) is copied in (the prefix cache, when on); returns the row's length, the entries
        the prompt feed skips."""
        if self.prefix is None:
            self.cache.set_length(row, 0)
            return 0
        return self.prefix.begin(row, prompt_pieces(plan, salt=salt), self.cache, self._scope())

    def settle(self, row: int, settled: int) -> None:
        """The row's first ``settled`` entries are final prompt K/V: the prefix cache keeps them."""
        if self.prefix is not None:
            self.prefix.settle(row, settled, self.cache, self._scope())
