"""The text-twin loss's value on a case worked out by hand (pins its normalisation)."""

import pytest
import torch

from vist2.chunking import fixed_chunker
from vist2.layout import build_sample, collate, olm_segments
from vist2.training.losses.twin import TwinLoss, twin_pairs


class _Layer(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, h):
        return h * self.scale


class _Core(torch.nn.Module):
    """A stand-in LLM core: each slot's hidden state is its input id (visual slots: -1), then two layers
    that scale it by 1 and by 2. Its layers' outputs are what the loss hooks record."""

    def __init__(self):
        super().__init__()
        self.language_model = torch.nn.Module()
        self.language_model.layers = torch.nn.ModuleList([_Layer(1.0), _Layer(2.0)])

    def forward(self, plan):
        h = plan.input_ids.float()[..., None]  # (B, T, 1)
        for layer in self.language_model.layers:
            h = layer(h)
        return h


def test_twin_loss_value_on_a_hand_worked_case():
    # [c1 = 10..13, v1, v1, c2 = 14..17, v2, v2, 18, 19]: with span 2, the student's slots 5, 6, 11, 12
    # (ids -1, 14, -1, 18) predict the tokens the twin [10..19] predicts at slots 3, 4, 7, 8 (ids 13, 14, 17, 18)
    plan = collate([build_sample(olm_segments(list(range(10, 20)), 4, 2, chunker=fixed_chunker(4)))])
    _, student, teacher = twin_pairs(plan, span=2)
    assert student[:, 1].tolist() == [5, 6, 11, 12] and teacher[:, 1].tolist() == [3, 4, 7, 8]

    core = _Core().train()
    aux = TwinLoss(core, weight=0.5, until=1.0, span=2, page_slot=True)
    try:
        core(plan)  # the student's forward: the hooks record both layers' outputs
        loss = aux.loss(plan, progress=0.0)
    finally:
        aux.close()
    # layer 1: squared errors (-1-13)^2, 0, (-1-17)^2, 0 -> mean 130; the teacher's values 13, 14, 17, 18
    # have (unbiased) variance 17/3, so the layer's term is 130 / (17/3) = 390/17. Layer 2 doubles both
    # sides: 4 x 130 / (4 x 17/3), the same term. Their mean is 390/17; the weight 0.5 halves it.
    assert float(loss) == pytest.approx(0.5 * 390 / 17, rel=1e-6)
    assert aux.last == pytest.approx(390 / 17, rel=1e-6)


def test_twin_loss_is_zero_past_until_and_without_pages():
    core = _Core().train()
    aux = TwinLoss(core, weight=1.0, until=0.5, span=2, page_slot=True)
    try:
        plan = collate([build_sample(olm_segments(list(range(10, 20)), 4, 2, chunker=fixed_chunker(4)))])
        core(plan)
        assert aux.loss(plan, progress=0.5) == 0.0  # past `until`
        text_only = collate([build_sample(olm_segments(list(range(10, 13)), 4, 2, chunker=fixed_chunker(4)))])
        core(text_only)
        assert aux.loss(text_only, progress=0.0) == 0.0  # no page: nothing to pull towards
    finally:
        aux.close()
