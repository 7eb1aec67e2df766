"""Load benchmark of `vist2 serve`: requests/s, TTFT and inter-token latency at 1, 8 and 32 clients.

Starts its own server (``python -m vist2.serve`` on a free port of 127.0.0.1), then for each
concurrency C runs C clients that each send streaming /v1/completions requests back to back until
``max(8, 2·C)`` requests have finished. Every request has the same shape: a prompt of
``--prompt-tokens`` token ids (different slices of the embedded sample text, so no two clients send
the same prompt) and exactly ``--max-tokens`` new tokens (``ignore_eos``), greedy, in ``--mode``.

* **TTFT**: from sending the request to the first streamed token (queueing included).
* **ITL**: the gap between consecutive streamed chunks of one request (a chunk is one token, except
  when the server holds back bytes of an incomplete character or a possible stop string).
* **TPOT**: per request, (last chunk − first chunk) / (tokens − 1).
* **req/s** and **tok/s**: finished requests and generated tokens per second of wall time.

Run (CPU, the tiny model built on the fly; about two minutes on 2 cores)::

    python bench/serve_load.py --out bench/results/serve-cpu-tiny/load.json

    python bench/serve_load.py --model runs/vist2-0.6b-random --device cuda --dtype bfloat16 \\
        --prompt-tokens 4096 --max-tokens 256 --out bench/results/serve-gpu-qwen3-0.6b/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def _summary(xs: list[float]) -> dict:
    return {"p50": _pct(xs, 50), "p99": _pct(xs, 99), "mean": statistics.fmean(xs) if xs else float("nan"),
            "n": len(xs)}


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    times, tokens = [], None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c["text"] for c in chunk["choices"]):
                times.append(time.perf_counter())
    return {"ttft": times[0] - t0, "itl": [b - a for a, b in zip(times, times[1:])],
            "tpot": (times[-1] - times[0]) / max(1, tokens - 1), "tokens": tokens, "end": times[-1]}


async def _level(url: str, prompts: list[list[int]], concurrency: int, args) -> dict:
    total = max(8, 2 * concurrency)
    next_i, results = 0, []

    async def worker(client):
        nonlocal next_i
        while next_i < total:
            i, next_i = next_i, next_i + 1
            body = {"model": "bench", "prompt": prompts[i % len(prompts)], "max_tokens": args.max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                    "ignore_eos": True, "mode": args.mode}
            results.append(await _one(client, url, body))

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency, "requests": len(results), "wall_s": wall,
        "requests_per_s": len(results) / wall, "output_tokens_per_s": tokens / wall,
        "ttft_s": _summary([r["ttft"] for r in results]),
        "itl_s": _summary([x for r in results for x in r["itl"]]),
        "tpot_s": _summary([r["tpot"] for r in results]),
    }


def _prompts(model_dir: str, n_tokens: int, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from vist2.samples import sample_text

    ids = AutoTokenizer.from_pretrained(model_dir)(sample_text("en"), add_special_tokens=False)["input_ids"]
    while len(ids) < n_tokens + count * 37:
        ids = ids + ids
    return [ids[i * 37 : i * 37 + n_tokens] for i in range(count)]  # shifted slices: all prompts differ


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a VIST2 checkpoint (default: build the tiny preset in a temporary folder)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--mode", choices=["gcc", "pcc", "none"], default="gcc")
    p.add_argument("--max-batch", type=int, default=32, help="server cache rows")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default="bench/results/serve-cpu-tiny/load.json")
    args = p.parse_args(argv)

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if model is None:
        model = str(Path(tmp.name) / "tiny")
        from vist2.cli import main as vist2_main

        assert vist2_main(["init", "--preset", "tiny", "--out", model]) == 0
    port = _free_port()
    cmd = [sys.executable, "-m", "vist2.serve", "--model", model, "--served-model-name", "bench", "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", "4096", "--device", args.device, "--dtype", args.dtype,
           "--mode", args.mode, "--log-level", "warning"]
    server = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with {server.returncode}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not come up within 300 s")
            time.sleep(0.5)
        prompts = _prompts(model, args.prompt_tokens, 64)
        url = base + "/v1/completions"
        asyncio.run(_level(url, prompts, 2, argparse.Namespace(**{**vars(args), "max_tokens": 4})))  # warm-up
        levels = []
        for c in args.concurrency:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            lv = asyncio.run(_level(url, prompts, c, args))
            lv["loadavg_1min_before"] = load
            levels.append(lv)
            print(f"C={c:3d}  {lv['requests']:3d} req  {lv['requests_per_s']:6.2f} req/s  "
                  f"{lv['output_tokens_per_s']:7.1f} tok/s  TTFT p50 {lv['ttft_s']['p50'] * 1e3:7.0f} ms "
                  f"p99 {lv['ttft_s']['p99'] * 1e3:7.0f} ms  ITL p50 {lv['itl_s']['p50'] * 1e3:6.1f} ms "
                  f"p99 {lv['itl_s']['p99'] * 1e3:6.1f} ms", flush=True)
        metrics = httpx.get(base + "/metrics").text
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        tmp.cleanup()

    import torch

    out = {
        "command": "python bench/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"model": args.model or "tiny (built)"},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count()},
        "levels": levels,
        "server_kv_entries_saved_total": next((float(x.split()[-1]) for x in metrics.splitlines()
                                               if x.startswith("vist2_kv_entries_saved_total")), None),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
