"""Does the answer time tell one tenant what another sent? A timing probe of `vist2 serve`'s shared caches.

Starts ``python -m vist2.serve`` on the shipped nano model with two API keys (tenants ``alice`` and
``bob``; a free port of 127.0.0.1). Each trial: Alice sends a 1.5 KB chat with a 4-digit PIN at its
start (``max_tokens`` 1); then, in random order, Bob sends the same chat (the right guess, ``cached``
if the caches were shared), a chat of the same length with another PIN and the text's words shuffled
(``uncached``: shares no chunk with any other probe, so Bob's own probes do not warm each other), and
Alice sends her chat again (``own_repeat``: what the cache does within one tenant). Every request's
wall time and ``usage.memory_cache`` are kept.

Per group: median, p10, p90 of the times; ``auc``: the chance that a right guess answers faster than
a wrong one (0.5: no separation; 1.0: every right guess is faster), and ``hits_identical``: trials
whose right and wrong guesses got the same cache hits in ``usage.memory_cache`` (``hits``,
``prefix_hit_chunks``, ``prefix_hit_tokens``). Run it twice, per tenant (the
default) and with ``--shared-cache`` (the behaviour before tenants), to see the channel close::

    OMP_NUM_THREADS=1 python bench/serve_tenant_timing.py --out bench/results/serve-cpu-nano/tenant_timing.json
    OMP_NUM_THREADS=1 python bench/serve_tenant_timing.py --server-args=--shared-cache \
        --out bench/results/serve-cpu-nano/tenant_timing_shared.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"alice": "bench-key-alice", "bob": "bench-key-bob"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chat(prose: str, trial: int, pin: str, chars: int, other: bool = False) -> list[dict]:
    """Trial ``trial``'s chat; ``other``: its words shuffled (the same length, no chunk in common with any
    other probe)."""
    start = (trial * 97) % max(1, len(prose) - chars)
    text = prose[start:start + chars]
    if other:
        words = text.split(" ")
        random.Random(trial).shuffle(words)
        text = " ".join(words)
    return [{"role": "user", "content": f"My bank PIN is {pin}. Keep it safe.\n" + text}]


def _hits(usage: dict) -> tuple:
    return usage["hits"], usage["prefix_hit_chunks"], usage["prefix_hit_tokens"]


def _ask(c: httpx.Client, who: str, messages: list[dict]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEYS[who]}"}, json={
        "model": "nano", "messages": messages, "max_tokens": 1, "temperature": 0, "ignore_eos": True})
    took = time.perf_counter() - t0
    r.raise_for_status()
    return took, r.json()["usage"]["memory_cache"]


def _summary(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=10)
    return {"median_ms": round(1000 * statistics.median(xs), 1), "p10_ms": round(1000 * q[0], 1),
            "p90_ms": round(1000 * q[-1], 1), "n": len(xs)}


def _auc(fast: list[float], slow: list[float]) -> float:
    """P(a value of ``fast`` < a value of ``slow``), ties counted half: 0.5 when they cannot be told apart."""
    wins = sum((a < b) + 0.5 * (a == b) for a in fast for b in slow)
    return round(wins / (len(fast) * len(slow)), 3)


def run(url: str, trials: int, chars: int, seed: int) -> dict:
    from vist2.samples import sample_text

    prose, rng = sample_text("en"), random.Random(seed)
    times = {"cached": [], "uncached": [], "own_repeat": []}
    hits = {k: [] for k in times}  # per trial: (hits, prefix_hit_chunks, prefix_hit_tokens)
    identical = 0
    with httpx.Client(base_url=url, timeout=120) as c:
        _ask(c, "bob", _chat(prose, -1, "9999", chars))  # warm-up: the first request pays one-time costs
        for trial in range(trials):
            pin, wrong = f"{rng.randrange(10_000):04d}", None
            while wrong is None or wrong == pin:
                wrong = f"{rng.randrange(10_000):04d}"
            _ask(c, "alice", _chat(prose, trial, pin, chars))
            probes = [("cached", "bob", pin, False), ("uncached", "bob", wrong, True),
                      ("own_repeat", "alice", pin, False)]
            rng.shuffle(probes)
            usage = {}
            for group, who, guess, other in probes:
                took, usage[group] = _ask(c, who, _chat(prose, trial, guess, chars, other))
                times[group].append(took)
                hits[group].append(_hits(usage[group]))
            identical += _hits(usage["cached"]) == _hits(usage["uncached"])
    return {"groups": {k: _summary(v) for k, v in times.items()},
            "auc_cached_faster_than_uncached": _auc(times["cached"], times["uncached"]),
            "auc_own_repeat_faster_than_uncached": _auc(times["own_repeat"], times["uncached"]),
            "hits_identical": f"{identical}/{trials}", "times_s": times, "hits": hits}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "models/vist2-nano"))
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--chars", type=int, default=1500, help="characters of text after the PIN (default 1500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-args", default="", help="extra vist2 serve flags, e.g. '--shared-cache'")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        keyfile = Path(tmp) / "keys.txt"
        keyfile.write_text("".join(f"{name}:{key}\n" for name, key in KEYS.items()))
        cmd = [sys.executable, "-m", "vist2.serve", "--model", args.model, "--port", str(port),
               "--served-model-name", "nano", "--api-key-file", str(keyfile), "--log-level", "warning",
               *shlex.split(args.server_args)]
        server = subprocess.Popen(cmd, env=dict(os.environ))
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)
            result = run(url, args.trials, args.chars, args.seed)
        finally:
            server.terminate()
            server.wait(30)
    model = Path(args.model).resolve()
    result["setup"] = {"command": " ".join(shlex.quote(a) for a in sys.argv), "server_args": args.server_args,
                       "model": str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else model.name, "trials": args.trials, "chars": args.chars, "python": platform.python_version(),
                       "machine": platform.machine(), "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                       "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("times_s", "hits")}, indent=2))


if __name__ == "__main__":
    main()
