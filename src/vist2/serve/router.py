"""Conversation affinity for ``vist2 serve --replicas``: which replica a request goes to.

A chat's next turn is cheap only on the replica that served its earlier turns: that replica's memory
cache holds the visual tokens of the chat's chunks and its prefix cache their K/V. Elsewhere the whole
history is rendered, read and prefilled again. So each request carries a *conversation key* and every
request with the same key goes to the same replica while that replica has room:

- the key (:func:`conversation_key`): the ``x-session-id`` header when the client sends one, else a hash
  of how the conversation begins (a chat's messages through its first user message, a completion
  prompt's first :data:`FIRST_CHUNK_CHARS` characters or :data:`FIRST_CHUNK_IDS` token ids: the text of
  about one chunk, the unit both caches are keyed by);
- the replica (:func:`rank_replicas`): rendezvous hashing of the key over the replicas' ids, so the
  choice needs no shared table, every router process agrees on it, and adding or losing a replica moves
  only the conversations that were on it;
- overload: when the preferred replica holds ``overload_at`` requests or more (by default its cache rows:
  a new request would wait for a row) and another replica holds fewer, the least-loaded replica gets
  the request instead. Ray's own backpressure (``max_ongoing_requests``) still applies on top.

:class:`vist2.serve.cluster.ConversationRouter` is this policy on Ray Serve's request-router API
(a ``RequestRouter`` named in ``RequestRouterConfig(request_router_class=...)``); the ingress passes the
key as the request's ``session_id``. This module itself needs no Ray. Requests without a key
(``/v1/models``, ``/health``) go to the least-loaded replica, as Ray's default router would send them.

Example (the pure policy; no Ray needed)::

    >>> from vist2.serve.router import conversation_key, rank_replicas
    >>> key = conversation_key({}, "/v1/chat/completions",
    ...                        b'{"messages": [{"role": "user", "content": "Hello"}]}')
    >>> rank_replicas(key, ["a", "b"], {"a": 0, "b": 0}, overload_at=8) in (
    ...     [["a"], ["b"]], [["b"], ["a"]])
    True
"""

from __future__ import annotations

import hashlib
import json
from typing import Hashable, Mapping, Sequence

SESSION_HEADER = "x-session-id"
# Characters / token ids of a completion prompt that key it: about one chunk (64 tokens of the presets;
# English prose averages about 4 characters a token). Prompts that share their first chunk share cache
# entries, so they are worth keeping together.
FIRST_CHUNK_CHARS = 256
FIRST_CHUNK_IDS = 64


def _digest(*parts: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def conversation_key(headers: Mapping[str, str], path: str, body: bytes) -> str | None:
    """The key that keeps a conversation on one replica, or None when the request has none.

    ``headers`` with lower-case names. A body that is not a JSON object (which the replica refuses with
    400) has no key.
    """
    session = headers.get(SESSION_HEADER, "").strip()
    if session:
        return "session:" + session
    if not body or path not in ("/v1/chat/completions", "/v1/completions"):
        return None
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    if path == "/v1/chat/completions":
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        start = []  # through the first user message: a system prompt many chats share does not key them
        for m in messages:
            start.append(m)
            if isinstance(m, dict) and m.get("role") == "user":
                break
        return "chat:" + _digest(json.dumps(start, sort_keys=True, ensure_ascii=False))
    prompt = obj.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a list of prompts: keyed by the first
    if isinstance(prompt, str) and prompt:
        return "prompt:" + _digest(prompt[:FIRST_CHUNK_CHARS])
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt[:FIRST_CHUNK_IDS]):
        return "prompt:" + _digest(",".join(map(str, prompt[:FIRST_CHUNK_IDS])))
    return None


def preferred_replica(key: str, replicas: Sequence[str]) -> str:
    """Rendezvous (highest random weight) hashing: the replica whose hash with ``key`` is highest."""
    if not replicas:
        raise ValueError("no replicas to choose from")
    return max(replicas, key=lambda r: _digest(key, r))


def rank_replicas(key: str | None, replicas: Sequence[Hashable], queue_lens: Mapping[Hashable, int],
                  overload_at: int, name=str) -> list[list]:
    """Ray's ranked candidates: the first rank is tried first; Ray sends the request to the replica of
    a rank with the fewest requests that still has room, and goes on to the next rank when none has.

    ``queue_lens``: requests each replica holds, as last reported (missing: unknown, counted as 0).
    ``name(replica)``: the replica's stable id, hashed with the key.
    """
    if not replicas:
        return []
    if key is None:
        return [list(replicas)]
    by_name = {name(r): r for r in replicas}
    first = by_name[preferred_replica(key, sorted(by_name))]
    rest = [r for r in replicas if r is not first]
    if not rest:
        return [[first]]
    load = queue_lens.get(first, 0)
    if load >= overload_at and min(queue_lens.get(r, 0) for r in rest) < load:
        return [rest, [first]]  # overloaded: the least loaded of the others, the preferred one last
    return [[first], rest]
