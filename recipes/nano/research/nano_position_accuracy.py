"""What of a page does an OCR-trained model read? Teacher-forced next-token accuracy at each text
position of MT-OCR samples ``[v, text]`` (one page of ``--tokens`` tokens each), with the real page
and with a blank one, and the mean NLL of both.

    python recipes/nano/research/nano_position_accuracy.py --model runs/nano/ocr-w512-k16 --data recipes/nano/heldout.txt \\
        --tokens 16 --out bench/results/nano/position-accuracy.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vist2.layout import IGNORE, build_sample, collate, ocr_segments
from vist2.modeling import VIST2ForCausalLM
from vist2.processing import VIST2Processor


def position_accuracy(model, processor, pieces: list[list[int]], blank: bool, batch: int = 10):
    """``(accuracy per text position (the last one is the end of text), mean NLL)``."""
    L = max(len(p) for p in pieces)
    hits, total = torch.zeros(L + 1), torch.zeros(L + 1)
    nll, n = 0.0, 0
    for b in range(0, len(pieces), batch):
        plan = collate([build_sample(ocr_segments([p], model.config.n_visual)) for p in pieces[b : b + batch]])
        pixels = processor.pixels_for(plan.chunks)
        if blank:
            pixels = torch.full_like(pixels, processor.renderer.config.background / 255)
        with torch.no_grad():
            logits = model(plan=plan, pixel_values=pixels).logits.float()  # labels sit at their own logits
        for r in range(logits.shape[0]):
            pos = (plan.labels[r] != IGNORE).nonzero().flatten()
            target = plan.labels[r, pos]
            logp = torch.log_softmax(logits[r, pos], -1)
            nll -= float(logp.gather(-1, target[:, None]).sum())
            n += len(pos)
            right = (logp.argmax(-1) == target).float()
            hits[: len(pos)] += right
            total[: len(pos)] += 1
    return (hits / total.clamp_min(1)).tolist(), nll / max(n, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path, help="a plain text file")
    ap.add_argument("--tokens", type=int, default=16, help="text tokens per page")
    ap.add_argument("--pages", type=int, default=60)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = VIST2ForCausalLM.from_pretrained(str(args.model)).eval()
    processor = VIST2Processor.from_pretrained(args.model)
    ids = processor.encode(args.data.read_text(encoding="utf-8"))
    L = args.tokens
    pieces = [ids[i : i + L] for i in range(0, len(ids) - L, L)][: args.pages]
    real, nll_real = position_accuracy(model, processor, pieces, blank=False)
    blank, nll_blank = position_accuracy(model, processor, pieces, blank=True)
    print(f"{len(pieces)} pages of {L} tokens: NLL {nll_real:.3f} with the page, {nll_blank:.3f} blank")
    print("position  real  blank")
    for k, (a, b) in enumerate(zip(real, blank)):
        print(f"{k if k < L else 'end':>8}  {a:.3f}  {b:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": str(args.model), "data": str(args.data), "tokens": L,
                                        "pages": len(pieces), "nll": {"real": nll_real, "blank": nll_blank},
                                        "accuracy": {"real": real, "blank": blank}}, indent=1))


if __name__ == "__main__":
    main()
