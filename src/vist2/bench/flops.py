"""Analytic FLOPs of generation: a decode forward, one chunk's compression, the cost per generated token.

    >>> s = FlopShape(llm_layers=2, llm_heads=4, llm_head_dim=16, llm_body_params=1000, lm_head_params=500,
    ...               vit_layers=1, vit_hidden=8, vit_params=100, n_patches=4, aligner_params=10,
    ...               chunk_tokens=8, n_visual=2)
    >>> decode_flops(s, 10)
    {'matmul': 3000, 'attention': 5120}
"""

from __future__ import annotations

from dataclasses import dataclass

from ..modes import Mode
from ..runtime import kv_geometry


@dataclass(frozen=True)
class FlopShape:
    """What the analytic FLOPs need to know about a model (counts, not tensors)."""

    llm_layers: int
    llm_heads: int  # query heads
    llm_head_dim: int
    llm_body_params: int  # decoder layers + final norm; the input embedding table is a lookup, not a matmul
    lm_head_params: int  # hidden x vocab, counted even when tied: it is a matmul every token
    vit_layers: int
    vit_hidden: int
    vit_params: int  # patch embedding + encoder (position embeddings excluded: added, not multiplied)
    n_patches: int
    aligner_params: int
    chunk_tokens: int  # K
    n_visual: int  # visual tokens per chunk


def decode_flops(s: FlopShape, kv_len: float) -> dict:
    """FLOPs of one decode forward with ``kv_len`` live cache entries.

    * matmuls: ``2 * (llm_body_params + lm_head_params)`` -- one multiply-add per weight;
    * attention: ``4 * layers * heads * head_dim * kv_len`` -- q.k and p.v, one
      multiply-add each per cached entry, per query head (GQA shares K/V, not the FLOPs).
    """
    matmul = 2 * (s.llm_body_params + s.lm_head_params)
    attention = 4 * s.llm_layers * s.llm_heads * s.llm_head_dim * kv_len
    return {"matmul": matmul, "attention": attention}


def image_flops(s: FlopShape) -> float:
    """One chunk image through the vision tower and the aligner.

    ``2 * vit_params * n_patches`` (every patch meets every weight once)
    ``+ 4 * vit_layers * vit_hidden * n_patches**2`` (full attention over the patches)
    ``+ 2 * aligner_params * n_visual`` (the aligner sees the merged tokens).
    """
    return (2 * s.vit_params * s.n_patches + 4 * s.vit_layers * s.vit_hidden * s.n_patches**2
            + 2 * s.aligner_params * s.n_visual)


def chunk_flops(s: FlopShape, kv_len: float) -> float:
    """Compressing one chunk whose n_visual visual tokens are written after ``kv_len`` live entries.

    ``image_flops + 2 * llm_body_params * n + 4 * layers * heads * head_dim * (n * kv_len + n * (n + 1) / 2)``, n = n_visual
    (visual token j attends to the ``kv_len`` entries before it and to visual tokens 0..j).
    """
    b = s.n_visual
    attention = 4 * s.llm_layers * s.llm_heads * s.llm_head_dim * (b * kv_len + b * (b + 1) / 2)
    return image_flops(s) + 2 * s.llm_body_params * b + attention


def flops_per_token(s: FlopShape, kv_len: float, mode: str) -> dict:
    """Analytic FLOPs to generate one token at ``kv_len`` live cache entries.

    ``matmul + attention`` as in :func:`decode_flops`; in ``gcc`` plus the amortised cost of
    compressing the chunk this token belongs to, ``chunk_flops(kv_len) / K`` (every K generated
    tokens are rendered once and read back as n_visual tokens). ``pcc``, ``none`` and ``hf`` compress
    nothing during decode (a compressed prompt costs at prefill, i.e. in TTFT).
    """
    terms = decode_flops(s, kv_len)
    terms["compression"] = chunk_flops(s, kv_len) / s.chunk_tokens if mode == Mode.GCC else 0.0
    terms["total"] = terms["matmul"] + terms["attention"] + terms["compression"]
    return terms


def flop_shape(model) -> FlopShape:
    """The counts :func:`flops_per_token` needs, read off a VIST2 model."""
    tc, vc, c = model.config.text_config, model.config.vision_config, model.config
    lm = model.model.language_model
    head_dim = kv_geometry(tc).head_dim
    body = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    vit = sum(p.numel() for n, p in model.model.vision.named_parameters() if "position_embedding" not in n)
    gh, gw = c.patch_grid
    return FlopShape(
        llm_layers=tc.num_hidden_layers, llm_heads=tc.num_attention_heads, llm_head_dim=head_dim,
        llm_body_params=body, lm_head_params=model.lm_head.weight.numel(),
        vit_layers=vc.num_hidden_layers, vit_hidden=vc.hidden_size, vit_params=vit, n_patches=gh * gw,
        aligner_params=sum(p.numel() for p in model.model.aligner.parameters()),
        chunk_tokens=c.chunk_tokens, n_visual=c.n_visual,
    )
