"""The ``vist2`` model type for lm-evaluation-harness, on small local tasks this test writes (no downloads)."""

import json
import math

import pytest

lm_eval = pytest.importorskip("lm_eval")

pytestmark = pytest.mark.slow

DOCS = [
    {"question": "In the beginning God created the heaven and the", "choices": [" earth", " moon"], "label": 0,
     "answer": "earth"},
    {"question": "And God said, Let there be", "choices": [" light", " dark", " water"], "label": 0,
     "answer": "light"},
]


def _write_tasks(folder, data):
    common = (
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data))}\n"
        f"  cache_dir: {json.dumps(str(folder / 'hf-cache'))}\n"
        "test_split: test\n"
    )
    (folder / "mc.yaml").write_text(
        "task: vist2_local_mc\n" + common + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    (folder / "gen.yaml").write_text(
        "task: vist2_local_gen\n" + common + "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    (folder / "ppl.yaml").write_text(
        "task: vist2_local_ppl\n" + common + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{question}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    _write_tasks(folder, data)
    return folder


def test_lm_eval_adapter_on_local_tasks(tiny_dir, tasks_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import vist2.eval.lm_eval_adapter  # noqa: F401  (registers the "vist2" model type)
    from lm_eval.tasks import TaskManager

    names = ["vist2_local_mc", "vist2_local_gen", "vist2_local_ppl"]
    out = lm_eval.simple_evaluate(
        model="vist2", model_args={"pretrained": str(tiny_dir), "mode": "gcc"}, tasks=names,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False), batch_size=2, bootstrap_iters=0,
    )
    res = out["results"]
    # the same numbers from the plain LLM: these texts are shorter than beta and K, so gcc compresses nothing
    expect = _plain_llm_metrics(tiny_dir)
    assert res["vist2_local_mc"]["acc,none"] == expect["acc"]
    assert res["vist2_local_gen"]["exact_match,none"] == expect["exact_match"]
    assert res["vist2_local_ppl"]["word_perplexity,none"] == pytest.approx(expect["word_perplexity"], rel=1e-4)
    assert res["vist2_local_ppl"]["bits_per_byte,none"] == pytest.approx(expect["bits_per_byte"], rel=1e-4)
    assert out["config"]["model"] == "vist2"


def _plain_llm_metrics(model_dir) -> dict:
    """The three tasks' metrics computed by hand with the checkpoint's LLM as a plain transformers
    model (lm-eval's conventions: a " " between question and choice, accuracy by the largest
    log-likelihood, exact match of the greedy text cut at the first newline, rolling perplexity
    conditioned on the EOS token)."""
    import re

    import torch
    from transformers import AutoTokenizer

    from vist2.bench import hf_model
    from vist2.modeling import VIST2ForCausalLM

    lm = hf_model(VIST2ForCausalLM.from_pretrained(str(model_dir)).eval())
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731

    @torch.no_grad()
    def loglik(ctx: list[int], cont: list[int]) -> float:
        logp = torch.log_softmax(lm(torch.tensor([ctx + cont])).logits[0].float(), -1)
        return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))

    correct, matched, ll, words, nbytes = 0, 0, 0.0, 0, 0
    for d in DOCS:
        q = enc(d["question"])
        scores = [loglik(q, enc(d["question"] + " " + c)[len(q):]) for c in d["choices"]]
        correct += max(range(len(scores)), key=scores.__getitem__) == d["label"]
        with torch.no_grad():
            out = lm.generate(torch.tensor([q]), max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
        matched += tok.decode(out[0, len(q):]).split("\n")[0] == d["answer"]
        ll += loglik([tok.eos_token_id], q)
        words += len(re.split(r"\s+", d["question"]))
        nbytes += len(d["question"].encode("utf-8"))
    return {"acc": correct / len(DOCS), "exact_match": matched / len(DOCS),
            "word_perplexity": math.exp(-ll / words), "bits_per_byte": -ll / nbytes / math.log(2)}


def test_adapter_modes_agree_where_nothing_is_compressed(tiny_dir):
    """A context no longer than beta stays raw text under the tail rule, so gcc, pcc and none score
    it identically; a long context is compressed in gcc/pcc and scores differently from none."""
    from lm_eval.api.instance import Instance

    from vist2.samples import sample_text
    from vist2.eval.lm_eval_adapter import VIST2LM

    lm = VIST2LM(pretrained=str(tiny_dir), mode="none")
    long_ctx = sample_text("en")[:800]

    def req(ctx, cont):
        return Instance("loglikelihood", {}, (ctx, cont), 0)

    reqs = [req("And God said", " Let there be light"), req(long_ctx, " and the evening")]
    scores = {}
    for mode in ("none", "pcc", "gcc"):
        lm.mode = mode
        scores[mode] = lm.loglikelihood(reqs, disable_tqdm=True)
        assert all(isinstance(lp, float) and lp < 0 and isinstance(g, bool) for lp, g in scores[mode])
    assert scores["gcc"][0][0] == pytest.approx(scores["none"][0][0], abs=1e-4)
    assert scores["pcc"][0][0] == pytest.approx(scores["none"][0][0], abs=1e-4)
    assert scores["gcc"][1][0] != pytest.approx(scores["none"][1][0], abs=1e-3)
    lm.mode = "gcc"
    (text,) = lm.generate_until([Instance("generate_until", {}, ("In the beginning", {"until": ["\n"],
                                                                                          "max_gen_toks": 5}), 0)])
    assert isinstance(text, str) and "\n" not in text


def test_adapter_cuts_chunks_by_the_fit_rule(tiny_dir):
    """Context and continuation are chunked exactly as the processor's fit rule cuts them (the cuts
    training and the engine use), not every K tokens; the plan still scores exactly the continuation."""
    from pathlib import Path

    from vist2.eval.lm_eval_adapter import VIST2LM
    from vist2.layout import build_sample

    from vist2.processing import VIST2Processor

    lm = VIST2LM(pretrained=str(tiny_dir), mode="gcc")
    # read through a coarser font (25 x 12 cells, as in test_engine), where the fit rule cuts often
    rc = lm.model.config.render_config.replace(font_size=8, min_font_size=8)
    proc = lm.processor = VIST2Processor(lm.processor.tokenizer, rc, lm.K)
    K = lm.K
    ids = proc.encode((Path(__file__).parent / "data" / "prose_hard_breaks.txt").read_text())
    ctx, cont = ids[: 3 * K], ids[3 * K : 5 * K]
    cuts = proc.chunker()(ctx)
    assert any(cuts.fit_cut)  # hard line breaks: the fit rule closes chunks before K tokens
    chunks = [list(c.tokens) for c in build_sample(lm._segments(ctx, cont)).chunks]
    pays = [c for c in cuts.closed + [cuts.tail] if len(c) > lm.n_visual]  # only pieces that pay are images
    n_ctx = len(pays)
    assert chunks[:n_ctx] == pays
    # the continuation's images start on the bytes left after the whole context, as generation does
    cont_cuts = proc.chunker()(cont, cuts.carry_tail)
    parts = cont_cuts.closed + ([cont_cuts.tail] if cont_cuts.tail else [])
    assert chunks[n_ctx:] == [c for c in parts[:-1] if len(c) > lm.n_visual]  # the last part stays open text
    ((lp, _),) = lm._score([(ctx, cont)])  # raises unless the plan targets exactly the continuation
    assert lp < 0
    lm.mode = "pcc"
    assert [list(c.tokens) for c in build_sample(lm._segments(ctx, cont)).chunks] == chunks[:n_ctx]


def test_model_args_may_name_device_and_batch_size(tiny_dir):
    """``--model_args pretrained=...,device=cpu`` used to fail with "got multiple values for keyword
    argument 'device'": lm-eval passes its own device and batch size too. The model's arguments win."""
    from vist2.eval.lm_eval_adapter import VIST2LM

    lm = VIST2LM.create_from_arg_string(f"pretrained={tiny_dir},mode=pcc,device=cpu,batch_size=3",
                                        {"device": "cuda:7", "batch_size": 1, "max_batch_size": None})
    assert (lm.mode, lm._device.type, lm.batch_size) == ("pcc", "cpu", 3)
    lm = VIST2LM.create_from_arg_obj({"pretrained": str(tiny_dir)}, {"device": "cpu", "batch_size": 2})
    assert (lm._device.type, lm.batch_size) == ("cpu", 2)  # lm-eval's own flags still apply when alone


def test_rulers_needle_task_runs_through_the_adapter_offline(tiny_dir, monkeypatch):
    """lm-eval's own RULER ``niah_single_1`` at 512 tokens: the samples are sized with the checkpoint's
    tokenizer (``pretrained`` is all the task needs), nothing is downloaded, and the score lm-eval
    reports is RULER's string_match_all of what the engine wrote."""
    from pathlib import Path

    pytest.importorskip("wonderwords")
    import nltk

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # RULER's module asks nltk for punkt_tab when imported; the repeat haystack never uses it
    monkeypatch.setattr(nltk, "download", lambda *a, **k: False)
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    import vist2.eval.lm_eval_adapter  # noqa: F401  (registers the "vist2" model type)
    from vist2.eval.niah import string_match_all

    args = {"pretrained": str(tiny_dir), "mode": "gcc", "device": "cpu"}
    tm = TaskManager(include_path=str(Path(lm_eval.tasks.__file__).parent / "ruler"), include_defaults=False,
                     metadata={**args, "max_seq_lengths": [512]})
    out = lm_eval.simple_evaluate(model="vist2", model_args=args, tasks=["niah_single_1"], task_manager=tm,
                                  limit=2, log_samples=True, bootstrap_iters=0, gen_kwargs="max_gen_toks=8")
    score = out["results"]["niah_single_1"]["512,none"]
    samples = out["samples"]["niah_single_1"]
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert len(samples) == 2
    for s in samples:
        prompt, gen_kwargs = s["arguments"][0]
        needle = s["doc"]["outputs"][0]
        assert f"is: {needle}." in prompt and prompt.endswith("mentioned in the provided text is")
        assert len(tok(prompt)["input_ids"]) <= 512 and gen_kwargs["max_gen_toks"] == 8
        assert isinstance(s["resps"][0][0], str)
    assert score == sum(string_match_all(s["resps"][0][0], s["doc"]["outputs"]) for s in samples) / 2
