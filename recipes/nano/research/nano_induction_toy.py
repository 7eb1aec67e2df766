"""Round 9's induction toy (bench/notes/nano.md, "Round 9"): does a decoder of the nano LLM's shape, from a
random init, learn to copy on purely synthetic repeats, and after how many steps? Each row: a span of 16..64
random lowercase letters (or --symbols byte ids), a line break, 0..--gap random ones, a line break, the span
again; the loss on the repeat alone (uniform guessing: ln 26 = 3.26 nats). No data, no tokenizer: byte ids
(batches padded as ``nano_copy.py induce`` pads its own).

    python recipes/nano/research/nano_induction_toy.py --layers 4 --gap 64 --lr 1e-3 --steps 2000
    python recipes/nano/research/nano_induction_toy.py --arch llama --steps 300   # no QK-norm, same shape
    python recipes/nano/research/nano_induction_toy.py --symbols 250 --steps 600   # a token matches alone
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from nano_copy import repeat_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--gap", type=int, default=64, help="most random letters between a span and its repeat")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=8, help="rows a step")
    ap.add_argument("--arch", choices=["qwen3", "llama"], default="qwen3")
    ap.add_argument("--symbols", type=int, default=26,
                    help="distinct symbols spans draw from: 26 lowercase letters, up to 250 byte ids")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    shape = dict(vocab_size=261, hidden_size=256, num_hidden_layers=a.layers, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=768, head_dim=64, max_position_embeddings=2048,
                 tie_word_embeddings=True)  # the nano model's LLM (recipes/nano/run.sh)
    m = (Qwen3ForCausalLM(Qwen3Config(**shape)) if a.arch == "qwen3" else LlamaForCausalLM(LlamaConfig(**shape)))
    opt = torch.optim.AdamW(m.parameters(), lr=a.lr, weight_decay=0.0)
    rng, nl = random.Random(0), 10
    letters = list(range(97, 123)) if a.symbols == 26 else [b for b in range(256) if b != nl][: a.symbols]
    t, hist = time.time(), []
    for s in range(a.steps):
        rows = []
        for _ in range(a.rows):
            n, g = rng.randint(16, 64), rng.randint(0, a.gap)
            x = [rng.choice(letters) for _ in range(n)]
            rows.append((x + [nl] + [rng.choice(letters) for _ in range(g)] + [nl], x))
        ids, labels = repeat_batch(rows, nl)
        loss = m(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(loss.item())
        if (s + 1) % 50 == 0:
            print(f"step {s + 1}: repeat loss {sum(hist[-50:]) / 50:.3f} (uniform {math.log(len(letters)):.3f}) "
                  f"{time.time() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
