"""The prefix cache: the LLM's K/V of a prompt's start kept across requests, so a new request that
begins with the same chunks copies their cache entries instead of rendering, reading and prefilling
them again (SGLang's RadixAttention, over chunks instead of tokens).

A cache entry's K/V depends on its own content and on every entry before it (the mask is causal
over cache indices, and the index is the position). A prompt's entries come in *pieces* whose K/V
is final once fed: a compressed chunk (its ``n_visual`` entries; its key: the ids, the layout kind,
and the image's text and style, so the carry and the render style too) or a block of at most
``raw_block`` raw tokens (its key: the ids). Pieces are the edges of a trie whose root is the
render config, the prompt encoding and ``n_visual``; a prompt with a ``cache_salt`` (its namespace, a
server's tenant) has the salt in its first piece's key, so its whole path lies in a subtree of its own
and no other salt's prompt can reach it (vLLM salts the first block's hash the same way). A node holds
the K/V of its piece for every
layer, ``(2 x layers, kv_heads, n, head_dim)`` on the model's device and dtype. The chunking is a
causal stream, so turn t+1 of a chat with a compressed history starts with every chunk closed in
turn t's prompt, and walks the same nodes. The model's weights are the scope (checked by a
:class:`~.weights_scope.WeightsScope` as the encoder cache's is, over the whole model here): when they
change, all is dropped.

A prompt's last piece is never taken from the cache: its forward gives the logits the first token
is drawn from. Memory is bounded by ``max_bytes`` (K/V bytes plus the keys' bytes); least recently
used leaves go first (a node is always touched after its descendants, so the oldest node is a leaf).

The bound is its own (``Engine(prefix_cache_bytes=…)``, by default the encoder cache's): a chunk's
K/V is ``2 x layers x kv_heads x head_dim`` values per entry, ~56 times its visual tokens for Qwen3-0.6B,
so one LRU over both would let K/V push out every visual-token entry, and those are the only reuse
left for a chunk seen after another start (a document behind another system prompt).

    >>> import torch
    >>> from vist2.engine.cache import CompressedKVCache
    >>> cache = CompressedKVCache(n_layers=1, batch=1, n_kv_heads=1, head_dim=2, capacity=8, dtype=torch.float32)
    >>> pc = PrefixCache(max_bytes=1 << 20)
    >>> pieces = [Piece(("r", (1, 2)), 2, None), Piece(("r", (3,)), 1, None)]
    >>> pc.begin(0, pieces, cache, scope="w"), pc.settle(0, 3, cache, scope="w")
    (0, None)
    >>> pc.begin(0, pieces, cache, scope="w")    # the next request: the first block is copied, the last fed
    2
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, NamedTuple, Sequence

import torch

from ..layout import Chunk
from .cache import CompressedKVCache
from .weights_scope import WeightsScope

RAW_BLOCK = 32  # raw tokens per piece: a shared raw start is reused to within this many tokens


class Piece(NamedTuple):
    key: Hashable
    entries: int  # cache entries it holds once fed
    chunk: int | None  # the prompt chunk it is (its number in PromptPlan.chunks), None for raw text


def prompt_pieces(plan, raw_block: int = RAW_BLOCK, salt: str | None = None) -> list[Piece]:
    """A :class:`~.scheduler.PromptPlan`'s pieces, in cache order; a ``salt`` (the prompt's cache namespace)
    joins the first piece's key."""
    out, n_chunks = [], 0
    for seg in plan.segments:
        if isinstance(seg, Chunk):
            text, style = plan.chunks[n_chunks]
            style = style if isinstance(style, str) else tuple(style)
            out.append(Piece(("c", seg.tokens, seg.kind, seg.n_visual, text, style), seg.n_visual, n_chunks))
            n_chunks += 1
            continue
        for i in range(0, len(seg.tokens), raw_block):
            block = seg.tokens[i : i + raw_block]
            out.append(Piece(("r", block), len(block), None))
    if salt is not None and out:
        out[0] = out[0]._replace(key=("s", salt, out[0].key))
    return out


def _key_bytes(key: tuple) -> int:
    if key[0] == "s":  # a salted first piece
        return len(key[1].encode("utf-8", "surrogatepass")) + _key_bytes(key[2])
    if key[0] == "r":
        return 8 * len(key[1])
    style = key[5]
    return 8 * len(key[1]) + len(key[4].encode("utf-8", "surrogatepass")) + (0 if isinstance(style, str) else 8 * len(style))


_COPY_BYTES = 64 << 20  # nodes are joined into copies of about this size (few copies, a bounded temporary)


def _copy_in(path: list, cache: CompressedKVCache, row: int) -> None:
    """Write the K/V of ``path``'s nodes into the row's first entries, in order."""
    layers, start, i = len(cache.keys), 0, 0
    while i < len(path):
        group, size = [path[i].kv], path[i].bytes
        i += 1
        while i < len(path) and size + path[i].bytes <= _COPY_BYTES:
            group.append(path[i].kv)
            size += path[i].bytes
            i += 1
        kv = torch.cat(group, dim=2) if len(group) > 1 else group[0]  # (2 x layers, kv_heads, n, head_dim)
        end = start + kv.shape[2]
        for j in range(layers):
            cache.keys[j][row, :, start:end] = kv[j]
            cache.values[j][row, :, start:end] = kv[layers + j]
        start = end


class _Node:
    __slots__ = ("key", "parent", "children", "kv", "bytes", "attached")

    def __init__(self, key, parent, kv, size):
        self.key, self.parent, self.kv, self.bytes = key, parent, kv, size
        self.children: dict[Hashable, _Node] = {}
        self.attached = True


class PrefixCache:
    """A byte-bounded trie of prompt pieces' K/V (see the module docstring).

    Per row the engine calls :meth:`begin` on admission (copies the longest cached start into the row,
    returns its entries: the prompt feed skips them) and :meth:`settle` after each prefill forward (keeps
    the pieces whose K/V is now final). ``context``: what every key shares (render config, prompt
    encoding, n_visual).
    """

    def __init__(self, max_bytes: int, context: Hashable = None, raw_block: int = RAW_BLOCK):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
            raise ValueError(f"prefix_cache_bytes must be a positive int (0 turns the cache off), got {max_bytes!r}")
        self.max_bytes, self.context, self.raw_block = max_bytes, context, raw_block
        self._root = _Node(context, None, None, 0)
        self._lru: OrderedDict[_Node, None] = OrderedDict()  # every node but the root, oldest first
        self._rows: dict[int, list] = {}  # row -> [its pieces, pieces kept, the node of the last kept, scope]
        self.weights = WeightsScope(self)
        self.bytes = 0
        self.hit_tokens = self.miss_tokens = self.hit_chunks = self.miss_chunks = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def invalidations(self) -> int:
        return self.weights.invalidations

    def stats(self) -> dict:
        """Counters since creation (hits and misses: the cache entries and the chunks of prompts' starts
        copied, or computed though they could have been; a prompt's last piece is not counted) and what
        the cache holds now."""
        return {"hit_tokens": self.hit_tokens, "miss_tokens": self.miss_tokens, "hit_chunks": self.hit_chunks,
                "miss_chunks": self.miss_chunks, "evictions": self.evictions, "invalidations": self.invalidations,
                "nodes": len(self._lru), "bytes": self.bytes, "max_bytes": self.max_bytes}

    def clear(self) -> None:
        for node in self._lru:
            node.attached = False
        self._lru.clear()
        self._root.children.clear()
        self.bytes = 0

    def _touch(self, node: _Node) -> None:
        """Mark a node and its ancestors used, deepest first: a parent is always newer than its children."""
        while node is not self._root:
            self._lru.move_to_end(node)
            node = node.parent

    def begin(self, row: int, pieces: Sequence[Piece], cache: CompressedKVCache, scope: Hashable) -> int:
        """A request enters ``row``: copy the K/V of the longest cached run of its pieces (never the last)
        into the row at the same cache indices; returns how many entries that is (the row's length)."""
        self.weights.check(scope)
        node, path, entries = self._root, [], 0
        for p in pieces[:-1]:
            nxt = node.children.get(p.key)
            if nxt is None:
                break
            node = nxt
            path.append(nxt)
            entries += p.entries
        if path:
            self._touch(node)
            _copy_in(path, cache, row)
        hit = pieces[: len(path)]
        self.hit_tokens += entries
        self.hit_chunks += sum(p.chunk is not None for p in hit)
        rest = pieces[len(path) : -1]
        self.miss_tokens += sum(p.entries for p in rest)
        self.miss_chunks += sum(p.chunk is not None for p in rest)
        self._rows[row] = [list(pieces), len(path), node, scope]
        cache.set_length(row, entries)
        return entries

    def settle(self, row: int, settled: int, cache: CompressedKVCache, scope: Hashable) -> None:
        """The row's first ``settled`` cache entries are final: keep the pieces they complete (not the
        prompt's last), their K/V copied out of the row."""
        state = self._rows.get(row)
        if state is None:
            return
        pieces, kept, node, began = state
        if scope != began:  # the weights changed while the prompt was fed: its K/V mixes two models
            del self._rows[row]
            return
        self.weights.check(scope)
        if not node.attached and node is not self._root:  # evicted meanwhile: find the way again from the root
            node, kept = self._root, 0
        start = sum(p.entries for p in pieces[:kept])
        while kept < len(pieces) - 1 and start + pieces[kept].entries <= settled:
            p = pieces[kept]
            child = node.children.get(p.key)
            if child is None:
                child = self._insert(node, p, cache, row, start)
                if child is None:  # it does not fit: nothing after it can be kept either
                    del self._rows[row]
                    return
            node, kept, start = child, kept + 1, start + p.entries
        self._touch(node)
        state[1], state[2] = kept, node

    def _insert(self, parent: _Node, p: Piece, cache: CompressedKVCache, row: int, start: int) -> _Node | None:
        self._touch(parent)  # the way here is the newest: evicting reaches it only when all else is gone
        end = start + p.entries
        kv = torch.stack([k[row, :, start:end] for k in cache.keys] + [v[row, :, start:end] for v in cache.values])
        size = kv.numel() * kv.element_size() + _key_bytes(p.key)
        if size > self.max_bytes:
            return None
        ancestors = set()
        a = parent
        while a is not self._root:
            ancestors.add(a)
            a = a.parent
        while self.bytes + size > self.max_bytes:
            victim = next(iter(self._lru))
            if victim in ancestors:  # only the way to this piece is left: no room for it
                return None
            self._evict(victim)
        node = _Node(p.key, parent, kv, size)
        parent.children[p.key] = node
        self._lru[node] = None
        self.bytes += size
        return node

    def _evict(self, node: _Node) -> None:
        assert not node.children, "the least recently used node is always a leaf"
        del self._lru[node]
        del node.parent.children[node.key]
        node.attached = False
        node.kv = None
        self.bytes -= node.bytes
        self.evictions += 1
