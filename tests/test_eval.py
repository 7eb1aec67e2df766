"""vist2 eval ocr / olm: metrics, greedy MT-OCR transcription, perplexity against the backbone, bad input."""

import argparse
import json
import math

import pytest
import torch

pytest.importorskip("rouge_score")

from vist2.errors import CLIError  # noqa: E402
from vist2.eval import add_parser  # noqa: E402
from vist2.eval.common import CJKTokenizer, read_documents  # noqa: E402
from vist2.eval.ocr import ocr_scores, parse_ratios, transcribe  # noqa: E402
from vist2.eval.olm import evaluate_generation, evaluate_olm, judge_nll, load_judge  # noqa: E402
from vist2.layout import build_sample, collate, ocr_segments  # noqa: E402
from vist2.runtime import load_checkpoint  # noqa: E402
from vist2.samples import sample_text  # noqa: E402


def run_eval(argv):
    """``vist2 eval ...`` as cli.main runs a sub-command: exit code, CLIError -> 2 with the message."""
    p = argparse.ArgumentParser(prog="vist2")
    add_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(argv)
    try:
        return args.func(args), ""
    except CLIError as e:
        return 2, str(e)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_checkpoint(tiny_dir, "cpu")


@pytest.fixture(scope="module")
def en_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "en.txt"
    path.write_text(sample_text("en"), encoding="utf-8")
    return path


# -- metrics ---------------------------------------------------------------------------------


def rouge_by_hand(reference: str, hypothesis: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures from their definitions (clipped n-gram overlap; longest common
    subsequence), on the CJK-aware tokens; what the library's scores are checked against."""
    from collections import Counter

    ref, hyp = CJKTokenizer().tokenize(reference), CJKTokenizer().tokenize(hypothesis)

    def f(overlap, n_hyp, n_ref):
        p, r = overlap / max(n_hyp, 1), overlap / max(n_ref, 1)
        return 2 * p * r / (p + r) if p + r else 0.0

    def ngrams(tokens, n):
        return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))

    out = {}
    for n in (1, 2):
        a, b = ngrams(ref, n), ngrams(hyp, n)
        out[f"rouge{n}"] = f(sum((a & b).values()), sum(b.values()), sum(a.values()))
    lcs = [[0] * (len(hyp) + 1) for _ in range(len(ref) + 1)]
    for i, x in enumerate(ref):
        for j, y in enumerate(hyp):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if x == y else max(lcs[i][j + 1], lcs[i + 1][j])
    out["rougeL"] = f(lcs[-1][-1], len(hyp), len(ref))
    return out


def test_ocr_metric_is_one_for_the_source_and_falls_when_corrupted():
    ref = sample_text("en")[:600]
    exact = ocr_scores(ref, ref)
    assert exact["rouge1"] == exact["rouge2"] == exact["rougeL"] == 1.0 and exact["cer"] == 0.0
    words = ref.split()
    some = " ".join(w if i % 7 else "xyzzy" for i, w in enumerate(words))  # every seventh word wrong
    many = " ".join(w if i % 3 else "xyzzy" for i, w in enumerate(words))  # every third
    s1, s2 = ocr_scores(ref, some), ocr_scores(ref, many)
    for k in ("rouge1", "rouge2", "rougeL"):
        assert 0.0 < s2[k] < s1[k] < 1.0, k
        assert s1[k] == pytest.approx(rouge_by_hand(ref, some)[k], abs=1e-12), k
        assert s2[k] == pytest.approx(rouge_by_hand(ref, many)[k], abs=1e-12), k
    # 17 of the 118 words (one token each) replaced: 101 unigrams shared, precision = recall = 101 / 118
    assert s1["rouge1"] == pytest.approx(101 / 118)
    assert 0 < s1["cer"] < s2["cer"]
    assert ocr_scores(ref, "")["rougeL"] == 0.0


def test_rouge_reads_chinese():
    from rouge_score import rouge_scorer

    ref = sample_text("zh")[:300]
    # rouge-score's own tokenizer keeps only [a-z0-9]: Chinese would score nothing, even against itself
    assert rouge_scorer.RougeScorer(["rouge1"]).score(ref, ref)["rouge1"].fmeasure == 0.0
    assert CJKTokenizer().tokenize("红楼梦abc 12,x") == ["红", "楼", "梦", "abc", "12", "x"]
    assert ocr_scores(ref, ref)["rougeL"] == 1.0
    corrupted = "".join("口" if i % 4 == 0 else ch for i, ch in enumerate(ref))
    s = ocr_scores(ref, corrupted)
    assert 0.5 < s["rouge1"] < 1.0 and s["rouge2"] < s["rouge1"]


def test_parse_ratios():
    assert parse_ratios("1, 2,4.5") == [1.0, 2.0, 4.5]
    for bad in ("a", "0", "-1", "1,,2"):
        with pytest.raises(ValueError, match="--ratios"):
            parse_ratios(bad)


# -- OCR -------------------------------------------------------------------------------------


def test_greedy_transcription_matches_teacher_forcing(tiny):
    """The KV-cached loop picks, at every step, the argmax of the full MT-OCR plan's forward."""
    model, proc = tiny
    beta, n_tok = model.config.n_visual, len(proc.tokenizer)
    texts = ["In the beginning God created", "红楼梦 第一回"]
    pixels = proc.pixels_from_texts(texts)
    with torch.no_grad():
        visual = model.model.encode_images(pixels)
    gens = transcribe(model, visual, max_new_tokens=10, n_tokens=n_tok)
    assert [len(g) for g in gens] == [10, 10]
    for i, g in enumerate(gens):
        plan = collate([build_sample(ocr_segments([g], beta))])
        with torch.no_grad():
            logits = model(plan=plan, pixel_values=pixels[i : i + 1]).logits[0]
        # slot beta-1 (the last visual token) predicts g[0]; text slot j predicts g[j+1]
        assert logits[beta - 1 : beta - 1 + len(g), :n_tok].argmax(-1).tolist() == g
    # a stop id ends a row and is not part of its text
    first = gens[0][0]
    assert transcribe(model, visual[:1], 10, stop_ids=[first], n_tokens=n_tok) == [[]]


def test_transcription_with_the_models_ocr_prompt_matches_teacher_forcing(tiny):
    """A model trained with an ocr_prompt is asked to read with it: [v, p, g...]; the cached loop picks the
    argmax of the full plan's forward at every step, and the prompt changes what is read (it is in the layout)."""
    from vist2.eval.ocr import ocr_prompt_ids

    model, proc = tiny
    beta, n_tok = model.config.n_visual, len(proc.tokenizer)
    assert ocr_prompt_ids(model, proc) == []  # the tiny model has none
    prompt = proc.encode("OCR:")
    pixels = proc.pixels_from_texts(["In the beginning God created"])
    with torch.no_grad():
        visual = model.model.encode_images(pixels)
    g = transcribe(model, visual, max_new_tokens=10, n_tokens=n_tok, prompt_ids=prompt)[0]
    plan = collate([build_sample(ocr_segments([g], beta, prompt))])
    with torch.no_grad():
        logits = model(plan=plan, pixel_values=pixels).logits[0]
    first = beta + len(prompt) - 1  # the prompt's last slot predicts g[0]
    assert logits[first : first + len(g), :n_tok].argmax(-1).tolist() == g
    with torch.no_grad():
        plain = model(plan=collate([build_sample(ocr_segments([g], beta))]), pixel_values=pixels).logits[0]
    assert not torch.allclose(plain[beta - 1], logits[first])
    model.config.ocr_prompt = "OCR:"
    try:
        assert ocr_prompt_ids(model, proc) == prompt
    finally:
        model.config.ocr_prompt = None


def test_eval_ocr_command(tiny, tiny_dir, en_file, tmp_path, capsys, monkeypatch):
    import vist2.eval.ocr

    # a random model transcribes noise (every score 0); a fixed transcription that shares words with
    # the first chunk but not the second makes the scores, and their mean over chunks, tell apart
    said = tiny[1].encode(" In the beginning God created the earth")
    monkeypatch.setattr(vist2.eval.ocr, "transcribe", lambda model, visual, *rest: [said] * len(visual))
    out = tmp_path / "ocr.json"
    rc, err = run_eval(["eval", "ocr", "--model", str(tiny_dir), "--data", str(en_file), "--ratios", "1,64",
                        "--limit", "2", "--no-progress", "--out", str(out)])
    assert rc == 0, err
    res = json.loads(out.read_text())
    prov = res["provenance"]
    assert prov["model"] == str(tiny_dir) and len(prov["config_hash"]) == 16
    assert len(prov["data_sha256"]) == 64 and prov["command"].startswith("vist2 eval ocr ")
    ok, dense = res["points"]
    assert ok["ratio"] == 1 and ok["tokens_per_image"] == 16 and ok["n"] == 2
    assert len(ok["examples"]) == 2  # both chunks: the mean below covers every scored chunk
    assert [e["transcription"] for e in ok["examples"]] == [" In the beginning God created the earth"] * 2
    by_hand = [rouge_by_hand(e["reference"], e["transcription"]) for e in ok["examples"]]
    assert by_hand[0]["rouge1"] > 0.4 and by_hand[1]["rouge1"] < by_hand[0]["rouge1"]
    for k in ("rouge1", "rouge2", "rougeL"):
        assert ok[k] == pytest.approx((by_hand[0][k] + by_hand[1][k]) / 2, abs=1e-12), k
    assert ok["mean_tokens_per_image"] == 16
    # 64 x beta = 1024 tokens cannot be drawn into a 128x128 image: the fit rule closes each chunk early
    assert dense["tokens_per_image"] == 1024 and dense["n"] == 2 and "skipped" not in dense
    assert 64 < dense["mean_tokens_per_image"] < 1024
    table = capsys.readouterr().out
    assert "ROUGE-L" in table


def test_eval_ocr_bad_input(tiny_dir, tmp_path):
    out = str(tmp_path / "o.json")
    base = ["eval", "ocr", "--model", str(tiny_dir), "--no-progress", "--out", out]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert run_eval(base + ["--data", str(empty)]) == (2, f"--data {empty}: the file is empty")
    rc, err = run_eval(base + ["--data", str(tmp_path / "missing.txt")])
    assert rc == 2 and "no such file" in err
    short = tmp_path / "short.txt"
    short.write_text("Only a few words.")
    rc, err = run_eval(base + ["--data", str(short), "--ratios", "1,2"])
    assert rc == 2 and "no ratio could be evaluated" in err
    points = json.loads(open(out).read())["points"]  # written anyway, with the reasons
    assert all("no document has a whole chunk" in p["skipped"] for p in points)
    rc, err = run_eval(base + ["--data", str(short), "--ratios", "x"])
    assert rc == 2 and "--ratios" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "no text field"}\n')
    rc, err = run_eval(base + ["--data", str(bad)])
    assert rc == 2 and '"text"' in err
    rc, err = run_eval(["eval", "ocr", "--model", str(tmp_path), "--data", str(short), "--out", out])
    assert rc == 2 and "not a VIST2 checkpoint" in err


def test_read_documents_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "  "}\n{"text": "b", "id": 2}\n')
    assert read_documents(path) == ["a", "b"]
    assert read_documents(path, limit=1) == ["a"]


# -- OLM -------------------------------------------------------------------------------------


def test_olm_text_perplexity_is_the_backbone_loss(tiny):
    """The plain-text layout through VIST2 is the backbone: a transformers Qwen3ForCausalLM with the
    same LLM and head weights gives the same loss on the same continuation tokens."""
    from transformers import Qwen3ForCausalLM

    model, proc = tiny
    K = model.config.chunk_tokens
    text = sample_text("en")
    N, M = 2 * K, 40
    res = evaluate_olm(model, proc, [text], context_tokens=N, continuation_tokens=M, limit=1, progress=False)
    assert res["windows"] == 1 and res["text"]["tokens"] == res["optical"]["tokens"] == M

    lm = Qwen3ForCausalLM(model.config.text_config).eval()
    state = {f"model.{k}": v for k, v in model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    missing, unexpected = lm.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    ids = torch.tensor([proc.encode(text)[: N + M]])
    labels = ids.clone()
    labels[:, :N] = -100
    with torch.no_grad():
        loss = lm(input_ids=ids, labels=labels).loss.item()
    assert res["text"]["nll_nats"] / M == pytest.approx(loss, rel=1e-4, abs=1e-4)
    assert res["text"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-3)
    chars = len(proc.decode(ids[0, N:].tolist()))
    assert res["text"]["bits_per_character"] == pytest.approx(loss * M / math.log(2) / chars, rel=1e-4)
    # the optical layout sees a different (compressed) context: a different number
    assert res["optical"]["nll_nats"] != pytest.approx(res["text"]["nll_nats"], rel=1e-6)
    assert res["optical"]["context_kv_entries"] == 2 * model.config.n_visual
    # no context: the continuation after the context's last token only
    labels = ids[:, N - 1 :].clone()
    labels[:, 0] = -100
    with torch.no_grad():
        alone = lm(input_ids=ids[:, N - 1 :], labels=labels).loss.item()
    assert res["none"]["nll_nats"] / M == pytest.approx(alone, rel=1e-4, abs=1e-4)
    assert res["none"]["tokens"] == M and res["none"]["context_kv_entries"] == 1


def test_olm_windows_with_a_stride_tile_the_continuations():
    """--stride S starts a window every S tokens; S = the continuation length scores every token after
    the first context exactly once (non-overlapping windows score one stretch in every N + M)."""
    from vist2.eval.olm import windows

    ids = list(range(100))
    plain = windows([ids], 20, 5)
    assert [c[0] for _, c in plain] == [20, 45, 70, 95]
    tiled = windows([ids], 20, 5, stride=5)
    assert [len(ctx) for ctx, _ in tiled] == [20] * 16
    assert [t for _, c in tiled for t in c] == list(range(20, 100))  # each token once, in order
    assert all(ctx == ids[c[0] - 20 : c[0]] for ctx, c in tiled)


def test_olm_windows_end_the_context_on_a_fit_rule_chunk_boundary(tiny):
    """With hard line breaks the fit rule closes chunks before K tokens: the context is cut back to
    whole chunks, the optical layout's chunks are the processor's chunker's, and the loss falls on
    the continuation only."""
    from pathlib import Path

    from vist2.eval.olm import windows
    from vist2.layout import olm_continuation_segments

    from vist2.processing import VIST2Processor

    model, tiny_proc = tiny
    K, beta = model.config.chunk_tokens, model.config.n_visual
    # read through a coarser font (25 x 12 cells, as in test_engine), where the fit rule cuts often
    rc = model.config.render_config.replace(font_size=8, min_font_size=8)
    proc = VIST2Processor(tiny_proc.tokenizer, rc, K)
    ids = proc.encode((Path(__file__).parent / "data" / "prose_hard_breaks.txt").read_text())
    N, M = 3 * K, 40
    chunker = proc.chunker(K)
    wins = windows([ids], N, M, chunker)
    assert len(wins) >= 2 and any(len(ctx) < N for ctx, _ in wins)  # cut back to whole chunks
    i = 0
    for ctx, cont in wins:
        assert ctx == ids[i : i + len(ctx)] and cont == ids[i + len(ctx) : i + len(ctx) + M]
        closed = proc.chunker()(ids[i : i + N]).closed
        assert len(ctx) == sum(map(len, closed))
        segs = olm_continuation_segments(ctx, cont, K, beta, chunker)
        assert [list(s.tokens) for s in segs][: len(closed)] == closed  # the fit rule's chunks
        assert [s.loss for s in segs] == [False] * len(closed) + [True] * (len(segs) - len(closed))
        assert [list(s.tokens) for s in segs] == proc.chunker()(ctx + cont).chunks[: len(segs)]
        i += len(ctx) + M
    with pytest.raises(ValueError, match="ends inside a chunk"):
        olm_continuation_segments(ctx[:-1], [ctx[-1], *cont], K, beta, chunker)
    res = evaluate_olm(model, proc, [proc.decode(ids)], context_tokens=N, continuation_tokens=M, limit=2,
                       progress=False)
    assert res["windows"] == 2 and res["optical"]["tokens"] == res["text"]["tokens"] == 2 * M
    assert res["context_tokens_mean"] == sum(len(c) for c, _ in wins[:2]) / 2
    n_chunks = sum(len(proc.chunker()(ids[j : j + N]).closed) for j in (0, len(wins[0][0]) + M))
    assert res["optical"]["context_kv_entries"] == n_chunks * beta / 2


def test_retention_is_the_share_of_the_text_gain_the_memory_keeps():
    from vist2.eval.olm import retention

    assert retention({"none": 8.0, "optical": 6.0, "text": 4.0}) == pytest.approx(0.5)
    assert retention({"none": 8.0, "optical": 4.0, "text": 4.0}) == pytest.approx(1.0)
    assert retention({"none": 6.65, "optical": 6.85, "text": 5.48}) == pytest.approx(-0.171, abs=1e-3)  # issue 21
    assert retention({"none": 5.0, "optical": 4.0, "text": 5.0}) is None  # text context worth nothing
    assert retention({"none": 7.2, "optical": 7.8, "text": 7.5}) is None  # ... or less: no sign flip to R > 0


def test_olm_recall_scores_the_passage_start_again_after_the_passage(tiny):
    """--recall: each passage (whole chunks) is followed by its own first M tokens; those M are the
    only targets, in all three layouts, and the optical layout holds the passage only as pages."""
    from vist2.eval.olm import continuation_nll, recall_windows, retention
    from vist2.layout import olm_continuation_segments

    model, proc = tiny
    K, beta = model.config.chunk_tokens, model.config.n_visual
    ids = proc.encode(sample_text("en"))
    N, M = 2 * K, 24
    chunker = proc.chunker(K)
    wins = recall_windows([ids], N, M, chunker)
    assert len(wins) >= 2
    i = 0
    for passage, repeat in wins:
        assert passage == ids[i : i + len(passage)] and repeat == passage[:M]
        assert len(passage) == sum(map(len, proc.chunker()(ids[i : i + N + 1]).closed)) <= N  # whole chunks
        i += len(passage)
    res = evaluate_olm(model, proc, [sample_text("en")], context_tokens=N, continuation_tokens=M, limit=2,
                       progress=False, recall=True)
    assert res["task"] == "recall" and res["windows"] == 2
    assert all(res[k]["tokens"] == 2 * M for k in ("optical", "text", "none"))
    segs = olm_continuation_segments(*wins[0], K, beta, chunker)
    assert [s.loss for s in segs][-1] and not any(s.loss for s in segs if s.n_visual)  # pages carry no loss
    nll = sum(continuation_nll(model, proc, olm_continuation_segments(p, r, K, beta, chunker))[0] for p, r in wins[:2])
    assert res["optical"]["nll_nats"] == pytest.approx(nll, rel=1e-5)
    ppl = {k: res[k]["perplexity"] for k in ("optical", "text", "none")}
    assert res["retention"] == retention(ppl)
    with pytest.raises(ValueError, match="at most --context-tokens"):
        evaluate_olm(model, proc, [sample_text("en")], context_tokens=K, continuation_tokens=K + 1, recall=True)


@pytest.mark.parametrize("layout", ["optical", "text", "none", "prompt-visual", "prompt-interleaved"])
def test_greedy_continuation_is_the_argmax_of_its_own_teacher_forced_scoring(tiny, layout):
    """What the demo's memory-in-use probe writes (the engine, greedy): scored back in the eval's layout
    of the same name, each written token is the model's argmax at the slot that predicts it."""
    from vist2.eval.olm import greedy_continuation, layout_segments, whole_chunks
    from vist2.layout import IGNORE

    model, proc = tiny
    ids = proc.encode(sample_text("en"))
    ctx = ids[: whole_chunks(ids[: 2 * model.config.chunk_tokens], proc.chunker(model.config.chunk_tokens))]
    out = greedy_continuation(model, proc, ctx, layout, 5)
    plan = collate([build_sample(layout_segments(layout, ctx, out, model, proc))])
    pixels = proc.pixels_for(plan.chunks) if plan.chunks else None
    with torch.no_grad():
        logits = model(plan=plan, pixel_values=pixels).logits[0]
    at = (plan.labels[0] != IGNORE).nonzero().flatten()
    assert plan.labels[0, at].tolist() == out and logits[at].argmax(-1).tolist() == out


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A tiny random Qwen3 causal LM with the Qwen3 tokenizer, saved as an ordinary HF folder."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from vist2.build import load_tokenizer

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("judge")
    cfg = Qwen3Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    load_tokenizer(None).save_pretrained(path)
    return path


def test_judged_generation_is_the_engine_text_scored_by_the_judge(tiny, judge_dir):
    """Paper Table 3: VIST2 (gcc) and its backbone (none) write from the same prompt with the engine;
    the judge's perplexity is a plain causal-LM loss on the generated text after the prompt's text."""
    from transformers import AutoModelForCausalLM

    from vist2.engine import Engine, Request, SamplingParams

    model, proc = tiny
    judge, jtok = load_judge(judge_dir, "cpu")
    text = sample_text("en")
    P, G = 2 * model.config.chunk_tokens, 80  # G > K: gcc compresses a generated chunk too
    res = evaluate_generation(model, proc, [text, "too short"], judge, jtok, prompt_tokens=P, max_new_tokens=G,
                              progress=False)
    assert res["documents"] == 1  # the short document cannot give the prompt
    prompt = proc.encode(text)[:P]
    direct = AutoModelForCausalLM.from_pretrained(str(judge_dir)).eval()
    engine = Engine(model, proc, max_batch=1)
    for name, mode in (("vist2", "gcc"), ("backbone", "none")):
        [r] = engine.generate([Request(query=prompt, params=SamplingParams(max_new_tokens=G), mode=mode)])
        side = res[name]
        assert side["mode"] == mode and side["samples"][0]["text"] == r.text and side["generated_tokens"] == G
        ctx = jtok(proc.decode(prompt), add_special_tokens=False)["input_ids"]
        gen = jtok(r.text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + gen])
        labels = ids.clone()
        labels[:, : len(ctx)] = -100
        with torch.no_grad():
            loss = direct(input_ids=ids, labels=labels).loss.item()
        assert side["judged_tokens"] == len(gen) > 0
        assert side["judge_perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
        assert side["judge_nll_nats"] == pytest.approx(loss * len(gen), rel=1e-4)
    assert res["vist2"]["samples"][0]["kv_tokens_peak"] < res["backbone"]["samples"][0]["kv_tokens_peak"]
    # an empty text scores nothing; a judge folder without tokenizer files is refused
    assert judge_nll(judge, jtok, "context", "") == (0.0, 0)
    with pytest.raises(ValueError, match="no document has the 100000 prompt tokens"):
        evaluate_generation(model, proc, [text], judge, jtok, prompt_tokens=100_000, progress=False)


def test_eval_olm_command_and_bad_input(tiny_dir, judge_dir, qwen3_dir, en_file, tmp_path, capsys):
    out = tmp_path / "olm.json"
    base = ["eval", "olm", "--model", str(tiny_dir), "--no-progress", "--out", str(out)]
    rc, err = run_eval(base + ["--data", str(en_file), "--context-tokens", "128", "--continuation-tokens", "16",
                               "--limit", "1"])
    assert rc == 0, err
    res = json.loads(out.read_text())
    tf = res["teacher_forced"]
    assert tf["windows"] == 1 and res["provenance"]["config_hash"] and "judged_generation" not in res
    assert tf["protocol"].startswith("teacher-forced perplexity")
    for k in ("optical", "text"):
        assert tf[k]["tokens"] == 16 and math.isfinite(tf[k]["perplexity"]) and tf[k]["bits_per_character"] > 0
    printed = capsys.readouterr().out
    assert "bits/char" in printed and "teacher-forced" in printed and "retention R" in printed
    assert tf["retention"] is None or math.isfinite(tf["retention"])
    rc, err = run_eval(base + ["--data", str(en_file), "--context-tokens", "128", "--continuation-tokens", "16",
                               "--limit", "1", "--recall"])
    assert rc == 0, err
    tf = json.loads(out.read_text())["teacher_forced"]
    assert tf["task"] == "recall" and tf["optical"]["tokens"] == 16
    assert "the first 16 tokens of each passage again" in capsys.readouterr().out
    rc, err = run_eval(base + ["--data", str(en_file), "--context-tokens", "64", "--continuation-tokens", "65",
                               "--recall"])
    assert rc == 2 and "--continuation-tokens" in err
    rc, err = run_eval(base + ["--data", str(en_file), "--context-tokens", "128", "--continuation-tokens", "16",
                               "--limit", "3", "--stride", "16"])
    assert rc == 0, err
    tf = json.loads(out.read_text())["teacher_forced"]
    assert tf["stride"] == 16 and tf["windows"] == 3 and tf["optical"]["tokens"] == 48
    for bad in (["--stride", "0"], ["--stride", "16", "--recall"]):
        rc, err = run_eval(base + ["--data", str(en_file), "--context-tokens", "128", "--continuation-tokens", "16",
                                   *bad])
        assert rc == 2 and "--stride" in err

    rc, err = run_eval(base + ["--data", str(en_file), "--context-tokens", "128", "--continuation-tokens", "16",
                               "--limit", "1", "--judge", str(judge_dir), "--prompt-tokens", "64",
                               "--max-new-tokens", "8"])
    assert rc == 0, err
    jg = json.loads(out.read_text())["judged_generation"]
    assert jg["judge"] == str(judge_dir) and jg["documents"] == 1 and jg["protocol"].startswith("paper Table 3")
    for name, mode in (("vist2", "gcc"), ("backbone", "none")):
        assert jg[name]["mode"] == mode and jg[name]["generated_tokens"] == 8
        assert math.isfinite(jg[name]["judge_perplexity"]) and jg[name]["judge_perplexity"] > 1
    assert "judge perplexity" in capsys.readouterr().out
    rc, err = run_eval(base + ["--data", str(en_file), "--context-tokens", "128", "--judge", str(qwen3_dir)])
    assert rc == 2 and "no tokenizer files" in err

    rc, err = run_eval(base + ["--data", str(en_file), "--context-tokens", "50"])
    assert rc == 2 and "at least the model's K=64" in err
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "Too short to hold one chunk."}) + "\n")
    rc, err = run_eval(base + ["--data", str(short)])
    assert rc == 2 and "no document has" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, err = run_eval(base + ["--data", str(empty)])
    assert rc == 2 and "empty" in err
