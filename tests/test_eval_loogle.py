"""LooGLE (paper Table 5): the metrics against hand-computed values, reading LooGLE's format, and the
``vist2 eval loogle`` command on fixture files in that format (with a local judge)."""

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("nltk")

from vist2.eval.loogle import TASKS, find_tasks, judged_true, read_prompts, read_task, scores, \
    wordnet_available  # noqa: E402

DATA = Path(__file__).parent / "data" / "loogle"


def test_bleu_and_rouge_by_hand():
    # 3 hypothesis words, all in the 6-word reference: unigram precision 1, brevity penalty exp(1 - 6/3)
    s = scores("the cat sat on the mat", "the cat sat", meteor=False)
    assert s["bleu1"] == pytest.approx(math.exp(-1))
    assert s["bleu4"] == pytest.approx(0.0, abs=1e-12)  # no 4-gram in a 3-word answer (NLTK: a tiny float)
    # ROUGE-1 F: P 3/3, R 3/6 -> 2/3; ROUGE-2: bigrams 2/2 and 2/5 -> 4/7; ROUGE-L: LCS 3 -> 2/3
    assert (s["rouge1"], s["rouge2"], s["rougeL"]) == pytest.approx((2 / 3, 4 / 7, 2 / 3))
    assert s["meteor"] is None
    same = scores("a b c d e", "a b c d e", meteor=False)
    assert same["bleu1"] == pytest.approx(1.0) and same["bleu4"] == pytest.approx(1.0) and same["rougeL"] == 1.0
    # BLEU-4 is the 4-gram precision alone: 1 of the 2 hypothesis 4-grams matches, lengths equal
    assert scores("a b c d e", "a b c d x", meteor=False)["bleu4"] == pytest.approx(0.5)
    empty = scores("a b", "", meteor=False)
    assert empty["bleu1"] == empty["bleu4"] == empty["rouge1"] == 0.0


@pytest.mark.skipif(not wordnet_available(), reason="NLTK's WordNet data is not installed")
def test_meteor_with_wordnet():
    assert scores("the cat sat", "the cat sat", meteor=True)["meteor"] > 0.9


def test_reading_loogle_format(tmp_path):
    qa = read_task(DATA / "shortdep_qa.jsonl", "shortdep_qa")
    # the first record's pairs are a Python literal string (as released), the second's a JSON list
    assert [q["question"] for q in qa] == ["When was the stone bridge built?", "Which river is Keldmouth on?",
                                           "Where did Olin Hart teach?"]
    assert qa[0]["reference"] == "In 1887." and qa[0]["input"].startswith("Keldmouth")
    assert len(read_task(DATA / "shortdep_qa.jsonl", "shortdep_qa", limit=1)) == 2  # limit counts documents
    cloze = read_task(DATA / "shortdep_cloze.jsonl", "shortdep_cloze")
    assert json.loads(cloze[0]["reference"]) == {"<mask-0>": "Mara Voss", "<mask-1>": "Keldmouth"}
    summ = read_task(DATA / "longdep_summarization.jsonl", "longdep_summarization")
    assert summ[0]["question"] is None and summ[0]["reference"].startswith("A model that stores")
    assert set(find_tasks(DATA)) == set(TASKS)
    (tmp_path / "summarization.jsonl").write_text((DATA / "longdep_summarization.jsonl").read_text())
    assert find_tasks(tmp_path) == {"longdep_summarization": tmp_path / "summarization.jsonl"}
    bad = tmp_path / "longdep_qa.jsonl"
    bad.write_text('{"input": "text", "qa_pairs": "[{\'Q\': \'q\'}]", "output": "none"}\n')
    with pytest.raises(ValueError, match=r"longdep_qa.jsonl, line 1: 'qa_pairs' must be"):
        read_task(bad, "longdep_qa")
    bad.write_text('\n{"input": "text", "qa_pairs": "none", "output": "none"}\n')
    with pytest.raises(ValueError, match=r"line 2: a longdep_qa record needs 'qa_pairs'"):
        read_task(bad, "longdep_qa")
    bad.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"line 1: expected an object with a string 'input'"):
        read_task(bad, "longdep_qa")
    with pytest.raises(ValueError, match="no longdep_qa.jsonl"):
        find_tasks(DATA.parent, ["longdep_qa"])
    with pytest.raises(ValueError, match="unknown nope"):
        find_tasks(DATA, ["nope"])


def test_prompts_file(tmp_path):
    p = tmp_path / "task2prompt.json"
    p.write_text(json.dumps({"shortdep_qa": "Text: {input}\nQ: {Q}\nA:", "other_task": "x"}))
    assert read_prompts(p) == {"shortdep_qa": "Text: {input}\nQ: {Q}\nA:"}
    p.write_text(json.dumps({"longdep_qa": "{input} only"}))
    with pytest.raises(ValueError, match="'longdep_qa' must be a string naming {input} and {Q}"):
        read_prompts(p)
    assert {t: n for t, (_, n) in TASKS.items()} == {"shortdep_qa": 300, "shortdep_cloze": 50, "longdep_qa": 500,
                                                      "longdep_summarization": 500}


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


def test_judge_prefers_the_likelier_verdict(judge_dir):
    """judged_true is the judge's comparison of " True" and " False" after the prompt, by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vist2.eval.loogle import JUDGE_PROMPT

    judge, tok = AutoModelForCausalLM.from_pretrained(str(judge_dir)).eval(), AutoTokenizer.from_pretrained(judge_dir)
    ctx = JUDGE_PROMPT.format(q="Q?", ref="In 1887.", pred="1887")

    def logp(word):
        ids = tok(ctx, add_special_tokens=False)["input_ids"]
        w = tok(word, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(judge(torch.tensor([ids + w])).logits[0].float(), -1)
        return sum(float(lp[len(ids) - 1 + i, t]) for i, t in enumerate(w))

    assert judged_true(judge, tok, "Q?", "In 1887.", "1887") == (logp(" True") > logp(" False"))


@pytest.mark.slow
def test_eval_loogle_command_end_to_end(tiny_dir, judge_dir, tmp_path, capsys):
    """All four tasks in two modes on the tiny preset with a judge: a row per task and mode, metrics that
    re-score from the saved answers, and fewer KV entries held compressed than plain."""
    from vist2.cli import main
    from vist2.eval.downstream import answer_of

    out = tmp_path / "lg.json"
    assert main(["eval", "loogle", "--model", str(tiny_dir), "--data", str(DATA), "--modes", "gcc,none",
                 "--limit", "1", "--max-new-tokens", "2", "--think-tokens", "1", "--judge", str(judge_dir), "--device", "cpu",
                 "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert out.with_suffix(".md").read_text().strip() in printed and "| longdep_qa | gcc |" in printed
    assert res["judged"] and res["meteor"] == wordnet_available() and res["think_tokens"] == 1
    assert (res["meteor_note"] is None) == res["meteor"]
    assert set(res["provenance"]["data_sha256"]) == {p.name for p in DATA.glob("*.jsonl")}
    for mode, m in res["modes"].items():
        assert set(m) == set(TASKS)
        for task, t in m.items():
            recs = read_task(DATA / f"{task}.jsonl", task, 1)
            assert len(t["samples"]) == len(recs) and t["max_new_tokens"] == 3
            for s, rec in zip(t["samples"], recs):
                assert s["reference"] == rec["reference"] and s["generated_tokens"] <= 3
                assert s["answer"] == answer_of(s["text"])
                again = scores(rec["reference"], s["answer"], res["meteor"])
                assert all(s[k] == pytest.approx(v) for k, v in again.items() if v is not None)
            assert t["rougeL"] == pytest.approx(100 * sum(s["rougeL"] for s in t["samples"]) / len(recs))
            assert t["judged"] == pytest.approx(100 * sum(s["judged"] for s in t["samples"]) / len(recs))
    assert res["modes"]["gcc"]["longdep_summarization"]["kv_peak_mean"] < \
        res["modes"]["none"]["longdep_summarization"]["kv_peak_mean"]
