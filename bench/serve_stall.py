"""How long hostile or long requests stall the streams already running on `vist2 serve`.

Starts ``python -m vist2.serve`` on the shipped nano model (a free port of 127.0.0.1), keeps
``--streams`` greedy streaming completions running back to back, and in turn sends, one at a time:

* ``question``: a chat request whose ``question`` field is ``--question-mb`` MB (under the default
  body limit, far over any prompt the server accepts): how fast it is refused, with which ``param``;
* ``long_prompt``: a valid ``--prompt-chars``-character prompt (prose) with 4 new tokens: its own
  time to the answer;
* ``refused_prompt``: a ``--refused-chars``-character prompt over the memory limit once tokenized;
* ``quiet``: nothing, the streams alone (the baseline).

For each, the longest gap between two tokens of any running stream while it was in flight
(``max_gap_s``), and the time to first token of a small request sent one second into it
(``small_ttft_s``). Results as JSON.

Run (CPU; about a minute)::

    OMP_NUM_THREADS=1 python bench/serve_stall.py --out bench/results/serve-cpu-nano/stall.json
    # the server code of another checkout (the "before" column in bench/notes/serve.md):
    OMP_NUM_THREADS=1 python bench/serve_stall.py --src /path/to/old/src --out before.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Streams:
    """``n`` clients streaming greedy completions back to back; every token's arrival time is kept."""

    def __init__(self, url: str, n: int, prose: str):
        self.url, self.n, self.prose = url, n, prose
        self.times: list[list[float]] = []  # one list per request: its tokens' arrival times
        self.stop = False

    async def _client(self, c: httpx.AsyncClient, k: int) -> None:
        i = 0
        while not self.stop:
            start = (k * 97 + i * 31) % (len(self.prose) - 200)
            body = {"model": "nano", "prompt": self.prose[start:start + 200], "max_tokens": 600, "temperature": 0,
                    "stream": True, "ignore_eos": True}
            times: list[float] = []
            self.times.append(times)
            async with c.stream("POST", self.url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if self.stop:
                        break
                    if line.startswith("data: {"):
                        times.append(time.perf_counter())
            i += 1

    def max_gap(self, t0: float, t1: float) -> float:
        """The longest gap between consecutive tokens of one request whose later token came in [t0, t1]."""
        gap = 0.0
        for ts in self.times:
            for a, b in zip(ts, ts[1:]):
                if t0 <= b <= t1:
                    gap = max(gap, b - a)
        return gap

    async def run(self, c: httpx.AsyncClient):
        return await asyncio.gather(*(self._client(c, k) for k in range(self.n)), return_exceptions=True)


async def _small_ttft(c: httpx.AsyncClient, url: str) -> float:
    t0 = time.perf_counter()
    body = {"model": "nano", "prompt": "Hello", "max_tokens": 2, "temperature": 0, "stream": True, "ignore_eos": True}
    async with c.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - t0
    return float("nan")


async def _probe(c: httpx.AsyncClient, url: str, streams: Streams, name: str, body: dict | None,
                 endpoint: str, settle: float) -> dict:
    await asyncio.sleep(settle)
    t0 = time.perf_counter()
    small = asyncio.ensure_future(_delayed(_small_ttft(c, url), 1.0))
    if body is None:
        await asyncio.sleep(4.0)
        out = {}
    else:
        r = await c.post(f"{url}/v1/{endpoint}", json=body, timeout=300)
        took = time.perf_counter() - t0
        err = r.json().get("error") if r.status_code != 200 else None
        out = {"status": r.status_code, "took_s": round(took, 3), "param": err and err["param"],
               "code": err and err["code"]}
    ttft = await small
    t1 = time.perf_counter()
    out |= {"name": name, "max_gap_s": round(streams.max_gap(t0, t1), 3), "small_ttft_s": round(ttft, 3),
            "window_s": round(t1 - t0, 3)}
    print(json.dumps(out), flush=True)
    return out


async def _delayed(coro, delay: float):
    await asyncio.sleep(delay)
    return await coro


async def _main(args, url: str) -> list[dict]:
    prose = (ROOT / "src/vist2/data/sample_en.txt").read_text(encoding="utf-8")
    long = (prose * (args.prompt_chars // len(prose) + 1))[: args.prompt_chars]
    refused = (prose * (args.refused_chars // len(prose) + 1))[: args.refused_chars]
    question = "q" * int(args.question_mb * 1e6)
    probes = [
        ("quiet", None, ""),
        ("question", {"model": "nano", "max_tokens": 2, "messages": [{"role": "user", "content": "doc",
                                                                       "question": question}]}, "chat/completions"),
        ("long_prompt", {"model": "nano", "max_tokens": 4, "prompt": long, "temperature": 0}, "completions"),
        ("refused_prompt", {"model": "nano", "max_tokens": 4, "prompt": refused}, "completions"),
    ]
    limits = httpx.Limits(max_connections=args.streams + 8)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        streams = Streams(url, args.streams, prose)
        task = asyncio.ensure_future(streams.run(c))
        results = []
        for _ in range(args.repeat):
            for name, body, endpoint in probes:
                results.append(await _probe(c, url, streams, name, body, endpoint, settle=1.0))
        streams.stop = True
        await task
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models/vist2-nano"))
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--question-mb", type=float, default=1.9)
    p.add_argument("--prompt-chars", type=int, default=32_000)
    p.add_argument("--refused-chars", type=int, default=420_000)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--src", help="run the server from this src folder (PYTHONPATH) instead of the installed vist2")
    p.add_argument("--server-args", default="", help="extra vist2 serve flags, e.g. '--prefill-budget 2048'")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    cmd = [sys.executable, "-m", "vist2.serve", "--model", args.model, "--port", str(port), "--served-model-name",
           "nano", "--max-batch", str(args.streams + 4), "--log-level", "warning", *args.server_args.split()]
    server = subprocess.Popen(cmd, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        results = asyncio.run(_main(args, url))
    finally:
        server.terminate()
        server.wait(30)
    out = {"command": " ".join(sys.argv), "server": cmd[1:], "src": args.src or "installed",
           "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                       "load_avg_1m": os.getloadavg()[0], "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
