"""The engine equals the teacher-forced model on the same layout plan, token for token.

Every distribution the engine samples from (prefill, decode, right after a
compression) is compared with the logits of ``VIST2ForCausalLM`` run once over
the whole sequence laid out by ``vist2.layout`` — prompt compressed by the tail
rule, the response as OLM (gcc), raw (pcc), or everything raw (none).
"""

import pytest
import torch

from vist2.build import load_tokenizer
from vist2.samples import sample_text
from vist2.config import preset_config
from vist2.engine.cache import CompressedKVCache
from vist2.engine.engine import Engine, Request
from vist2.engine.sampling import SamplingParams
from vist2.text import token_bytes
from vist2.layout import IGNORE, Raw, build_sample, collate, prompt_segments, sft_segments
from vist2.modeling import VIST2ForCausalLM
from vist2.processing import VIST2Processor


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _model(prompt_encoding="visual"):
    torch.manual_seed(0)
    cfg = preset_config("tiny", prompt_encoding=prompt_encoding)
    cfg.text_config.initializer_range = 0.5  # large weights: a wrong mask or position shows as a large difference
    return VIST2ForCausalLM(cfg).eval()


def _engine(tok, prompt_encoding="visual", **kw):
    model = _model(prompt_encoding)
    return Engine(model, VIST2Processor(tok, model.config.render_config), record_logits=True, **kw)


def _ids(tok, n, lang="en", offset=0):
    ids = tok(sample_text(lang), add_special_tokens=False)["input_ids"][offset : offset + n]
    assert len(ids) == n
    return ids


def teacher(engine, req: Request, generated):
    """Logits of the plain forward over the full layout, at the positions that predict ``generated``."""
    m, K, beta = engine.model, engine.K, engine.n_visual
    fit = engine.processor.chunker(K)  # the fit rule, as training cuts
    if req.mode == "gcc":
        segs = sft_segments(req.prefix, req.query, req.suffix, generated, K, beta, engine.prompt_encoding, fit)
    elif req.mode == "pcc":
        segs = prompt_segments(req.prefix, req.query, req.suffix, K, beta, engine.prompt_encoding, fit)
        segs += [Raw(tuple(generated), loss=True)]
    else:
        segs = [Raw(tuple(req.prompt_ids)), Raw(tuple(generated), loss=True)]
    plan = collate([build_sample(segs)])
    pixels = engine.processor.pixels_for(plan.chunks) if plan.chunks else None
    with torch.no_grad():
        logits = m(plan=plan, pixel_values=pixels).logits[0]
    lab = plan.labels[0]
    assert lab[lab != IGNORE].tolist() == list(generated)
    return logits[lab != IGNORE]


def check(engine, req, res, atol=1e-4):
    n_tok = len(engine.processor.tokenizer)
    got = torch.stack(res.logits)[:, :n_tok]
    want = teacher(engine, req, res.token_ids)[:, :n_tok]
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff < atol, f"max |engine - teacher| = {diff}"
    return diff


GREEDY = SamplingParams(max_new_tokens=40, ignore_eos=True)


@pytest.mark.parametrize("encoding", ["visual", "interleaved"])
@pytest.mark.parametrize("mode", ["gcc", "pcc", "none"])
def test_multi_chunk_prompt_with_compressed_tail(tok, mode, encoding):
    eng = _engine(tok, encoding)
    K = eng.K
    # 2 full chunks + a tail of 20 > beta=16 (compressed too), raw prefix and suffix
    req = Request(query=_ids(tok, 2 * K + 20), prefix=_ids(tok, 3, offset=500), suffix=_ids(tok, 2, offset=600),
                  params=SamplingParams(max_new_tokens=K + 10, ignore_eos=True), mode=mode)
    res = eng.generate([req])[0]
    check(eng, req, res)
    expect = {"gcc": 3 + 1, "pcc": 3, "none": 0}[mode]  # + one generated chunk in gcc
    assert res.stats.chunks_compressed == expect


def test_prompt_shorter_than_beta_stays_raw(tok):
    eng = _engine(tok)
    req = Request(query=_ids(tok, 10), params=GREEDY, mode="gcc")
    res = eng.generate([req])[0]
    check(eng, req, res)
    assert res.stats.chunks_compressed == 0 and res.stats.kv_tokens == 10 + 40 - 1


def test_generation_crossing_three_chunk_boundaries(tok):
    eng = _engine(tok)
    K, beta = eng.K, eng.n_visual
    req = Request(query=_ids(tok, 30, "zh"), params=SamplingParams(max_new_tokens=3 * K + 5, ignore_eos=True))
    res = eng.generate([req])[0]
    check(eng, req, res)
    st = res.stats
    assert st.chunks_compressed == 4  # the 30-token query (> beta) and 3 generated chunks
    # cache: 4 images + the open window of 5 tokens, of which the last sampled one was never fed
    assert st.kv_tokens == 4 * beta + 5 - 1
    assert st.kv_tokens_uncompressed == 30 + 3 * K + 5 - 1  # the last sampled token is never fed
    assert st.kv_tokens_peak == 4 * beta - beta + K + beta  # a full window plus its visual tokens, briefly
    assert len(res.memory) == 4


def test_ragged_batch_of_three(tok):
    eng = _engine(tok, max_batch=3)
    K = eng.K
    reqs = [
        Request(query=_ids(tok, 5), params=SamplingParams(max_new_tokens=K + 3, ignore_eos=True)),
        Request(query=_ids(tok, K + 30, offset=100), params=SamplingParams(max_new_tokens=2 * K, ignore_eos=True)),
        Request(query=_ids(tok, 2 * K, "zh"), prefix=[151644], params=SamplingParams(max_new_tokens=20, ignore_eos=True)),
    ]
    results = eng.generate(reqs)
    for req, res in zip(reqs, results):
        check(eng, req, res)
    assert [r.stats.generated_tokens for r in results] == [K + 3, 2 * K, 20]


def test_more_requests_than_rows_are_queued(tok):
    eng = _engine(tok, max_batch=2)
    reqs = [Request(query=_ids(tok, 8, offset=10 * i), params=SamplingParams(max_new_tokens=5 + i, ignore_eos=True))
            for i in range(4)]
    results = eng.generate(reqs)
    for req, res in zip(reqs, results):
        check(eng, req, res)


def test_control_without_eviction_fails_the_comparison(tok, monkeypatch):
    eng = _engine(tok)

    def keep_text(cache, row, text_start, visual_start, n_visual):  # no eviction: text and visual tokens stay
        cache.set_length(row, visual_start + n_visual)

    monkeypatch.setattr(CompressedKVCache, "evict", keep_text)
    K = eng.K
    req = Request(query=_ids(tok, K + 20), params=SamplingParams(max_new_tokens=K + 10, ignore_eos=True))
    res = eng.generate([req])[0]
    with pytest.raises(AssertionError, match="engine - teacher"):
        check(eng, req, res)


def test_sampling_is_reproducible_and_stops(tok):
    eng = _engine(tok)
    p = SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    a = eng.generate([Request(query=_ids(tok, 20), params=p)])[0]
    b = eng.generate([Request(query=_ids(tok, 20), params=p)])[0]
    assert a.token_ids == b.token_ids
    # a stop string taken from the seeded run's own text: the same run stops just before its first occurrence
    stop_at = a.text[len(a.text) // 2 :][:4]
    assert len(stop_at.strip()) >= 2, repr(a.text)
    p2 = SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True, stop=(stop_at,))
    c = eng.generate([Request(query=_ids(tok, 20), params=p2)])[0]
    assert c.stats.finish_reason == "stop"
    assert c.text == a.text[: a.text.index(stop_at)]


def test_stream_yields_the_same_text(tok):
    eng = _engine(tok)
    req = Request(query=_ids(tok, 40, "zh"), params=SamplingParams(max_new_tokens=80, ignore_eos=True))
    events = list(eng.stream([req]))
    full = eng.generate([Request(query=req.query, params=req.params)])[0]
    assert "".join(e.delta for e in events) == full.text
    assert events[-1].done and events[-1].stats.generated_tokens == 80
    # streaming never splits a character: the deltas join to exactly what decoding all bytes at once
    # gives (a random model also emits invalid byte sequences, which both show as U+FFFD)
    whole = token_bytes(tok, full.token_ids).decode("utf-8", errors="replace")
    assert "".join(e.delta for e in events) == whole


def test_memory_limit(tok):
    eng = _engine(tok, max_cache_tokens=100)
    with pytest.raises(ValueError, match="max_cache_tokens=100"):
        eng.add(Request(query=_ids(tok, 200), mode="none"))
    # gcc compresses the same prompt into 3 images + a raw tail of 8: it fits
    res = eng.generate([Request(query=_ids(tok, 200), params=SamplingParams(max_new_tokens=500, ignore_eos=True))])[0]
    assert res.stats.finish_reason == "length" and res.stats.generated_tokens < 500


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p")],
)
def test_bad_sampling_params(tok, kwargs, field):
    eng = _engine(tok)
    with pytest.raises(ValueError, match=field):
        eng.request("hello", params=SamplingParams(**kwargs))


def test_bad_requests(tok):
    eng = _engine(tok)
    with pytest.raises(ValueError, match="empty"):
        eng.request("")
    with pytest.raises(ValueError, match="mode"):
        eng.request("hi", mode="zip")
    with pytest.raises(ValueError, match="user"):
        eng.request(messages=[{"role": "system", "content": "x"}])


def test_odd_text_generates_without_crash(tok):
    eng = _engine(tok)
    prompt = "ctrl\x00\x07\x1b[0m emoji 🧪👩‍🔬 中文测试 עברית العربية " * 6
    req = eng.request(prompt, params=SamplingParams(max_new_tokens=2 * eng.K, ignore_eos=True))
    res = eng.generate([req])[0]
    assert res.stats.generated_tokens == 2 * eng.K and res.stats.chunks_compressed >= 2
    check(eng, req, res)  # and what it generates is what the model computes on that layout


def test_chat_prompt_splits_around_the_user_message(tok):
    eng = _engine(tok)
    req = eng.request(messages=[{"role": "user", "content": "Tell me a story about the sea."}])
    assert eng.processor.decode(req.query) == "Tell me a story about the sea."
    assert eng.processor.decode(req.prefix) == "<|im_start|>user\n"
    assert eng.processor.decode(req.suffix) == "<|im_end|>\n<|im_start|>assistant\n"


def _fit_engine(tok, prompt_encoding="visual", **kw):
    """The tiny model read through a coarser font (8 px cells: 25 x 12 of them): the fit rule, not K,
    closes many of its chunks, in the prompt and in generated text."""
    model = _model(prompt_encoding)
    rc = model.config.render_config.replace(font_size=8, min_font_size=8)
    return Engine(model, VIST2Processor(tok, rc, model.config.chunk_tokens), record_logits=True, **kw)


@pytest.mark.parametrize("encoding", ["visual", "interleaved"])
@pytest.mark.parametrize("mode", ["gcc", "pcc"])
def test_chunks_cut_short_by_the_fit_rule(tok, mode, encoding):
    from vist2.layout import Chunk

    eng = _fit_engine(tok, encoding)
    K = eng.K
    req = Request(query=_ids(tok, 3 * K), prefix=_ids(tok, 3, offset=500),
                  params=SamplingParams(max_new_tokens=2 * K + 10, ignore_eos=True), mode=mode)
    res = eng.generate([req])[0]
    check(eng, req, res)
    fit = eng.processor.chunker(K)
    segs = sft_segments(req.prefix, req.query, req.suffix, res.token_ids, K, eng.n_visual, encoding, fit)
    query_chunks = [s for s in segs if isinstance(s, Chunk) and not s.loss]
    reply_chunks = [s for s in segs if isinstance(s, Chunk) and s.loss and s.kind != "open"]
    # 3K tokens: two chunks closed early by the fit rule, a raw tail of 2 (<= beta)
    assert [len(c.tokens) for c in query_chunks] == [64, 63, 63]
    assert [c.fit_cut for c in query_chunks] == [False, True, True]
    n_images = len(query_chunks)
    if mode == "gcc":
        assert any(c.fit_cut for c in reply_chunks)  # a generated window closed by the fit rule
        n_images += len(reply_chunks)
    assert res.stats.chunks_compressed == n_images
    # the engine's images show exactly the texts of the chunks the layout (the chunker) cuts
    plan = collate([build_sample(segs)])
    assert res.memory == eng.processor.chunk_texts(plan.chunks)[:n_images]


def test_request_marks_the_question(tok):
    """A question beside the document (chat field or plain-prompt argument): the query is
    document + newline + question, and Request.question spans exactly the question's tokens."""
    eng = _engine(tok)
    req = eng.request("Some document.", question="What is it?")
    assert eng.processor.decode(req.query) == "Some document.\nWhat is it?"
    assert eng.processor.decode(req.query[req.question[0]:req.question[1]]) == "What is it?"
    chat = eng.request(messages=[{"role": "user", "content": "Some document.", "question": "What is it?"}])
    assert chat.query == req.query and chat.question == req.question
    assert eng.request("Some document.").question is None
    with pytest.raises(ValueError, match="only the last user message"):
        eng.request(messages=[{"role": "user", "content": "a", "question": "q"}, {"role": "assistant", "content": "b"},
                              {"role": "user", "content": "c"}])
    with pytest.raises(ValueError, match="question must be a non-empty string"):
        eng.request("doc", question="")
    with pytest.raises(ValueError, match="question must be a .start, end. token span"):
        eng.add(Request(query=req.query, question=(0, len(req.query) + 1)))


def test_the_decode_step_never_reads_the_device(tok, monkeypatch):
    """No host sync per token: the decode step (the function captured as a CUDA graph) reads no
    tensor value back; lengths and write indices stay on the device."""
    eng = _engine(tok, max_batch=3)
    calls = {"steps": 0}
    step = eng.runner.step_fn

    def refuse(name):
        def read(*a, **k):
            raise AssertionError(f"the decode step read a tensor back ({name})")
        return read

    def guarded(*args):
        calls["steps"] += 1
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "cpu", "numpy", "__int__", "__bool__", "__index__", "__float__"):
                m.setattr(torch.Tensor, name, refuse(name))
            return step(*args)

    monkeypatch.setattr(eng.runner, "step_fn", guarded)
    reqs = [Request(query=_ids(tok, 30 + 40 * i), params=SamplingParams(max_new_tokens=eng.K + 5, ignore_eos=True))
            for i in range(3)]
    for req, res in zip(reqs, eng.generate(reqs)):
        check(eng, req, res)
    # every token but the last is fed by the guarded step; the rows enter one step apart
    assert calls["steps"] == eng.K + 4 + 2


@pytest.mark.parametrize("encoding", ["visual", "interleaved"])
def test_a_long_prompt_is_admitted_in_bounded_pieces(tok, encoding):
    """Chunked prefill: while a row decodes, a long prompt enters at most ``prefill_budget`` entries
    per step, and both rows still equal the teacher-forced model."""
    reports = []
    eng = _engine(tok, encoding, max_batch=2, prefill_budget=40, observer=reports.append)
    K = eng.K
    short = Request(query=_ids(tok, 10), params=SamplingParams(max_new_tokens=30, ignore_eos=True))
    long = Request(query=_ids(tok, 4 * K + 20, offset=50), prefix=_ids(tok, 3, offset=500),
                   params=SamplingParams(max_new_tokens=10, ignore_eos=True), mode="gcc")
    a = eng.add(short)
    eng.step()  # the short prompt is in and decoding
    b = eng.add(long)
    while eng.busy:
        eng.step()
    res = {a: eng.result(a), b: eng.result(b)}
    check(eng, short, res[a])
    check(eng, long, res[b])
    admitting = [r for r in reports[1:] if r.prefill_tokens]
    assert len(admitting) > 1 and all(r.prefill_tokens <= 40 for r in admitting)
    assert all(r.decode_rows >= 1 for r in admitting)  # the short row decoded in every one of those steps
    assert sum(r.prefill_chunks for r in reports) == 5  # 4 chunks + the 20-token tail, each read once
    assert res[b].stats.chunks_compressed == 5


def test_the_visual_prompt_is_one_forward(tok):
    """With the visual encoding, all prompt chunks are read by the vision tower in one batch and their
    visual tokens (with the raw prefix) run through the LLM in one forward."""
    reports = []
    eng = _engine(tok, "visual", observer=reports.append)
    forwards = []
    forward = eng.runner.forward
    eng.runner.forward = lambda rows, emb, *a: forwards.append(emb.shape[1]) or forward(rows, emb, *a)
    images = _spy_images(eng)
    req = Request(query=_ids(tok, 6 * eng.K + 20), prefix=_ids(tok, 3, offset=500),
                  params=SamplingParams(max_new_tokens=2, ignore_eos=True))
    res = eng.generate([req])[0]
    check(eng, req, res)
    assert images == [7] and forwards[0] == 3 + 7 * eng.n_visual
    assert reports[0].prefill_tokens == 3 + 7 * eng.n_visual and reports[0].seconds["vision"] > 0


def _spy_images(eng):
    """Record the images of every vision-tower batch."""
    images, read = [], eng.runner.read_chunks
    eng.runner.read_chunks = lambda texts, styles: images.append(len(texts)) or read(texts, styles)
    return images


def _uneven_requests(tok, mode, K):
    """Three prompts of different lengths: 4 chunks behind a raw prefix, 2 chunks, and one that stays raw."""
    p = SamplingParams(max_new_tokens=K + 5, ignore_eos=True)
    return [Request(query=_ids(tok, 3 * K + 20), prefix=_ids(tok, 3, offset=500), params=p, mode=mode),
            Request(query=_ids(tok, K + 30, offset=100), params=p, mode=mode),
            Request(query=_ids(tok, 12, "zh"), params=p, mode=mode)]


def _same_as_alone(tok, encoding, budget, reqs, together):
    alone = _engine(tok, encoding, max_batch=1, prefill_budget=budget)
    for req, res in zip(reqs, together):
        ref = alone.generate([req])[0]
        assert res.token_ids == ref.token_ids
        n = len(tok)  # past it the vocabulary is padding, -inf in both
        diff = (torch.stack(res.logits)[:, :n] - torch.stack(ref.logits)[:, :n]).abs().max().item()
        assert diff < 1e-4, f"max |together - alone| = {diff}"
        assert res.memory == ref.memory and res.stats.kv_tokens == ref.stats.kv_tokens


@pytest.mark.parametrize("budget", [2048, 40])
@pytest.mark.parametrize("encoding", ["visual", "interleaved"])
@pytest.mark.parametrize("mode", ["gcc", "pcc", "none"])
def test_rows_prefilled_together_equal_one_at_a_time(tok, mode, encoding, budget):
    """Requests admitted in one step share padded LLM forwards and vision-tower batches; every row
    equals the same request prefilled alone, and the teacher-forced model."""
    reports = []
    eng = _engine(tok, encoding, max_batch=3, max_prefills_per_step=3, prefill_budget=budget, observer=reports.append)
    images = _spy_images(eng)
    reqs = _uneven_requests(tok, mode, eng.K)
    together = eng.generate(reqs)
    for req, res in zip(reqs, together):
        check(eng, req, res)
        assert res.stats.generated_tokens == eng.K + 5
    _same_as_alone(tok, encoding, budget, reqs, together)
    assert all(r.prefill_rows == [] for r in reports[1:])  # every prompt was in after the first step
    if budget == 2048:  # the first forward holds all three prompts (interleaved: up to each one's first chunk)
        assert reports[0].prefill_rows == ([3] if encoding == "visual" or mode == "none" else [3, 2, 1, 1])
        assert images[:1] == ([] if mode == "none" else [4 + 2])  # every prompt chunk in one ViT batch
    else:  # pieces of <= 40 entries, shared by the rows in admission order
        assert max(reports[0].prefill_rows) >= 2


@pytest.mark.parametrize("encoding", ["visual", "interleaved"])
def test_rows_admitted_together_while_another_decodes(tok, encoding):
    """Two prompts enter together under a prefill budget while a third row decodes: each step feeds at
    most the budget of both prompts (in shared forwards), and every row still equals the model."""
    reports = []
    eng = _engine(tok, encoding, max_batch=3, max_prefills_per_step=2, prefill_budget=40, observer=reports.append)
    short = Request(query=_ids(tok, 10, offset=700), params=SamplingParams(max_new_tokens=40, ignore_eos=True))
    a = eng.add(short)
    eng.step()
    reqs = _uneven_requests(tok, "gcc", eng.K)[::2]  # 4 chunks behind a prefix, 12 raw tokens
    ids = [eng.add(r) for r in reqs]
    while eng.busy:
        eng.step()
    check(eng, short, eng.result(a))
    together = [eng.result(i) for i in ids]
    for req, res in zip(reqs, together):
        check(eng, req, res)
    _same_as_alone(tok, encoding, 40, reqs, together)
    admitting = [r for r in reports[1:] if r.prefill_tokens]
    assert len(admitting) > 1 and all(r.prefill_tokens <= 40 and r.decode_rows >= 1 for r in admitting)
    assert 2 in [n for r in admitting for n in r.prefill_rows]  # both prompts in one forward


@pytest.mark.gpu
def test_captured_decode_equals_eager_on_cuda(tok):
    """CUDA graphs replay the eager step: same greedy tokens, logits within bf16/TF32 noise."""
    torch.backends.cuda.matmul.allow_tf32 = False
    outs = []
    for graphs in (False, True):
        model = _model("visual").cuda()
        eng = Engine(model, VIST2Processor(tok, model.config.render_config), max_batch=4, record_logits=True,
                     cuda_graphs=graphs)
        reqs = [Request(query=_ids(tok, 20 + 30 * i), params=SamplingParams(max_new_tokens=2 * eng.K + 3,
                                                                              ignore_eos=True)) for i in range(3)]
        outs.append(eng.generate(reqs))
        for req, res in zip(reqs, outs[-1]):
            check(eng, req, res, atol=1e-3)
    for a, b in zip(*outs):
        assert a.token_ids == b.token_ids


def _split_char_query(eng):
    """Complete Chinese text whose last closed chunk ends inside a multi-byte character, and whose tail
    (the rest of that character onwards, <= beta tokens) stays raw: the bytes left after the closed
    chunks are not the response's to draw."""
    tok, K = eng.processor.tokenizer, eng.K
    # rare characters (CJK extension B, emoji) are several tokens each: chunk boundaries can split them
    text = "".join(ch + ("𠀀𪚥" if i % 5 == 0 else "") + ("🧪" if i % 7 == 3 else "")
                   for i, ch in enumerate(sample_text("zh")))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for n in range(2 * K, len(ids)):
        q = ids[:n]
        if "\ufffd" in tok.decode(q):
            continue  # not complete text
        cuts = eng.processor.chunker(K)(q)
        if cuts.carry and 0 < len(cuts.tail) <= eng.n_visual:
            return q
    raise AssertionError("no such query in the sample text")


@pytest.mark.parametrize("encoding", ["visual", "interleaved"])
def test_seam_between_query_tail_and_response_draws_every_character_whole(tok, encoding):
    """D3: a query whose last closed chunk splits a character, a raw tail, then a response cut by the fit
    rule: engine == teacher, the engine's images are the layout's, and the response's first image starts
    with the response's own text (no byte of the query's split character carried into it)."""
    from vist2.layout import Chunk

    eng = _fit_engine(tok, encoding)
    K = eng.K
    req = Request(query=_split_char_query(eng), params=SamplingParams(max_new_tokens=3 * K, ignore_eos=True))
    res = eng.generate([req])[0]
    check(eng, req, res)
    segs = sft_segments(req.prefix, req.query, req.suffix, res.token_ids, K, eng.n_visual, encoding,
                        eng.processor.chunker(K))
    plan = collate([build_sample(segs)])
    assert res.memory == eng.processor.chunk_texts(plan.chunks)[: len(res.memory)]
    n_query = sum(isinstance(s, Chunk) and not s.loss for s in segs)
    assert n_query >= 2 and all("\ufffd" not in t for t in res.memory[:n_query])
    first = next(s for s in segs if isinstance(s, Chunk) and s.loss and s.kind != "open")
    assert res.memory[n_query] == eng.processor.chunk_text(b"", first.tokens)[0]  # checked without the layout


def test_two_consecutive_fit_cut_windows_follow_the_paper_rule(tok):
    """Generated windows closed by the fit rule, one after another: every boundary token is drawn after the
    compression (recorded logits == teacher's at the last visual slot), and the cuts the engine made are
    the ones the fit rule makes on the generated text."""
    eng = _fit_engine(tok)
    K = eng.K
    req = Request(query=_ids(tok, 20), params=SamplingParams(max_new_tokens=4 * K, ignore_eos=True))
    res = eng.generate([req])[0]
    check(eng, req, res)
    cuts = eng.processor.chunker(K)(res.token_ids)
    assert sum(cuts.fit_cut) >= 2, cuts.fit_cut
    compressed = [c for c in cuts.closed if len(c) > eng.n_visual]
    assert res.stats.chunks_compressed == 1 + len(compressed)  # the query (20 > beta) and the generated ones


def test_padded_vocabulary_rows_are_never_sampled(tok):
    """A model whose vocabulary is padded past the tokenizer's length: those rows get -inf, even when
    their weights would win."""
    torch.manual_seed(0)
    cfg = preset_config("tiny")
    n = len(tok)
    cfg.text_config.vocab_size = n + 64
    model = VIST2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[n:] = 10 * model.lm_head.weight[:64].abs().max()  # would win every argmax
        model.lm_head.weight[n:] *= torch.sign(torch.randn(64, 1))
    eng = Engine(model, VIST2Processor(tok, cfg.render_config), record_logits=True)
    res = eng.generate([Request(query=_ids(tok, 30), params=SamplingParams(max_new_tokens=8, ignore_eos=True))])[0]
    assert all(t < n for t in res.token_ids)
    assert all(torch.isinf(lg[n:]).all() and (lg[n:] < 0).all() for lg in res.logits)


def test_the_vision_tower_reads_in_micro_batches(tok):
    """Prefill reads a long prompt's chunks a few images at a time (bounded activations), without autograd,
    and the result is the same as reading them all at once."""
    eng = _engine(tok, "visual", vision_batch=2)
    batches = []
    encode_images = eng.model.model.encode_images

    def spy(px):
        batches.append(px.shape[0])
        out = encode_images(px)
        assert not out.requires_grad  # no activations kept for a backward pass
        return out

    eng.model.model.encode_images = spy
    req = Request(query=_ids(tok, 6 * eng.K + 20), params=SamplingParams(max_new_tokens=2, ignore_eos=True))
    res = eng.generate([req])[0]
    assert batches == [2, 2, 2, 1]  # 7 chunks (the tail of 20 > beta is one)
    check(eng, req, res)
    with pytest.raises(ValueError, match="vision_batch"):
        _engine(tok, vision_batch=0)


@pytest.mark.parametrize("encoding", ["visual", "interleaved"])
def test_fit_cut_boundaries_in_a_batch(tok, encoding):
    """Three rows whose windows the fit rule closes at different steps: each row equals the teacher."""
    eng = _fit_engine(tok, encoding, max_batch=3)
    K = eng.K
    p = SamplingParams(max_new_tokens=2 * K, ignore_eos=True)
    reqs = [Request(query=_ids(tok, 2 * K + 7), params=p), Request(query=_ids(tok, 40, "zh"), params=p),
            Request(query=_ids(tok, 5, offset=300), params=p)]
    for req, res in zip(reqs, eng.generate(reqs)):
        check(eng, req, res)
        assert any(eng.processor.chunker(K)(res.token_ids).fit_cut)
