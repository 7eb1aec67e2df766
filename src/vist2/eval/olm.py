"""Optical language modelling: perplexity with the context as visual memory vs. as plain text
(the paper's Table 3 protocol).

    vist2 eval olm --model runs/tiny --data docs.jsonl --context-tokens 256 --continuation-tokens 64 --out runs/eval/olm.json

Each document is cut into windows of N context tokens followed by M continuation tokens. The
continuation is scored twice by the same model, on identical tokens:

- **optical**: :func:`vist2.layout.olm_segments` over context + continuation, the layout the model
  trains on and generates in: every K-token chunk of the context is rendered and, once its β
  visual tokens are written, its text is out of sight; the continuation's own earlier chunks are
  compressed too, as generation does. Loss only on the continuation.
- **text**: ``[Raw(context), Raw(continuation, loss=True)]`` — no visual slots, so this is the
  backbone LLM reading the context as ordinary text.

Reported: perplexity (per token), bits per token and bits per character (total NLL in bits over
the characters of the continuation), so models with different tokenizers compare.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import replace
from typing import Sequence

import torch
import torch.nn.functional as F

from ..layout import IGNORE, Raw, Segment, build_sample, collate, olm_segments
from .common import table

LAYOUTS = ("optical", "text")


def optical_segments(context: Sequence[int], continuation: Sequence[int], chunk_tokens: int,
                     n_visual: int) -> list[Segment]:
    """OLM layout over context + continuation with the loss on the continuation only.

    The context must be whole chunks (a chunk has one loss flag), so the split between context
    and continuation falls on a chunk boundary: the context chunks are exactly the first
    ``len(context) / K`` segments.
    """
    if len(context) % chunk_tokens:
        raise ValueError(f"the context ({len(context)} tokens) must be a multiple of K={chunk_tokens} tokens")
    n_ctx = len(context) // chunk_tokens
    segs = olm_segments([*context, *continuation], chunk_tokens, n_visual, loss=False)
    return [replace(s, loss=True) if i >= n_ctx else s for i, s in enumerate(segs)]


def text_segments(context: Sequence[int], continuation: Sequence[int]) -> list[Segment]:
    """The backbone's view: the context as plain text, loss on the continuation."""
    return [Raw(tuple(context)), Raw(tuple(continuation), loss=True)]


@torch.no_grad()
def continuation_nll(model, processor, segments: Sequence[Segment]) -> tuple[float, list[int]]:
    """Total NLL (nats) of the loss targets of one sample, and the target ids (in order)."""
    plan = collate([build_sample(segments)])
    pixels = processor.pixels_for(plan.chunks).to(model.device, model.dtype) if plan.chunks else None
    logits = model(plan=plan, pixel_values=pixels).logits
    labels = plan.labels.to(logits.device)
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return float(nll), labels[labels != IGNORE].tolist()


def windows(docs_ids: Sequence[Sequence[int]], context: int, continuation: int) -> list[tuple[list[int], list[int]]]:
    """Non-overlapping (context, continuation) windows, in document order."""
    n = context + continuation
    return [(list(ids[i : i + context]), list(ids[i + context : i + n]))
            for ids in docs_ids for i in range(0, len(ids) - n + 1, n)]


def _summary(nll: float, tokens: int, chars: int) -> dict:
    return {"nll_nats": nll, "tokens": tokens, "characters": chars, "perplexity": math.exp(nll / tokens),
            "bits_per_token": nll / math.log(2) / tokens, "bits_per_character": nll / math.log(2) / max(chars, 1)}


def evaluate_olm(model, processor, documents: Sequence[str], context_tokens: int | None = None,
                 continuation_tokens: int | None = None, limit: int | None = None, progress: bool = True) -> dict:
    """``{"optical": {...}, "text": {...}, "windows": n, ...}``; ``ValueError`` when no window fits."""
    from tqdm.auto import tqdm

    cfg = model.config
    K, beta = cfg.chunk_tokens, cfg.n_visual
    N = 4 * K if context_tokens is None else context_tokens
    M = K if continuation_tokens is None else continuation_tokens
    if N <= 0 or N % K:
        raise ValueError(f"--context-tokens must be a positive multiple of the model's K={K} "
                         f"(whole chunks become visual memory), got {N}")
    if M <= 0:
        raise ValueError(f"--continuation-tokens must be > 0, got {M}")
    docs_ids = [processor.encode(d) for d in documents]
    wins = windows(docs_ids, N, M)
    if not wins:
        longest = max((len(x) for x in docs_ids), default=0)
        raise ValueError(f"no document has {N} + {M} = {N + M} tokens (context + continuation); "
                         f"the longest has {longest}")
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"--limit must be > 0, got {limit}")
        wins = wins[:limit]
    totals = {k: 0.0 for k in LAYOUTS}
    tokens = chars = 0
    t0 = time.perf_counter()
    for ctx, cont in tqdm(wins, desc="olm", unit="window", disable=not progress, file=sys.stderr):
        nll_o, tgt_o = continuation_nll(model, processor, optical_segments(ctx, cont, K, beta))
        nll_t, tgt_t = continuation_nll(model, processor, text_segments(ctx, cont))
        # the comparison is only meaningful on identical targets; the layouts must agree
        assert tgt_o == tgt_t == cont, "optical and text layouts score different tokens"
        totals["optical"] += nll_o
        totals["text"] += nll_t
        tokens += len(cont)
        chars += len(processor.decode(cont))
    res = {k: _summary(totals[k], tokens, chars) for k in LAYOUTS}
    res["optical"]["context_kv_entries"] = N // K * beta
    res["text"]["context_kv_entries"] = N
    res.update(windows=len(wins), context_tokens=N, continuation_tokens=M,
               perplexity_ratio=res["optical"]["perplexity"] / res["text"]["perplexity"],
               seconds=round(time.perf_counter() - t0, 3))
    return res


def format_table(res: dict) -> str:
    rows = [[k, res[k]["context_kv_entries"], res[k]["tokens"], f"{res[k]['perplexity']:.3f}",
             f"{res[k]['bits_per_token']:.4f}", f"{res[k]['bits_per_character']:.4f}"] for k in LAYOUTS]
    head = ["context as", "context KV", "tokens", "perplexity", "bits/token", "bits/char"]
    return (table(rows, head) + f"\n{res['windows']} window(s) of {res['context_tokens']} context + "
            f"{res['continuation_tokens']} continuation tokens; optical/text perplexity = {res['perplexity_ratio']:.4f}")


def cmd_eval_olm(args) -> int:
    from ..errors import CLIError
    from ..runtime import load_checkpoint as load
    from ..runtime import write_json
    from .common import command_line, provenance, read_documents

    try:
        docs = read_documents(args.data)
        model, processor = load(args.model, args.device, args.dtype)
        res = evaluate_olm(model, processor, docs, args.context_tokens, args.continuation_tokens,
                           limit=args.limit, progress=not args.no_progress)
    except ValueError as e:
        raise CLIError(str(e)) from e
    cfg = model.config
    results = {
        "evaluation": "olm",
        "provenance": provenance(args.model, cfg, args.data, command_line("vist2 eval olm", args)),
        "model_geometry": {"chunk_tokens": cfg.chunk_tokens, "n_visual": cfg.n_visual,
                           "compression_ratio": cfg.compression_ratio},
        "layouts": {"optical": "olm_segments(context + continuation), loss on the continuation",
                    "text": "[Raw(context), Raw(continuation, loss=True)] (the backbone LLM)"},
        **res,
    }
    path = write_json(args.out, results)
    print(format_table(res))
    print(f"wrote {path}")
    return 0


def add_parser(sub) -> None:
    q = sub.add_parser("olm", help="perplexity with the context as visual memory vs. as plain text",
                       description="Score a continuation with its context compressed (OLM layout) and with the "
                                   "context as plain text through the same LLM; identical tokens.")
    q.add_argument("--model", required=True, metavar="DIR", help="a VIST2 checkpoint folder")
    q.add_argument("--data", required=True, metavar="PATH", help='plain UTF-8 text, or .jsonl with a "text" field')
    q.add_argument("--context-tokens", type=int, default=None, metavar="N",
                   help="context tokens per window, a multiple of K (default 4 x K)")
    q.add_argument("--continuation-tokens", type=int, default=None, metavar="M",
                   help="scored tokens per window (default K)")
    q.add_argument("--limit", type=int, default=None, metavar="N", help="quick run: at most N windows")
    q.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.add_argument("--out", required=True, metavar="FILE", help="results JSON")
    q.set_defaults(func=cmd_eval_olm)
