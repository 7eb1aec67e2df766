"""Does drawing a prompt's chunk images on worker threads pay off? (the engine's ``render_workers``)

    OMP_NUM_THREADS=1 python bench/render_workers.py --out bench/results/render_workers.json

For each model preset, the chunks of an N-token prompt (the embedded English sample, repeated, as
``vist2 bench`` builds it), cut by the fit rule at the preset's K and render config, are drawn as
one batch by :class:`vist2.engine.rendering.ChunkRenderer` with 1, 2, 4 ... threads; the batch is
timed ``--repeats`` times after a warm-up pass (glyph atlases of every thread), and the median
kept. Pixels are checked equal to the serial ones.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vist2.bench import prompt_ids  # noqa: E402
from vist2.build import load_tokenizer  # noqa: E402
from vist2.config import preset_config  # noqa: E402
from vist2.engine.rendering import ChunkRenderer  # noqa: E402
from vist2.processing import VIST2Processor  # noqa: E402


def prompt_chunks(proc: VIST2Processor, n_tokens: int) -> list[str]:
    texts, carry = [], b""
    for ids in proc.chunker()(prompt_ids(proc.tokenizer, n_tokens)).chunks:
        text, carry = proc.chunk_text(carry, ids)
        texts.append(text)
    return texts


def time_batch(renderer: ChunkRenderer, texts: list[str], repeats: int) -> list[float]:
    styles = ["user"] * len(texts)
    renderer.pixels(texts, styles)  # warm-up: every thread builds its atlases
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        renderer.pixels(texts, styles)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "render_workers.json")
    ap.add_argument("--presets", default="tiny,qwen3-0.6b")
    ap.add_argument("--prompt-tokens", default="2000,32768", help="per preset, comma-separated")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    tok = load_tokenizer()
    workers = [int(w) for w in args.workers.split(",")]
    results = []
    for preset, n in zip(args.presets.split(","), [int(x) for x in args.prompt_tokens.split(",")]):
        cfg = preset_config(preset)
        proc = VIST2Processor(tok, cfg.render_config, cfg.chunk_tokens)
        texts = prompt_chunks(proc, n)
        serial = proc.pixels_from_texts(texts, ["user"] * len(texts))
        row = {"preset": preset, "prompt_tokens": n, "chunks": len(texts), "K": cfg.chunk_tokens,
               "image": [cfg.render_config.width, cfg.render_config.height], "ms": {}}
        for w in workers:
            r = ChunkRenderer(proc, w)
            assert torch.equal(r.pixels(texts, ["user"] * len(texts)), serial), "threads drew other pixels"
            ms = time_batch(r, texts, args.repeats)
            r.close()
            row["ms"][str(w)] = {"median": round(statistics.median(ms), 2), "all": [round(x, 2) for x in ms]}
            print(f"{preset:12} {len(texts):3} chunks  workers {w}: {statistics.median(ms):8.2f} ms", flush=True)
        base = row["ms"]["1"]["median"] if "1" in row["ms"] else None
        row["speedup_vs_1"] = {w: round(base / v["median"], 2) for w, v in row["ms"].items()} if base else {}
        results.append(row)
    report = {"command": "python bench/render_workers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
