"""Where does a nano model lose the characters of its page? Train the vision tower (and, for
``--read aligner``, the aligner) with a linear character head alone, no LLM, and print the head's
accuracy on inked cells as it learns. The head reads one of three places:

- ``patch``: each vision-tower output (one patch: with the ``nano`` page and 8 px patches, 2 characters);
- ``merged``: each ``merge x merge`` block of patch features, concatenated (the aligner's input);
- ``aligner``: each visual token, ``tanh(x W + b)`` at the LLM's width (what the LLM reads).

Pages are random words of the data's text (no sentence), up to 230 characters, as PT-2 draws them.

    python recipes/nano/research/nano_char_probe.py --model runs/nano/init7 --data runs/nano/data/text_en.jsonl \\
        --read patch --steps 400 --out bench/results/nano/probe-patch.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vist2.modeling import VIST2ForCausalLM, merge_patches
from vist2.processing import VIST2Processor
from vist2.training.losses.char import IGNORE, N_CLASSES, char_class, region_map


def _words(path: Path, limit: int = 200_000) -> list[str]:
    words: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            words += json.loads(line)["text"].split()
            if len(words) > limit:
                break
    return words


def _page(words: list[str], renderer, rng: random.Random, max_chars: int = 230) -> str:
    out = ""
    while True:
        nxt = f"{out} {rng.choice(words)}" if out else rng.choice(words)
        if len(nxt) > max_chars or not renderer.fits(nxt):
            return out
        out = nxt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="a VIST2 checkpoint (random init is the point)")
    ap.add_argument("--data", required=True, type=Path, help="text JSONL (records with a 'text' field)")
    ap.add_argument("--read", choices=("patch", "merged", "aligner"), required=True)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16, help="pages per step")
    ap.add_argument("--every", type=int, default=25, help="print (and record) every n steps")
    ap.add_argument("--out", type=Path, help="JSON with the curve")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = VIST2ForCausalLM.from_pretrained(str(args.model)).train()
    proc = VIST2Processor.from_pretrained(args.model)
    cfg, r = model.config, proc.renderer
    p, m = cfg.patch_size, cfg.merge
    gh, gw = cfg.patch_grid
    cw, ch, cols, rows = r.grid(r.config.min_font_size)
    region = p if args.read == "patch" else p * m
    rmap = region_map(r.config.width, r.config.height, r.config.margin, cw, ch, rows, cols, region)
    width = {"patch": cfg.vision_config.hidden_size, "merged": cfg.vision_config.hidden_size * m * m,
             "aligner": cfg.text_config.hidden_size}[args.read]
    head = torch.nn.Linear(width, rmap.slots * N_CLASSES)
    params = [*model.model.vision.parameters(), *head.parameters()]
    if args.read == "aligner":
        params += list(model.model.aligner.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    words, rng = _words(args.data), random.Random(0)
    print(f"read {args.read}: {rmap.slots} cells per head, width {width}", flush=True)
    curve, t0 = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        texts = [_page(words, r, rng) for _ in range(args.batch)]
        target = torch.from_numpy(np.stack(
            [np.append(char_class(r.cells(t)[1]).reshape(-1), IGNORE)[rmap.slot_cell] for t in texts]))
        n = len(texts)
        pixels = proc.pixels_from_texts(texts)
        x = (pixels * 2 - 1).expand(n, 3, *pixels.shape[-2:])  # SigLIP normalisation, as encode_images
        patches = x.reshape(n, 3, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, p * p * 3)
        feats = model.model.vision(pixel_values=patches, pixel_attention_mask=torch.ones(n, gh * gw, dtype=torch.long),
                                   spatial_shapes=torch.tensor([[gh, gw]]).expand(n, 2)).last_hidden_state
        if args.read != "patch":
            feats = merge_patches(feats, gh, gw, m)
            if args.read == "aligner":
                feats = model.model.aligner(feats)
        logits = head(feats).view(n, -1, rmap.slots, N_CLASSES)
        loss = F.cross_entropy(logits.reshape(-1, N_CLASSES), target.reshape(-1), ignore_index=IGNORE)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % args.every == 0:
            ink = target > 0
            acc = float((logits.argmax(-1)[ink] == target[ink]).float().mean())
            curve.append({"step": step, "loss": loss.item(), "acc": acc, "seconds": time.perf_counter() - t0})
            print(f"step {step}: loss {loss.item():.3f}, accuracy {acc:.3f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"read": args.read, "model": str(args.model), "lr": args.lr,
                                        "batch": args.batch, "slots": rmap.slots, "width": width,
                                        "curve": curve}, indent=1))


if __name__ == "__main__":
    main()
