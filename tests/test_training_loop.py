"""The training loop reproduces itself: a fixed-seed tiny run gives the same numbers, step by step.

The numbers below were recorded before the loop was split into step / logging / evaluation /
checkpoint parts; any change to the loop's behaviour (accumulation, the LR schedule, when it
evaluates or saves, what it averages) moves them.
"""

from pathlib import Path

import pytest

from vist2.training.config import stage_preset
from vist2.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

# (step, train/loss, train/lr) for each optimizer step, then (step, eval/loss)
TRAIN = [(1, 11.940818786621094, 1e-3), (2, 11.943859100341797, 7.5e-4), (3, 11.831756591796875, 2.5e-4),
         (4, 11.790262222290039, 0.0)]
EVAL = [(2, 11.900150299072266), (4, 11.860838890075684)]
BLIND_GAP = -0.00048160552978515625  # probe/blind_gap at the last eval
TOKENS = 1024  # real (non-pad) slots over the 4 steps x 2 micro-batches


def test_fixed_seed_run_gives_the_recorded_losses(tiny_dir, tmp_path, capsys):
    novel = tmp_path / "novel.txt"
    novel.write_text((ROOT / "src/vist2/data/sample_en.txt").read_text(encoding="utf-8") * 6, encoding="utf-8")
    cfg = stage_preset("olm", max_steps=4, grad_accum=2, log_every=1, eval_every=2, eval_batches=1,
                       eval_holdout=100, save_every=2, keep_checkpoints=5, max_length=128, num_workers=0,
                       learning_rate=1e-3, seed=7)
    logged = []  # (step, the scalars logged at that step), through the trainer's callbacks
    res = Trainer(cfg, tiny_dir, novel, tmp_path / "out", progress=False,
                  callbacks=[lambda step, values: logged.append((step, values))]).train()
    assert [s for s, _ in logged] == [1, 2, 3, 4]  # every optimizer step, the last included
    train = [(s, v["train/loss"], v["train/lr"]) for s, v in logged if "train/loss" in v]
    evals = [(s, v["eval/loss"]) for s, v in logged if "eval/loss" in v]
    gaps = [v["probe/blind_gap"] for s, v in logged if "probe/blind_gap" in v]
    assert [s for s, *_ in train] == [1, 2, 3, 4]
    assert train == [(s, pytest.approx(loss, rel=1e-5), pytest.approx(lr, rel=1e-9)) for s, loss, lr in TRAIN]
    assert evals == [(s, pytest.approx(loss, rel=1e-5)) for s, loss in EVAL]
    assert gaps[-1] == pytest.approx(BLIND_GAP, abs=1e-6)
    assert res.tokens == TOKENS and res.steps == 4
    assert res.last_loss == pytest.approx(TRAIN[-1][1], rel=1e-5) and res.eval_loss == pytest.approx(EVAL[-1][1])
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
