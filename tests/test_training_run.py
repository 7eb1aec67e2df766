"""Training runs on the tiny model (CPU): every stage, what trains, loss falls, exact resume, 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port
import torch
from safetensors.torch import load_file

from vist2.training.config import stage_preset
from vist2.training.prepare import prepare
from vist2.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"vision": "model.vision.", "aligner": "model.aligner.", "llm": "model.language_model."}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The demo sets of ``vist2 data prepare``, cut small."""
    out = tmp_path_factory.mktemp("data")
    prepare(out, max_docs=1, images=8, chats=12, seed=0)
    return out


def run(model_dir, stage, data_path, out, steps=2, **kw):
    kw.setdefault("max_length", 128)  # the 151k-word LM head dominates CPU time; keep rows short
    kw.setdefault("num_workers", 0)
    kw.setdefault("eval_holdout", 0)
    cfg = stage_preset(stage, max_steps=steps, log_every=1, **kw)
    return Trainer(cfg, model_dir, data_path, out, progress=False).train()


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def changed(before, after, prefix):
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


def test_prepare_uses_only_public_domain_sources(data):
    manifest = json.loads((data / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["files"]) == {"text_en.jsonl", "text_zh.jsonl", "caption.jsonl", "sft.jsonl"}
    text = json.dumps(manifest, ensure_ascii=False)
    assert "fangfang" not in text and "340-脂砚斋重批红楼梦.txt" in text
    first = json.loads((data / "text_zh.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first["text"].startswith("第一回")
    en = [json.loads(x) for x in (data / "text_en.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["source"] for r in en] == ["kjv", "web"] and en[0]["text"].startswith("Genesis\n\nIn the beginning")
    chat = json.loads((data / "sft.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert chat["messages"][-1]["role"] == "assistant" and "<think>" in chat["messages"][-1]["content"]
    # deterministic for a seed
    again = data.parent / "again"
    prepare(again, corpora=["shapes", "chat"], images=8, chats=12, seed=0)
    assert (again / "sft.jsonl").read_bytes() == (data / "sft.jsonl").read_bytes()
    assert (again / "images" / "shape_00003.png").read_bytes() == (data / "images" / "shape_00003.png").read_bytes()


STAGE_DATA = {"caption": "caption.jsonl", "ocr": "text_en.jsonl", "olm": "text_zh.jsonl", "sft": "sft.jsonl"}
TRAINS = {"caption": {"aligner"}, "ocr": {"vision", "aligner"}, "olm": {"llm", "aligner"},
          "sft": {"vision", "aligner", "llm"}}


@pytest.mark.parametrize("stage", ["caption", "ocr", "olm", "sft"])
def test_stage_runs_and_trains_only_its_parts(stage, tiny_dir, data, tmp_path):
    kw = {}
    if stage == "ocr":  # one image per sample fits the short rows
        kw = dict(curriculum=[{"until": 1.0, "min_images": 1, "max_images": 1}])
    if stage == "sft":  # also: periodic eval, checkpoint pruning, TensorBoard, and the output loads for generation
        kw = dict(max_length=256, eval_holdout=3, eval_every=1, eval_batches=1, save_every=1, keep_checkpoints=1)
    out = tmp_path / stage
    res = run(tiny_dir, stage, data / STAGE_DATA[stage], out, steps=2, **kw)
    assert res.steps == 2 and res.last_loss is not None and res.last_loss == res.last_loss
    before, after = weights(tiny_dir), weights(out)
    assert set(before) == set(after)
    for part, prefix in PARTS.items():
        assert changed(before, after, prefix) == (part in TRAINS[stage]), (stage, part)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["stage"] == stage
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert (out / "processor_config.json").read_text() == (tiny_dir / "processor_config.json").read_text()
    if stage != "sft":
        return
    from vist2.engine import Engine, SamplingParams

    assert res.eval_loss is not None and res.eval_loss > 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]  # pruned to keep_checkpoints
    assert list((out / "train").rglob("events.out.tfevents*")), "TensorBoard log"
    engine = Engine.from_pretrained(str(out))
    result = engine.generate_text(["In the beginning"], SamplingParams(max_new_tokens=5))[0]
    assert result.stats.generated_tokens == 5


def test_loss_falls_on_a_fixed_batch(tiny_dir, data):
    """20 steps on one OLM batch (interleaved chunks and the sparse mask) drive the loss well down."""
    from vist2.modeling import VIST2ForCausalLM
    from vist2.processing import VIST2Processor
    from vist2.training.data import open_source
    from vist2.training.pipeline import StageDataset
    from vist2.training.stages import StageBuilder
    from vist2.training.trainer import apply_trainable, make_optimizer, make_scheduler

    torch.manual_seed(0)
    proc = VIST2Processor.from_pretrained(tiny_dir)
    model = VIST2ForCausalLM.from_pretrained(str(tiny_dir))
    cfg = stage_preset("olm", max_length=88, learning_rate=5e-3, warmup_ratio=0.0, lr_scheduler="constant_with_warmup")
    builder = StageBuilder(cfg, proc.tokenizer, 64, 16, "visual", processor=proc)
    ds = StageDataset(open_source(data / "text_en.jsonl"), builder, proc, cfg, split="eval")
    batch = next(iter(ds))
    assert len(batch.plan.chunks) >= 1  # the batch really has a compressed chunk
    apply_trainable(model, cfg)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, 20)
    losses = []
    for _ in range(20):
        loss = model(plan=batch.plan, pixel_values=batch.pixel_values).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.4 * losses[0], losses[::4]  # 11.9 -> about 2.9 on the reference machine


def test_resume_ends_with_the_same_weights(tiny_dir, data, tmp_path):
    """A run stopped by a callback after step 3 (checkpoints every 2 steps) saves step 3, exports
    nothing, and resumes to the weights of the run that went straight through."""
    kw = dict(save_every=2, shuffle_buffer=8, learning_rate=1e-3)
    run(tiny_dir, "olm", data / "text_en.jsonl", tmp_path / "straight", steps=4, **kw)
    cfg = stage_preset("olm", max_steps=4, log_every=1, max_length=128, num_workers=0, eval_holdout=0, **kw)
    seen = []

    def stop_at_3(step, logged):
        seen.append((step, sorted(logged)))
        return step == 3

    first = Trainer(cfg, tiny_dir, data / "text_en.jsonl", tmp_path / "resumed", progress=False,
                    callbacks=[stop_at_3]).train()
    assert first.stopped_early and first.steps == 3
    assert [s for s, _ in seen] == [1, 2, 3] and "train/loss" in seen[0][1]
    assert [p.name for p in sorted((tmp_path / "resumed" / "checkpoints").iterdir())] == [
        "step-00000002", "step-00000003"]  # step 3 saved on the stop, off the save_every grid
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="--resume"):
        Trainer(cfg, tiny_dir, data / "text_en.jsonl", tmp_path / "resumed", progress=False).train()
    # the resumed part renders with two DataLoader workers: the batches must still be the same
    second = Trainer(cfg.replace(num_workers=2), tiny_dir, data / "text_en.jsonl", tmp_path / "resumed",
                     resume=True, progress=False).train()
    assert second.steps == 4 and not second.stopped_early
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(a["model.aligner.proj.weight"], weights(tiny_dir)["model.aligner.proj.weight"])


def test_lora_trains_adapters_and_saves_merged(tiny_dir, data, tmp_path):
    pytest.importorskip("peft")
    res = run(tiny_dir, "olm", data / "text_en.jsonl", tmp_path / "lora", steps=2, learning_rate=1e-2,
              lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0})
    assert res.steps == 2
    before, after = weights(tiny_dir), weights(tmp_path / "lora")
    assert set(before) == set(after)  # merged: a plain checkpoint, no adapter keys
    assert changed(before, after, "model.language_model.layers.0.self_attn.q_proj")
    assert not changed(before, after, "model.language_model.embed_tokens")  # not a LoRA target
    assert not changed(before, after, "model.vision.")


def test_cli_errors_are_clear(tiny_dir, tmp_path, capsys):
    from vist2.training.cli import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"nope": 1}\n')
    assert main(["train", "--stage", "olm", "--model", str(tiny_dir), "--data", str(empty),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no usable record for stage 'olm'" in err and "empty_text=1" in err
    assert main(["train", "--stage", "olm", "--model", str(tmp_path), "--data", str(empty),
                 "--out", str(tmp_path / "o")]) == 2
    assert "not a VIST2 checkpoint folder" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_cpu_run_with_accelerate_launch(tiny_dir, data, tmp_path):
    cfg = tmp_path / "olm.yaml"
    cfg.write_text("stage: olm\neval_holdout: 4\neval_every: 2\neval_batches: 1\n")
    docs = [json.loads(x) for x in (data / "text_en.jsonl").read_text(encoding="utf-8").splitlines()]
    corpus = tmp_path / "corpus.jsonl"  # several documents, so both ranks and the eval split get some
    corpus.write_text("".join(json.dumps({"text": d["text"][i * 3000:(i + 1) * 3000]}) + "\n"
                              for d in docs for i in range(4)), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), "--config_file",
           str(ROOT / "configs/accelerate/cpu-2proc.yaml"), "-m", "vist2.training", "train", "--stage", "olm",
           "--model", str(tiny_dir), "--data", str(corpus), "--out", str(tmp_path / "ddp"),
           "--max-steps", "2", "--max-length", "128", "--num-workers", "0", "--no-progress", "--save-every", "1",
           "--config", str(cfg)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval_loss"] is not None
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert changed(weights(tiny_dir), weights(tmp_path / "ddp"), "model.language_model.")


def test_one_text_file_trains_with_a_held_out_slice(tiny_dir, tmp_path, capfd):
    """`vist2 train --stage ocr --data novel.txt` with the default eval_holdout (100): the single document
    used to be the held-out record, leaving nothing to train on. Now its last 1% is the eval split, and
    every saved step is a model folder the engine loads; --no-progress prints the loss."""
    import logging

    from vist2.engine import Engine, SamplingParams
    from vist2.training.pipeline import holdout_cut

    sample = (ROOT / "src/vist2/data/sample_en.txt").read_text(encoding="utf-8")
    novel = tmp_path / "novel.txt"
    novel.write_text((sample + "\n") * 6, encoding="utf-8")  # ~35k characters: one record
    text = novel.read_text(encoding="utf-8")
    cut = holdout_cut(text, 100)
    assert len(text) - 400 < cut < len(text) - 300 and text[cut - 1].isspace()

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    h = Collect()
    logging.getLogger().addHandler(h)
    try:
        res = run(tiny_dir, "ocr", novel, tmp_path / "out", steps=2, eval_holdout=100, eval_every=2,
                  eval_batches=1, save_every=1, max_length=192,
                  curriculum=[{"until": 1.0, "min_images": 1, "max_images": 2}])
    finally:
        logging.getLogger().removeHandler(h)
    assert res.steps == 2 and res.eval_loss is not None and res.eval_loss > 0
    printed = capfd.readouterr().out
    assert "ocr step 1/2: loss " in printed and f"step 2: eval loss {res.eval_loss:.4f}" in printed
    assert not [m for m in h.messages if "Removed shared tensor" in m], h.messages
    step1 = tmp_path / "out" / "checkpoints" / "step-00000001"
    assert (step1 / "config.json").is_file() and (step1 / "tokenizer.json").is_file()
    assert (step1 / "processor_config.json").read_text() == (tiny_dir / "processor_config.json").read_text()
    engine = Engine.from_pretrained(step1)  # an intermediate step loads like the final model
    assert engine.generate_text(["The"], SamplingParams(max_new_tokens=3))[0].stats.generated_tokens == 3
    final = tmp_path / "out" / "checkpoints" / "step-00000002"
    for k, v in weights(tmp_path / "out").items():  # the last step's model is the exported one
        assert torch.equal(v, weights(final)[k]), k


def test_intermediate_checkpoint_is_loadable_by_the_cli(tiny_dir, data, tmp_path, capsys):
    from vist2.cli import main

    run(tiny_dir, "olm", data / "text_en.jsonl", tmp_path / "o", steps=2, save_every=1)
    step1 = tmp_path / "o" / "checkpoints" / "step-00000001"
    assert main(["generate", "--model", str(step1), "--prompt", "In the beginning", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


def test_every_saved_model_folder_records_its_provenance(tiny_dir, data, tmp_path, monkeypatch):
    """PT-1 then PT-2 from its output: the PT-2 folder and its step folder record stage, steps, the
    resolved config, the data's bytes and sha256, the code and library versions, and the parent (its
    weights' sha256 and its own record, chained back to the untrained init, which has none)."""
    import hashlib
    import subprocess

    import transformers

    import vist2
    from vist2.training import provenance

    def sha(path):
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    pt1 = run(tiny_dir, "caption", data / "caption.jsonl", tmp_path / "pt1", steps=1)
    assert pt1.steps == 1
    ocr = dict(curriculum=[{"until": 1.0, "min_images": 1, "max_images": 1}], save_every=1, seed=3)
    run(tmp_path / "pt1", "ocr", data / "text_en.jsonl", tmp_path / "pt2", steps=2, **ocr)
    rec = provenance.read(tmp_path / "pt2")
    cfg = stage_preset("ocr", max_steps=2, log_every=1, max_length=128, num_workers=0, eval_holdout=0, **ocr)
    assert rec["written_by"] == "vist2 trainer" and rec["stage"] == "ocr"
    assert rec["steps"] == rec["total_steps"] == 2 and rec["final"] is True and rec["seed"] == 3
    assert rec["config"] == json.loads(json.dumps(cfg.to_dict()))
    (f,) = rec["data"]["files"]
    assert f == {"path": str((data / "text_en.jsonl").resolve()), "bytes": (data / "text_en.jsonl").stat().st_size,
                 "sha256": sha(data / "text_en.jsonl")}
    assert rec["eval_data"] is None and rec["world_size"] == 1 and rec["device"] == "cpu"
    assert rec["code"]["vist2"] == vist2.__version__
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0 and Path(vist2.__file__).resolve().parents[2] == ROOT:  # tests of this checkout
        assert rec["code"]["git_commit"] == head.stdout.strip() and isinstance(rec["code"]["git_dirty"], bool)
    assert rec["libraries"]["torch"] == torch.__version__
    assert rec["libraries"]["transformers"] == transformers.__version__
    assert rec["started"] <= rec["written"]  # ISO 8601, UTC: strings order as times
    parent = rec["parent"]
    assert parent["path"] == str((tmp_path / "pt1").resolve())
    assert [w["sha256"] for w in parent["weights"]] == [sha(tmp_path / "pt1" / "model.safetensors")]
    assert parent["provenance"] == provenance.read(tmp_path / "pt1")
    assert parent["provenance"]["stage"] == "caption" and parent["provenance"]["steps"] == 1
    grand = parent["provenance"]["parent"]
    assert grand["path"] == str(Path(tiny_dir).resolve()) and grand["provenance"] is None  # `vist2 init`
    step1 = provenance.read(tmp_path / "pt2" / "checkpoints" / "step-00000001")
    assert step1["steps"] == 1 and step1["final"] is False and step1["started"] == rec["started"]
    # no git (or not a checkout): recorded as unknown, never an error
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    assert provenance.code_version() == {"vist2": vist2.__version__, "git_commit": None, "git_dirty": None}


@pytest.mark.slow
def test_fsdp_config_on_two_cpu_processes_with_accelerate_launch(tiny_dir, data, tmp_path):
    """configs/accelerate/fsdp-cpu-2proc.yaml: 2 processes train 3 OLM steps and save; only the main
    process writes model folders, the run's lines are printed once, and the output loads and changed.
    accelerate 1.16 applies FSDP to GPU runs only, so on CPU the run is MULTI_CPU data parallel: the
    trainer warns, and provenance.json says so (this test notices when accelerate starts sharding on CPU).
    The data is one 60,000-character .txt with the default eval hold-out (its last 1 %): the ranks share
    its samples (issue 32: records were shared, so rank 1 had nothing and the launch failed)."""
    from vist2.modeling import VIST2ForCausalLM
    from vist2.training import provenance

    cfg = tmp_path / "olm.yaml"
    cfg.write_text("stage: olm\neval_every: 2\neval_batches: 1\n")
    docs = [json.loads(x)["text"] for x in (data / "text_en.jsonl").read_text(encoding="utf-8").splitlines()]
    corpus = tmp_path / "novel.txt"
    corpus.write_text(("\n".join(docs) * (60_000 // len("\n".join(docs)) + 1))[:60_000], encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), "--config_file",
           str(ROOT / "configs/accelerate/fsdp-cpu-2proc.yaml"), "-m", "vist2.training", "train", "--stage", "olm",
           "--model", str(tiny_dir), "--data", str(corpus), "--out", str(out), "--max-steps", "3",
           "--max-length", "128", "--num-workers", "0", "--no-progress", "--save-every", "2", "--config", str(cfg)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    printed = p.stdout + p.stderr
    for line in ("step 2: eval loss", "step 3: eval loss", "olm: 3 steps, loss", f"wrote {out}",
                 "an FSDP config on cpu: accelerate runs it as MULTI_CPU"):
        assert printed.count(line) == 1, (line, printed[-3000:])
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_loss"] is not None
    step2 = out / "checkpoints" / "step-00000002"
    assert json.loads((step2 / "trainer_state.json").read_text())["world_size"] == 2
    for folder, steps in ((out, 3), (step2, 2)):
        rec = provenance.read(folder)
        assert (rec["steps"], rec["world_size"], rec["distributed"]) == (steps, 2, "MULTI_CPU")
    model = VIST2ForCausalLM.from_pretrained(str(out))  # the gathered weights load as a plain folder
    assert model.config.text_config._attn_implementation == VIST2ForCausalLM.from_pretrained(
        str(tiny_dir)).config.text_config._attn_implementation
    assert changed(weights(tiny_dir), weights(out), "model.language_model.")
    assert not changed(weights(tiny_dir), weights(out), "model.vision.")  # olm leaves the vision tower as it was


def test_an_ocr_prompt_is_saved_with_the_model_and_kept_by_later_stages(tiny_dir, data, tmp_path):
    """TrainConfig.ocr_prompt goes into the saved config.json (eval and the demo transcribe with it); a later
    stage that does not name one keeps the model's, so an SFT of a prompted reader still reads on request."""
    from vist2.config import VIST2Config

    olm = tmp_path / "olm"
    run(tiny_dir, "olm", data / STAGE_DATA["olm"], olm, steps=1, ocr_mix=1.0, ocr_prompt="OCR:")
    assert VIST2Config.from_pretrained(str(olm)).ocr_prompt == "OCR:"
    assert VIST2Config.from_pretrained(str(tiny_dir)).ocr_prompt is None  # a model without one loads as before
    sft = tmp_path / "sft"
    run(olm, "sft", data / STAGE_DATA["sft"], sft, steps=1, max_length=256)
    assert VIST2Config.from_pretrained(str(sft)).ocr_prompt == "OCR:"
    with pytest.raises(ValueError, match="ocr_prompt"):
        VIST2Config(ocr_prompt="")
