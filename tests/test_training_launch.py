"""Multi-process launches: ranks share samples (not records), and a launch whose processes are not
one job is refused before it writes anything."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import free_port

from vist2.training.config import stage_preset
from vist2.training.data import open_source
from vist2.training.launch import check_one_job, launcher_world
from vist2.training.pipeline import StageDataset, _RankRows
from vist2.training.stages import Item, StageBuilder, pack

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = (ROOT / "src/vist2/data/sample_en.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def proc(tiny_dir):
    from vist2.processing import VIST2Processor

    return VIST2Processor.from_pretrained(tiny_dir)


def _stream(proc, path, stage="olm", rank=0, world=1, cfg_kw=None, **kw):
    cfg = stage_preset(stage, seed=0, **{"max_length": 128, "batch_size": 2, "shuffle_buffer": 4, **(cfg_kw or {})})
    builder = StageBuilder(cfg, proc.tokenizer, 64, 16, "visual", processor=proc)
    return StageDataset(open_source(path), builder, proc, cfg, rank=rank, world=world, **kw)


def _samples(ds, n_batches=None):
    """The samples of ``ds``'s batches in order (one epoch, or ``n_batches`` batches), as token tuples."""
    batches = ds.layouts(one_epoch=n_batches is None)
    out = []
    for (_, rows, _), _ in zip(batches, range(n_batches or 10**9)):
        out += [tuple(it.sample.input_ids) for row in rows for it in row]
    return out


def _novel(tmp_path, chars=12_000):
    path = tmp_path / "novel.txt"
    path.write_text((SAMPLE * (chars // len(SAMPLE) + 1))[:chars], encoding="utf-8")
    return path


# -- sharding ----------------------------------------------------------------------------------------


def test_one_long_record_gives_every_rank_its_share_of_the_samples(proc, tmp_path):
    """A single document: rank r of N takes samples r, r + N, ... of the one-process epoch, so every
    rank has some and together they hold each sample once, in a fixed order."""
    novel = _novel(tmp_path)
    one = _samples(_stream(proc, novel))
    assert len(one) >= 6 and len(set(one)) == len(one)  # distinct windows, so "once" is checkable
    for world in (2, 3):
        shares = [_samples(_stream(proc, novel, rank=r, world=world)) for r in range(world)]
        assert all(shares)
        assert shares == [one[r::world] for r in range(world)]
        assert shares == [_samples(_stream(proc, novel, rank=r, world=world)) for r in range(world)]  # deterministic


def test_ranks_share_the_shuffled_records_and_the_held_out_split(proc, tmp_path):
    """Several records (shuffled, some skipped) and the eval split: the ranks' samples of an epoch are
    the one-process epoch's, each once; the skips are counted once (by rank 0)."""
    path = tmp_path / "docs.jsonl"
    rng = random.Random(0)
    rows = [{"text": SAMPLE[i * 200:i * 200 + 100 + rng.randrange(900)]} for i in range(15)] + [{"text": " "}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for split in ("train", "eval"):
        one = _samples(_stream(proc, path, split=split, holdout=4))
        shares = [_samples(_stream(proc, path, split=split, holdout=4, rank=r, world=2)) for r in range(2)]
        assert shares == [one[0::2], one[1::2]] and all(shares), split
    skipped = [sum((sum(d.values()) for _, _, d in _stream(proc, path, rank=r, world=2).layouts(one_epoch=True)), 0)
               for r in range(2)]
    assert skipped == [1, 0]  # the blank record, counted by rank 0 only (the trainer sums the ranks)


def test_every_rank_lays_records_out_at_the_same_curriculum_progress(proc, tmp_path):
    """OCR's images per sample follow the run's progress; every rank uses rank 0's batch count for it,
    so the ranks agree on each record's samples and their shares never overlap."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": SAMPLE[i * 450:(i + 1) * 450]}) + "\n" for i in range(12)),
                    encoding="utf-8")
    cfg_kw = dict(max_length=640, batch_size=1, curriculum=[{"until": 0.2, "min_images": 1, "max_images": 1},
                                                            {"until": 1.0, "min_images": 2, "max_images": 8}])
    seen, shares = [], []
    for r in range(2):
        ds = _stream(proc, path, stage="ocr", rank=r, world=2, cfg_kw=cfg_kw, total_steps=4)
        progress, items = [], ds.builder.items

        def record(rec, rng, p, items=items, progress=progress):
            progress.append(p)
            return items(rec, rng, p)

        ds.builder.items = record
        shares.append(_samples(ds))  # one epoch
        seen.append(progress)
    assert seen[0] == seen[1] and seen[0][0] == 0.0 and max(seen[0]) >= 0.25, seen  # both phases, on both ranks
    assert all(shares) and not set(shares[0]) & set(shares[1])


def test_rows_fed_one_at_a_time_are_packs_rows(proc):
    """The ranks' push-style packer is stages.pack turned around: the same rows, batched."""
    from vist2.layout import Raw, build_sample

    rng = random.Random(1)
    items = [Item(build_sample([Raw(tuple(range(rng.randint(2, 60))), loss=True)])) for _ in range(50)]
    for packed in (True, False):
        cfg = stage_preset("olm", max_length=128, batch_size=3, pack=packed)
        rows = _RankRows(cfg)
        batches = [b for it in items if (b := rows.push(it)) is not None] + rows.end_epoch()
        want = list(pack(items, 128, packed))
        assert [r for b in batches for r in b] == want and rows.batch_index == len(batches) == -(-len(want) // 3)
        assert all(len(b) == 3 for b in batches[:-1])


def test_fewer_samples_than_ranks_stop_every_rank_with_the_same_error(proc, tmp_path):
    """One sample, two ranks: both raise the same one-line error before either yields a batch (a rank
    that trained on would wait for the other in its first gradient sync)."""
    short = tmp_path / "short.txt"
    short.write_text("A short note.", encoding="utf-8")
    assert len(_samples(_stream(proc, short))) == 1
    errors = []
    for r in range(2):
        ds = _stream(proc, short, rank=r, world=2)
        got = []
        with pytest.raises(ValueError) as e:
            for b in ds.layouts():
                got.append(b)
        assert got == []
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "\n" not in errors[0]
    assert "1 training sample for stage 'olm', fewer than the 2 processes" in errors[0]
    assert "launch fewer processes" in errors[0]
    # the trainer asks before its first step, so that the ranks stop together
    assert [_stream(proc, short, rank=r, world=2).shortfall() for r in range(2)] == errors
    assert _stream(proc, short).shortfall() is None
    held = _stream(proc, short, holdout=100)  # a short text is held out whole: nothing left to train on
    with pytest.raises(ValueError) as e:
        next(held.layouts())
    assert held.shortfall() == str(e.value) and "no usable training samples" in str(e.value)


# -- refusing a launch that is not one job -------------------------------------------------------------


def test_launcher_world_reads_what_launchers_set():
    assert launcher_world({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}) == (4, "WORLD_SIZE")
    assert launcher_world({"LOCAL_WORLD_SIZE": "2"}) == (2, "LOCAL_WORLD_SIZE")
    assert launcher_world({"OMPI_COMM_WORLD_SIZE": "3"}) == (3, "OMPI_COMM_WORLD_SIZE")
    assert launcher_world({"WORLD_SIZE": "1"}) == launcher_world({}) == launcher_world({"WORLD_SIZE": "x"}) == (1, None)


def test_processes_that_are_not_one_job_are_refused():
    from accelerate.utils import DistributedType

    alone = SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO)
    with pytest.raises(ValueError) as e:
        check_one_job(alone, "runs/x", {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
    msg = str(e.value)
    assert "\n" not in msg and "started 2 processes (WORLD_SIZE=2)" in msg and "distributed type NO" in msg
    assert "ACCELERATE_USE_CPU=1" in msg and "--num_processes 1" in msg and "--out runs/x" in msg
    check_one_job(alone, "runs/x", {})  # a plain `vist2 train`
    check_one_job(SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU), "runs/x",
                  {"WORLD_SIZE": "2"})  # one job of two processes


def _env(**extra):
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", **extra)


def test_trainer_refuses_before_writing_the_output_folder(tiny_dir, tmp_path, monkeypatch, capsys):
    """A launcher says two processes (WORLD_SIZE) and accelerate sees one: `vist2 train` stops with the
    one-line error (exit 2) and --out is never created. (No LOCAL_RANK, so torch does not wait for a
    second process; the real torchrun path is the slow test below.)"""
    from vist2.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    out = tmp_path / "out"
    code = main(["train", "--stage", "olm", "--model", str(tiny_dir), "--data", str(_novel(tmp_path)),
                 "--out", str(out), "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("vist2: error: the launcher started 2 processes (WORLD_SIZE=2)"), err
    assert not out.exists()


# -- real launches (two CPU processes) ------------------------------------------------------------------


def _same_error_from_each(errors: list[str]) -> bool:
    """Both processes printed the same error line; torchrun ends the other process as soon as one
    exits, so on a loaded machine the second line may be cut off (never a different one)."""
    return len(errors) in (1, 2) and len(set(errors)) == 1


def _launch(config, tiny_dir, data, out, *args, **env):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), "--config_file",
           str(config), "-m", "vist2.training",
           "train", "--stage", "olm", "--model", str(tiny_dir), "--data", str(data), "--out", str(out),
           "--max-length", "128", "--num-workers", "0", "--no-progress", *args]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_fsdp_config_with_use_cpu_true_is_refused(tiny_dir, tmp_path):
    """issue 32 (7): `accelerate config` on a CPU-only machine writes use_cpu: true; with an FSDP config
    `accelerate launch` then starts two processes that accelerate does not join. Both stop at once with
    the error (the launch exits 1) and nothing is written."""
    cfg = tmp_path / "fsdp-use-cpu.yaml"
    text = (ROOT / "configs/accelerate/fsdp-cpu-2proc.yaml").read_text(encoding="utf-8")
    assert "\nuse_cpu: false\n" in text
    cfg.write_text(text.replace("\nuse_cpu: false\n", "\nuse_cpu: true\n"), encoding="utf-8")
    out = tmp_path / "out"
    p = _launch(cfg, tiny_dir, _novel(tmp_path), out, "--max-steps", "1", CUDA_VISIBLE_DEVICES="")
    assert p.returncode == 1, p.stderr[-3000:]
    errors = [x for x in p.stderr.splitlines() if x.startswith("vist2: error:")]
    assert _same_error_from_each(errors) and "ACCELERATE_USE_CPU=1" in errors[0], p.stderr[-3000:]
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_with_one_sample_stop_with_the_same_error(tiny_dir, tmp_path):
    """The documented launch (configs/accelerate/fsdp-cpu-2proc.yaml, ACCELERATE_USE_CPU=1) on a text
    that makes one sample: both processes stop with the same one-line error and no gloo traceback.
    (The same launch training on a single 60,000-character .txt: tests/test_training_run.py,
    test_fsdp_config_on_two_cpu_processes_with_accelerate_launch.)"""
    short = tmp_path / "short.txt"
    short.write_text("A short note, one sample long. " * 4, encoding="utf-8")
    p = _launch(ROOT / "configs/accelerate/fsdp-cpu-2proc.yaml", tiny_dir, short, tmp_path / "out",
                "--max-steps", "2", "--eval-data", str(short), ACCELERATE_USE_CPU="1")
    assert p.returncode == 1
    errors = [x for x in p.stderr.splitlines() if x.startswith("vist2: error:")]
    assert _same_error_from_each(errors), p.stderr[-3000:]
    assert "1 training sample for stage 'olm', fewer than the 2 processes" in errors[0], errors[0]
    assert "gloo" not in p.stderr.lower() and "Connection closed" not in p.stderr, p.stderr[-3000:]
