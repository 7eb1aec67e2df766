"""``vist2 eval olm``'s prompt layouts are what the engine does with a user's prompt: the
teacher-forced logits of ``prompt-<encoding>`` over (context, what the engine wrote) equal the
engine's own, token for token, across a compression of the written text (gcc)."""

import pytest
import torch

from vist2.build import load_tokenizer
from vist2.config import preset_config
from vist2.engine.engine import Engine, Request
from vist2.engine.sampling import SamplingParams
from vist2.eval.olm import evaluate_olm, layout_segments, prompt_encodings, whole_chunks
from vist2.layout import IGNORE, Kind, build_sample, collate
from vist2.modeling import VIST2ForCausalLM
from vist2.processing import VIST2Processor
from vist2.samples import sample_text


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _setup(tok, encoding):
    torch.manual_seed(0)
    cfg = preset_config("tiny", prompt_encoding=encoding)
    cfg.text_config.initializer_range = 0.5  # large weights: a wrong mask or position shows
    model = VIST2ForCausalLM(cfg).eval()
    return model, VIST2Processor(tok, cfg.render_config)


@pytest.mark.parametrize("encoding", ["visual", "interleaved"])
def test_prompt_layout_equals_the_engine(tok, encoding):
    model, proc = _setup(tok, encoding)
    K = model.config.chunk_tokens
    ids = tok(sample_text("en"), add_special_tokens=False)["input_ids"]
    n = whole_chunks(ids[: 2 * K + 5], proc.chunker(K))
    assert n >= K
    eng = Engine(model, proc, record_logits=True)
    req = Request(query=ids[:n], params=SamplingParams(max_new_tokens=K + 6, ignore_eos=True), mode="gcc")
    res = eng.generate([req])[0]
    assert res.stats.chunks_compressed >= 2  # the prompt's pages and one of the written text
    plan = collate([build_sample(layout_segments(f"prompt-{encoding}", ids[:n], res.token_ids, model, proc))])
    if encoding == "visual":  # only the pages' visual tokens enter the LLM before the continuation
        first = int((plan.labels[0] != IGNORE).nonzero()[0])
        assert (plan.kind[0, :first] == Kind.VISUAL).all()
    with torch.no_grad():
        logits = model(plan=plan, pixel_values=proc.pixels_for(plan.chunks)).logits[0]
    lab = plan.labels[0]
    assert lab[lab != IGNORE].tolist() == res.token_ids
    V = len(tok)
    diff = (torch.stack(res.logits)[:, :V] - logits[lab != IGNORE][:, :V]).abs().max().item()
    assert diff < 1e-4, f"max |engine - prompt layout| = {diff}"


def test_eval_olm_reports_each_prompt_encoding(tok):
    model, proc = _setup(tok, "visual")
    K = model.config.chunk_tokens
    res = evaluate_olm(model, proc, [sample_text("en")], context_tokens=2 * K, continuation_tokens=8, limit=2,
                       progress=False, prompt_encodings=("visual", "interleaved"))
    assert set(res["prompt_retention"]) == {"prompt-visual", "prompt-interleaved"}
    for name in res["prompt_retention"]:
        assert res[name]["tokens"] == res["optical"]["tokens"] == 16
        assert res[name]["context_kv_entries"] == res["optical"]["context_kv_entries"]
    # the visual prompt is a different layout from the OLM one: a random model scores it differently
    assert res["prompt-visual"]["nll_nats"] != pytest.approx(res["optical"]["nll_nats"])
    assert prompt_encodings("model", "interleaved") == ("interleaved",)
    with pytest.raises(ValueError, match="prompt_encoding"):
        layout_segments("prompt-pixels", [1] * K, [2], model, proc)
