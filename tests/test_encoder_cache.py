"""The encoder cache: prompt chunks' visual tokens reused across requests, exactly, within a byte bound."""

import warnings

import pytest
import torch

from vist2.build import load_tokenizer
from vist2.config import preset_config
from vist2.engine.engine import Engine, Request
from vist2.engine.encoder_cache import EncoderCache
from vist2.engine.sampling import SamplingParams
from vist2.modeling import VIST2ForCausalLM
from vist2.processing import VIST2Processor
from vist2.samples import sample_text


class Reader:
    """A stand-in vision tower: ``(n, 2, 4)`` float32 tokens (32 bytes each) derived from the text; counts calls."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts, styles):
        self.calls.append(list(texts))
        return torch.stack([torch.full((2, 4), float(len(t) + 100 * (s != "plain"))) for t, s in zip(texts, styles)])


ENTRY = 2 * 4 * 4  # tensor bytes of one entry; a one-letter key adds 1


def test_hits_misses_and_a_repeat_within_one_call():
    ec, read = EncoderCache(10_000), Reader()
    v, hits = ec.fetch(["a", "bb", "a"], ["plain", "user", "plain"], read, scope=0)
    assert hits == [False, False, False] and read.calls == [["a", "bb"]]  # "a" read once
    assert v[:, 0, 0].tolist() == [1.0, 102.0, 1.0]
    v2, hits = ec.fetch(["bb", "a", "c"], ["user", "plain", "plain"], read, scope=0)
    assert hits == [True, True, False] and read.calls[-1] == ["c"]
    assert torch.equal(v2[0], v[1]) and torch.equal(v2[1], v[0])
    _, hits = ec.fetch(["bb"], ["plain"], read, scope=0)  # same text, other style: another image
    assert hits == [False]
    assert ec.stats() | {"bytes": 0} == {"hits": 2, "misses": 5, "evictions": 0, "invalidations": 0, "entries": 4,
                                        "bytes": 0, "max_bytes": 10_000}


def test_eviction_keeps_the_byte_bound_least_recently_used_first():
    ec, read = EncoderCache(3 * (ENTRY + 1)), Reader()  # room for exactly three one-letter entries
    ec.fetch(["a", "b", "c"], ["plain"] * 3, read, scope=0)
    assert ec.bytes == 3 * (ENTRY + 1) and len(ec) == 3
    ec.fetch(["a"], ["plain"], read, scope=0)  # "a" is now the most recently used
    ec.fetch(["d"], ["plain"], read, scope=0)  # evicts "b"
    assert ec.evictions == 1 and ec.bytes <= ec.max_bytes
    _, hits = ec.fetch(["a", "c", "d", "b"], ["plain"] * 4, read, scope=0)
    assert hits == [True, True, True, False]
    for n in range(1, 40):  # whatever comes, the bound holds
        ec.fetch([chr(200 + i) * (1 + i % 3) for i in range(n)], ["plain"] * n, read, scope=0)
        assert ec.bytes <= ec.max_bytes
        assert ec.bytes == sum(size for _, size in ec._entries.values())


def test_an_entry_over_the_bound_is_not_kept_and_a_new_scope_drops_all():
    ec, read = EncoderCache(ENTRY), Reader()  # a one-letter key does not fit beside its tokens
    _, hits = ec.fetch(["a"], ["plain"], read, scope=0)
    _, hits = ec.fetch(["a"], ["plain"], read, scope=0)
    assert hits == [False] and len(ec) == 0 and ec.evictions == 0
    ec = EncoderCache(10_000)
    ec.fetch(["a", "b"], ["plain"] * 2, read, scope="weights-1")
    _, hits = ec.fetch(["a"], ["plain"], read, scope="weights-2")
    assert hits == [False] and ec.invalidations == 1 and len(ec) == 1


@pytest.mark.parametrize("bad", [-1, 0, 1.5, True, "1"])
def test_bad_bounds_are_refused(bad):
    with pytest.raises(ValueError, match="encoder_cache_bytes"):
        EncoderCache(bad)


# -- the engine ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _engine(tok, encoder_cache_bytes=0, **kw):
    """The encoder cache alone: with the prefix cache on, a repeated prompt start would not reach it
    (tests/test_prefix_cache.py)."""
    torch.manual_seed(0)
    cfg = preset_config("tiny")
    cfg.text_config.initializer_range = 0.5  # large weights: any difference in the visual tokens shows
    model = VIST2ForCausalLM(cfg).eval()
    return Engine(model, VIST2Processor(tok, model.config.render_config), record_logits=True,
                  encoder_cache_bytes=encoder_cache_bytes, prefix_cache_bytes=0, **kw)


def _doc(tok, n):
    ids = tok(sample_text("en"), add_special_tokens=False)["input_ids"][:n]
    assert len(ids) == n
    return ids


GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)


def _run(engine, query):
    [res] = engine.generate([Request(query=list(query), params=GREEDY)])
    return res


def test_a_cached_request_gives_the_uncached_logits_bitwise(tok):
    """Exact, not within a tolerance: a hit returns the very tensor the vision tower produced for the
    same chunk in a batch of the same composition (the first request), so the LLM sees the same bits."""
    doc = _doc(tok, 400)
    plain = _run(_engine(tok), doc)
    engine = _engine(tok, encoder_cache_bytes=1 << 22)
    first, second = _run(engine, doc), _run(engine, doc)
    n_chunks = first.stats.memory_misses
    assert n_chunks >= 5 and first.stats.memory_hits == 0
    assert second.stats.memory_hits == n_chunks and second.stats.memory_misses == 0
    assert second.token_ids == plain.token_ids == first.token_ids
    for got, want in zip(second.logits, plain.logits, strict=True):
        assert torch.equal(got, want)
    assert engine.encoder_cache_stats()["hits"] == n_chunks


def test_a_shared_start_is_reused_and_equals_the_uncached_run(tok):
    """A longer document that begins with the cached one: its first chunks are hits, read in a smaller
    vision-tower batch than without the cache, so equal within float32 rounding (CPU: <= 1e-5)."""
    short, long = _doc(tok, 256), _doc(tok, 420)
    plain = _run(_engine(tok), long)
    engine = _engine(tok, encoder_cache_bytes=1 << 22)
    _run(engine, short)
    res = _run(engine, long)
    assert res.stats.memory_hits >= 3 and res.stats.memory_misses >= 1
    assert res.token_ids == plain.token_ids
    got, want = torch.stack(res.logits), torch.stack(plain.logits)
    assert torch.equal(got.isinf(), want.isinf())  # the padded vocabulary rows, -inf in both
    diff = (got - want)[got.isfinite()].abs().max().item()
    assert diff <= 1e-5, diff


def test_a_repeated_document_is_not_read_again_and_new_weights_are_not_served_stale(tok):
    reads = []
    engine = _engine(tok, encoder_cache_bytes=1 << 22, observer=lambda r: reads.append(r.prefill_chunks))
    doc = _doc(tok, 400)
    first = _run(engine, doc)
    assert sum(reads) == first.stats.memory_misses > 0
    reads.clear()
    _run(engine, doc)
    assert sum(reads) == 0  # no chunk rendered or read by the vision tower
    with torch.no_grad():
        next(engine.model.model.aligner.parameters()).mul_(1.5)  # as a training step would, in place
    again = _run(engine, doc)
    assert again.stats.memory_hits == 0 and engine.encoder_cache_stats()["invalidations"] == 1
    assert not torch.equal(again.logits[0], first.logits[0])


def test_the_engine_cache_stays_within_its_bound(tok):
    probe = _engine(tok)
    tokens = probe.n_visual * probe.model.config.text_config.hidden_size * 4  # one chunk's float32 visual tokens
    engine = _engine(tok, encoder_cache_bytes=3 * tokens + 3 * 400)  # three chunks and their texts (< 400 bytes each)
    for n in (300, 330, 360):
        _run(engine, _doc(tok, n))
        s = engine.encoder_cache_stats()
        assert s["bytes"] <= s["max_bytes"] and s["entries"] <= 3
    assert s["evictions"] > 0 and s["misses"] > 3


def test_the_engines_old_names_still_work(tok):
    """``Engine(memory_cache_bytes=...)`` (it warns) and ``Engine.memory_cache_stats``: the encoder cache's old names."""
    with pytest.warns(DeprecationWarning, match="encoder_cache_bytes"):
        engine = _engine(tok, memory_cache_bytes=1 << 20)
    assert engine.encoder_cache_stats()["max_bytes"] == 1 << 20
    assert engine.memory_cache_stats() == engine.encoder_cache_stats()
    with pytest.raises(ValueError, match="encoder_cache_bytes only"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _engine(tok, encoder_cache_bytes=1 << 20, memory_cache_bytes=1 << 20)


# -- the server ---------------------------------------------------------------------------------


def _scrape(text: str) -> dict[str, float]:
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")}


def test_the_server_reports_the_encoder_cache_in_usage_and_metrics(tok):
    from fastapi.testclient import TestClient

    from vist2.serve.app import create_app

    doc = tok.decode(_doc(tok, 400))
    body = {"model": "tiny", "prompt": doc, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    with TestClient(create_app(_engine(tok, encoder_cache_bytes=1 << 22), "tiny")) as c:  # served as memory_cache
        first = c.post("/v1/completions", json=body).json()["usage"]["memory_cache"]
        second = c.post("/v1/completions", json=body).json()["usage"]["memory_cache"]
        m = _scrape(c.get("/metrics").text)
    assert first["hits"] == 0 and first["misses"] >= 5
    assert second == {"hits": first["misses"], "misses": 0, "prefix_hit_chunks": 0, "prefix_hit_tokens": 0}
    assert m["vist2_memory_cache_hits_total"] == first["misses"] == m["vist2_memory_cache_misses_total"]
    assert 0 < m["vist2_memory_cache_bytes"] <= m["vist2_memory_cache_max_bytes"] == 1 << 22
    with TestClient(create_app(_engine(tok), "tiny")) as c:  # off: no usage field, zero metrics
        assert c.post("/v1/completions", json=body).json()["usage"]["memory_cache"] is None
        assert _scrape(c.get("/metrics").text)["vist2_memory_cache_max_bytes"] == 0


def test_the_serve_flag(tmp_path, capsys):
    import argparse

    from vist2.serve import DEFAULT_ENCODER_CACHE_BYTES, add_parser, main

    p = add_parser(argparse.ArgumentParser(prog="vist2").add_subparsers(dest="command"))
    assert p.parse_args(["--model", "m"]).encoder_cache_bytes == DEFAULT_ENCODER_CACHE_BYTES == 256 << 20
    assert p.parse_args(["--model", "m", "--encoder-cache-bytes", "0"]).encoder_cache_bytes == 0
    for flag in ("--encoder-cache-bytes", "--memory-cache-bytes"):  # the old spelling still works
        assert p.parse_args(["--model", "m", flag, "1024"]).encoder_cache_bytes == 1024
        assert main(["--model", str(tmp_path), flag, "-1"]) == 2
        err = capsys.readouterr().err
        assert "--encoder-cache-bytes must be >= 0" in err and "Traceback" not in err


def test_salts_are_namespaces():
    """A chunk stored under one salt (a server's tenant) is never a hit under another, even within one call."""
    ec, read = EncoderCache(10_000), Reader()
    _, hits = ec.fetch(["secret", "secret"], ["user", "user"], read, scope=0, salts=["alice", "bob"])
    assert hits == [False, False] and read.calls == [["secret", "secret"]]  # read once per namespace
    _, hits = ec.fetch(["secret"] * 3, ["user"] * 3, read, scope=0, salts=["alice", None, "carol"])
    assert hits == [True, False, False]
    _, hits = ec.fetch(["secret"], ["user"], read, scope=0)  # no salts: the shared namespace (None)
    assert hits == [True]
    with pytest.raises(ValueError, match="salts"):
        ec.fetch(["a"], ["user"], read, scope=0, salts=["x", "y"])
