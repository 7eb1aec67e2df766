"""Attention masks read off a :class:`~vist2.layout.Plan`.

There is one visibility rule, :func:`allowed_mask`; the dense mask (CPU, SDPA,
eager) broadcasts it over ``(q, k)`` and the FlexAttention ``BlockMask`` (GPU
training) calls it per element, so the two cannot drift apart.

Example::

    >>> from vist2.chunking import fixed_chunker
    >>> from vist2.layout import build_sample, collate, olm_segments
    >>> plan = collate([build_sample(olm_segments(range(6), 4, 2, chunker=fixed_chunker(4)))])
    >>> dense_mask(plan).shape
    torch.Size([1, 8, 8])
"""

from __future__ import annotations

import torch

from .layout import Plan


def allowed_mask(sample_q, sample_k, chunk_q, chunk_k, evicted_k, q_idx, k_idx):
    """May query ``q`` attend to key ``k``?

    Causal within a sample, except that an evicted chunk's text is seen only by
    tokens of that same chunk (its own text and its visual tokens). A padding
    slot (sample -1) sees only itself, so that no softmax row is empty.
    """
    same = (sample_q == sample_k) & (sample_q >= 0)
    visible = ~evicted_k | (chunk_q == chunk_k)
    return (same & (k_idx <= q_idx) & visible) | ((sample_q < 0) & (q_idx == k_idx))


def dense_mask(plan: Plan) -> torch.Tensor:
    """``(B, T, T)`` bool, True where query (row) may attend to key (column)."""
    B, T = plan.shape
    idx = torch.arange(T, device=plan.kind.device)
    return allowed_mask(
        plan.sample[:, :, None],
        plan.sample[:, None, :],
        plan.chunk[:, :, None],
        plan.chunk[:, None, :],
        plan.evicted[:, None, :],
        idx[None, :, None],
        idx[None, None, :],
    )


def additive_mask(plan: Plan, dtype: torch.dtype) -> torch.Tensor:
    """``(B, 1, T, T)`` float mask: 0 where allowed, the dtype's minimum elsewhere.

    Float rather than bool on purpose: transformers' eager attention *adds* the
    mask to the scores, which silently turns a bool mask into +0/+1.
    """
    allowed = dense_mask(plan)[:, None]
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def block_mask(plan: Plan, block_size: int = 128):
    """A FlexAttention ``BlockMask`` for the plan (sequence length padded to ``block_size``)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = plan.shape
    if T % block_size:
        # mask_mod indexes the plan, so it must never see the padded tail FlexAttention adds
        raise ValueError(f"sequence length {T} is not a multiple of block_size={block_size}: collate(..., pad_to=...)")
    sample, chunk, evicted = plan.sample, plan.chunk, plan.evicted

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed_mask(
            sample[b, q_idx], sample[b, kv_idx], chunk[b, q_idx], chunk[b, kv_idx], evicted[b, kv_idx], q_idx, kv_idx
        )

    return create_block_mask(
        mask_mod, B=B, H=None, Q_LEN=T, KV_LEN=T, device=plan.kind.device, BLOCK_SIZE=block_size
    )
