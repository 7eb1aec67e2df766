"""Token ids -> exact bytes -> text that never shows half a character.

Qwen3's tokenizer is byte-level BPE, so one token can hold part of a multi-byte UTF-8 character (CJK,
emoji). Streaming text to a user and rendering chunks of K tokens into images both need whole characters:
``StreamDecoder`` holds incomplete bytes back until the character is complete, and ``chunk_text`` moves a
character split by a chunk boundary into the later chunk.

Example::

    >>> from vist2.build import load_tokenizer
    >>> from vist2.text import StreamDecoder, chunk_text, split_complete, token_bytes
    >>> tok = load_tokenizer()
    >>> ids = tok.encode("猫 汉字 END", add_special_tokens=False)  # " 汉" is 3 tokens
    >>> token_bytes(tok, ids).decode()
    '猫 汉字 END'
    >>> split_complete("汉".encode()[:2])
    (b'', b'\\xe6\\xb1')
    >>> dec = StreamDecoder(tok, stop=[" END"])
    >>> [dec.push(i) for i in ids], dec.finish(), dec.stopped  # " " waits: it could begin " END"
    (['猫', '', '', ' 汉', '字', ''], '', True)
    >>> first, carry = chunk_text(tok, b"", ids[:3])  # the chunk boundary splits 汉
    >>> first, carry
    ('猫 ', b'\\xe6\\xb1')
    >>> chunk_text(tok, carry, ids[3:])
    ('汉字 END', b'')
"""

from __future__ import annotations

import codecs
import weakref
from collections.abc import Sequence

try:  # where transformers 4.x kept it
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode
except ImportError:  # transformers 5.x
    from transformers.convert_slow_tokenizer import bytes_to_unicode

from tokenizers import decoders

_BYTE_DECODER: dict[str, int] = {ch: b for b, ch in bytes_to_unicode().items()}


class _TokenBytes:
    """Per-tokenizer cache of the exact bytes of each token id (``None`` = not byte-level)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_level = _is_byte_level(tokenizer)
        self.cache: dict[int, bytes] = {}
        self._added: dict[int, str] | None = None
        self._added_len = -1

    def added(self) -> dict[int, str]:
        # added_tokens_decoder builds a fresh dict on every access; rebuild only when tokens were added
        n = len(self.tokenizer)
        if self._added is None or n != self._added_len:
            self._added = {i: t.content for i, t in self.tokenizer.added_tokens_decoder.items()}
            self._added_len = n
            self.cache.clear()
        return self._added

    def one(self, token_id: int) -> bytes:
        added = self.added()
        b = self.cache.get(token_id)
        if b is not None:
            return b
        if token_id in added:
            # added/special tokens are stored verbatim, not in the byte alphabet
            b = added[token_id].encode("utf-8")
        else:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if piece is None:  # an id past the tokenizer (the model's vocab is padded) shows nothing
                b = b""
            elif all(ch in _BYTE_DECODER for ch in piece):
                b = bytes(_BYTE_DECODER[ch] for ch in piece)
            else:
                b = self.tokenizer.decode([token_id]).encode("utf-8")
        self.cache[token_id] = b
        return b


_TABLES: "weakref.WeakKeyDictionary[object, _TokenBytes]" = weakref.WeakKeyDictionary()


def _is_byte_level(tokenizer) -> bool:
    if isinstance(getattr(tokenizer, "byte_decoder", None), dict):  # a Python (slow) GPT-2-style tokenizer
        return True
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # only a plain ByteLevel decoder: a decoder Sequence may rewrite the text after the byte step
    return backend is not None and isinstance(backend.decoder, decoders.ByteLevel)


def _table(tokenizer) -> _TokenBytes:
    table = _TABLES.get(tokenizer)
    if table is None:
        table = _TABLES[tokenizer] = _TokenBytes(tokenizer)
    return table


def token_bytes(tokenizer, ids: Sequence[int]) -> bytes:
    """The exact bytes the tokens stand for; byte-level pieces may end or start inside a character.

    Special/added tokens (``<|im_end|>``, ``<think>``) give their UTF-8 text. A tokenizer that is not
    byte-level falls back to ``tokenizer.decode(ids)`` (whole characters only, so no split is ever seen).
    """
    table = _table(tokenizer)
    if not table.byte_level:
        return tokenizer.decode(list(ids)).encode("utf-8")
    return b"".join(table.one(int(i)) for i in ids)


def split_complete(data: bytes) -> tuple[bytes, bytes]:
    """``(prefix ending on a character boundary, incomplete tail)``; the tail is 0-3 bytes.

    Only a valid incomplete start of a character is held back; invalid bytes stay in the prefix (they
    decode to U+FFFD there) so they are never held forever.
    """
    # the stdlib incremental decoder buffers exactly a trailing incomplete sequence, and one never spans
    # more than 3 bytes, so looking at those is enough
    decoder = codecs.getincrementaldecoder("utf-8")("ignore")
    decoder.decode(data[-3:], final=False)
    tail = decoder.getstate()[0]
    if len(tail) >= 2:
        # CPython buffers ED A0..BF (the start of a UTF-16 surrogate, never valid) until the next byte
        # arrives; a real incomplete start of 2+ bytes is completed by any continuation byte
        try:
            codecs.getincrementaldecoder("utf-8")("strict").decode(tail + b"\x80", final=False)
        except UnicodeDecodeError:
            tail = b""
    assert len(tail) <= 3 and data.endswith(tail)
    return data[: len(data) - len(tail)], tail


class StreamDecoder:
    """Turns generated token ids into text deltas that never contain half a character.

    ``stop`` strings end the stream: ``stopped`` becomes True and text from the stop string on is never
    emitted. To catch a stop string split across tokens, up to ``len(longest stop) - 1`` characters that
    could begin one are held back until they cannot (or until ``finish``).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a sequence of non-empty strings, got {stop!r}")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        # special tokens (<|im_end|>, <|endoftext|>) are control, not text, as in decode(skip_special_tokens=True):
        # a generation that runs past EOS (ignore_eos) must not show "<|im_end|>"; <think> is text and stays
        self._skip = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        self.stopped = False
        self.text = ""
        self._table = _table(tokenizer)
        self._pending = b""  # incomplete UTF-8 tail
        self._held = ""  # decoded text that may be the start of a stop string
        # a non-byte-level tokenizer only decodes whole sequences: keep the ids and diff the bytes
        self._ids: list[int] = []
        self._seen = b""

    def _new_bytes(self, token_id: int) -> bytes:
        if int(token_id) in self._skip:
            return b""
        if self._table.byte_level:
            return self._table.one(int(token_id))
        self._ids.append(int(token_id))
        data = token_bytes(self.tokenizer, self._ids)
        # best effort: a decoder that rewrites earlier text cannot take back what was emitted
        new = data[len(self._seen) :] if data.startswith(self._seen) else b""
        self._seen = data
        return new

    def _emit(self, new_text: str, final: bool) -> str:
        buf = self._held + new_text
        hits = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self._held, self.stopped = buf[: min(hits)], "", True
        else:
            hold = 0 if final else self._stop_prefix_len(buf)
            out, self._held = buf[: len(buf) - hold], buf[len(buf) - hold :]
        self.text += out
        return out

    def _stop_prefix_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best

    def push(self, token_id: int) -> str:
        """The new text that is now safe to emit (``""`` if none, and always after a stop)."""
        if self.stopped:
            return ""
        complete, self._pending = split_complete(self._pending + self._new_bytes(token_id))
        return self._emit(complete.decode("utf-8", errors="replace"), final=False)

    def finish(self) -> str:
        """Whatever remains: held text, and incomplete bytes as U+FFFD."""
        if self.stopped:
            return ""
        tail, self._pending = self._pending.decode("utf-8", errors="replace"), b""
        return self._emit(tail, final=True)


def chunk_text(tokenizer, carry: bytes, ids: Sequence[int]) -> tuple[str, bytes]:
    """``(text the chunk's image shows, carry for the next chunk)``; ``carry=b""`` for a sample's first chunk.

    The rule is causal, so it applies the moment a chunk is full: the chunk's bytes are ``carry +
    token_bytes(ids)``, the complete prefix is its text and the incomplete tail (0-3 bytes) is carried into
    the next chunk, so a character split by the boundary is shown whole, in the later chunk.
    """
    complete, tail = split_complete(bytes(carry) + token_bytes(tokenizer, ids))
    return complete.decode("utf-8", errors="replace"), tail
