"""TTFT of several requests admitted in the same engine step (the tiny preset on CPU by default).

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/prefill_rows.py --batch 4 --prompt-tokens 2000 \\
        --out bench/results/engine-cpu-tiny/rows/batch4.json

``--batch`` requests with prompts of equal length (different text: the embedded English sample,
repeated, each starting 50 tokens further) are added at once to an engine with
``max_prefills_per_step = batch``; the time until the last of them has its first token is
recorded. One untimed run first, then ``--repeats`` timed ones; the median is kept. The script
uses only the engine's public API, so it runs unchanged against an older checkout of ``src``
(the before/after in ``bench/notes/engine.md``).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

try:
    from vist2.bench import prompt_ids
except ImportError:  # an older checkout of src, before the benchmark became a package
    from vist2.benchmark import _prompt_ids as prompt_ids
from vist2.build import build_from_preset, load_tokenizer
from vist2.engine import Engine, Request, SamplingParams
from vist2.processing import VIST2Processor


def batch_ttft_ms(model, proc, batch: int, n: int, mode: str) -> float:
    engine = Engine(model, proc, max_batch=batch, max_cache_tokens=n + 64, max_prefills_per_step=batch)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    reqs = [Request(query=prompt_ids(proc.tokenizer, n + 50 * i)[50 * i :], params=params, mode=mode)
            for i in range(batch)]
    return max(r.stats.ttft_s for r in engine.generate(reqs)) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--modes", default="gcc,pcc,none")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default: print only)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = build_from_preset(args.preset, seed=0).eval()
    proc = VIST2Processor(load_tokenizer(), model.config.render_config)
    out = {}
    for mode in args.modes.split(","):
        ms = [batch_ttft_ms(model, proc, args.batch, args.prompt_tokens, mode) for _ in range(args.repeats + 1)][1:]
        out[mode] = {"ttft_ms_median": round(statistics.median(ms), 1), "ttft_ms": [round(x, 1) for x in ms]}
        print(f"{mode:5} batch {args.batch} x {args.prompt_tokens} tokens: TTFT {out[mode]['ttft_ms_median']:.1f} ms",
              flush=True)
    report = {"command": "python bench/prefill_rows.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "preset": args.preset, "batch": args.batch, "prompt_tokens": args.prompt_tokens, "modes": out}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
