"""The encoder cache: visual tokens of prompt chunks kept across requests, so a chunk seen before
is neither rendered nor read by the vision tower again.

A chunk's visual tokens (vision tower + aligner output, ``(n_visual, D)``) are a pure function
of what its image shows and of the weights that read it: its text, its render style (one, or one
per character), the render config, and the model. The cache keys entries by exactly that. The
text, the style and the render config are in every key; the model is the cache's *scope*: the
identity of the vision tower and aligner weights, checked by a :class:`~.weights_scope.WeightsScope`
as the prefix cache's is. When the scope changes every entry is dropped at once (counted in
``invalidations``).

Entries live on the model's device, in its dtype: a hit costs no transfer, and the tokens a hit
returns are the very tensor the vision tower produced when the chunk was first read. Memory is
bounded by ``max_bytes`` (tensor bytes plus the key's text bytes), least recently used first out.

Every key also holds a *salt*, the namespace of the request that stored it (a server's tenant): a chunk
stored under one salt is never a hit under another, so one client cannot learn from a hit (or its
speed) what another sent. None is the shared namespace.

    >>> import torch
    >>> ec = EncoderCache(max_bytes=1 << 20)
    >>> read = lambda texts, styles: torch.ones(len(texts), 4, 8)    # the vision tower, for the example
    >>> v, hits = ec.fetch(["a chunk", "another"], ["user", "user"], read, scope="model-1")
    >>> v.shape, hits
    (torch.Size([2, 4, 8]), [False, False])
    >>> _, hits = ec.fetch(["a chunk"], ["user"], read, scope="model-1")
    >>> hits, ec.stats()["hits"]
    ([True], 1)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Sequence

import torch

from .weights_scope import WeightsScope

Style = str | tuple[str, ...]


class EncoderCache:
    """A byte-bounded LRU of chunk visual tokens keyed by ``(text, style, render config, salt)`` within a
    scope (the model's weights, see :func:`~.weights_scope.model_scope`).

    Args:
        max_bytes: the bound on what entries hold (tensor bytes + key text bytes); must be > 0
            (an engine without an encoder cache holds none of these objects).
        render_config: part of every key (a hashable object, e.g. :class:`vist2.render.RenderConfig`).
    """

    def __init__(self, max_bytes: int, render_config: Hashable = None):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
            raise ValueError(f"encoder_cache_bytes must be a positive int (0 turns the cache off), got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.render_config = render_config
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, int]] = OrderedDict()  # key -> (tokens, bytes)
        self.weights = WeightsScope(self)
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def invalidations(self) -> int:
        return self.weights.invalidations

    def key(self, text: str, style: Style, salt: str | None = None) -> tuple:
        return (text, style if isinstance(style, str) else tuple(style), self.render_config, salt)

    def stats(self) -> dict:
        """Counters since creation (hits and misses count chunks) and what the cache holds now."""
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "invalidations": self.invalidations, "entries": len(self._entries), "bytes": self.bytes,
                "max_bytes": self.max_bytes}

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def fetch(self, texts: Sequence[str], styles: Sequence[Style], read: Callable[[list[str], list], torch.Tensor],
              scope: Hashable, salts: Sequence[str | None] | None = None) -> tuple[torch.Tensor, list[bool]]:
        """The visual tokens of each chunk ``(n, n_visual, D)`` and whether each was a hit. Misses are read
        in one call ``read(texts, styles)`` (a chunk repeated within the call and salt is read once) and
        stored. ``salts``: each chunk's namespace (default: all None, the shared one)."""
        salts = [None] * len(texts) if salts is None else list(salts)
        if not len(texts) == len(styles) == len(salts):
            raise ValueError(f"{len(texts)} chunk texts for {len(styles)} styles and {len(salts)} salts")
        self.weights.check(scope)
        keys = [self.key(t, s, salt) for t, s, salt in zip(texts, styles, salts)]
        out: list[torch.Tensor | None] = [None] * len(keys)
        hits, todo = [False] * len(keys), {}  # todo: key -> indices of the call that need it
        for i, k in enumerate(keys):
            entry = self._entries.get(k)
            if entry is not None:
                self._entries.move_to_end(k)
                out[i], hits[i] = entry[0], True
            else:
                todo.setdefault(k, []).append(i)
        self.hits += sum(hits)
        self.misses += len(keys) - sum(hits)
        if todo:
            firsts = [idx[0] for idx in todo.values()]
            read_NVD = read([texts[i] for i in firsts], [styles[i] for i in firsts])  # (misses, n_visual, D)
            for (k, idx), v in zip(todo.items(), read_NVD):
                v = v.clone()  # its own storage: a view would keep the whole batch alive, uncounted
                for i in idx:
                    out[i] = v
                self._put(k, v)
        return torch.stack(out), hits  # (n, n_visual, D)

    def _put(self, key: tuple, tokens: torch.Tensor) -> None:
        size = (tokens.numel() * tokens.element_size() + len(key[0].encode("utf-8", "surrogatepass"))
                + len(key[3] or ""))
        if size > self.max_bytes:  # would evict everything and still not fit
            return
        while self.bytes + size > self.max_bytes:
            _, (_, freed) = self._entries.popitem(last=False)
            self.bytes -= freed
            self.evictions += 1
        self._entries[key] = (tokens, size)
        self.bytes += size
