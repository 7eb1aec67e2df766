"""How full the fit rule keeps each image, and what the running fit check costs per token.

For each text, the Qwen3 token ids are cut by ``VIST2Processor.chunker`` at a render geometry
(K tokens per chunk, or fewer when the text would not fit at ``min_font_size``); every closed
chunk is rendered. Reports mean tokens per closed chunk / K, how many chunks the fit rule closed
early, characters dropped (text of all chunk images joined vs the decoded text: must be 0), and
the CPU cost of ``ChunkFit.push`` per token (the check generation runs after every sampled token; the
first pass over each text, so the per-renderer piece cache starts cold for it).

    python bench/chunk_fill.py --out bench/results/chunk_fill.json
    python bench/chunk_fill.py --quick      # the test fixtures only
"""

from __future__ import annotations

import argparse
import inspect
import json
import textwrap
import time
from pathlib import Path

from vist2.build import load_tokenizer
from vist2.config import preset_config
from vist2.processing import VIST2Processor

ROOT = Path(__file__).resolve().parents[1]


def texts(quick: bool) -> dict[str, str]:
    out = {
        "prose (fixture)": (ROOT / "tests/data/prose_hard_breaks.txt").read_text() * 3,
        "code (fixture)": (ROOT / "tests/data/code_sample.py.txt").read_text(),
        "zh (fixture)": (ROOT / "src/vist2/data/sample_zh.txt").read_text() * 3,
    }
    if quick:
        return out
    import argparse as ap_mod

    out["code (argparse.py)"] = inspect.getsource(ap_mod)
    out["code (inspect.py)"] = inspect.getsource(inspect)
    out["prose (stdlib docstrings, rewrapped at 70)"] = "\n\n".join(
        textwrap.fill(" ".join(p.split()), 70)
        for m in (ap_mod, inspect, textwrap, json, argparse) for p in (m.__doc__ or "").split("\n\n") if p.strip())
    return {k: v for k, v in out.items() if v}


def measure(proc: VIST2Processor, K: int, ids: list[int]) -> dict:
    cuts = proc.chunker(K)(ids)
    closed = cuts.closed
    from vist2.layout import ChunkInfo

    infos = [ChunkInfo(tuple(c), 1) for c in closed + [cuts.tail]]
    shown = proc.chunk_texts(infos)
    for t in shown[:-1]:
        proc.render_chunk(t)  # raises if a chunk's text did not fit
    whole = proc.decode(ids)
    dropped = len(whole) - len("".join(shown))
    t0 = time.process_time()  # CPU time: on a shared machine wall time mostly measures the neighbours
    n = 0
    for c in closed:
        fit = proc.chunker(K).window()
        for t in c:
            fit.push(t)
        n += len(c)
    dt = time.process_time() - t0
    return {
        "tokens": len(ids), "closed_chunks": len(closed),
        "fill": sum(map(len, closed)) / (len(closed) * K) if closed else None,
        "cut_by_fit": sum(cuts.fit_cut), "chars_dropped": dropped,
        "fit_check_us_per_token": 1e6 * dt / max(n, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    tok = load_tokenizer()
    res = {}
    for preset in ("qwen3-0.6b", "qwen3-0.6b-paper"):
        cfg = preset_config(preset)
        proc = VIST2Processor(tok, cfg.render_config, cfg.chunk_tokens)
        for name, text in texts(a.quick).items():
            ids = tok(text, add_special_tokens=False)["input_ids"]
            r = measure(proc, cfg.chunk_tokens, ids)
            r["effective_ratio"] = (r["fill"] or 0) * cfg.chunk_tokens / cfg.n_visual
            res[f"{preset} | {name}"] = r
            print(f"{preset:18s} {name:45s} fill {r['fill']:.3f} cut_by_fit {r['cut_by_fit']}/{r['closed_chunks']} "
                  f"dropped {r['chars_dropped']} r_eff {r['effective_ratio']:.2f} fit {r['fit_check_us_per_token']:.1f} us/tok")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
