"""AdamW with the stage's parameter groups, and the LR schedule (warm-up, then the configured decay).

    opt = make_optimizer(model, cfg)          # only parameters that train
    sched = make_scheduler(opt, cfg, total_steps=2000)
"""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter trains: check train_vision / train_aligner / train_llm")
    # weight decay on matrices only: decaying norms and biases toward 0 fights their role; the vision
    # tower and aligner at learning_rate x vision_lr_scale
    groups = []
    for visual in (False, True):
        lr = cfg.learning_rate * (cfg.vision_lr_scale if visual else 1.0)
        part = [p for n, p in params if _is_visual(n) == visual]
        groups += [{"params": [p for p in part if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr": lr},
                   {"params": [p for p in part if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def _is_visual(name: str) -> bool:
    return name.startswith(("model.vision.", "model.aligner.", "vision.", "aligner."))


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
