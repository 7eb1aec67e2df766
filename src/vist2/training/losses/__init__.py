"""Auxiliary training losses: what a stage may add to the next-token loss, all with one interface.

=====================  =========================================  =====================================
loss (module)          signal                                     switched on by (``TrainConfig``)
=====================  =========================================  =====================================
:class:`PageLoss`      each visual token redraws its page region  ``aux_page_weight``, ``aux_page_until``
(``page``)             (a model trained from scratch)
:class:`CharLoss`      each visual token names the characters     ``aux_char_weight``, ``aux_char_until``
(``char``)             drawn in its region
:class:`TwinLoss`      after a page, every LLM layer's state is   ``twin_weight``, ``twin_until``,
(``twin``)             pulled towards the text twin's             ``twin_span``, ``twin_page_slot``
=====================  =========================================  =====================================

The interface (:class:`AuxLoss`), as the trainer calls it: ``build(cfg, model, processor)`` gives the
loss or None when it is off; ``for_batch(batch, progress)`` the weighted loss of one micro-batch (the
model's forward has already run: the losses read it through hooks), added to the stage's loss before
``backward``; ``step()`` after each optimizer step (a head's own optimizer); ``log_values()`` what to
log; ``close()`` at the end (hooks and heads go: nothing of them stays in the model or its checkpoints).
"""

from __future__ import annotations

from typing import Protocol

import torch

from .char import CharLoss
from .page import PageLoss
from .twin import TwinLoss

__all__ = ["AuxLoss", "CharLoss", "PageLoss", "TwinLoss", "build_aux_losses"]


class AuxLoss(Protocol):
    def for_batch(self, batch, progress: float) -> torch.Tensor | float: ...

    def step(self) -> None: ...

    def log_values(self) -> dict: ...

    def close(self) -> None: ...


def build_aux_losses(cfg, model, processor) -> list[AuxLoss]:
    """The auxiliary losses ``cfg`` switches on, hooked into ``model``, in a fixed order."""
    built = (PageLoss.build(cfg, model, processor), CharLoss.build(cfg, model, processor),
             TwinLoss.build(cfg, model, processor))
    return [a for a in built if a is not None]
