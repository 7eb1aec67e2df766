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
* **Long-prompt client** (``--long-prompt-mb``, 0 = off): alongside the C clients, one more client
  keeps sending oversized prompts (alternately ``--long-prompt-mb`` MB, refused by the body-size
  limit unread, and a fifth of it, which is tokenized and refused by the memory limit), one every
  ``--long-prompt-every`` seconds. Reported: its refusal times, and ``itl_s.max``, the longest stall
  the regular streams saw.

Run (CPU, the tiny model built on the fly; about two minutes on 2 cores)::

    python bench/serve_load.py --out bench/results/serve-cpu-tiny/load.json
    python bench/serve_load.py --concurrency 1 8 --long-prompt-mb 6 \
        --out bench/results/serve-cpu-tiny/load-long-prompts.json

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
    return {"p50": _pct(xs, 50), "p99": _pct(xs, 99), "max": max(xs, default=float("nan")),
            "mean": statistics.fmean(xs) if xs else float("nan"), "n": len(xs)}


async def _long_prompts(client: httpx.AsyncClient, url: str, args, stop: asyncio.Event) -> list[dict]:
    """Oversized prompts, one every ``--long-prompt-every`` s until ``stop``: (size, status, seconds)."""
    big = "word " * int(args.long_prompt_mb * 1e6 / 5)
    sizes = [big, big[: len(big) // 5]]
    out, i = [], 0
    while not stop.is_set():
        prompt = sizes[i % 2]
        i += 1
        t0 = time.perf_counter()
        r = await client.post(url, json={"model": "bench", "prompt": prompt, "max_tokens": 4})
        out.append({"bytes": len(prompt), "status": r.status_code, "seconds": time.perf_counter() - t0,
                    "code": (r.json().get("error") or {}).get("code") if r.status_code != 200 else None})
        try:
            await asyncio.wait_for(stop.wait(), args.long_prompt_every)
        except asyncio.TimeoutError:
            pass
    return out


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
        stop = asyncio.Event()
        long = asyncio.ensure_future(_long_prompts(client, url, args, stop)) if args.long_prompt_mb else None
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        stop.set()
        refusals = await long if long else []
    tokens = sum(r["tokens"] for r in results)
    extra = {}
    if refusals:
        extra["long_prompts"] = {
            "sent": len(refusals), "statuses": sorted({r["status"] for r in refusals}),
            "refusal_s": _summary([r["seconds"] for r in refusals]), "requests": refusals}
    return {**extra,
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
    p.add_argument("--long-prompt-mb", type=float, default=0.0,
                   help="also run a client sending prompts this large (MB) and a fifth of it (0: off)")
    p.add_argument("--long-prompt-every", type=float, default=1.0, metavar="S", help="seconds between them")
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
                  f"p99 {lv['itl_s']['p99'] * 1e3:6.1f} ms max {lv['itl_s']['max'] * 1e3:6.0f} ms", flush=True)
            if "long_prompts" in lv:
                lp = lv["long_prompts"]
                print(f"       long prompts: {lp['sent']} sent, statuses {lp['statuses']}, refused in "
                      f"p50 {lp['refusal_s']['p50'] * 1e3:.0f} ms, max {lp['refusal_s']['max'] * 1e3:.0f} ms",
                      flush=True)
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
