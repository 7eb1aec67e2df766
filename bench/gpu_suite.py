"""Helpers of ``bench/gpu_suite.sh``: the GPU tests' JUnit XML as JSON, and the suite's summary.

    python bench/gpu_suite.py junit OUT/gpu_tests.xml OUT/gpu_tests.json
    python bench/gpu_suite.py summary OUT        # writes OUT/summary.json and OUT/summary.md

The summary reads what the steps wrote (``ttft/bench.json``, ``long/bench.json``, ``fit/bench.json``,
``train.json``, ``gpu_tests.json``, ``steps.jsonl``) and never measures anything itself: a figure whose
step failed or did not run is ``null``, with the reason under ``reasons``. How each figure is computed
(and where one is extrapolated) is under ``how``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

GEN_TARGET = 32768  # "KV after 32k generated tokens": the long step generates fewer and extrapolates

# the targets: (figure, comparison, bound); None where the issue sets none
TARGETS = {
    "kv_ratio_32k": ("<=", 0.26), "ttft_speedup_vs_hf": (">=", 4.0), "decode_speedup_vs_hf": (">=", 10.0),
    "decode_speedup_vs_none_32k": (">=", 1.5), "fit_ratio_32k": (">=", 3.5), "batch_throughput_ratio": (">=", 3.0),
    "compression_share": ("<=", 0.10), "train_mfu_flex": (">=", 0.35), "stall_ms": None, "gpu_tests": None,
}


def junit(xml_path: Path, out: Path) -> dict:
    """Counts and the failing tests' names from pytest's ``--junitxml``."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failing": []}
    if xml_path.exists():
        for case in ET.parse(xml_path).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None:
                counts["failed"] += 1
                counts["failing"].append(name)
            elif case.find("error") is not None:
                counts["errors"] += 1
                counts["failing"].append(name)
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    else:
        counts["errors"] = None
    out.write_text(json.dumps(counts, indent=1))
    return counts


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def kv_per_fed_token(mode: dict, prompt_tokens: int) -> tuple[float, float, int]:
    """``(entries right after prefill, entries added per fed token, fed tokens at the end)`` measured off a
    mode's per-step curve. With compressions, the rate runs from the prompt to the last compression
    (whole windows only: the open window after it would inflate it); without, over the whole curve.
    A binned curve (over 2,000 steps) keeps each bin's last step, so the point after a compression may
    hold up to ``bin_steps - 1`` open tokens: the rate is then off by at most that many in ``fed``."""
    c = mode["curve"]
    ctx, kv = c["context"], c["kv_tokens"]
    fed = [x - prompt_tokens for x in ctx]
    start = kv[0] - fed[0]  # no compression before the first timed step (a window is K >= 2 tokens)
    drops = [i for i in range(1, len(kv)) if kv[i] < kv[i - 1]]
    if drops:
        i = drops[-1]
        rate = (kv[i] - start) / fed[i]
    else:
        rate = (kv[-1] - kv[0]) / (fed[-1] - fed[0])
    return start, rate, fed[-1]


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


class Summary:
    def __init__(self, out: Path):
        self.out = out
        self.values: dict = {}
        self.reasons: dict[str, str] = {}
        self.how: dict[str, str] = {}
        self.steps = self._steps()

    def _steps(self) -> dict:
        steps = {}
        path = self.out / "steps.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    s = json.loads(line)
                    s["timed_out"] = s["rc"] in (124, 137)
                    steps[s["step"]] = s
        return steps

    def bench(self, step: str) -> dict | None:
        return _load(self.out / step / "bench.json")

    def why_missing(self, step: str) -> str:
        s = self.steps.get(step)
        if s is None:
            return f"step {step} did not run (out of the suite's time budget, or the suite was stopped)"
        if s["timed_out"]:
            return f"step {step} ran past its {s['timeout_s']} s limit (see {step}.log)"
        return f"step {step} failed with exit status {s['rc']} (see {step}.log)"

    def put(self, key: str, value, how: str, step: str, reason: str | None = None) -> None:
        self.how[key] = how
        if value is None:
            self.reasons[key] = reason or self.why_missing(step)
        self.values[key] = value

    def build(self) -> dict:
        self._ttft()
        self._long()
        self._fit()
        self._train()
        self._tests()
        return self._document()

    def _ttft(self) -> None:
        r = self.bench("ttft")
        m = (r or {}).get("modes", {})
        ok = r is not None and {"gcc", "hf"} <= set(m)
        self.put("ttft_speedup_vs_hf", _ratio(m["hf"]["ttft_s"], m["gcc"]["ttft_s"]) if ok else None,
                 "ttft step: hf ttft_s / gcc ttft_s, one prompt, batch 1, same process", "ttft")
        st = (r or {}).get("stall")
        self.put("stall_ms", st["stall_ms"] if st else None,
                 "ttft step (--stall): the longest step a decoding stream sees while the prompt is admitted (gcc); "
                 "stall_steady_ms is its step alone", "ttft")
        self.values["stall_steady_ms"] = st["steady_ms"] if st else None
        self.values["peak_memory_gib"] = {k: v["peak_memory_bytes"] / 2**30 for k, v in m.items()} or None
        self.values["ttft_s"] = {k: v["ttft_s"] for k, v in m.items()} or None

    def _long(self) -> None:
        r, t = self.bench("long"), self.bench("ttft")
        m = (r or {}).get("modes", {})
        ok = r is not None and {"gcc", "none"} <= set(m)
        self.put("decode_speedup_vs_none_32k", _ratio(m["gcc"]["decode_tokens_per_s"], m["none"]["decode_tokens_per_s"])
                 if ok else None, "long step: gcc / none decode_tokens_per_s, batch 1, after the prompt (a context "
                 "of prompt + generated tokens), gcc's compressions included", "long")
        hf = (t or {}).get("modes", {}).get("hf")
        self.put("decode_speedup_vs_hf", _ratio(hf["ms_per_token_mean"], m["gcc"]["ms_per_token_mean"])
                 if ok and hf else None, "hf ms_per_token_mean (ttft step) / gcc ms_per_token_mean (long step, its "
                 "compressions included); both batch 1 after the same prompt", "long" if not ok else "ttft")
        self._kv(r, ok)
        self._compression(r, ok)

    def _kv(self, r: dict | None, ok: bool) -> None:
        how = (f"KV entries after {GEN_TARGET} generated tokens, gcc / none (bf16 bytes per entry are the same): "
               "extrapolated from the long step, which generates fewer: its last count plus the entries per fed "
               "token measured over whole windows (prompt to last compression) times the tokens still to feed. "
               "kv_ratio_32k_layout is the layout rule's count for the same lengths (vist2.bench.kv.kv_layout, "
               "chunks of K), a cross-check")
        if not ok:
            self.put("kv_ratio_32k", None, how, "long")
            return
        N, est = r["prompt_tokens"], {}
        for name in ("gcc", "none"):
            _, rate, fed = kv_per_fed_token(r["modes"][name], N)
            est[name] = r["modes"][name]["kv_tokens"] + rate * (GEN_TARGET - 1 - fed)
        self.put("kv_ratio_32k", est["gcc"] / est["none"], how, "long")
        self.values["kv_entries_32k"] = est
        self.values["kv_ratio_measured"] = r["modes"]["gcc"]["kv_bytes"] / r["modes"]["none"]["kv_bytes"]
        self.values["kv_ratio_32k_layout"] = _layout_ratio(r)

    def _compression(self, r: dict | None, ok: bool) -> None:
        how = ("long step, gcc: amortised compression time per token (compress seconds / chunks / K) over that plus "
               "the decode time per token without compression; the run holds few windows, so the share is taken "
               "per chunk rather than as compress time / decode time of the run")
        g = r["modes"]["gcc"] if ok else None
        if g is None or not g["compression"]["decode_chunks"]:
            self.put("compression_share", None, how, "long",
                     reason=None if g is None else "the long step compressed no chunk during decode")
            return
        c, K = g["compression"], r["model"]["K"]
        per_token = c["decode_s"] / c["decode_chunks"] / K
        plain = (g["decode_s"] - c["decode_s"]) / (g["new_tokens"] - 1)
        self.put("compression_share", per_token / (per_token + plain), how, "long")
        self.values["compression_share_of_run"] = c["fraction_of_decode"]

    def _fit(self) -> None:
        r = self.bench("fit")
        m = (r or {}).get("modes", {})
        ok = r is not None and {"gcc", "none"} <= set(m)
        gib = (r or {}).get("batch_fit_gib")
        self.put("fit_ratio_32k", _ratio(m["gcc"]["batch"], m["none"]["batch"]) if ok else None,
                 f"fit step: rows whose preallocated KV cache fits the same {gib} GiB (vist2 bench --batch-fit), "
                 "gcc / none; both ran to the end", "fit")
        self.put("batch_throughput_ratio",
                 _ratio(m["gcc"]["decode_tokens_per_s"], m["none"]["decode_tokens_per_s"]) if ok else None,
                 "fit step: decode_tokens_per_s of the whole batch, gcc / none, each at its largest batch", "fit")
        if ok:
            self.values["fit_batches"] = {k: v["batch"] for k, v in m.items()}

    def _train(self) -> None:
        r = _load(self.out / "train.json")
        runs = (r or {}).get("runs", {})
        flex = runs.get("flex")
        reason = None
        if r is not None and flex is None:
            reason = "FlexAttention was not run (it needs CUDA)"
        elif flex is not None and flex.get("mfu") is None:
            reason = "no peak TFLOPS known for this device (bench/train_throughput.py --peak-tflops)"
        self.put("train_mfu_flex", flex.get("mfu") if flex else None,
                 "train step: bench/train_throughput.py, one packed OLM row, bf16 autocast on CUDA; model FLOPs "
                 "per step / step time / the device's peak dense bf16 TFLOPS", "train", reason)
        self.values["train_tokens_per_s"] = {k: v.get("tokens_per_s") for k, v in runs.items()} or None

    def _tests(self) -> None:
        r = _load(self.out / "gpu_tests.json")
        self.put("gpu_tests", r, "pytest -m gpu over the test files that hold gpu tests (JUnit counts)", "gpu_tests")

    def _document(self) -> dict:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
        versions = {"python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.version.cuda}
        try:
            import transformers

            versions["transformers"] = transformers.__version__
        except ImportError:
            versions["transformers"] = None
        smoke = (_load(self.out / "suite.json") or {}).get("smoke")
        return {
            **{k: self.values.get(k) for k in TARGETS}, "device": device, "versions": versions, "smoke": smoke,
            "steps": self.steps, "extra": {k: v for k, v in self.values.items() if k not in TARGETS},
            "targets": {k: v and f"{v[0]} {v[1]}" for k, v in TARGETS.items()},
            "reasons": self.reasons, "how": self.how,
            "note": ("SMOKE: tiny shapes on CPU; these numbers check the flow and say nothing about speed"
                     if smoke else "one run; random weights at the preset's shape"),
        }


def _layout_ratio(r: dict) -> float | None:
    """gcc / none entries after the prompt and GEN_TARGET tokens by the layout rule (chunks of K)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from vist2.bench.kv import kv_layout
    from vist2.chunking import fixed_chunker
    from vist2.layout import Raw, prompt_segments

    m, N = r["model"], r["prompt_tokens"]
    K, nv = m["K"], m["n_visual"]
    query = prompt_segments([], list(range(N)), [], K, nv, m["prompt_encoding"], chunker=fixed_chunker(K))
    gcc = kv_layout(query, GEN_TARGET, K, nv, "gcc")
    none = kv_layout([Raw(tuple(range(N)))], GEN_TARGET, K, nv, "none")
    return gcc["final"] / none["final"]


def _met(key: str, value) -> str:
    t = TARGETS.get(key)
    if t is None or value is None:
        return ""
    return "yes" if (value <= t[1] if t[0] == "<=" else value >= t[1]) else "no"


def markdown(s: dict) -> str:
    lines = [f"# GPU suite: {s['device']}", "", s["note"], "",
             "| figure | value | target | met | how / why null |", "|---|---:|---|---|---|"]
    for key in TARGETS:
        v = s[key]
        if key == "gpu_tests" and v is not None:
            shown = f"{v['passed']} passed, {v['failed']} failed, {v['errors']} errors, {v['skipped']} skipped"
        elif isinstance(v, float):
            shown = f"{v:.3g}"
        else:
            shown = "null" if v is None else str(v)
        note = s["reasons"].get(key) or s["how"].get(key, "")
        lines.append(f"| {key} | {shown} | {s['targets'][key] or ''} | {_met(key, v)} | {note} |")
    lines += ["", "| step | exit | wall s | limit s |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['rc']} | {v['wall_s']} | {v['timeout_s']} |" for k, v in s["steps"].items()]
    lines += ["", "versions: " + ", ".join(f"{k} {v}" for k, v in s["versions"].items()), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    j = sub.add_parser("junit")
    j.add_argument("xml", type=Path)
    j.add_argument("out", type=Path)
    s = sub.add_parser("summary")
    s.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "junit":
        junit(args.xml, args.out)
        return 0
    summary = Summary(args.out).build()
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    (args.out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
