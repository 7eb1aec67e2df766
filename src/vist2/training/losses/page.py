"""Auxiliary page loss: every visual token must redraw the patch of page it was read from.

Trained from scratch, the LLM learns the text's statistics faster than the vision tower learns
to read, every image becomes the same vector and the visual path collapses (see
:mod:`vist2.training.probe`). The next-token loss reaches the vision tower only through the
LLM, so it cannot prevent that. This loss gives the tower a signal of its own, local to each
visual token: a linear head maps each aligner output back to the pixels of its image region
(the ``merge x merge`` block of ``patch x patch`` patches it was merged from), and the mean
squared error, divided by the variance of those pixels (1.0 = predicting the mean page), is
added to the stage loss with weight ``aux_page_weight`` while training progress is below
``aux_page_until``. Tokens that must redraw their region cannot all be the same vector, nor sit
in the saturated tails of tanh.

The head is not part of the model: it lives here, with its own AdamW at the stage's learning
rate (constant), and is dropped when training ends; it is not in the checkpoints either, so after
``--resume`` it starts afresh (a linear head relearns in a few dozen steps). In the nano runs
(bench/notes/nano.md) it kept the visual path alive where the same run without it collapsed.

    >>> aux = PageLoss.build(cfg, model)              # None when aux_page_weight is 0  # doctest: +SKIP
    >>> out = model(plan=plan, pixel_values=pixels)   # the hook records the aligner outputs  # doctest: +SKIP
    >>> loss = out.loss + aux.loss(pixels, progress)                                 # doctest: +SKIP
    >>> loss.backward(); optimizer.step(); aux.step()                                 # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def page_regions(pixel_values: torch.Tensor, region: int) -> torch.Tensor:
    """``(N, C, H, W)`` pages -> ``(N, (H/region)*(W/region), region*region)`` ink (1 - grey), one row per
    visual token in the model's order (row-major over blocks, as :func:`vist2.modeling.merge_patches`)."""
    N, C, H, W = pixel_values.shape
    if H % region or W % region:
        raise ValueError(f"images {H}x{W} do not split into {region}x{region} regions")
    ink = 1.0 - pixel_values.float().mean(dim=1)  # (N, H, W)
    r = ink.reshape(N, H // region, region, W // region, region).permute(0, 1, 3, 2, 4)
    return r.reshape(N, (H // region) * (W // region), region * region)


class AlignerHead:
    """What an auxiliary loss on the visual tokens shares: a forward hook that records the aligner's
    outputs while training, a linear head of its own (``out_features`` per visual token) with its own
    AdamW (constant ``lr``), a weight, and the share of training ``until`` which it counts."""

    def __init__(self, model, out_features: int, weight: float, until: float, lr: float):
        cfg = model.config
        self.region = cfg.patch_size * cfg.merge  # the page pixels (region x region) of one visual token
        self.weight, self.until = float(weight), float(until)
        device = next(model.parameters()).device
        self.head = nn.Linear(cfg.text_config.hidden_size, out_features).to(device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=0.0)
        self._out: torch.Tensor | None = None
        self._hook = getattr(model, "model", model).aligner.register_forward_hook(self._record)
        self.last: float | None = None  # the last unweighted loss

    def _record(self, module, inputs, output) -> None:
        self._out = output if module.training else None

    def _take(self, progress: float) -> torch.Tensor | None:
        """The aligner outputs of the forward pass just run, or None (none recorded, or past ``until``)."""
        out, self._out = self._out, None
        return None if progress >= self.until else out

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self._hook.remove()


class PageLoss(AlignerHead):
    """The auxiliary page loss of one training run (see the module docstring)."""

    def __init__(self, model, weight: float, until: float, lr: float):
        region = model.config.patch_size * model.config.merge
        super().__init__(model, region**2, weight, until, lr)

    @classmethod
    def build(cls, cfg, model, processor=None) -> "PageLoss | None":
        if not cfg.aux_page_weight:
            return None
        return cls(model, cfg.aux_page_weight, cfg.aux_page_until, cfg.learning_rate)

    def loss(self, pixel_values: torch.Tensor | None, progress: float) -> torch.Tensor | float:
        """Weighted loss for the forward pass just run (0.0 past ``until`` or without images)."""
        out = self._take(progress)
        if pixel_values is None or out is None:
            return 0.0
        target = page_regions(pixel_values.to(out.device), self.region)
        if target.shape[:2] != out.shape[:2]:
            raise ValueError(f"{out.shape[1]} visual tokens per image but {target.shape[1]} page regions")
        pred = self.head(out.float())
        var = target.var().clamp_min(1e-4)
        loss = F.mse_loss(pred, target) / var
        self.last = float(loss.detach())
        return self.weight * loss

    def for_batch(self, batch, progress: float) -> torch.Tensor | float:
        """:meth:`loss` for a training batch."""
        return self.loss(batch.pixel_values, progress)

    def log_values(self) -> dict:
        return {} if self.last is None else {"train/page_loss": self.last}
