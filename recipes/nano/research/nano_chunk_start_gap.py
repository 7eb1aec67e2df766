"""Does a model continue from its visual memory? Teacher-forced NLL of the first tokens of each
compressed-context chunk (chunk 2 on, where the text before is only visual tokens), with the real
memory pages and with blank ones, on optical-LM windows of a text file.

    python recipes/nano/research/nano_chunk_start_gap.py --model models/vist2-nano --data recipes/nano/heldout.txt \\
        --out bench/results/nano/chunk-start-gap.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vist2.layout import IGNORE, Kind, build_sample, collate, olm_segments
from vist2.runtime import load_checkpoint


def chunk_start_nll(model, proc, ids: list[int], window: int, first: int, blank: bool) -> tuple[float, float, int]:
    """``(mean NLL of the first ``first`` tokens of chunks 2.., mean NLL of every target, n)``."""
    c = model.config
    head = total = 0.0
    n_head = n_total = 0
    for start in range(0, len(ids) - window + 1, window):
        s = build_sample(olm_segments(ids[start : start + window], c.chunk_tokens, c.n_visual,
                                      chunker=proc.chunker()))
        plan = collate([s])
        px = proc.pixels_for(plan.chunks)
        if blank:
            px = torch.full_like(px, proc.renderer.config.background / 255)
        with torch.no_grad():
            logp = torch.log_softmax(model(plan=plan, pixel_values=px).logits.float()[0], -1)
        offset, seen = [0] * len(s.kind), {}
        for i, (ch, k) in enumerate(zip(s.chunk, s.kind)):
            if k == Kind.TEXT:
                offset[i] = seen.get(ch, 0)
                seen[ch] = offset[i] + 1
        for i, lab in enumerate(plan.labels[0].tolist()):
            if lab == IGNORE:
                continue
            nll = -float(logp[i, lab])
            total, n_total = total + nll, n_total + 1
            t = s.predicts[i]  # the slot this target sits in
            if t >= 0 and s.kind[t] == Kind.TEXT and s.chunk[t] >= 1 and offset[t] < first:
                head, n_head = head + nll, n_head + 1
    return head / max(n_head, 1), total / max(n_total, 1), n_head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="a UTF-8 text file")
    ap.add_argument("--window", type=int, default=320, help="tokens per optical-LM window (default 320)")
    ap.add_argument("--first", type=int, default=4, help="tokens at the start of each chunk (default 4)")
    ap.add_argument("--out", help="write the numbers as JSON")
    args = ap.parse_args()
    model, proc = load_checkpoint(args.model, "cpu")
    ids = proc.encode(Path(args.data).read_text(encoding="utf-8"))
    got = {}
    for blank in (False, True):
        head, total, n = chunk_start_nll(model, proc, ids, args.window, args.first, blank)
        got["blank" if blank else "real"] = {"chunk_start_nll": head, "nll": total, "chunk_start_tokens": n}
        print(f"{'blank' if blank else 'real'} memory: first {args.first} tokens of chunks 2..: NLL {head:.3f} "
              f"({n} tokens); every target: {total:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "data": args.data, "window": args.window,
                                              "first": args.first, **got}, indent=1) + "\n")


if __name__ == "__main__":
    main()
