"""The prefix cache: the LLM's K/V of a shared prompt start reused across requests, exactly, within a byte bound."""

import pytest
import torch

from vist2.build import load_tokenizer
from vist2.config import preset_config
from vist2.engine.cache import CompressedKVCache
from vist2.engine.engine import Engine, Request
from vist2.engine import prefix_cache
from vist2.engine.prefix_cache import Piece, PrefixCache, prompt_pieces
from vist2.engine.sampling import SamplingParams
from vist2.modeling import VIST2ForCausalLM
from vist2.processing import VIST2Processor
from vist2.samples import sample_text

# -- the trie on its own ------------------------------------------------------------------------


def _cache(rows=2, capacity=32):
    return CompressedKVCache(n_layers=2, batch=rows, n_kv_heads=1, head_dim=2, capacity=capacity, dtype=torch.float32)


def _fill(cache, row, n, base):
    """Write recognisable K/V into a row's first ``n`` entries, as a prefill would."""
    for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
        k[row, :, :n] = base + 10 * i + torch.arange(n, dtype=torch.float32)[None, :, None]
        v[row, :, :n] = -k[row, :, :n]
    cache.set_length(row, n)


def _raw(*blocks):
    return [Piece(("r", tuple(b)), len(b), None) for b in blocks]


ENTRY = 2 * 2 * 2 * 4  # K and V, 2 layers, one head of 2 floats: bytes per cache entry
NODE = 2 * ENTRY + 2 * 8  # a two-token raw block with its key


@pytest.mark.parametrize("copy_bytes", [64 << 20, 1])  # the nodes copied in one piece, or one copy each
def test_a_shared_start_is_copied_at_the_same_indices_and_never_the_last_piece(monkeypatch, copy_bytes):
    monkeypatch.setattr(prefix_cache, "_COPY_BYTES", copy_bytes)
    cache, pc = _cache(), PrefixCache(1 << 20)
    first = _raw((1, 2), (3, 4), (5,))
    assert pc.begin(0, first, cache, scope=0) == 0
    _fill(cache, 0, 5, base=100.0)
    pc.settle(0, 5, cache, scope=0)
    assert len(pc) == 2  # the last piece is not kept
    second = _raw((1, 2), (3, 4), (9, 9))
    assert pc.begin(1, second, cache, scope=0) == 4 and cache.host_length[1] == 4
    for k, v in zip(cache.keys, cache.values):
        assert torch.equal(k[1, :, :4], k[0, :, :4]) and torch.equal(v[1, :, :4], v[0, :, :4])
    assert pc.begin(1, first, cache, scope=0) == 4  # the same prompt again: its last piece is fed
    assert pc.begin(1, _raw((1, 2), (7, 7), (3, 4)), cache, scope=0) == 2  # a difference ends the match
    assert pc.begin(1, _raw((1, 2)), cache, scope=0) == 0  # a one-piece prompt has nothing to reuse
    s = pc.stats()
    assert (s["hit_tokens"], s["miss_tokens"], s["nodes"], s["bytes"]) == (4 + 4 + 2, 4 + 2, 2, 2 * NODE)


def test_only_settled_pieces_are_kept_and_an_evicted_way_is_found_again():
    cache, pc = _cache(), PrefixCache(1 << 20)
    pieces = _raw((1, 2), (3, 4), (5, 6), (7,))
    pc.begin(0, pieces, cache, scope=0)
    _fill(cache, 0, 3, base=0.0)
    pc.settle(0, 3, cache, scope=0)  # the second block is half fed
    assert len(pc) == 1
    _fill(cache, 0, 7, base=0.0)
    pc.clear()  # as if evicted meanwhile
    pc.settle(0, 7, cache, scope=0)
    assert len(pc) == 3 and pc.begin(1, pieces, cache, scope=0) == 6


def test_least_recently_used_leaves_go_first_and_the_bound_holds():
    cache, pc = _cache(rows=1), PrefixCache(3 * NODE)  # room for three blocks
    for prompt in ([(1, 1), (2, 2), (0,)], [(1, 1), (3, 3), (0,)]):
        pieces = _raw(*prompt)
        pc.begin(0, pieces, cache, scope=0)
        _fill(cache, 0, 5, base=0.0)
        pc.settle(0, 5, cache, scope=0)
    assert len(pc) == 3 and pc.evictions == 0
    pc.begin(0, _raw((1, 1), (2, 2), (0,)), cache, scope=0)  # (1 1)(2 2) is now the newest way
    pieces = _raw((4, 4), (5, 5), (0,))
    pc.begin(0, pieces, cache, scope=0)
    _fill(cache, 0, 5, base=0.0)
    pc.settle(0, 5, cache, scope=0)  # two new nodes: (3 3) goes first, then (2 2); (1 1) only had children
    assert pc.evictions == 2 and pc.bytes <= pc.max_bytes
    assert pc.begin(0, _raw((1, 1), (3, 3), (0,)), cache, scope=0) == 2
    assert pc.begin(0, _raw((1, 1), (2, 2), (0,)), cache, scope=0) == 2
    assert pc.begin(0, pieces, cache, scope=0) == 4
    for n in range(1, 30):  # whatever comes, the bound holds and the bytes add up
        pieces = _raw(*[(n, i) for i in range(n % 5 + 1)], (0,))
        pc.begin(0, pieces, cache, scope=0)
        _fill(cache, 0, 2 * (n % 5 + 1) + 1, base=float(n))
        pc.settle(0, 2 * (n % 5 + 1) + 1, cache, scope=0)
        assert pc.bytes <= pc.max_bytes
        assert pc.bytes == sum(node.bytes for node in pc._lru)


def test_a_piece_over_the_bound_is_not_kept_and_new_weights_drop_all():
    cache, pc = _cache(), PrefixCache(NODE - 1)
    pieces = _raw((1, 2), (3,))
    pc.begin(0, pieces, cache, scope=0)
    _fill(cache, 0, 3, base=0.0)
    pc.settle(0, 3, cache, scope=0)
    assert len(pc) == 0 and pc.begin(0, pieces, cache, scope=0) == 0
    pc = PrefixCache(1 << 20)
    pc.begin(0, pieces, cache, scope="w1")
    pc.settle(0, 3, cache, scope="w1")
    assert pc.begin(1, pieces, cache, scope="w1") == 2
    assert pc.begin(1, pieces, cache, scope="w2") == 0 and pc.invalidations == 1 and len(pc) == 0
    pc.begin(0, pieces, cache, scope="w2")
    pc.settle(0, 3, cache, scope="w3")  # the weights changed while the prompt was fed: nothing kept
    assert len(pc) == 0


@pytest.mark.parametrize("bad", [-1, 0, 1.5, True])
def test_bad_bounds_are_refused(bad):
    with pytest.raises(ValueError, match="prefix_cache_bytes"):
        PrefixCache(bad)


# -- the engine ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _engine(tok, cached=True, encoding="visual", **kw):
    torch.manual_seed(0)
    cfg = preset_config("tiny", prompt_encoding=encoding)
    cfg.text_config.initializer_range = 0.5  # large weights: any difference in the K/V shows
    model = VIST2ForCausalLM(cfg).eval()
    return Engine(model, VIST2Processor(tok, model.config.render_config), record_logits=True,
                  encoder_cache_bytes=(1 << 24) if cached else 0, **kw)


def _doc(tok, n, offset=0):
    ids = tok(sample_text("en"), add_special_tokens=False)["input_ids"][offset : offset + n]
    assert len(ids) == n
    return ids


GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)


def _same(res, plain, atol=1e-4):
    """Same tokens, memory and cache occupancy; logits equal within float32 rounding of other forward shapes."""
    assert res.token_ids == plain.token_ids and res.memory == plain.memory
    assert res.stats.kv_tokens == plain.stats.kv_tokens and res.stats.visual_tokens == plain.stats.visual_tokens
    got, want = torch.stack(res.logits), torch.stack(plain.logits)
    assert torch.equal(got.isinf(), want.isinf())
    diff = (got - want)[got.isfinite()].abs().max().item()
    assert diff <= atol, diff


def _shared_chunks(engine, cached: Request, new: Request) -> int:
    """The chunks the new prompt starts with that the cached one fed before its last segment."""
    a, b = engine.plan(cached), engine.plan(new)
    n = 0
    for i, (x, y) in enumerate(zip(a.segments[:-1], b.segments)):
        if x != y:
            break
        if hasattr(x, "n_visual"):
            assert a.chunks[n] == b.chunks[n]
            n += 1
    return n


def _req(query, mode="gcc", prefix=()):
    return Request(query=list(query), prefix=list(prefix), params=GREEDY, mode=mode)


@pytest.mark.parametrize("encoding", ["visual", "interleaved"])
@pytest.mark.parametrize("mode", ["gcc", "pcc"])
def test_a_longer_prompt_reuses_the_cached_chunks_and_equals_the_uncached_run(tok, mode, encoding):
    prefix, short, long = _doc(tok, 20, offset=900), _doc(tok, 300), _doc(tok, 420)
    engine = _engine(tok, encoding=encoding)
    [first] = engine.generate([_req(short, mode, prefix)])
    [res] = engine.generate([_req(long, mode, prefix)])
    [plain] = _engine(tok, cached=False, encoding=encoding).generate([_req(long, mode, prefix)])
    closed = _shared_chunks(engine, _req(short, mode, prefix), _req(long, mode, prefix))
    assert first.stats.prefix_hit_chunks == 0 and res.stats.prefix_hit_chunks == closed >= 3
    assert res.stats.prefix_hit_tokens == 20 + closed * engine.n_visual  # the raw prefix and those chunks
    n_chunks = len(engine.plan(_req(long, mode, prefix)).chunks)
    assert res.stats.memory_hits + res.stats.memory_misses == n_chunks - closed  # the reused ones are not read
    _same(res, plain)
    s = engine.encoder_cache_stats()["prefix"]
    assert s["hit_chunks"] == closed and s["hit_tokens"] == res.stats.prefix_hit_tokens and 0 < s["bytes"]


@pytest.mark.parametrize("encoding", ["visual", "interleaved"])
def test_turn_two_of_a_compressed_chat_reuses_turn_one(tok, encoding):
    text = tok.decode(_doc(tok, 600))
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    engine, fresh = _engine(tok, encoding=encoding), _engine(tok, cached=False, encoding=encoding)
    msgs = [{"role": "system", "content": "Read."}, {"role": "user", "content": text[:1200]}]
    [one] = engine.generate([engine.request(messages=msgs, params=params, history="compressed")])
    msgs += [{"role": "assistant", "content": one.text}, {"role": "user", "content": text[1200:]}]
    req = engine.request(messages=msgs, params=params, history="compressed")
    [two] = engine.generate([req])
    [plain] = fresh.generate([fresh.request(messages=msgs, params=params, history="compressed")])
    n_one = len(engine.plan(engine.request(messages=msgs[:2], params=params, history="compressed")).chunks)
    assert n_one >= 4 and n_one - 1 <= two.stats.prefix_hit_chunks <= n_one  # all but turn one's open tail
    _same(two, plain)


@pytest.mark.parametrize("encoding", ["visual", "interleaved"])
def test_two_rows_reuse_together_under_a_small_prefill_budget(tok, encoding):
    """Two requests admitted in one step, both starting with cached chunks, fed in pieces of 40 entries
    (shared, left-padded forwards): each equals its own uncached run."""
    engine = _engine(tok, encoding=encoding, max_batch=2, max_prefills_per_step=2, prefill_budget=40)
    engine.generate([_req(_doc(tok, 260))])
    reqs = [_req(_doc(tok, 400)), _req(_doc(tok, 330))]
    got = engine.generate(reqs)
    for req, res in zip(reqs, got):
        [plain] = _engine(tok, cached=False, encoding=encoding, prefill_budget=40).generate([req])
        assert res.stats.prefix_hit_chunks >= 3
        _same(res, plain)


def test_one_changed_token_ends_the_reuse_at_its_chunk(tok):
    engine = _engine(tok)
    doc = _doc(tok, 400)
    engine.generate([_req(doc)])
    plan = engine.plan(_req(doc))
    first = len(plan.segments[0].tokens)
    changed = list(doc)
    changed[first + 5] = doc[first + 6]  # a token of the second chunk
    assert changed != doc
    [res] = engine.generate([_req(changed)])
    [plain] = _engine(tok, cached=False).generate([_req(changed)])
    assert res.stats.prefix_hit_chunks == 1 and res.stats.prefix_hit_tokens == engine.n_visual
    _same(res, plain)
    before = engine.generate([_req(doc)])[0].logits[0]
    assert (res.logits[0] - before)[before.isfinite()].abs().max() > 1e-3  # the change shows


def test_a_plain_llm_reuses_raw_text_in_blocks(tok):
    engine = _engine(tok)
    doc = _doc(tok, 200)
    engine.generate([_req(doc[:150], "none")])
    [res] = engine.generate([_req(doc, "none")])
    [plain] = _engine(tok, cached=False).generate([_req(doc, "none")])
    assert res.stats.prefix_hit_tokens == 128 and res.stats.prefix_hit_chunks == 0  # four whole 32-token blocks
    _same(res, plain)


def test_the_engine_cache_stays_within_its_bound(tok):
    probe = _engine(tok)
    per_chunk = probe.n_visual * probe.runner.cache.bytes_per_token
    engine = _engine(tok, prefix_cache_bytes=4 * per_chunk + 4 * 1000)  # four chunks' K/V and their keys
    for offset in (0, 400, 800, 0):
        engine.generate([_req(_doc(tok, 330, offset=offset))])
        s = engine.encoder_cache_stats()["prefix"]
        assert s["bytes"] <= s["max_bytes"] and s["nodes"] <= 4
    assert s["evictions"] > 0 and s["miss_chunks"] > 4


@pytest.mark.parametrize("change", ["step", "load_state_dict"])
def test_new_weights_are_not_served_stale(tok, change):
    engine = _engine(tok)
    doc = _doc(tok, 400)
    first = engine.generate([_req(doc)])[0]
    assert engine.generate([_req(doc)])[0].stats.prefix_hit_chunks > 0
    lm = engine.model.model.language_model
    if change == "step":
        with torch.no_grad():
            next(lm.parameters()).mul_(1.5)  # as an optimizer step would, in place
    else:
        state = {k: v * 1.5 if v.is_floating_point() else v for k, v in lm.state_dict().items()}
        lm.load_state_dict(state)
    again = engine.generate([_req(doc)])[0]
    assert again.stats.prefix_hit_chunks == 0 and engine.encoder_cache_stats()["prefix"]["invalidations"] == 1
    assert not torch.equal(again.logits[0], first.logits[0])


def test_the_prefix_cache_needs_the_encoder_cache(tok):
    with pytest.raises(ValueError, match="prefix_cache_bytes"):
        _engine(tok, cached=False, prefix_cache_bytes=1 << 20)
    engine = _engine(tok, prefix_cache_bytes=0)  # the encoder cache alone
    assert engine.encoder_cache_stats()["prefix"] is None


def test_prompt_pieces_key_chunks_by_what_they_show(tok):
    engine = _engine(tok)
    doc = _doc(tok, 300)
    plain, styled = (engine.plan(Request(query=doc, styles=s)) for s in (None, ("plain",) * len(doc)))
    a, b = prompt_pieces(plain), prompt_pieces(styled)
    assert [p.entries for p in a] == [p.entries for p in b] and a[0].chunk == 0
    assert all(x.key != y.key for x, y in zip(a, b))  # same ids, other style: other images


# -- the server ---------------------------------------------------------------------------------


def _scrape(text: str) -> dict[str, float]:
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")}


def test_the_server_reports_the_prefix_cache_in_usage_and_metrics(tok):
    from fastapi.testclient import TestClient

    from vist2.serve.app import create_app

    doc = tok.decode(_doc(tok, 400))
    body = {"model": "tiny", "prompt": doc, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    with TestClient(create_app(_engine(tok), "tiny")) as c:
        first = c.post("/v1/completions", json=body).json()["usage"]["memory_cache"]
        second = c.post("/v1/completions", json=body).json()["usage"]["memory_cache"]
        m = _scrape(c.get("/metrics").text)
    assert first["prefix_hit_chunks"] == 0 and first["misses"] >= 5
    assert second["prefix_hit_chunks"] >= 4 and second["prefix_hit_tokens"] >= 4 * 16
    assert m["vist2_prefix_cache_hit_chunks_total"] == second["prefix_hit_chunks"]
    assert m["vist2_prefix_cache_hit_tokens_total"] == second["prefix_hit_tokens"]
    assert 0 < m["vist2_prefix_cache_bytes"] <= m["vist2_prefix_cache_max_bytes"] == 1 << 24


def test_a_salt_puts_a_prompt_in_a_subtree_of_its_own(tok):
    """Salted pieces (a server's tenant) never reach another salt's, or the unsalted, cached K/V."""
    cache, pc = _cache(), PrefixCache(1 << 20)
    salted = lambda pieces, salt: [pieces[0]._replace(key=("s", salt, pieces[0].key)), *pieces[1:]]  # noqa: E731
    prompt = _raw((1, 2), (3, 4), (5,))
    assert pc.begin(0, salted(prompt, "alice"), cache, scope=0) == 0
    _fill(cache, 0, 5, base=1.0)
    pc.settle(0, 5, cache, scope=0)
    assert pc.begin(1, salted(prompt, "bob"), cache, scope=0) == 0
    assert pc.begin(1, prompt, cache, scope=0) == 0
    assert pc.begin(1, salted(prompt, "alice"), cache, scope=0) == 4  # its own tenant still hits
    # prompt_pieces salts the first piece the same way
    plan = _engine(tok).plan(Request(query=_doc(tok, 300)))
    plain, mine = prompt_pieces(plan), prompt_pieces(plan, salt="alice")
    assert mine[0].key == ("s", "alice", plain[0].key) and mine[1:] == plain[1:]
    assert prefix_cache._key_bytes(mine[0].key) == 5 + prefix_cache._key_bytes(plain[0].key)


def test_the_engine_shares_cache_entries_only_within_a_salt(tok):
    """The same document under another ``cache_salt``: no prefix or encoder cache hit (all read anew); under its
    own salt again: the prefix cache serves its start, and the logits match the uncached run."""
    engine, doc = _engine(tok), _doc(tok, 300)
    run = lambda salt: engine.generate([Request(query=doc, params=SamplingParams(max_new_tokens=2, temperature=0),
                                                cache_salt=salt)])[0]  # noqa: E731
    first = run("alice")
    other, again = run("bob"), run("alice")
    assert first.stats.memory_misses > 0 and first.stats.prefix_hit_chunks == 0
    assert (other.stats.memory_hits, other.stats.prefix_hit_chunks) == (0, 0)
    assert other.stats.memory_misses == first.stats.memory_misses
    assert again.stats.prefix_hit_chunks > 0 and again.token_ids == first.token_ids == other.token_ids
    assert torch.allclose(torch.stack(again.logits), torch.stack(first.logits), atol=1e-5)
