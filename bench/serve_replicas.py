"""Replicas and conversation routing: ``vist2 serve --replicas`` with affinity routing vs round-robin, 1 vs 2
replicas, and a replica killed mid-run.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/serve_replicas.py --model models/vist2-nano \\
        --out bench/results/serve_replicas/nano-cpu.json

``--chats`` chats (default 8) run concurrently for ``--turns`` turns (default 12) against a local Ray Serve
application of the model (``--chat-history compressed``, the server's other defaults; each replica one CPU).
The chats go in lockstep: every chat sends its turn at once, and the next turn starts when all have their
answer (a chat client waits for the reply before it writes again). Each turn adds ``--user-tokens`` tokens of
held-out prose (``bench/chat_turns.py``'s texts, a different stretch per chat) and asks for ``--reply-tokens``
greedy tokens, streamed; the reply joins the history. Configurations (``--configs``):

- ``affinity-2``: 2 replicas, vist2's ``ConversationRouter`` (a chat stays on one replica);
- ``round-robin-2``: 2 replicas, Ray Serve's ``RoundRobinRouter`` (turns alternate between replicas);
- ``affinity-1``: 1 replica;
- ``kill-2``: ``affinity-2`` again, and during turn ``--kill-turn`` (once every chat has its first token)
  the replica serving chat 0 is killed (``ray.kill``): its chats' turns end with the error event; they send
  the same turn again, and the run goes on while Ray starts a replacement.

Per configuration: TTFT (client clock: the request sent to its first generated text) per turn, median and max
over the chats; turn 12's; the encoder cache's hit ratio (hits / (hits + misses), prompt chunks) and the prefix
cache's (chunks whose K/V was reused / chunks prefilled that it could have held), and the share of prompt
chunks that came from either cache (not read by the vision tower), all over turns 2-12 and summed over the
replicas' ``/metrics`` (a chunk found in the prefix cache counts in neither encoder cache hits nor misses); the
share of the previous turn's prompt chunks found in the prefix cache (``usage.memory_cache.prefix_hit_chunks``
of turn t over ``chunks_compressed`` of turn t-1); generated tokens per second over the turns' wall time;
which replica served each request.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import asyncio
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_turns import user_turns  # noqa: E402  (the held-out texts of the chat benchmark)

CONFIGS = ("affinity-2", "round-robin-2", "affinity-1", "kill-2")
SYSTEM = "You are a careful reader. Answer from the text."


def metrics_totals(url: str) -> dict[str, float]:
    """The cache counters of every replica's /metrics, summed over replicas."""
    want = ("vist2_memory_cache_hits_total", "vist2_memory_cache_misses_total",
            "vist2_prefix_cache_hit_chunks_total", "vist2_prefix_cache_miss_chunks_total",
            "vist2_generation_tokens_total")
    out = dict.fromkeys(want, 0.0)
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


async def one_turn(client: httpx.AsyncClient, url: str, messages: list[dict], reply_tokens: int,
                   started: asyncio.Event | None = None) -> dict:
    body = {"model": "m", "messages": messages, "max_tokens": reply_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    row = {"text": "", "ttft_s": None, "error": None}
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        row["replica"] = r.headers.get("x-vist2-replica")
        if r.status_code != 200:
            row["error"] = (await r.aread()).decode()[:300]
            return row
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                row["error"] = ev["error"]
                continue
            if ev.get("usage"):
                row["usage"] = ev["usage"]
            for c in ev.get("choices", ()):
                text = c["delta"].get("content")
                if text or c.get("finish_reason"):
                    if row["ttft_s"] is None:
                        row["ttft_s"] = time.perf_counter() - t0
                        if started is not None:
                            started.set()
                    row["text"] += text or ""
    row["wall_s"] = time.perf_counter() - t0
    return row


async def run_chats(url: str, users: list[list[str]], args, kill=None) -> dict:
    """Every chat's turns in lockstep; ``kill(previous turn's rows)`` runs during turn ``--kill-turn``."""
    chats = [[{"role": "system", "content": SYSTEM}] for _ in users]
    turns, totals, wall = [], [metrics_totals(url)], 0.0
    kill_report, replaced = None, None
    async with httpx.AsyncClient(timeout=600, headers={"Authorization": "Bearer none"}) as client:
        for t in range(len(users[0])):
            for c, msgs in enumerate(chats):
                msgs.append({"role": "user", "content": users[c][t]})
            t0 = time.perf_counter()
            firsts = [asyncio.Event() for _ in chats]
            tasks = [asyncio.create_task(one_turn(client, url, [*m], args.reply_tokens, firsts[c]))
                     for c, m in enumerate(chats)]
            if kill is not None and t + 1 == args.kill_turn:
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), 600)
                kill_report, replaced = await kill(turns[-1])
            rows = await asyncio.gather(*tasks)
            retried = [c for c, r in enumerate(rows) if r["error"]]
            for c in retried:  # the conversation's next try works on any replica: the history is in the request
                rows[c] = {**await one_turn(client, url, [*chats[c]], args.reply_tokens), "retry_of": rows[c]}
            wall += time.perf_counter() - t0
            for c, r in enumerate(rows):
                chats[c].append({"role": "assistant", "content": r["text"]})
            await asyncio.sleep(1.5)  # replicas report /metrics every second
            totals.append(metrics_totals(url))
            turns.append(rows)
            ttfts = [r["ttft_s"] for r in rows if r["ttft_s"] is not None]
            print(f"  turn {t + 1:2}: TTFT median {statistics.median(ttfts):6.2f} s max {max(ttfts):6.2f} s, "
                  f"replicas {sorted({r['replica'] for r in rows})}, retried {retried}",
                  file=sys.stderr, flush=True)
    if replaced is not None:
        kill_report.update(await asyncio.wait_for(replaced, 600))
    return {"turns": turns, "metrics": totals, "wall_s": wall, "kill": kill_report}


def summarize(run: dict) -> dict:
    turns, totals = run["turns"], run["metrics"]
    d = {k: totals[-1][k] - totals[1][k] for k in totals[0]}  # turns 2..N
    mem = d["vist2_memory_cache_hits_total"] / max(1.0, d["vist2_memory_cache_hits_total"]
                                                  + d["vist2_memory_cache_misses_total"])
    pre = d["vist2_prefix_cache_hit_chunks_total"] / max(1.0, d["vist2_prefix_cache_hit_chunks_total"]
                                                        + d["vist2_prefix_cache_miss_chunks_total"])
    hits, pre_hits = d["vist2_memory_cache_hits_total"], d["vist2_prefix_cache_hit_chunks_total"]
    read_again = (pre_hits + hits) / max(1.0, pre_hits + hits + d["vist2_memory_cache_misses_total"])
    reuse_hit = reuse_all = 0
    for prev, cur in zip(turns, turns[1:]):
        for p, c in zip(prev, cur):
            if "usage" in p and "usage" in c:
                reuse_hit += c["usage"]["memory_cache"]["prefix_hit_chunks"]
                reuse_all += p["usage"]["compression"]["chunks_compressed"]
    per_turn = [{"turn": i + 1, "ttft_median_s": round(statistics.median(x := [r["ttft_s"] for r in rows]), 4),
                 "ttft_max_s": round(max(x), 4), "replicas": [r["replica"] for r in rows],
                 "prompt_tokens": [r.get("usage", {}).get("prompt_tokens") for r in rows]}
                for i, rows in enumerate(turns)]
    sticky = sum(len({rows[c]["replica"] for rows in turns}) == 1 for c in range(len(turns[0])))
    generated = sum(r.get("usage", {}).get("completion_tokens", 0) for rows in turns for r in rows)
    return {"memory_cache_hit_ratio_turns_2_on": round(mem, 4), "prefix_cache_hit_ratio_turns_2_on": round(pre, 4),
            "chunks_from_either_cache_ratio_turns_2_on": round(read_again, 4),
            "previous_prompt_reused_ratio": round(reuse_hit / max(1, reuse_all), 4),
            "turn_last_ttft_median_s": per_turn[-1]["ttft_median_s"],
            "turn_last_ttft_max_s": per_turn[-1]["ttft_max_s"],
            "throughput_tokens_per_s": round(generated / run["wall_s"], 2), "wall_s": round(run["wall_s"], 2),
            "generated_tokens": generated, "chats_on_one_replica": sticky, "metrics_delta_turns_2_on": d,
            "per_turn": per_turn}


def serve_args(args, replicas: int, port: int):
    from vist2.serve import _add_arguments

    p = argparse.ArgumentParser()
    _add_arguments(p)
    return p.parse_args(["--model", str(args.model), "--served-model-name", "m", "--replicas", str(replicas),
                         "--port", str(port), "--chat-history", "compressed", "--shutdown-grace", "1"])


def kill_figures(run: dict, kill_turn: int, victim: str) -> dict:
    """What the kill did to turn ``kill_turn``: the failed turns (their error), the others, the retries."""
    rows = run["turns"][kill_turn - 1]
    failed = [c for c, r in enumerate(rows) if "retry_of" in r]
    return {"turn": kill_turn, "chats_on_killed_replica_failed": failed,
            "errors": [rows[c]["retry_of"]["error"] for c in failed],
            "failed_were_on_killed_replica": all(rows[c]["retry_of"]["replica"] == victim for c in failed),
            "others_completed": all(r["error"] is None and r.get("usage", {}).get("completion_tokens") == run["reply"]
                                    for c, r in enumerate(rows) if c not in failed),
            "retries_completed": all(rows[c]["error"] is None for c in failed),
            "retry_replicas": [rows[c]["replica"] for c in failed],
            "retry_ttft_s": [round(rows[c]["ttft_s"], 4) for c in failed],
            "turns_after_kill_all_ok": all(r["error"] is None for rows in run["turns"][kill_turn:] for r in rows)}


def run_config(name: str, users, args, port: int) -> dict:
    import ray
    from ray import serve
    from ray.serve.experimental.round_robin_router import RoundRobinRouter

    from vist2.serve import build_app, cluster

    replicas = int(name.rsplit("-", 1)[1])
    router = RoundRobinRouter if name.startswith("round-robin") else cluster.ConversationRouter
    t0 = time.perf_counter()
    url = cluster.start(serve_args(args, replicas, port), build_app, router_class=router,
                        ray_init={"num_cpus": 2, "object_store_memory": 200 << 20, "log_to_driver": False})
    up = time.perf_counter() - t0
    print(f"{name}: {replicas} replica(s) up in {up:.1f} s", file=sys.stderr, flush=True)

    async def kill(prev_rows):
        """Kill the replica that served chat 0's previous turn; time until Ray has replaced it."""
        victim = prev_rows[0]["replica"]
        t_kill = time.perf_counter()
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{cluster.APP_NAME}#Engine#{victim}", namespace="serve"),
                 no_restart=True)

        async def replaced():
            """Seconds from the kill until Ray reports fewer running replicas, and until all run again."""
            out, full = {}, {"RUNNING": replicas}
            while True:
                app = await asyncio.to_thread(serve.status)
                st = {k: v for k, v in app.applications[cluster.APP_NAME].deployments["Engine"]
                      .replica_states.items() if v}
                if "death_noticed_after_s" not in out:
                    if st != full:
                        out["death_noticed_after_s"] = round(time.perf_counter() - t_kill, 2)
                elif st == full:
                    out["replacement_running_after_s"] = round(time.perf_counter() - t_kill, 2)
                    return out
                await asyncio.sleep(0.25)

        return {"killed_replica": victim}, asyncio.create_task(replaced())

    try:
        run = asyncio.run(run_chats(url, users, args, kill=kill if name.startswith("kill") else None))
        run["reply"] = args.reply_tokens
        out = {"replicas": replicas, "router": router.__name__, "startup_s": round(up, 1), **summarize(run)}
        if run["kill"] is not None:
            out["kill"] = {**run["kill"], **kill_figures(run, args.kill_turn, run["kill"]["killed_replica"])}
        out["raw"] = [[{k: v for k, v in r.items() if k != "text"} for r in rows] for rows in run["turns"]]
        return out
    finally:
        serve.delete(cluster.APP_NAME)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/vist2-nano"))
    p.add_argument("--chats", type=int, default=8)
    p.add_argument("--turns", type=int, default=12)
    p.add_argument("--user-tokens", type=int, default=256, help="held-out tokens per user message")
    p.add_argument("--reply-tokens", type=int, default=16)
    p.add_argument("--kill-turn", type=int, default=6)
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not 1 < args.kill_turn <= args.turns:
        p.error("--kill-turn must be in [2, --turns]")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    texts = user_turns(tok, args.chats * args.turns, args.user_tokens)
    users = [texts[c * args.turns:(c + 1) * args.turns] for c in range(args.chats)]
    out = {"command": "python " + shlex.join(sys.argv), "machine": platform.platform(),
           "cpus": os.cpu_count(), "load_avg_before": os.getloadavg(),
           "args": {k: str(v) for k, v in vars(args).items()},
           "configs": {}}
    import ray

    try:
        for name in args.configs:
            out["configs"][name] = run_config(name, users, args, args.port)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1))  # after each configuration: a partial run is kept
            brief = {k: v for k, v in out["configs"][name].items()
                     if k not in ("raw", "per_turn", "metrics_delta_turns_2_on")}
            print(json.dumps(brief), file=sys.stderr, flush=True)
    finally:
        from vist2.serve import cluster

        if ray.is_initialized():
            cluster.stop()
    out["load_avg_after"] = os.getloadavg()
    args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
