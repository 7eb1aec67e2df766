import pytest

from vist2.build import load_tokenizer
from vist2.text import StreamDecoder, chunk_text, split_complete, token_bytes

MIXED = "Hello 你好，世界！🐈‍⬛ 👍🏽 𠀀𪚥 汉字 done."


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def ids_of(tok, s):
    return tok.encode(s, add_special_tokens=False)


def has_split_token(tok, ids):
    """Some single token is not whole UTF-8 on its own (the case all of this exists for)."""
    return any(split_complete(token_bytes(tok, [i]))[1] or not _valid(token_bytes(tok, [i])) for i in ids)


def _valid(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# --- token_bytes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.  Twice  spaced,\n\nnew lines.",
        "机器学习是人工智能的一个分支。",
        "emoji: 😀🤖🐈‍⬛👍🏽🇯🇵 family 👨‍👩‍👧",
        "مرحبا بالعالم",  # Arabic, RTL
        "שלום עולם",  # Hebrew, RTL
        "tab\there bell\x07 cr\r\n nul-free ctrl \x1b[0m",
        "rare CJK 𠀀𪚥 and combining é",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nok<|endoftext|>",
    ],
)
def test_token_bytes_round_trip(tok, text):
    ids = ids_of(tok, text)
    assert token_bytes(tok, ids) == text.encode("utf-8")
    # and per token, as the engine calls it
    assert b"".join(token_bytes(tok, [i]) for i in ids) == text.encode("utf-8")


def test_round_trip_strings_really_split_characters(tok):
    assert has_split_token(tok, ids_of(tok, MIXED))


def test_special_tokens_are_their_text(tok):
    for name in ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "<think>", "</think>"):
        i = tok.convert_tokens_to_ids(name)
        assert i >= tok.vocab_size  # an added token, outside the byte-level vocab
        assert token_bytes(tok, [i]) == name.encode()


def test_padded_vocab_ids_give_no_bytes(tok):
    assert token_bytes(tok, [len(tok) + 5]) == b""


def test_empty(tok):
    assert token_bytes(tok, []) == b""


class CharTokenizer:
    """Not byte-level: one id per character, decoded only as a whole."""

    def encode(self, s):
        return [ord(c) for c in s]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_non_byte_level_tokenizer_falls_back_to_decode():
    t = CharTokenizer()
    assert token_bytes(t, t.encode("aé汉")) == "aé汉".encode()
    dec = StreamDecoder(t, stop=["汉字"])
    out = [dec.push(i) for i in t.encode("aé汉语汉字!")]
    assert out == ["a", "é", "", "汉语", "", "", ""]
    assert dec.stopped and dec.text == "aé汉语"


# --- split_complete -------------------------------------------------------------------------------

CAT = "🐈".encode()  # f0 9f 90 88


@pytest.mark.parametrize(
    "data, complete, tail",
    [
        (b"", b"", b""),
        (b"abc", b"abc", b""),
        ("a汉".encode(), "a汉".encode(), b""),
        (b"a" + CAT[:1], b"a", CAT[:1]),
        (b"a" + CAT[:2], b"a", CAT[:2]),
        (b"a" + CAT[:3], b"a", CAT[:3]),
        (b"a" + CAT, b"a" + CAT, b""),
        (CAT + CAT[:3], CAT, CAT[:3]),
        ("汉".encode()[:2], b"", "汉".encode()[:2]),
        (b"a\xc3", b"a", b"\xc3"),  # first byte of é
        # invalid bytes are never held: they can not become a character
        (b"a\xff", b"a\xff", b""),
        (b"a\xc0", b"a\xc0", b""),  # C0/C1 only start overlong forms
        (b"a\xf5", b"a\xf5", b""),  # beyond U+10FFFF
        (b"a\x80", b"a\x80", b""),  # a stray continuation byte
        (CAT + b"\x80", CAT + b"\x80", b""),
        (b"a\xe0\x80", b"a\xe0\x80", b""),  # overlong
        (b"a\xed\xa0", b"a\xed\xa0", b""),  # a UTF-16 surrogate half
        (b"a\xf4\x90", b"a\xf4\x90", b""),  # beyond U+10FFFF
        (b"\xf0\x9f\x90\xff", b"\xf0\x9f\x90\xff", b""),
    ],
)
def test_split_complete(data, complete, tail):
    assert split_complete(data) == (complete, tail)


def test_split_complete_every_prefix_of_mixed_text():
    data = MIXED.encode()
    for k in range(len(data) + 1):
        complete, tail = split_complete(data[:k])
        assert complete + tail == data[:k] and len(tail) <= 3
        complete.decode("utf-8")  # strict: ends on a boundary
        assert MIXED.startswith(complete.decode()) and (tail == b"") == _valid(data[:k])


# --- StreamDecoder --------------------------------------------------------------------------------


def test_stream_deltas_are_whole_characters(tok):
    ids = ids_of(tok, MIXED)
    dec = StreamDecoder(tok)
    deltas = [dec.push(i) for i in ids]
    assert "" in deltas  # some token ended inside a character and was held back
    assert all("\ufffd" not in d for d in deltas)
    assert dec.finish() == ""
    assert "".join(deltas) == MIXED == dec.text
    assert not dec.stopped


def test_finish_flushes_incomplete_bytes_as_replacement(tok):
    ids = ids_of(tok, "ab 汉")
    assert token_bytes(tok, ids[-1:]) == "汉".encode()[2:]  # " \xe6", "\xb1", "\x89"
    dec = StreamDecoder(tok)
    text = "".join(dec.push(i) for i in ids[:-1])
    assert text == "ab "
    assert dec.finish() == "\ufffd"


def test_stop_string_split_across_tokens(tok):
    text = "The answer is 42.\n\nUser: tell me more"
    stop = "\n\nUser:"
    ids = ids_of(tok, text)
    pieces = [token_bytes(tok, [i]).decode() for i in ids]
    assert not any(stop in p for p in pieces)  # no single token holds it
    dec = StreamDecoder(tok, stop=[stop])
    deltas = [dec.push(i) for i in ids]
    assert dec.stopped
    assert "".join(deltas) == dec.text == "The answer is 42."
    assert dec.push(ids[0]) == "" and dec.finish() == ""
    assert dec.text == "The answer is 42."


def test_stop_string_with_cjk_and_earliest_of_several(tok):
    dec = StreamDecoder(tok, stop=["再见", "世界"])
    out = "".join(dec.push(i) for i in ids_of(tok, "你好世界再见")) + dec.finish()
    assert out == "你好" and dec.stopped


def test_stop_at_the_first_token(tok):
    dec = StreamDecoder(tok, stop=["Hello"])
    assert dec.push(ids_of(tok, "Hello")[0]) == ""
    assert dec.stopped and dec.text == ""


def test_held_text_is_released_when_it_can_not_be_a_stop(tok):
    stop = "\n\nUser:"
    text = "a\n\nUse"  # a prefix of the stop string, then the end
    ids = ids_of(tok, text)
    dec = StreamDecoder(tok, stop=[stop])
    decoded = b""
    for i in ids:
        dec.push(i)
        decoded += token_bytes(tok, [i])
        # nothing but a possible stop start is held back
        assert len(decoded.decode()) - len(dec.text) <= len(stop) - 1
    assert dec.finish() == "\n\nUse"
    assert dec.text == text and not dec.stopped


def test_stop_strings_validated(tok):
    for bad in ("\n", [""], [3]):
        with pytest.raises(ValueError, match="stop"):
            StreamDecoder(tok, stop=bad)


# --- chunk_text -----------------------------------------------------------------------------------


def test_chunk_boundary_inside_a_character(tok):
    text = "视觉上下文压缩 🐈‍⬛ 𠀀𪚥 龘"
    ids = ids_of(tok, text)
    # the first cut point whose left side ends inside a character
    cut = next(k for k in range(1, len(ids)) if split_complete(token_bytes(tok, ids[:k]))[1])
    first, carry = chunk_text(tok, b"", ids[:cut])
    second, rest = chunk_text(tok, carry, ids[cut:])
    assert carry and rest == b""
    assert first + second == text
    assert "\ufffd" not in first + second
    split_char = text[len(first)]
    # the character's bytes really straddle the cut, and it is shown whole in the second chunk
    left = len(token_bytes(tok, ids[:cut]))
    assert len(first.encode()) < left < len(first.encode()) + len(split_char.encode())
    assert second.startswith(split_char)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_chunks_of_k_tokens_rebuild_the_text(tok, k):
    ids = ids_of(tok, MIXED)
    carry, texts = b"", []
    for start in range(0, len(ids), k):
        text, carry = chunk_text(tok, carry, ids[start : start + k])
        texts.append(text)
    assert carry == b""
    assert "".join(texts) == MIXED
    assert all("\ufffd" not in t for t in texts)
    if k == 1:
        assert "" in texts  # a chunk wholly inside one character shows nothing; its bytes move on


def test_chunk_text_keeps_invalid_bytes_visible(tok):
    # a carry that can not be completed is not held forever
    text, carry = chunk_text(tok, b"\xed\xa0", ids_of(tok, "ok"))
    assert text == "\ufffd\ufffdok" and carry == b""


def test_special_tokens_stream_no_text(tok):
    """A generation past EOS (ignore_eos) must not show "<|im_end|>"; <think> is text, not control."""
    im_end, eot, think = (tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", "<think>"))
    dec = StreamDecoder(tok)
    out = [dec.push(i) for i in ids_of(tok, "ok") + [im_end, eot] + ids_of(tok, " go") + [think]]
    assert "".join(out) + dec.finish() == "ok go<think>" == dec.text
