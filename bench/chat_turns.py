"""A long chat, turn by turn: TTFT and KV entries per turn, raw vs compressed history, encoder and prefix caches.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/chat_turns.py --model models/vist2-nano --turns 12 \\
        --user-tokens 1200 --prefill-budget 256 --repeats 3 --out bench/results/chat_turns/nano-cpu.json \\
        --plot bench/results/chat_turns/nano-cpu.png
    python bench/chat_turns.py --replot bench/results/chat_turns/nano-cpu.json \\
        --plot bench/results/chat_turns/nano-cpu.png

Each turn appends a user message of ``--user-tokens`` tokens of held-out prose (``recipes/nano/heldout.txt``,
``recipes/nano/recall.txt``, ``tests/data/prose_hard_breaks.txt``, in that order, none of it from the
nano model's training corpora; read on from where the last turn stopped, wrapping round only if the turns
need more) to the chat, asks the engine for ``--reply-tokens`` greedy tokens through
:meth:`Engine.request` (``messages``, ``history``), and appends the reply as the assistant's turn, as a
chat client does. One engine per configuration, kept for all its turns (as a server is), at the server's
CPU defaults (one cache row of ``max_cache_tokens`` = the model's positions, ``--prefill-budget``):

- ``raw``: today's split, the last user message compressed and every earlier turn raw text;
- ``compressed``: the whole chat through the last user message compressed (``history="compressed"``);
- each with the encoder cache off and on (``--encoder-cache-bytes``, the server's 256 MiB default; on, the
  prefix cache too, as in the server: the LLM's K/V of the chat's earlier chunks is reused);
- ``compressed+memory``: the encoder cache alone (visual tokens reused, the LLM prefills every chunk again);
- ``none``: a plain LLM (mode none) for reference;
- ``hf``: the model's LLM as a plain transformers model, the whole raw chat (mode none's ids) prefilled
  every turn, no cache limit (turns past the model's positions are marked ``beyond_positions``).

Per turn: prompt tokens, the KV entries the prompt needs at its peak (``Engine.footprint``, checked before
the request is added: a chat over the memory limit is *refused* there, as the server answers 413, and the
configuration stops), entries held after the reply and what a plain LLM would hold, TTFT (engine clock,
prompt admission to first token) and where it went (render + vision tower; the LLM's prefill), the whole
turn's wall time, the encoder cache's hits and misses, and the prompt chunks and cache entries whose K/V
came from the prefix cache. One untimed warm-up request (other text) first;
the whole chat runs ``--repeats`` times per configuration (a fresh engine each) and every time is the
median over them (the runs' own times are kept). The machine's other load shows in the times; the counts
are exact.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import functools
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from vist2.engine import Engine, SamplingParams
from vist2.runtime import load_checkpoint
from vist2.serve import CPU_PREFILL_BUDGET

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ("recipes/nano/heldout.txt", "recipes/nano/recall.txt", "tests/data/prose_hard_breaks.txt")
DOCUMENT = (*HELD_OUT, "tests/data/code_sample.py.txt")  # --document-tokens: held-out prose, then source code
CONFIGS = {  # name -> (mode, history, encoder cache on, prefix cache on); names and JSON keys as in saved results
    "raw": ("gcc", "raw", False, False),
    "raw+cache": ("gcc", "raw", True, True),
    "compressed": ("gcc", "compressed", False, False),
    "compressed+memory": ("gcc", "compressed", True, False),
    "compressed+cache": ("gcc", "compressed", True, True),
    "none": ("none", "raw", False, False),
    "hf": ("hf", "raw", False, False),  # transformers: the LLM alone, the whole raw chat prefilled every turn
}


def held_out_ids(tokenizer, files=HELD_OUT) -> list[int]:
    text = "\n\n".join((ROOT / p).read_text(encoding="utf-8").strip() for p in files)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def user_turns(tokenizer, turns: int, n: int) -> list[str]:
    """``turns`` consecutive pieces of ``n`` held-out tokens, decoded (a piece never splits a character:
    it is cut back to the last whole one)."""
    ids = held_out_ids(tokenizer)
    out, at = [], 0
    for _ in range(turns):
        piece = [ids[(at + i) % len(ids)] for i in range(n)]
        at += n
        out.append(tokenizer.decode(piece).strip("\ufffd"))
    return out


def run_chat(model, processor, *, name: str, users: list[str], args) -> list[dict]:
    mode, history, cached, prefix = CONFIGS[name]
    phases: dict[str, float] = {}

    def observe(report):  # the step's phases: prefill (the LLM, with render and vision inside it), render, vision
        for k, v in report.seconds.items():
            phases[k] = phases.get(k, 0.0) + v

    engine = Engine(model, processor, max_batch=1, max_cache_tokens=args.max_cache_tokens,
                    prefill_budget=args.prefill_budget, encoder_cache_bytes=args.encoder_cache_bytes if cached else 0,
                    prefix_cache_bytes=None if prefix else 0, observer=observe)
    params = SamplingParams(max_new_tokens=args.reply_tokens, ignore_eos=True)
    warm = engine.request(messages=[{"role": "user", "content": "A short warm-up. " * 40}], params=params,
                          mode=mode, history=history)
    engine.generate([warm])
    msgs: list[dict] = [{"role": "system", "content": "You are a careful reader. Answer from the text."}]
    rows = []
    for t, text in enumerate(users, 1):
        msgs.append({"role": "user", "content": text})
        req = engine.request(messages=msgs, params=params, mode=mode, history=history)
        need = engine.footprint(req)
        row = {"turn": t, "prompt_tokens": len(req.prompt_ids), "kv_needed": need}
        if need > engine.max_cache_tokens:
            row["refused"] = f"needs {need} KV entries, over max_cache_tokens={engine.max_cache_tokens}"
            rows.append(row)
            print(f"  {name:17} turn {t:2}: refused ({row['refused']})", file=sys.stderr, flush=True)
            break
        before = engine.encoder_cache_stats() or {}
        phases.clear()
        t0 = time.perf_counter()
        [res] = engine.generate([req])
        wall = time.perf_counter() - t0
        s, after = res.stats, engine.encoder_cache_stats() or {}
        row.update(kv_tokens=s.kv_tokens, kv_tokens_uncompressed=s.kv_tokens_uncompressed,
                   kv_ratio=round(s.kv_tokens / s.kv_tokens_uncompressed, 4), ttft_s=round(s.ttft_s, 4),
                   turn_s=round(wall, 4), generated_tokens=s.generated_tokens, chunks_compressed=s.chunks_compressed,
                   memory_hits=after.get("hits", 0) - before.get("hits", 0),
                   memory_misses=after.get("misses", 0) - before.get("misses", 0),
                   prefix_hit_chunks=s.prefix_hit_chunks, prefix_hit_tokens=s.prefix_hit_tokens,
                   render_vision_s=round(phases.get("render", 0.0) + phases.get("vision", 0.0), 4),
                   llm_prefill_s=round(phases.get("prefill", 0.0) - phases.get("render", 0.0)
                                       - phases.get("vision", 0.0), 4))
        rows.append(row)
        print(f"  {name:17} turn {t:2}: {row['prompt_tokens']:6} tokens, KV {s.kv_tokens:5} / "
              f"{s.kv_tokens_uncompressed:5} ({row['kv_ratio']:.0%}), TTFT {s.ttft_s:6.2f} s, "
              f"hits {row['memory_hits']:3} misses {row['memory_misses']:3} prefix {s.prefix_hit_chunks:3}",
              file=sys.stderr, flush=True)
        msgs.append({"role": "assistant", "content": res.text})
    return rows


@torch.no_grad()
def run_chat_hf(model, processor, users: list[str], args) -> list[dict]:
    """The same chat on a plain transformers LLM (``vist2.bench.hf.hf_model``: the model's own LLM weights):
    every turn its whole raw prompt (the ids of mode ``none``) is prefilled, no cache limit, no reuse
    across turns; TTFT is the prefill forward, the reply is greedy with transformers' own cache."""
    from transformers import DynamicCache

    from vist2.bench.hf import hf_model
    from vist2.chat import prompt_parts
    from vist2.modeling import cache_kwarg

    hf = hf_model(model)

    def ids_of(**prompt) -> list[int]:  # the chat's ids as the engine takes them (mode none feeds all as text)
        p = prompt_parts(processor.tokenizer, **prompt)
        return [*p.prefix, *p.query, *p.suffix]

    def reply(ids: list[int]) -> tuple[list[int], float]:
        cache, t0 = DynamicCache(config=hf.config), time.perf_counter()
        logits = hf(torch.tensor([ids]), **cache_kwarg(hf, cache), use_cache=True, logits_to_keep=1).logits
        ttft, out = time.perf_counter() - t0, [int(logits[0, -1].argmax())]
        while len(out) < args.reply_tokens:
            logits = hf(torch.tensor([out[-1:]]), **cache_kwarg(hf, cache), use_cache=True).logits
            out.append(int(logits[0, -1].argmax()))
        return out, ttft

    reply(ids_of(prompt="A short warm-up. " * 40))
    msgs: list[dict] = [{"role": "system", "content": "You are a careful reader. Answer from the text."}]
    rows = []
    for t, text in enumerate(users, 1):
        msgs.append({"role": "user", "content": text})
        ids = ids_of(messages=msgs)
        t0 = time.perf_counter()
        out, ttft = reply(ids)
        n = len(ids) + len(out) - 1
        rows.append({"turn": t, "prompt_tokens": len(ids), "kv_needed": len(ids), "kv_tokens": n,
                     "kv_tokens_uncompressed": n, "kv_ratio": 1.0, "ttft_s": round(ttft, 4),
                     "turn_s": round(time.perf_counter() - t0, 4), "generated_tokens": len(out),
                     "memory_hits": 0, "memory_misses": 0,
                     "beyond_positions": len(ids) > model.config.text_config.max_position_embeddings})
        print(f"  {'hf':17} turn {t:2}: {len(ids):6} tokens, KV {n:5}, TTFT {ttft:6.2f} s", file=sys.stderr, flush=True)
        msgs.append({"role": "assistant", "content": processor.decode(out)})
    return rows


def repeat_document(model, processor, args) -> dict:
    """One document of ``--document-tokens`` tokens asked about twice (encoder cache on): TTFT, the time in
    render + vision tower, and the chunks the vision tower read, for each request."""
    ids = held_out_ids(processor.tokenizer, DOCUMENT)
    if len(ids) < args.document_tokens:
        raise SystemExit(f"--document-tokens: the text has only {len(ids)} tokens")
    text = processor.tokenizer.decode(ids[: args.document_tokens]).strip("\ufffd")
    reads, phases = [], {}

    def observe(report):
        reads.append(report.prefill_chunks)
        for k, v in report.seconds.items():
            phases[k] = phases.get(k, 0.0) + v

    engine = Engine(model, processor, max_batch=1, max_cache_tokens=args.max_cache_tokens,
                    prefill_budget=args.prefill_budget, encoder_cache_bytes=args.encoder_cache_bytes,
                    observer=observe)
    params = SamplingParams(max_new_tokens=args.reply_tokens, ignore_eos=True)
    rows = []
    for i in range(2):
        reads.clear()
        phases.clear()
        [res] = engine.generate([engine.request(text, params=params, question="What is this text about?")])
        s = res.stats
        rows.append({"request": i + 1, "prompt_tokens": s.prompt_tokens, "kv_tokens": s.kv_tokens,
                     "ttft_s": round(s.ttft_s, 4), "vision_chunks_read": sum(reads),
                     "render_vision_s": round(phases.get("render", 0.0) + phases.get("vision", 0.0), 4),
                     "memory_hits": s.memory_hits, "memory_misses": s.memory_misses})
        print(f"  document request {i + 1}: {rows[-1]}", file=sys.stderr, flush=True)
    return {"document_tokens": args.document_tokens, "files": list(DOCUMENT), "requests": rows}


TIMED = ("ttft_s", "turn_s", "render_vision_s", "llm_prefill_s")


def merge_runs(runs: list[list[dict]]) -> list[dict]:
    """One row per turn: the first run's counts (every run must match them: greedy replies, the same chat)
    and the median of each time over the runs, the runs' own times kept beside it."""
    out = []
    for rows in zip(*runs):
        row = dict(rows[0])
        for r in rows[1:]:
            mismatch = {k for k in row if k not in TIMED and r.get(k) != row[k]}
            if mismatch:
                raise RuntimeError(f"turn {row['turn']}: runs differ in {sorted(mismatch)}")
        for k in TIMED:
            if k in row:
                row[k + "_runs"] = [r[k] for r in rows]
                row[k] = round(statistics.median(row[k + "_runs"]), 4)
        out.append(row)
    return out


def summary(rows: list[dict]) -> dict:
    done = [r for r in rows if "refused" not in r]
    by_turn = {r["turn"]: r for r in done}
    last = done[-1] if done else None
    return {
        "turns_answered": len(done),
        "refused_at_turn": rows[-1]["turn"] if rows and "refused" in rows[-1] else None,
        "kv_ratio_last": last["kv_ratio"] if last else None,
        "ttft_last_over_turn2": round(last["ttft_s"] / by_turn[2]["ttft_s"], 3) if last and 2 in by_turn else None,
        "memory_hit_rate": (round(sum(r["memory_hits"] for r in done)
                                  / max(1, sum(r["memory_hits"] + r["memory_misses"] for r in done)), 4)),
        "prefix_hit_chunks": sum(r.get("prefix_hit_chunks", 0) for r in done),
    }


def plot(out: dict, path: Path) -> None:
    """Two panels over the turns: KV entries held (a plain LLM's for reference, the memory limit) and TTFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (kv, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in out["results"].items():
        done = [row for row in r["turns"] if "refused" not in row]
        turns = [row["turn"] for row in done]
        kv.plot(turns, [row["kv_tokens"] for row in done], marker="o", label=name)
        ttft.plot(turns, [row["ttft_s"] for row in done], marker="o", label=name)
        for row in r["turns"]:
            if "refused" in row:
                kv.plot([row["turn"]], [row["kv_needed"]], marker="x", color="black")
    kv.axhline(out["max_cache_tokens"], color="grey", linestyle="--", label="memory limit (x: refused)")
    kv.set(xlabel="turn", ylabel="KV entries after the reply", title="KV cache per turn")
    ttft.set(xlabel="turn", ylabel="TTFT (s, median)", title="time to first token per turn")
    fig.legend(*kv.get_legend_handles_labels(), loc="lower center", ncol=6, fontsize=8)
    fig.suptitle(f"{out['model']}: {out['turns']} turns x {out['user_tokens']} tokens, CPU")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "vist2-nano")
    ap.add_argument("--turns", type=int, default=12)
    ap.add_argument("--user-tokens", type=int, default=1200, help="tokens of each user message")
    ap.add_argument("--reply-tokens", type=int, default=16)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"some of {', '.join(CONFIGS)} ('': no chat)")
    ap.add_argument("--document-tokens", type=int, default=0, metavar="N",
                    help="also ask about one N-token document twice (encoder cache on): vision-tower reads per request")
    ap.add_argument("--max-cache-tokens", type=int, default=None, help="default: the model's positions")
    ap.add_argument("--prefill-budget", type=int, default=None,
                    help="prompt entries per LLM forward (default: the server's CPU default)")
    ap.add_argument("--encoder-cache-bytes", "--memory-cache-bytes", type=int, default=256 << 20,
                    dest="encoder_cache_bytes", help="the server's default (--memory-cache-bytes: its old name)")
    ap.add_argument("--repeats", type=int, default=3, help="whole chats per configuration; times are medians")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default: print only)")
    ap.add_argument("--plot", type=Path, default=None, help="PNG of KV and TTFT per turn")
    ap.add_argument("--replot", type=Path, default=None, metavar="JSON",
                    help="only draw --plot from a JSON this script wrote")
    args = ap.parse_args(argv)
    if args.replot:
        if not args.plot:
            ap.error("--replot needs --plot")
        plot(json.loads(args.replot.read_text()), args.plot)
        return 0
    names = [n for n in args.configs.split(",") if n]
    if unknown := [n for n in names if n not in CONFIGS]:
        ap.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    torch.set_num_threads(1)
    model, processor = load_checkpoint(args.model, "cpu", torch.float32)
    args.max_cache_tokens = args.max_cache_tokens or model.config.text_config.max_position_embeddings
    args.prefill_budget = args.prefill_budget or CPU_PREFILL_BUDGET
    users = user_turns(processor.tokenizer, args.turns, args.user_tokens) if names else []
    results = {}
    for name in names:
        run = run_chat_hf if name == "hf" else functools.partial(run_chat, name=name)
        rows = merge_runs([run(model, processor, users=users, args=args) for _ in range(args.repeats)])
        results[name] = {"mode": CONFIGS[name][0], "history": CONFIGS[name][1], "memory_cache": CONFIGS[name][2],
                         "prefix_cache": CONFIGS[name][3], "summary": summary(rows), "turns": rows}
    out = {"command": shlex.join(["python", "bench/chat_turns.py", *(sys.argv[1:] if argv is None else argv)]),
           "model": str(args.model.resolve().relative_to(ROOT) if args.model.resolve().is_relative_to(ROOT)
                        else args.model),
           "turns": args.turns, "user_tokens": args.user_tokens, "reply_tokens": args.reply_tokens,
           "max_cache_tokens": args.max_cache_tokens, "prefill_budget": args.prefill_budget,
           "memory_cache_bytes": args.encoder_cache_bytes, "repeats": args.repeats, "held_out": list(HELD_OUT),
           "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "results": results}
    if args.document_tokens:
        out["document"] = repeat_document(model, processor, args)
    text = json.dumps(out, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.plot:
        plot(out, args.plot)
    for name, r in results.items():
        print(f"{name:17} {r['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
