"""The visual-path probe: blind gap and aligner spread, checked against direct computations; collapse flagged."""

import json

import pytest
import torch

from vist2.cli import main, sample_text
from vist2.layout import IGNORE
from vist2.training.probe import MIN_REL_SPREAD, VisualProbe, diagnose


@pytest.fixture(scope="module")
def batches(tiny_dir):
    """Two OCR eval batches of the tiny model (several rendered images each)."""
    from vist2.processing import VIST2Processor
    from vist2.training.config import stage_preset
    from vist2.training.data import open_source
    from vist2.training.pipeline import StageDataset
    from vist2.training.stages import StageBuilder

    proc = VIST2Processor.from_pretrained(tiny_dir)
    path = tiny_dir.parent / "probe.txt"
    path.write_text(sample_text("en"), encoding="utf-8")
    cfg = stage_preset("ocr", max_length=240, curriculum=[{"until": 1.0, "min_images": 2, "max_images": 2}])
    ds = StageDataset(open_source(path), StageBuilder(cfg, proc.tokenizer, 64, 16, "visual", processor=proc), proc, cfg,
                      split="eval", max_batches=2)
    out = list(ds)
    assert len(out) == 2 and all(b.pixel_values.shape[0] >= 2 for b in out)
    return out


def probe_run(model, batches):
    """What the trainer's evaluation does: the real forward (hook records), then observe."""
    probe = VisualProbe(model, blank=1.0)
    with torch.no_grad():
        for b in batches:
            out = model(plan=b.plan, loss_only=True, pixel_values=b.pixel_values)
            probe.observe(model, b.plan, b.pixel_values, float(out.loss), int((b.plan.labels != IGNORE).sum()))
    return probe.finish()


@pytest.fixture()
def model(tiny_dir):
    from vist2.modeling import VIST2ForCausalLM

    return VIST2ForCausalLM.from_pretrained(str(tiny_dir)).eval()


def test_blind_gap_and_spread_equal_direct_computations(model, batches):
    res = probe_run(model, batches)
    real = blind = targets = 0.0
    outs = []
    with torch.no_grad():
        for b in batches:
            n = int((b.plan.labels != IGNORE).sum())
            real += float(model(plan=b.plan, pixel_values=b.pixel_values).loss) * n
            blind += float(model(plan=b.plan, pixel_values=torch.ones_like(b.pixel_values)).loss) * n  # white pages
            targets += n
            outs.append(model.model.encode_images(b.pixel_values))
    direct_gap = (blind - real) / targets
    assert abs(direct_gap) > 1e-5  # a random model still reacts to its pixels a little
    assert res.blind_gap == pytest.approx(direct_gap, abs=1e-5)
    assert res.loss == pytest.approx(real / targets, rel=1e-6)
    x = torch.cat(outs).double()  # (N, beta, D)
    assert res.images == x.shape[0]
    assert res.spread == pytest.approx(float(x.std(0, unbiased=False).mean()), rel=1e-6)
    assert res.saturated == pytest.approx(float((x.abs() > 0.99).double().mean()), abs=1e-12)


def test_random_aligner_is_not_flagged(model, batches):
    res = probe_run(model, batches)
    assert res.rel_spread > 5 * MIN_REL_SPREAD, res
    assert diagnose(res, past_warmup=False) == []


def test_constant_aligner_is_flagged_as_collapsed(model, batches):
    with torch.no_grad():  # every image -> tanh(4) in every dimension: saturated, identical
        model.model.aligner.proj.weight.zero_()
        model.model.aligner.proj.bias.fill_(4.0)
    res = probe_run(model, batches)
    assert res.spread == pytest.approx(0.0, abs=1e-9) and res.saturated == 1.0
    assert res.blind_gap == pytest.approx(0.0, abs=1e-6)  # the images cannot matter any more
    before = diagnose(res, past_warmup=False)
    assert len(before) == 1 and "same output for every image" in before[0]
    after = diagnose(res, past_warmup=True)
    assert len(after) == 2 and "blind gap 0.0000" in after[1]


def test_training_logs_the_probe_and_warns_on_collapse(tiny_dir, tmp_path, capsys):
    """vist2 train --stage ocr on a model whose aligner is constant: the summary and the CLI say so."""
    from safetensors.torch import load_file, save_file

    collapsed = tmp_path / "collapsed"
    assert main(["init", "--preset", "tiny", "--out", str(collapsed)]) == 0
    w = load_file(str(collapsed / "model.safetensors"))
    w["model.aligner.proj.weight"].zero_()
    w["model.aligner.proj.bias"].fill_(4.0)
    save_file(w, str(collapsed / "model.safetensors"), metadata={"format": "pt"})
    text = tmp_path / "t.txt"
    text.write_text(sample_text("en"), encoding="utf-8")
    capsys.readouterr()
    assert main(["train", "--stage", "ocr", "--model", str(collapsed), "--data", str(text), "--eval-data", str(text),
                 "--out", str(tmp_path / "ocr"), "--max-steps", "1", "--max-length", "640", "--num-workers", "0",
                 "--eval-every", "1", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "COLLAPSED" in err and "same output for every image" in err
    assert (out + err).count("THE VISUAL PATH HAS COLLAPSED") == 1  # the eval's warning, once (then the summary)
    probe = json.loads((tmp_path / "ocr" / "train_summary.json").read_text())["probe"]
    assert probe["collapsed"] and probe["step"] == 1 and probe["saturated"] == 1.0 and probe["images"] >= 2
    events = list((tmp_path / "ocr" / "train").rglob("events.out.tfevents*"))
    if events:  # TensorBoard installed: the probe scalars are logged beside the loss
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(events[0].parent))
        acc.Reload()
        assert {"probe/blind_gap", "probe/spread", "probe/saturated"} <= set(acc.Tags()["scalars"])
