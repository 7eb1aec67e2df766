"""Rounds 8 and 9 copying probes (bench/notes/nano.md, "Round 8: copying before retrieving", "Round 9").

    python recipes/nano/research/nano_copy.py probe MODEL [--gap 0 256 768]  # repeat vs alone ppl, 64-token spans
    python recipes/nano/research/nano_copy.py generate MODEL         # greedy writing after random numbers + newline
    python recipes/nano/research/nano_copy.py diag MODEL --steps 150 # the plan path vs plain transformers, copy batches
    python recipes/nano/research/nano_copy.py train MODEL --steps 800 --out llm.pt [--length 32] [--no-lm]
    python recipes/nano/research/nano_copy.py swap MODEL llm.pt OUT  # a model folder with that LLM
    python recipes/nano/research/nano_copy.py induce MODEL --steps 400 --gap 512 --out llm.pt
        # copies at a distance: span, 0..gap tokens of text, a line break, the span again (loss on the
        # repeat), 4 a step beside 2 plain-text windows; probes the repeat at a 256-token gap every 100 steps

Spans: half random 7-digit-number digits and spaces (only the first copy tells them), half text; a span,
a line break, the span again, the loss on the repeat. ``probe`` reads spans of ``recall.txt`` (dev);
``train`` reads the prepared corpus (runs/r7/data/text_en.jsonl, as ``vist2 data prepare`` writes it).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

from vist2.eval.olm import continuation_nll, greedy_continuation
from vist2.layout import IGNORE, Raw, build_sample, collate
from vist2.runtime import load_checkpoint

HERE = Path(__file__).resolve().parents[1]


def probe(model, proc, n: int = 30, L: int = 64, gap: int = 0) -> dict:
    """Repeat vs alone perplexity of L-token spans; with ``gap``, ``gap`` tokens of other text of recall.txt
    between the span and its repeat (and before the span alone); 0 is round 8's probe."""
    text = (HERE / "recall.txt").read_text(encoding="utf-8")
    ids, nl, rng, out = proc.encode(text), proc.encode("\n"), random.Random(0), {}
    filler = ids[-gap:] if gap else []
    for kind in ("text", "random"):
        rep = alone = 0.0
        for _ in range(n):
            if kind == "text":
                o = rng.randrange(len(ids) - L - gap)
                span = ids[o : o + L]
            else:
                words = (str(rng.randint(10**6, 10**7 - 1)) if rng.random() < 0.5 else rng.choice(text.split())
                         for _ in range(20))
                span = proc.encode(" ".join(words))[:L]
            with torch.no_grad():
                mid = nl + filler + nl if gap else nl
                rep += continuation_nll(model, proc, [Raw(tuple(span + mid)), Raw(tuple(span), loss=True)])[0]
                alone += continuation_nll(model, proc, [Raw(tuple(mid)), Raw(tuple(span), loss=True)])[0]
        out[kind] = {"repeat_ppl": math.exp(rep / (n * L)), "alone_ppl": math.exp(alone / (n * L))}
    return out


def spans(proc, rng, corpus):
    """``span(L)``: half random digits and spaces, half text; ``text(L)``: L tokens of a random record."""
    digits = [proc.encode(str(d))[0] for d in range(10)] + [proc.encode(" ")[0]]
    books = [proc.encode(c) for c in corpus]  # encoded once: a record is a whole book

    def text(L):
        ids = rng.choice(books)
        while len(ids) < L + 1:
            ids = rng.choice(books)
        o = rng.randrange(len(ids) - L)
        return ids[o : o + L]

    return (lambda L: [rng.choice(digits) for _ in range(L)] if rng.random() < 0.5 else text(L)), text


def repeat_batch(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, repeat) rows as one padded batch: input ids, and labels on the repeats alone."""
    width = max(len(c) + len(x) for c, x in rows)
    ids, labels = torch.full((len(rows), width), pad), torch.full((len(rows), width), IGNORE)
    for i, (c, x) in enumerate(rows):
        ids[i, : len(c) + len(x)] = torch.tensor(c + x)
        labels[i, len(c) : len(c) + len(x)] = torch.tensor(x)
    return ids, labels


def plain_llm(model):
    from transformers import Qwen3ForCausalLM

    hf = Qwen3ForCausalLM(model.config.text_config)
    hf.model.load_state_dict(model.model.language_model.state_dict())
    hf.lm_head.weight = hf.model.embed_tokens.weight
    return hf.train()


def induce(model, proc, a) -> None:
    """Copy batches at a distance (``--gap`` most tokens of text between a span and its repeat), beside
    plain text; the repeat probe at a 256-token gap every 100 steps (``probe``'s numbers, in the log)."""
    corpus = [json.loads(line)["text"] for line in open(a.data)][:2000]
    rng, nl, G = random.Random(0), proc.encode("\n"), a.gap[-1]
    span, text = spans(proc, rng, corpus)
    hf = plain_llm(model)
    if a.qk_gain != 1.0:  # Qwen3 RMS-normalises q and k: attention logits are at most about head_dim ** 0.5 x the gains
        with torch.no_grad():
            for layer in hf.model.layers:
                layer.self_attn.q_norm.weight.mul_(a.qk_gain ** 0.5)
                layer.self_attn.k_norm.weight.mul_(a.qk_gain ** 0.5)
    opt = torch.optim.AdamW(hf.parameters(), lr=a.lr, weight_decay=0.0)
    t, hist = time.time(), []
    for s in range(a.steps):
        rows = []
        for _ in range(4):
            x, g = span(rng.randint(16, 64)), rng.randint(0, G)
            rows.append((x + text(g) + nl if g else x + nl, x))
        ids, labels = repeat_batch(rows, nl[0])
        lm = torch.tensor([text(256) for _ in range(2)])
        copy = hf(input_ids=ids, labels=labels).loss
        loss = copy + hf(input_ids=lm, labels=lm).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(copy.item())
        if (s + 1) % 100 == 0:
            model.model.language_model.load_state_dict(hf.model.state_dict())
            p = probe(model.eval(), proc, n=15, gap=256)
            print(f"step {s + 1}: copy loss {sum(hist[-100:]) / 100:.3f}; probe at 256: " + ", ".join(
                f"{k} {v['repeat_ppl']:.2f} / {v['alone_ppl']:.2f}" for k, v in p.items()) + f" ({time.time() - t:.0f}s)",
                flush=True)
            torch.save(hf.model.state_dict(), a.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["probe", "generate", "diag", "train", "swap", "induce"])
    ap.add_argument("model")
    ap.add_argument("args", nargs="*")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out")
    ap.add_argument("--length", type=int, default=0, help="train: every span this long (0: 8..64, one a step)")
    ap.add_argument("--no-lm", action="store_true", help="train: copy batches only (no plain-text batch a step)")
    ap.add_argument("--data", default="runs/r7/data/text_en.jsonl")
    ap.add_argument("--gap", type=int, nargs="*", default=[0],
                    help="probe: tokens between a span and its repeat; induce: the most (one value)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--qk-gain", type=float, default=1.0, help="induce: scale every layer's attention logits first")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if a.what == "swap":
        from safetensors.torch import load_file, save_file

        llm, dst = a.args
        shutil.copytree(a.model, dst, ignore=shutil.ignore_patterns("checkpoints", "train"), dirs_exist_ok=True)
        w, sd = load_file(Path(dst) / "model.safetensors"), torch.load(llm)
        assert len(sd) == sum(k.startswith("model.language_model.") for k in w), "every LLM tensor replaced"
        w.update({f"model.language_model.{k}": v.contiguous() for k, v in sd.items()})
        save_file(w, Path(dst) / "model.safetensors", metadata={"format": "pt"})
        return
    model, proc = load_checkpoint(a.model)
    if a.what == "probe":
        print(json.dumps({g: probe(model.eval(), proc, gap=g) for g in a.gap}, indent=1))
    elif a.what == "generate":
        rng = random.Random(1)
        for _ in range(3):
            s = " ".join(str(rng.randint(10**6, 10**7 - 1)) for _ in range(4)) + " the lamb of God"
            print(repr(s), "->", repr(proc.decode(greedy_continuation(model.eval(), proc, proc.encode(s + "\n"),
                                                                        "text", 40))))
    elif a.what == "induce":
        induce(model, proc, a)
    else:
        corpus = [json.loads(line)["text"] for line in open(a.data)][:2000]
        rng, nl = random.Random(0), proc.encode("\n")
        span, text = spans(proc, rng, corpus)
        hf = plain_llm(model)
        nets = [("plain", hf)] + ([("plan", model.train())] if a.what == "diag" else [])
        opts = {n: torch.optim.AdamW(m.parameters() if n == "plain" else model.model.language_model.parameters(),
                                     lr=1e-3, weight_decay=0.0) for n, m in nets}
        t, hist = time.time(), {n: [] for n, _ in nets}
        for s in range(a.steps):
            L = 32 if a.what == "diag" else (a.length or rng.randint(8, 64))
            xs = [span(L) for _ in range(8)]
            lm = None if (a.what == "diag" or a.no_lm) else torch.tensor([text(128) for _ in range(4)])
            for n, m in nets:
                if n == "plain":
                    ids = torch.tensor([x + nl + x for x in xs])
                    labels = ids.clone()
                    labels[:, : L + len(nl)] = IGNORE
                    loss = m(input_ids=ids, labels=labels).loss
                    if lm is not None:
                        loss = loss + m(input_ids=lm, labels=lm).loss
                else:
                    plan = collate([build_sample([Raw(tuple(x + nl)), Raw(tuple(x), loss=True)]) for x in xs])
                    loss = m(plan=plan).loss
                opts[n].zero_grad()
                loss.backward()
                opts[n].step()
                hist[n].append(loss.item())
            if (s + 1) % 25 == 0:
                print(f"step {s + 1}: " + ", ".join(f"{n} {sum(h[-25:]) / 25:.3f}" for n, h in hist.items())
                      + f" ({time.time() - t:.0f}s)", flush=True)
            if a.what == "train" and (s + 1) % 100 == 0:
                torch.save(hf.model.state_dict(), a.out)


if __name__ == "__main__":
    main()
