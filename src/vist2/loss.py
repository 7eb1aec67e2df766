"""The LM loss without the logits: a linear cross-entropy computed in chunks of target positions.

The LM head of a Qwen3 backbone has 151,936 words. Over the ~6,500 targets of one 8k-slot
training row its fp32 logits are 4 GB, and autograd keeps them and their gradient: that term,
not the model, is what a training step's memory was made of (16.6 GB for the tiny preset on
CPU, bench/notes/train.md). :func:`linear_cross_entropy` never holds more than one chunk of
logits: the forward pass computes each chunk's logits, its loss and at once its gradients with
respect to the hidden states and the head weight (softmax minus one-hot, two matmuls), then drops
the chunk; the backward pass only scales the stored gradients by the incoming one. The same
matmuls as the plain path, one chunk of ``rows x vocab`` logits at a time.

On CUDA, Liger-Kernel's fused linear cross-entropy (a Triton kernel doing the same thing) is used
when it is installed (``pip install liger-kernel``; optional). The torch path here is the fallback
everywhere else and the reference its tests compare against.

    >>> h, w = torch.randn(5, 8), torch.randn(11, 8)
    >>> y = torch.tensor([1, -100, 3, 10, 0])
    >>> plain = F.cross_entropy(h @ w.T, y, reduction="sum")
    >>> torch.allclose(linear_cross_entropy(h, w, y), plain)
    True
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from .layout import IGNORE

CHUNK_BYTES = 1 << 27  # fp32 logits held at once (128 MiB: 220 rows of a 151,936-word head)


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Target positions per chunk so that one chunk's fp32 logits fit in ``chunk_bytes``.

    >>> chunk_rows(151_936), chunk_rows(100)
    (220, 335544)
    """
    return max(1, chunk_bytes // (4 * vocab))


class _ChunkedLinearCE(torch.autograd.Function):
    """Sum of cross-entropies of ``hidden_ND @ weight_VD.T`` against ``labels_N`` (every label valid).

    The gradients are computed in the forward pass, chunk by chunk, so that no chunk's logits
    outlive it; they are computed only for the inputs that need one (a frozen head gets none).
    """

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, labels_N, rows: int, grad_enabled: bool):
        # needs_input_grad says True under no_grad too; the caller's grad mode decides
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        acc_dtype = torch.promote_types(hidden_ND.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        loss = torch.zeros((), dtype=acc_dtype, device=hidden_ND.device)
        grad_h = torch.empty_like(hidden_ND) if need_h else None
        grad_w = torch.zeros_like(weight_VD, dtype=acc_dtype) if need_w else None
        for start in range(0, hidden_ND.shape[0], rows):
            h, y = hidden_ND[start : start + rows], labels_N[start : start + rows]
            logits = h @ weight_VD.T  # (rows, V)
            logits = logits.to(acc_dtype)  # the softmax in fp32 at least, as the plain path
            lse = torch.logsumexp(logits, dim=-1)  # (rows,)
            loss += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if not (need_h or need_w):
                continue
            # d(sum CE)/d(logits) = softmax - one_hot, in place over the logits
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(len(y), device=g.device), y] -= 1.0
            g = g.to(hidden_ND.dtype)
            if need_h:
                grad_h[start : start + rows] = g @ weight_VD
            if need_w:
                grad_w += (g.T @ h).to(acc_dtype)
            del logits, g
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight_VD.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        dw = None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype)
        return dh, dw, None, None, None


def _liger():
    """Liger-Kernel's fused linear cross-entropy loss class, or None when it is not installed."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE, rows: int | None = None,
                         backend: str = "auto") -> torch.Tensor:
    """Sum over positions with a label of ``cross_entropy(hidden @ weight.T, labels)`` (fp32 or wider).

    ``hidden`` is ``(..., D)`` and ``labels`` the matching ``(...)``; positions labelled
    ``ignore_index`` never reach the head. ``rows``: target positions per chunk (default: 128 MiB
    of fp32 logits, :func:`chunk_rows`). ``backend``: ``"auto"`` (Liger on CUDA when installed,
    else the chunked torch path), ``"torch"`` (always the chunked torch path) or ``"liger"``.
    Under autocast the matmuls run in the autocast dtype, as ``F.linear`` would; the gradient
    reaching ``weight`` is cast back to its dtype (fp32 master weights stay fp32).
    """
    if backend not in ("auto", "torch", "liger"):
        raise ValueError(f"backend must be auto, torch or liger, not {backend!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not match")
    keep = labels.to(hidden.device) != ignore_index
    h, y = hidden[keep], labels.to(hidden.device)[keep]  # (n_targets, D), (n_targets,)
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
    elif h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    liger = _liger() if backend != "torch" and h.is_cuda else None
    if backend == "liger" and liger is None:
        raise ValueError("backend liger needs CUDA and the liger-kernel package (pip install liger-kernel)")
    with torch.autocast(h.device.type, enabled=False):  # the dtypes are settled above
        if liger is not None:
            return liger(reduction="sum")(weight, h, y).float()
        return _ChunkedLinearCE.apply(h, weight, y, rows or chunk_rows(weight.shape[0]), torch.is_grad_enabled())
