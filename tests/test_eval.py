"""vist2 eval ocr / olm: metrics, greedy MT-OCR transcription, perplexity against the backbone, bad input."""

import argparse
import json
import math

import pytest
import torch

pytest.importorskip("rouge_score")

from vist2.cli import CLIError, sample_text  # noqa: E402
from vist2.eval import add_parser  # noqa: E402
from vist2.eval.common import CJKTokenizer, load, read_documents  # noqa: E402
from vist2.eval.ocr import ocr_scores, parse_ratios, transcribe  # noqa: E402
from vist2.eval.olm import evaluate_olm  # noqa: E402
from vist2.layout import build_sample, collate, ocr_segments  # noqa: E402


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
    return load(tiny_dir, "cpu")


@pytest.fixture(scope="module")
def en_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "en.txt"
    path.write_text(sample_text("en"), encoding="utf-8")
    return path


# -- metrics ---------------------------------------------------------------------------------


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


def test_eval_ocr_command(tiny_dir, en_file, tmp_path, capsys):
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
    assert ok["mean_tokens_per_image"] == 16
    for k in ("rouge1", "rouge2", "rougeL"):
        assert 0.0 <= ok[k] <= 1.0
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


def test_eval_olm_command_and_bad_input(tiny_dir, en_file, tmp_path, capsys):
    out = tmp_path / "olm.json"
    base = ["eval", "olm", "--model", str(tiny_dir), "--no-progress", "--out", str(out)]
    rc, err = run_eval(base + ["--data", str(en_file), "--context-tokens", "128", "--continuation-tokens", "16",
                               "--limit", "1"])
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert res["windows"] == 1 and res["provenance"]["config_hash"]
    for k in ("optical", "text"):
        assert res[k]["tokens"] == 16 and math.isfinite(res[k]["perplexity"]) and res[k]["bits_per_character"] > 0
    assert "bits/char" in capsys.readouterr().out

    rc, err = run_eval(base + ["--data", str(en_file), "--context-tokens", "100"])
    assert rc == 2 and "multiple of the model's K=64" in err
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "Too short to hold one chunk."}) + "\n")
    rc, err = run_eval(base + ["--data", str(short)])
    assert rc == 2 and "no document has" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, err = run_eval(base + ["--data", str(empty)])
    assert rc == 2 and "empty" in err
