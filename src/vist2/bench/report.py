"""``bench.json``, the two plots and the table of ``vist2 bench``.

``bench.json`` holds every number: the machine, versions, the model's shape, the command as it was
run (``sys.argv``), and per mode one :class:`~vist2.bench.runners.ModeResult` with its per-step
curve (binned to at most :data:`MAX_CURVE_POINTS` points).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

from .flops import FlopShape
from .runners import ModeResult

MAX_CURVE_POINTS = 2000  # longer runs are stored as means over equal bins of steps
COLORS = {"gcc": "tab:red", "pcc": "tab:orange", "none": "tab:blue", "hf": "tab:gray"}


def command_line(argv: list[str] | None = None) -> str:
    """The command as it was run: ``sys.argv`` with the program's folder left out (no machine paths
    in saved results); ``python -m vist2.cli`` is shown as such."""
    argv = sys.argv if argv is None else argv
    prog = os.path.basename(argv[0]) if argv else "vist2"
    if prog in ("cli.py", "__main__.py"):
        prog = "python -m vist2.cli"
    return " ".join([prog, *map(shlex.quote, argv[1:])])


def bin_curve(context: list[int], ms: list[float], kv: list[int]) -> dict:
    n = len(context)
    size = max(1, math.ceil(n / MAX_CURVE_POINTS))
    if size == 1:
        return {"bin_steps": 1, "context": context, "ms_per_token": [round(x, 3) for x in ms], "kv_tokens": kv}
    out = {"bin_steps": size, "context": [], "ms_per_token": [], "kv_tokens": []}
    for i in range(0, n, size):
        out["context"].append(context[min(i + size, n) - 1])
        out["ms_per_token"].append(round(statistics.fmean(ms[i : i + size]), 3))
        out["kv_tokens"].append(kv[min(i + size, n) - 1])
    return out


def buckets(context: list[int], ms: list[float], lo: int, hi: int, n: int) -> list[dict]:
    """Mean and median ms per step over ``n`` equal context ranges from ``lo`` to ``hi``."""
    edges = [lo + round(i * (hi - lo) / n) for i in range(n + 1)]
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        sel = [m for c, m in zip(context, ms) if (a < c or (a == lo and c == lo)) and c <= b]
        out.append({
            "context_from": a, "context_to": b, "steps": len(sel),
            "ms_per_token_mean": round(statistics.fmean(sel), 4) if sel else None,
            "ms_per_token_median": round(statistics.median(sel), 4) if sel else None,
        })
    return out


def batch_label(args, modes: dict[str, ModeResult]) -> str:
    if not args.batch_fit:
        return f"batch {args.batch}"
    per_mode = ", ".join(f"{name} {m.batch}" for name, m in modes.items())
    return f"batch {per_mode} (KV cache in {args.batch_fit} GiB)"


def plots(out: Path, modes: dict[str, ModeResult], batch: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    files = []
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    for name, m in modes.items():
        if not m.ms:
            continue
        w = max(1, len(m.ms) // 40)  # a mean over a window keeps gcc's compression spikes as their amortised cost
        smooth = [statistics.fmean(m.ms[max(0, i - w + 1) : i + 1]) for i in range(len(m.ms))]
        ax.plot(m.context, m.ms, color=COLORS.get(name), alpha=0.15, linewidth=0.5)
        ax.plot(m.context, smooth, color=COLORS.get(name), label=name, linewidth=1.5)
    _finish(ax, "decode ms / step", f"decode latency, {batch}")
    fig.tight_layout()
    fig.savefig(out / "decode_ms_per_token.png")
    files.append("decode_ms_per_token.png")

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    for name, m in modes.items():
        ax.plot(m.context, m.kv, "--" if name == "hf" else "-", color=COLORS.get(name), label=name, linewidth=1.5)
    _finish(ax, "KV cache entries per sequence", "KV cache size as the context grows")
    fig.tight_layout()
    fig.savefig(out / "kv_entries.png")
    files.append("kv_entries.png")
    return files


def _finish(ax, ylabel: str, title: str) -> None:
    ax.set_xlabel("context (prompt + generated tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()


def table(modes: dict[str, ModeResult]) -> str:
    first = next(iter(modes.values())).buckets
    head = (f"{'mode':5} {'TTFT ms':>9} {'tok/s':>8} " + " ".join(
        f"{'ms@' + str(b['context_to']):>9}" for b in first) + f" {'KV end':>7} {'KV peak':>7} {'KV MiB':>7} "
            f"{'peak MiB':>9} {'compr%':>6} {'MFLOP/tok':>10}")
    lines = [head]
    for name, m in modes.items():
        cells = " ".join(f"{b['ms_per_token_mean']:9.3f}" if b["ms_per_token_mean"] is not None else f"{'-':>9}"
                         for b in m.buckets)
        lines.append(
            f"{name:5} {m.ttft_s * 1e3:9.1f} {m.decode_tokens_per_s:8.1f} {cells} {m.kv_tokens:7d} "
            f"{m.kv_tokens_peak:7d} {m.kv_bytes / 2**20:7.2f} {m.peak_memory_bytes / 2**20:9.1f} "
            f"{100 * m.compression['fraction_of_decode']:6.1f} {m.flops_per_token['mean'] / 1e6:10.2f}")
    return "\n".join(lines)


def dumps(report: dict) -> str:
    """Indented JSON with every curve on one line each (thousands of numbers, one per line, bloat it)."""
    flat = {}
    for name, m in report["modes"].items():
        for key, values in m["curve"].items():
            if isinstance(values, list):
                tag = f"@@{name}.{key}@@"
                flat[json.dumps(tag)] = json.dumps(values, separators=(",", ":"))
                m["curve"][key] = tag
    text = json.dumps(report, indent=1)
    for tag, values in flat.items():
        text = text.replace(tag, values)
    return text


def machine(device) -> dict:
    import torch
    import transformers

    info = {
        "platform": platform.platform(), "python": platform.python_version(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def model_info(model, fshape: FlopShape) -> dict:
    c, tc = model.config, model.config.text_config
    return {
        "llm": {k: getattr(tc, k, None) for k in ("model_type", "hidden_size", "intermediate_size",
                                                  "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads", "head_dim", "vocab_size",
                                                  "max_position_embeddings")},
        "vision": {k: getattr(c.vision_config, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                                  "patch_size")},
        "image": [c.render["height"], c.render["width"]], "merge": c.merge,
        "K": c.chunk_tokens, "n_visual": c.n_visual, "compression_ratio": c.compression_ratio,
        "prompt_encoding": c.prompt_encoding, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "flop_shape": asdict(fshape),
    }


def build_report(args, device, model, fshape: FlopShape, results: dict[str, ModeResult], files: list[str]) -> dict:
    return {
        "command": command_line(),
        "machine": machine(device),
        "model": model_info(model, fshape),
        "source": str(args.model) if args.model else f"preset {args.preset} (random weights, seed {args.seed})",
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "batch": args.batch,
        "batch_fit_gib": args.batch_fit,
        "notes": {
            "context": "prompt tokens + generated tokens fed through the LLM so far",
            "kv": "per sequence; kv_bytes_allocated is the engine's preallocated cache for the whole batch",
            "decode_tokens_per_s": "batch * (new_tokens - 1) / time from the first to the last token",
            "flops_per_token": "analytic, see vist2.bench.flops.flops_per_token; mean over the run's decode steps "
                               "(compressions counted where they happened), at_end at the final KV length",
        },
        "modes": {name: m.to_json() | {"curve": bin_curve(m.context, m.ms, m.kv)} for name, m in results.items()},
        "plots": files,
    }


def print_summary(args, report: dict, results: dict[str, ModeResult], model, device, out: Path) -> None:
    print(f"vist2 bench: {report['source']}, {device}, {args.dtype}; prompt {args.prompt_tokens} + "
          f"{args.new_tokens} new tokens, {batch_label(args, results)}; K={model.config.chunk_tokens}, "
          f"n_visual={model.config.n_visual}")
    print("ms@C: mean decode ms per step for contexts up to C; tok/s counts the whole batch; "
          "KV per sequence; compr%: compression time / decode time")
    print(table(results))
    if "stall" in report:
        st = report["stall"]
        print(f"stall: a running stream's longest step while a {st['prompt_tokens']}-token prompt is admitted: "
              f"{st['stall_ms']:.1f} ms (alone {st['steady_ms']:.1f} ms; budget {st['prefill_budget']} entries, "
              f"{st['admission_steps']} steps)")
    print(f"wrote {out / 'bench.json'} and {', '.join(report['plots'])}")
