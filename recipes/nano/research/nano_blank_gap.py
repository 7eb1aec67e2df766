"""How much a model's continuations read its memory pages: the *blank-page gap*, mean NLL per token of
teacher-forced continuations after whole chunks of visual memory with white pages minus with the real
ones (same layout, same targets), on the eval's own windows (``vist2 eval olm``'s gcc layout).

    python recipes/nano/research/nano_blank_gap.py --model models/vist2-nano --data recipes/nano/heldout.txt \\
        --continuation-tokens 8 64 --out bench/results/nano/blank-gap.json
    # every token after the first context scored once (458 windows of 8 on heldout.txt, not 14):
    python recipes/nano/research/nano_blank_gap.py --model models/vist2-nano --data recipes/nano/heldout.txt \
        --continuation-tokens 8 --stride --out bench/results/nano/blank-gap-stride8.json

The shipped model's 8-token gap is what ``tests/test_shipped_model.py`` guards (0.159 nats when shipped),
through the same :func:`vist2.eval.olm.blank_page_gap`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vist2.eval.olm import blank_page_gap
from vist2.runtime import load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="a held-out text file")
    ap.add_argument("--context-tokens", type=int, default=256)
    ap.add_argument("--continuation-tokens", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--stride", action="store_true",
                    help="a window every continuation-length tokens (vist2 eval olm --stride), not non-overlapping")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    model, proc = load_checkpoint(args.model, "cpu")
    ids = proc.encode(Path(args.data).read_text(encoding="utf-8"))
    res = {"model": args.model, "data": args.data, "context_tokens": args.context_tokens, "stride": args.stride,
           "gaps": {str(c): blank_page_gap(model, proc, ids, args.context_tokens, c, c if args.stride else None)
                    for c in args.continuation_tokens}}
    for c, g in res["gaps"].items():
        print(f"{c:>3} tokens: {g['windows']} windows, NLL real {g['nll_real']:.3f}, blank {g['nll_blank']:.3f}, "
              f"gap {g['gap_nats']:.3f} nats")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
