"""The text-only backbone stage (``vist2 train --stage lm``) on the tiny model (CPU)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from vist2.cli import sample_text
from vist2.layout import IGNORE, Kind
from vist2.training.config import load_config, stage_preset
from vist2.training.trainer import Trainer


@pytest.fixture(scope="module")
def text_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm") / "text.jsonl"
    docs = [sample_text("en"), sample_text("zh"), "a short one"]
    path.write_text("\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs) + "\n", encoding="utf-8")
    return path


def test_lm_preset_trains_the_llm_only_and_refuses_image_parts():
    cfg = stage_preset("lm")
    assert (cfg.train_llm, cfg.train_vision, cfg.train_aligner) == (True, False, False)
    assert load_config(None, "configs/lm.yaml").to_dict() == cfg.to_dict()  # the YAML restates the preset
    with pytest.raises(ValueError, match="stage lm reads no images"):
        stage_preset("lm", train_aligner=True)


def test_lm_samples_are_plain_causal_text(tiny_dir, text_jsonl):
    from vist2.processing import VIST2Processor
    from vist2.training.data import open_source
    from vist2.training.pipeline import StageDataset
    from vist2.training.stages import StageBuilder

    proc = VIST2Processor.from_pretrained(tiny_dir)
    cfg = stage_preset("lm", max_length=64)
    builder = StageBuilder(cfg, proc.tokenizer, 64, 16, "visual", processor=proc)
    ds = StageDataset(open_source(text_jsonl), builder, proc, cfg, split="eval")
    batch = next(iter(ds))
    plan = batch.plan
    assert batch.pixel_values is None and not plan.chunks and not (plan.kind == Kind.VISUAL).any()
    row = plan.input_ids[0]
    ids = proc.encode(sample_text("en"))
    assert row[:64].tolist() == ids[:64]  # the first window of the first document, untouched
    assert plan.position[0, :64].tolist() == list(range(64))
    # every slot predicts the next token of its window; the window's last slot has nothing to predict
    assert plan.labels[0, :63].tolist() == ids[1:64] and int(plan.labels[0, 63]) == IGNORE


def test_lm_stage_runs_and_trains_only_the_llm(tiny_dir, text_jsonl, tmp_path):
    cfg = stage_preset("lm", max_steps=2, log_every=1, max_length=64, num_workers=0, eval_holdout=2,
                       eval_every=1, eval_batches=1)
    res = Trainer(cfg, tiny_dir, text_jsonl, tmp_path / "lm", progress=False).train()
    assert res.steps == 2 and res.eval_loss is not None and 0 < res.eval_loss < 13
    before, after = load_file(str(tiny_dir / "model.safetensors")), load_file(str(tmp_path / "lm/model.safetensors"))
    for prefix, trains in (("model.language_model.", True), ("model.vision.", False), ("model.aligner.", False)):
        keys = [k for k in before if k.startswith(prefix)]
        assert keys and any(not torch.equal(before[k], after[k]) for k in keys) == trains, prefix
    summary = json.loads((tmp_path / "lm" / "train_summary.json").read_text())
    assert summary["stage"] == "lm"


def test_lm_loss_falls_on_a_fixed_batch(tiny_dir, text_jsonl):
    from vist2.modeling import VIST2ForCausalLM
    from vist2.processing import VIST2Processor
    from vist2.training.data import open_source
    from vist2.training.pipeline import StageDataset
    from vist2.training.stages import StageBuilder
    from vist2.training.trainer import apply_trainable, make_optimizer, make_scheduler

    torch.manual_seed(0)
    proc = VIST2Processor.from_pretrained(tiny_dir)
    model = VIST2ForCausalLM.from_pretrained(str(tiny_dir))
    cfg = stage_preset("lm", max_length=64, learning_rate=5e-3, warmup_ratio=0.0, lr_scheduler="constant_with_warmup")
    builder = StageBuilder(cfg, proc.tokenizer, 64, 16, "visual", processor=proc)
    ds = StageDataset(open_source(text_jsonl), builder, proc, cfg, split="eval")
    batch = next(iter(ds))
    apply_trainable(model, cfg)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, 20)
    losses = []
    for _ in range(20):
        loss = model(plan=batch.plan, loss_only=True).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[0] > 11 and losses[-1] < 0.4 * losses[0], losses[::4]
