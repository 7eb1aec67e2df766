"""Where a continuation after visual memory loses to text context: mean NLL at each position of
teacher-forced continuations right after whole chunks of memory (``vist2 eval olm``'s windows), in
several layouts of the same context and the same targets:

- ``gcc``: the eval's gcc layout (the context as pages; each page's visual tokens see its own text);
- ``gcc_blank``: the same with white pages (how much the pixels are read);
- ``gcc_shuffled_text``: the same pages with the compressed chunks' text shuffled in place (how much
  the page's visual tokens draw on the text they may see, rather than on the pixels);
- ``text_L``: only the context's last L tokens as plain text, L in ``--text-tokens`` (what the
  nearest characters are worth: the share a page's last visual tokens would have to give).

    python recipes/nano/research/nano_positions.py --model models/vist2-nano --data recipes/nano/heldout.txt \\
        --stride 32 --out bench/results/nano/positions-shipped.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vist2.eval.olm import layout_segments, text_segments, windows
from vist2.layout import IGNORE, Kind, build_sample, collate
from vist2.runtime import load_checkpoint


@torch.no_grad()
def position_nll(model, plan, pixels=None) -> torch.Tensor:
    """NLL of each loss target of a one-row plan, in order."""
    logits = model(plan=plan, pixel_values=pixels).logits.float()[0]
    labels = plan.labels[0]
    keep = labels != IGNORE
    return F.cross_entropy(logits[keep], labels[keep], reduction="none")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="a held-out text file")
    ap.add_argument("--context-tokens", type=int, default=256)
    ap.add_argument("--continuation-tokens", type=int, default=8)
    ap.add_argument("--stride", type=int, default=32, help="a window every S tokens (vist2 eval olm --stride)")
    ap.add_argument("--text-tokens", type=int, nargs="+", default=[256, 16, 4, 1])
    ap.add_argument("--seed", type=int, default=0, help="for the shuffled text")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    model, proc = load_checkpoint(args.model, "cpu")
    ids = proc.encode(Path(args.data).read_text(encoding="utf-8"))
    M = args.continuation_tokens
    wins = windows([ids], args.context_tokens, M, proc.chunker(model.config.chunk_tokens), args.stride)
    if not wins:
        raise SystemExit(f"{args.data}: no window of {args.context_tokens} + {M} tokens")
    gen = torch.Generator().manual_seed(args.seed)
    sums: dict[str, torch.Tensor] = {}

    def add(name, nll):
        sums[name] = sums.get(name, torch.zeros(M)) + nll

    for ctx, cont in tqdm(wins, desc="windows"):
        segs = layout_segments("optical", ctx, cont, model, proc)
        plan = collate([build_sample(segs)])
        px = proc.pixels_for(plan.chunks)
        add("gcc", position_nll(model, plan, px))
        add("gcc_blank", position_nll(model, plan, torch.full_like(px, proc.renderer.config.background / 255)))
        shuffled = collate([build_sample(segs)])
        evicted = shuffled.evicted[0] & (shuffled.kind[0] == Kind.TEXT)
        vals = shuffled.input_ids[0, evicted]
        shuffled.input_ids[0, evicted] = vals[torch.randperm(len(vals), generator=gen)]
        add("gcc_shuffled_text", position_nll(model, shuffled, px))
        for L in args.text_tokens:
            add(f"text_{L}", position_nll(model, collate([build_sample(text_segments(ctx[-L:], cont))])))
    n = len(wins)
    res = {"model": args.model, "data": args.data, "windows": n, "context_tokens": args.context_tokens,
           "continuation_tokens": M, "stride": args.stride,
           "nll_by_position": {k: [round(float(x) / n, 4) for x in v] for k, v in sums.items()},
           "mean_nll": {k: round(float(v.sum()) / (n * M), 4) for k, v in sums.items()}}
    print(f"{'layout':<20}" + "".join(f"{i:>7}" for i in range(M)) + "   mean")
    for k, v in res["nll_by_position"].items():
        print(f"{k:<20}" + "".join(f"{x:7.3f}" for x in v) + f"{res['mean_nll'][k]:7.3f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
