"""LongBench (paper Table 4): the official metrics and protocol, the KV budget's middle cut, the
``vist2 eval longbench`` command on fixture files in LongBench's format, and the lm-eval LongBench
path offline (a task over a local jsonl, the ``vist2`` model type)."""

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("jieba")  # lm-eval's LongBench metrics (pip install "lm-eval[longbench]")

from vist2.eval.downstream import answer_of, fit_to_budget, generation_length, middle_cut  # noqa: E402
from vist2.eval.longbench import (FIRST_LINE, NO_CHAT, find_datasets, prompt, read_dataset, score,  # noqa: E402
                                  tasks)

DATA = Path(__file__).parent / "data" / "longbench"
CLASSES = ["Individual", "Number of something", "City", "Country", "Other location"]


def test_tasks_are_longbench_21_with_official_lengths():
    t = tasks()
    assert len(t) == 21
    # LongBench's dataset2maxlen
    assert {d: t[d]["max_new_tokens"] for d in ("narrativeqa", "multifieldqa_en", "hotpotqa", "gov_report", "trec",
                                                 "samsum", "passage_count", "lcc")} == {
        "narrativeqa": 128, "multifieldqa_en": 64, "hotpotqa": 32, "gov_report": 512, "trec": 64, "samsum": 128,
        "passage_count": 32, "lcc": 64}
    assert {d for d in t if t[d]["category"] == "code"} == {"lcc", "repobench-p"}
    assert sum(1 for d in t if t[d]["category"] == "single") == 4
    assert NO_CHAT >= FIRST_LINE and "lcc" in NO_CHAT
    rec = read_dataset(DATA / "hotpotqa.jsonl")[0]
    p = prompt("hotpotqa", rec)
    assert p.startswith("Answer the question based on the given passages.") and rec["context"] in p
    assert p.endswith(f"Question: {rec['input']}\nAnswer:")


@pytest.mark.parametrize("dataset,prediction,answers,expected", [
    # qa_f1: normalized words [cat, sat] vs [cat, sat, on, mat]: P 1, R 1/2 -> F1 2/3; best over answers
    ("hotpotqa", "The cat sat.", ["cat sat on mat", "dog"], 2 / 3),
    ("hotpotqa", "River Tarn", ["River Tarn", "the Tarn"], 1.0),
    ("multifieldqa_zh", "1887年", ["1887年"], 1.0),
    # classification on the first line only: "City" alone; both classes named on one line share the credit
    ("trec", "\nCity\nIndividual", ["City"], 1.0),
    ("trec", "City or Individual", ["City"], 0.5),
    # retrieval / count: the share of the numbers written that are right
    ("passage_retrieval_en", "Paragraph 2", ["Paragraph 2"], 1.0),
    ("passage_retrieval_en", "Paragraph 2 or Paragraph 3", ["Paragraph 2"], 0.5),
    ("passage_count", "There are 3 unique paragraphs.", ["3"], 1.0),
    ("passage_count", "2 or 3", ["3"], 0.5),
    # code_sim: the first line that is not a comment, fuzzy ratio
    ("lcc", "# the sum\n    return 2 * (width + height)\nmore", ["    return 2 * (width + height)"], 1.0),
    ("lcc", "abcd", ["abce"], 0.75),
])
def test_official_metrics_on_hand_computed_cases(dataset, prediction, answers, expected):
    rec = {"answers": answers, "all_classes": CLASSES if dataset == "trec" else None}
    assert score(dataset, prediction, rec) == pytest.approx(expected)


def test_rouge_datasets_score_identity_high_and_disjoint_zero():
    rec = {"answers": ["the agency plans to hire forty inspectors"], "all_classes": None}
    assert score("gov_report", "the agency plans to hire forty inspectors", rec) == pytest.approx(1.0, abs=1e-6)
    assert score("gov_report", "bananas", rec) == 0.0
    # samsum is scored on the first line: a wrong second line costs nothing
    assert score("samsum", "the agency plans to hire forty inspectors\nbananas", rec) == pytest.approx(1.0, abs=1e-6)


def test_the_answer_follows_the_thinking():
    assert answer_of("<think>It is a city.</think>\nCity") == "\nCity"
    assert answer_of("<think>a</think>b</think>c") == "c"
    assert answer_of("<think>still thinking") == ""
    assert answer_of("City") == "City"
    # the first-line rule then applies to the answer: trec scores "City", not the thinking
    rec = {"answers": ["City"], "all_classes": CLASSES}
    assert score("trec", answer_of("<think>Individual? No.</think>\nCity\nmore"), rec) == 1.0
    assert generation_length(32, None, 0) == 32 and generation_length(512, 8, 100) == 108
    with pytest.raises(ValueError, match="--think-tokens"):
        generation_length(32, None, -1)


def test_middle_cut():
    assert middle_cut(list(range(10)), 4) == [0, 1, 8, 9]
    assert middle_cut(list(range(10)), 5) == [0, 1, 7, 8, 9]
    assert middle_cut([1, 2, 3], 7) == [1, 2, 3]
    assert middle_cut([1, 2, 3], 0) == []


@pytest.fixture(scope="module")
def tiny_engine(tiny_dir):
    from vist2.engine import Engine

    return Engine.from_pretrained(str(tiny_dir), max_batch=2)


def test_fit_to_budget_cuts_only_past_the_budget(tiny_engine):
    """Mode none: every token is an entry, so the query keeps budget - generation - 1 tokens (the
    footprint counts one entry for the first generated token), from its start and its end. Compressed,
    the same prompt fits whole."""
    from vist2.engine import Request, SamplingParams
    from vist2.samples import sample_text

    ids = tiny_engine.processor.encode(sample_text("en"))[:600]
    params = SamplingParams(max_new_tokens=10)
    req = Request(query=list(ids), params=params, mode="none")
    cut, n = fit_to_budget(tiny_engine, req, 200)
    assert n == 600 - (200 - 10 - 1) and cut.query == ids[:94] + ids[-95:]
    assert tiny_engine.footprint(cut) + 10 <= 200
    same, n = fit_to_budget(tiny_engine, req, 1000)
    assert n == 0 and same.query == ids
    gcc = Request(query=list(ids), params=params, mode="gcc")
    assert tiny_engine.footprint(gcc) + 10 <= 300 < len(ids)
    assert fit_to_budget(tiny_engine, gcc, 300)[1] == 0  # 600 tokens compressed fit 300 entries
    cut, n = fit_to_budget(tiny_engine, gcc, 60)
    assert 0 < n < 600 and tiny_engine.footprint(cut) + 10 <= 60
    with pytest.raises(ValueError, match="cannot hold"):
        fit_to_budget(tiny_engine, req, 10)


def test_data_errors_name_file_and_line(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        find_datasets(tmp_path / "nope")
    with pytest.raises(ValueError, match="none of LongBench's files"):
        find_datasets(tmp_path)
    with pytest.raises(ValueError, match="unknown wiki"):
        find_datasets(DATA, ["wiki"])
    with pytest.raises(ValueError, match="no qasper.jsonl"):
        find_datasets(DATA, ["qasper"])
    assert set(find_datasets(DATA)) == {p.stem for p in DATA.glob("*.jsonl")}
    good = (DATA / "trec.jsonl").read_text().splitlines()[0]
    bad = tmp_path / "trec.jsonl"
    bad.write_text(good + "\n{oops\n")
    with pytest.raises(ValueError, match=r"trec.jsonl, line 2: not JSON"):
        read_dataset(bad)
    rec = json.loads(good)
    del rec["context"]
    bad.write_text(good + "\n\n" + json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=r"line 3: field 'context' missing"):
        read_dataset(bad)
    rec = json.loads(good) | {"answers": []}
    bad.write_text(json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match="line 1: 'answers' must be a non-empty list"):
        read_dataset(bad)


def test_eval_longbench_command_end_to_end(tiny_dir, tmp_path, capsys):
    """Every fixture dataset in two modes on the tiny preset: a row a mode, Table 4's categories, scores
    that re-score from the saved answers, categories the mean of their datasets, and the compressed
    mode holding fewer KV entries than the plain LLM."""
    from vist2.cli import main

    out = tmp_path / "lb.json"
    assert main(["eval", "longbench", "--model", str(tiny_dir), "--data", str(DATA), "--modes", "gcc,none",
                 "--limit", "1", "--max-new-tokens", "3", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "| gcc |" in printed and "SingleDoc QA" in printed and out.with_suffix(".md").read_text().strip() in printed
    prov = res["provenance"]
    assert set(prov["data_sha256"]) == {p.name for p in DATA.glob("*.jsonl")} and prov["lm_eval"]
    assert prov["command"].startswith("vist2 eval longbench --data") and "--eval-command" not in prov["command"]
    assert set(res["modes"]) == {"gcc", "none"}
    for mode, m in res["modes"].items():
        assert set(m["categories"]) == {"single", "multi", "summarization", "fewshot", "synthetic", "code"}
        for ds, d in m["datasets"].items():
            assert len(d["samples"]) == 1 and d["max_new_tokens"] == 3
            rec = read_dataset(DATA / f"{ds}.jsonl", 1)[0]
            s = d["samples"][0]
            assert s["id"] == rec["_id"] and s["generated_tokens"] <= 3
            assert s["answer"] == answer_of(s["text"])
            assert d["score"] == pytest.approx(100 * score(ds, s["answer"], rec))
        for cat, c in m["categories"].items():
            scores = [d["score"] for d in m["datasets"].values() if d["category"] == cat]
            assert c["score"] == pytest.approx(sum(scores) / len(scores))
        assert m["average"] == pytest.approx(sum(c["score"] for c in m["categories"].values()) / 6)
    gcc, none = res["modes"]["gcc"]["datasets"]["hotpotqa"], res["modes"]["none"]["datasets"]["hotpotqa"]
    assert gcc["prompt_tokens_mean"] == none["prompt_tokens_mean"] and gcc["kv_peak_mean"] < none["kv_peak_mean"]


def test_eval_longbench_command_bad_input(tiny_dir, tmp_path, capsys):
    from vist2.cli import main

    for argv, msg in ((["--data", str(tmp_path)], "none of LongBench's files"),
                      (["--data", str(DATA), "--modes", "gcc,zip"], "--modes"),
                      (["--data", str(DATA), "--limit", "0"], "--limit")):
        assert main(["eval", "longbench", "--model", str(tiny_dir), "--out", str(tmp_path / "x.json"), *argv]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def _longbench_task(folder: Path, dataset: str, data: Path) -> str:
    """A task over a local LongBench file: lm-eval's own LongBench task (prompt, metric) included, only the
    data source and generation length changed; lm-eval's templates name LongBench's ``input`` ``question``."""
    import lm_eval.tasks

    official = Path(lm_eval.tasks.__file__).parent / "longbench" / f"{dataset}.yaml"
    name = f"vist2_longbench_{dataset}"
    (folder / f"{dataset}.yaml").write_text(
        f"include: {json.dumps(str(official))}\n"
        f"task: {name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        f"  cache_dir: {json.dumps(str(folder / 'hf-cache'))}\n"
        "test_split: test\n"
        f"doc_to_text: {json.dumps(tasks()[dataset]['prompt'].replace('{{question}}', '{{input}}'))}\n"
        "generation_kwargs:\n  max_gen_toks: 4\n  until: []\n  do_sample: false\n  temperature: 0\n")
    return name


@pytest.mark.slow
def test_lm_eval_longbench_task_offline(tiny_dir, tmp_path, monkeypatch):
    """lm-eval's hotpotqa task (its prompt and metric) on the fixture file through the ``vist2`` model type,
    mode gcc, with a KV budget (max_length) that even the compressed prompts do not fit: the harness's score
    is the official qa_f1 of the answers it logged, and the prompts were cut in the middle, not refused
    (the engine refuses a prompt over its budget)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import vist2.eval.lm_eval_adapter  # noqa: F401  (registers "vist2")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = _longbench_task(tmp_path, "hotpotqa", DATA / "hotpotqa.jsonl")
    out = lm_eval.simple_evaluate(
        model="vist2", model_args={"pretrained": str(tiny_dir), "mode": "gcc", "max_length": 40},
        tasks=[name], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        bootstrap_iters=0, log_samples=True)
    samples = out["samples"][name]
    records = read_dataset(DATA / "hotpotqa.jsonl")
    assert len(samples) == len(records)
    by_id = {r["_id"]: r for r in records}
    mine = [score("hotpotqa", s["resps"][0][0], by_id[s["doc"]["_id"]]) for s in samples]
    assert out["results"][name]["score,none"] == pytest.approx(sum(mine) / len(mine))
    assert all(s["arguments"][0][0].startswith("Answer the question based on") for s in samples)


def test_adapter_cuts_prompts_past_max_length_in_the_middle(tiny_dir):
    """generate_until: a prompt whose footprint is over max_length is cut to fit (head and tail kept), in
    the mode's own entries: compressed, the same prompt fits whole."""
    from lm_eval.api.instance import Instance

    from vist2.eval.lm_eval_adapter import VIST2LM
    from vist2.samples import sample_text

    text = sample_text("en")[:1500]
    lm = VIST2LM(pretrained=str(tiny_dir), mode="none", max_length=120)
    assert lm.max_length == 120 and lm.engine.max_cache_tokens == 120
    seen = []
    real = lm.engine.generate
    lm.engine.generate = lambda reqs: seen.extend(reqs) or real(reqs)
    inst = Instance("generate_until", {}, (text, {"until": [], "max_gen_toks": 4}), 0)
    ids = lm.processor.encode(text)
    for mode, cut in (("none", True), ("gcc", False)):
        lm.mode = mode
        (out,) = lm.generate_until([inst], disable_tqdm=True)
        req = seen.pop()
        assert isinstance(out, str) and lm.engine.footprint(req) + 4 <= 120
        if cut:
            n = len(req.query)
            assert n < len(ids) and req.query == ids[: n // 2] + ids[len(ids) - (n - n // 2):]
        else:
            assert req.query == ids
