"""The chunked linear cross-entropy equals the plain LM head + cross-entropy, and never holds the logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from vist2.layout import IGNORE
from vist2.loss import chunk_rows, linear_cross_entropy

V, D = 211, 24


def _inputs(shape=(3, 17), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, D, generator=g, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, D, generator=g, dtype=dtype) * 0.3).requires_grad_()
    labels = torch.randint(0, V, shape, generator=g)
    labels[..., ::3] = IGNORE  # a third of the positions carry no loss
    labels[0, 1] = V - 1  # the last word of the head
    return hidden, weight, labels


def _plain(hidden, weight, labels):
    """The path this replaces: every position through the head, then cross-entropy over the targets."""
    logits = F.linear(hidden, weight)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float() if logits.dtype != torch.float64 else logits.flatten(0, 1),
                           labels.flatten(), ignore_index=IGNORE, reduction="sum")


def _grads(fn, hidden, weight, labels, scale=1.7):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, labels)
    (scale * loss).backward()  # a non-unit upstream gradient, as the mean and accumulation give
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("rows", [1, 5, 16, 10_000])  # uneven last chunk, one chunk for everything
def test_equals_the_plain_path_loss_and_gradients_fp64(rows):
    h, w, y = _inputs()
    ref = _grads(_plain, h, w, y)
    got = _grads(lambda *a: linear_cross_entropy(*a, rows=rows), h, w, y)
    assert ref[0] > 0
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    assert h.grad[y == IGNORE].abs().max() == 0  # positions without a label get no gradient


def test_equals_the_plain_path_in_fp32():
    h, w, y = _inputs(dtype=torch.float32, seed=1)
    ref = _grads(_plain, h, w, y)
    got = _grads(lambda *a: linear_cross_entropy(*a, rows=7), h, w, y)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_the_plain_path_and_keeps_fp32_master_gradients():
    h, w, y = _inputs(dtype=torch.float32, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _grads(_plain, h, w, y)
        got = _grads(lambda *a: linear_cross_entropy(*a, rows=8), h, w, y)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    for r, g in zip(ref, got):  # bf16 matmuls round differently per chunk; both are ~0.3 % off the fp64 truth
        assert float((g - r).norm() / r.norm()) < 1e-2


def test_frozen_head_gets_no_gradient_and_no_targets_gives_zero():
    h, w, y = _inputs()
    w.requires_grad_(False)
    loss = linear_cross_entropy(h, w, y, rows=4)
    loss.backward()
    assert w.grad is None and h.grad.abs().sum() > 0
    empty = torch.full_like(y, IGNORE)
    h.grad = None
    zero = linear_cross_entropy(h, w, empty)
    zero.backward()
    assert float(zero) == 0.0 and h.grad.abs().max() == 0


def test_under_no_grad_it_builds_no_graph():
    h, w, y = _inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y, rows=4)
    assert not loss.requires_grad
    assert float(loss) == pytest.approx(float(_plain(h, w, y)), rel=1e-12)


class _Largest(TorchDispatchMode):
    """The element count of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_larger_than_one_chunk_of_logits_or_the_head():
    """The memory bound itself: the plain path makes (targets, V) logits; this path at most one chunk
    of them (forward and backward), or a tensor the size of the head or of the hidden states (their gradients)."""
    h, w, y = _inputs(shape=(4, 64), dtype=torch.float32)
    n_targets = int((y != IGNORE).sum())
    rows = 8
    with _Largest() as seen:
        linear_cross_entropy(h, w, y, rows=rows).backward()
    assert seen.largest <= max(rows * V, V * D, h.numel()) < n_targets * V
    with _Largest() as plain:
        _plain(h, w, y).backward()
    assert plain.largest >= n_targets * V  # the control: the plain path does hold them


def test_chunk_rows_and_user_errors():
    assert chunk_rows(151_936) == 220 and chunk_rows(151_936, chunk_bytes=1) == 1
    h, w, y = _inputs()
    with pytest.raises(ValueError, match="backend"):
        linear_cross_entropy(h, w, y, backend="triton")
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(h, w, y[:, :-1])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="liger"):
            linear_cross_entropy(h, w, y, backend="liger")


@pytest.mark.gpu
def test_liger_on_cuda_equals_the_torch_path():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("liger_kernel")
    h, w, y = (t.detach().cuda().float().requires_grad_(t.requires_grad) if t.is_floating_point() else t.cuda()
               for t in _inputs(shape=(4, 300), seed=3))
    ref = _grads(lambda *a: linear_cross_entropy(*a, backend="torch"), h, w, y)
    got = _grads(lambda *a: linear_cross_entropy(*a, backend="liger"), h, w, y)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
