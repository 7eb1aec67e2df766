"""``vist2 bench``: speed, KV footprint and FLOPs of generation with and without compression.

    vist2 bench --preset tiny --prompt-tokens 2000 --new-tokens 1000 --modes gcc,pcc,none,hf \\
        --device cpu --out bench/results/engine-cpu-tiny
    vist2 bench --preset qwen3-0.6b --prompt-tokens 32768 --new-tokens 32768 --dtype bfloat16 \\
        --device cuda --out runs/bench-0.6b
    vist2 bench --model runs/vist2-0.6b --prompt-tokens 8192 --new-tokens 4096 --batch 8 --out runs/bench

One prompt of N token ids (the embedded English sample, repeated) is decoded for
exactly M greedy tokens (``ignore_eos``) in each mode:

* ``gcc``  -- prompt and output compressed, every K tokens become n_visual visual tokens (the paper);
* ``pcc``  -- the prompt compressed, the output kept as text (the Glyph-style baseline);
* ``none`` -- the same engine as a plain LLM;
* ``hf``   -- the same LLM weights in an ordinary ``transformers`` causal LM and ``generate()``:
  what a user has without this package.

Timing: every ``Engine.step()`` is timed (synchronised on CUDA) and recorded
against the context length after it, i.e. the prompt plus the generated tokens
fed through the LLM so far; for ``hf`` a logits processor timestamps every step.
TTFT is the time until every sequence of the batch has its first token. Decode
throughput is ``batch * (M - 1) / (time from first to last token)``. Phases come
from the engine's public step reports (``Engine(observer=...)``): compressing a
generated chunk (render, vision tower, aligner, n_visual tokens through the LLM)
is reported as a fraction of decode time. ``--stall`` adds the longest step a
running stream sees while the prompt is admitted (chunked prefill).

The engine's cache is sized per mode to what the request needs (see
:func:`kv_layout`) unless ``--max-cache-tokens`` is given: the cache is
preallocated, so its capacity, not its live length, is what peak memory shows.

Output: ``OUT/bench.json`` (all numbers, machine, versions, model shape, the
command line), ``OUT/decode_ms_per_token.png``, ``OUT/kv_entries.png``, and a
table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import CLIError
from .runtime import default_device, eos_ids, kv_geometry, load_checkpoint, torch_dtype
from .samples import sample_text

BENCH_MODES = ("gcc", "pcc", "none", "hf")
MAX_CURVE_POINTS = 2000  # longer runs are stored as means over equal bins of steps


# -- FLOPs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopShape:
    """What the analytic FLOPs need to know about a model (counts, not tensors)."""

    llm_layers: int
    llm_heads: int  # query heads
    llm_head_dim: int
    llm_body_params: int  # decoder layers + final norm; the input embedding table is a lookup, not a matmul
    lm_head_params: int  # hidden x vocab, counted even when tied: it is a matmul every token
    vit_layers: int
    vit_hidden: int
    vit_params: int  # patch embedding + encoder (position embeddings excluded: added, not multiplied)
    n_patches: int
    aligner_params: int
    chunk_tokens: int  # K
    n_visual: int  # visual tokens per chunk


def decode_flops(s: FlopShape, kv_len: float) -> dict:
    """FLOPs of one decode forward with ``kv_len`` live cache entries.

    * matmuls: ``2 * (llm_body_params + lm_head_params)`` -- one multiply-add per weight;
    * attention: ``4 * layers * heads * head_dim * kv_len`` -- q.k and p.v, one
      multiply-add each per cached entry, per query head (GQA shares K/V, not the FLOPs).
    """
    matmul = 2 * (s.llm_body_params + s.lm_head_params)
    attention = 4 * s.llm_layers * s.llm_heads * s.llm_head_dim * kv_len
    return {"matmul": matmul, "attention": attention}


def image_flops(s: FlopShape) -> float:
    """One chunk image through the vision tower and the aligner.

    ``2 * vit_params * n_patches`` (every patch meets every weight once)
    ``+ 4 * vit_layers * vit_hidden * n_patches**2`` (full attention over the patches)
    ``+ 2 * aligner_params * n_visual`` (the aligner sees the merged tokens).
    """
    return (2 * s.vit_params * s.n_patches + 4 * s.vit_layers * s.vit_hidden * s.n_patches**2
            + 2 * s.aligner_params * s.n_visual)


def chunk_flops(s: FlopShape, kv_len: float) -> float:
    """Compressing one chunk whose n_visual visual tokens are written after ``kv_len`` live entries.

    ``image_flops + 2 * llm_body_params * n + 4 * layers * heads * head_dim * (n * kv_len + n * (n + 1) / 2)``, n = n_visual
    (visual token j attends to the ``kv_len`` entries before it and to visual tokens 0..j).
    """
    b = s.n_visual
    attention = 4 * s.llm_layers * s.llm_heads * s.llm_head_dim * (b * kv_len + b * (b + 1) / 2)
    return image_flops(s) + 2 * s.llm_body_params * b + attention


def flops_per_token(s: FlopShape, kv_len: float, mode: str) -> dict:
    """Analytic FLOPs to generate one token at ``kv_len`` live cache entries.

    ``matmul + attention`` as in :func:`decode_flops`; in ``gcc`` plus the amortised cost of
    compressing the chunk this token belongs to, ``chunk_flops(kv_len) / K`` (every K generated
    tokens are rendered once and read back as n_visual tokens). ``pcc``, ``none`` and ``hf`` compress
    nothing during decode (a compressed prompt costs at prefill, i.e. in TTFT).
    """
    terms = decode_flops(s, kv_len)
    terms["compression"] = chunk_flops(s, kv_len) / s.chunk_tokens if mode == "gcc" else 0.0
    terms["total"] = terms["matmul"] + terms["attention"] + terms["compression"]
    return terms


def flop_shape(model) -> FlopShape:
    tc, vc, c = model.config.text_config, model.config.vision_config, model.config
    lm = model.model.language_model
    head_dim = kv_geometry(tc).head_dim
    body = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    vit = sum(p.numel() for n, p in model.model.vision.named_parameters() if "position_embedding" not in n)
    gh, gw = c.patch_grid
    return FlopShape(
        llm_layers=tc.num_hidden_layers, llm_heads=tc.num_attention_heads, llm_head_dim=head_dim,
        llm_body_params=body, lm_head_params=model.lm_head.weight.numel(),
        vit_layers=vc.num_hidden_layers, vit_hidden=vc.hidden_size, vit_params=vit, n_patches=gh * gw,
        aligner_params=sum(p.numel() for p in model.model.aligner.parameters()),
        chunk_tokens=c.chunk_tokens, n_visual=c.n_visual,
    )


# -- the cache layout, analytically ------------------------------------------------------


def kv_layout(n_prompt: int, n_new: int, K: int, n_visual: int, mode: str, prompt_encoding: str = "visual") -> dict:
    """Cache entries of one sequence whose whole prompt is the query and which generates ``n_new``
    tokens: ``prompt`` (after prefill), ``final`` and ``peak``.

    Read off the layout plan (:mod:`vist2.layout`), not re-derived: walking the laid-out sequence,
    every token enters the cache, and after a chunk's last visual token that chunk's evicted text
    leaves. The last generated token is sampled but never fed, so ``n_new - 1`` tokens enter; one
    more is laid out so that a window filled exactly at the end counts as compressed, as in the engine.
    """
    from .layout import Kind, Raw, build_sample, olm_segments, prompt_segments

    query, response = list(range(n_prompt)), list(range(n_new))
    if mode in ("none", "hf"):
        prompt = [Raw(tuple(query))]
    else:
        prompt = prompt_segments([], query, [], K, n_visual, prompt_encoding)
    reply = olm_segments(response, K, n_visual) if mode == "gcc" else [Raw(tuple(response))]
    s = build_sample(prompt + reply)
    alive, peak, trace = 0, 0, []
    for t in range(len(s)):
        alive += 1
        peak = max(peak, alive)
        last_visual = s.kind[t] == Kind.VISUAL and (t + 1 == len(s) or s.kind[t + 1] != Kind.VISUAL
                                                    or s.chunk[t + 1] != s.chunk[t])
        if last_visual:
            alive -= sum(1 for c, e in zip(s.chunk, s.evicted) if e and c == s.chunk[t])
        trace.append((alive, peak))
    n_prompt_slots = len(build_sample(prompt))
    final_alive, final_peak = trace[len(s) - 2]  # before the never-fed last token
    return {"prompt": trace[n_prompt_slots - 1][0], "final": final_alive, "peak": final_peak}


# -- small helpers ----------------------------------------------------------------------


class _Memory:
    """Peak memory of one mode: CUDA's allocator peak, or the process's peak RSS on CPU."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.device = device
        self.torch = torch
        self.kind = ""

    def _status_kb(self, key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def start(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated (reset per mode; weights included)"
            return self.torch.cuda.memory_allocated(self.device)
        try:  # Linux: writing 5 resets the peak RSS (VmHWM) so each mode gets its own peak
            Path("/proc/self/clear_refs").write_text("5")
            self.kind = "cpu peak RSS of the process, VmHWM reset per mode (weights and interpreter included)"
        except OSError:
            self.kind = "cpu peak RSS of the process since it started (ru_maxrss; not reset per mode)"
        rss = self._status_kb("VmRSS")
        return rss if rss is not None else 0

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            return self.torch.cuda.max_memory_allocated(self.device)
        hwm = self._status_kb("VmHWM")
        if hwm is not None and "VmHWM" in self.kind:
            return hwm
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return ru if sys.platform == "darwin" else ru * 1024  # bytes on macOS, KiB on Linux


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _bin_curve(context: list[int], ms: list[float], kv: list[int]) -> dict:
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


def _buckets(context: list[int], ms: list[float], lo: int, hi: int, n: int) -> list[dict]:
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


def _prompt_ids(tokenizer, n: int) -> list[int]:
    text = sample_text("en")
    per_passage = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    # whole passages tokenized together, so the joins tokenize as real text would
    ids = tokenizer("\n\n".join([text] * (n // per_passage + 2)), add_special_tokens=False)["input_ids"]
    return ids[:n]


# -- running one mode -------------------------------------------------------------------


class _Recorder:
    """The bench's only view into the engine: its public step reports (``Engine(observer=...)``),
    summed per phase of the run (``prefill``: the first step; ``decode``: every later one)."""

    def __init__(self):
        self.phase = "prefill"
        self.seconds: dict[str, dict[str, float]] = {"prefill": {}, "decode": {}}
        self.chunks = {"prefill": 0, "decode": 0}
        self.compress_kv: list[int] = []  # live entries before each decode-time compression (FLOPs)
        self.kv_tokens: dict[int, int] = {}
        self.max_prefill_tokens = 0
        self.prefill_rows = 0  # most rows in one prefill forward (prompts fed together)

    def __call__(self, report) -> None:
        sec = self.seconds[self.phase]
        for k, v in report.seconds.items():
            sec[k] = sec.get(k, 0.0) + v
        self.chunks["prefill"] += report.prefill_chunks
        self.chunks["decode"] += report.decode_chunks
        self.compress_kv += report.compress_kv
        self.kv_tokens = report.kv_tokens
        self.max_prefill_tokens = max(self.max_prefill_tokens, report.prefill_tokens)
        self.prefill_rows = max([self.prefill_rows, *report.prefill_rows])

    def compression(self, decode_s: float) -> dict:
        p, d = self.seconds["prefill"], self.seconds["decode"]
        return {
            "prefill_chunks": self.chunks["prefill"], "prefill_s": p.get("render", 0.0) + p.get("vision", 0.0),
            "prefill_render_s": p.get("render", 0.0),
            "decode_chunks": self.chunks["decode"], "decode_s": d.get("compress", 0.0),
            "decode_render_s": d.get("render", 0.0),
            "fraction_of_decode": d.get("compress", 0.0) / decode_s if decode_s > 0 else 0.0,
        }


def _timed_steps(engine, rids, recorder, N, M, device, progress, label) -> tuple:
    """Step the engine to the end: the first step (prefill + first token) untimed here, then every
    step timed against the context after it. Returns (context, ms, kv, t0, t_end)."""
    context, ms, kv = [], [], []
    _sync(device)
    t0 = time.perf_counter()
    engine.step()  # admit + prefill every row, sample and feed the first token
    _sync(device)
    recorder.phase = "decode"
    k = 0
    with progress(total=M, desc=f"{label:4}", initial=1) as bar:
        while engine.busy:
            t = time.perf_counter()
            engine.step()
            _sync(device)
            dt = time.perf_counter() - t
            k += 1
            bar.update(1)
            if engine.busy:  # the last step only samples: no forward, not a point of the curve
                context.append(N + k + 1)
                ms.append(dt * 1e3)
                kv.append(recorder.kv_tokens[rids[0]])
    return context, ms, kv, t0, time.perf_counter()


def _run_engine(model, processor, ids, mode, args, device, fshape, memory, progress) -> dict:
    from .engine import Engine, Request, SamplingParams

    N, M, B = len(ids), args.new_tokens, args.batch
    c = model.config
    need = kv_layout(N, M, c.chunk_tokens, c.n_visual, mode, c.prompt_encoding)
    capacity = args.max_cache_tokens or need["peak"] + 1
    base_mem = memory.start()
    recorder = _Recorder()
    engine = Engine(model, processor, max_batch=B, max_cache_tokens=capacity, observer=recorder,
                    max_prefills_per_step=args.prefills_per_step or B, **_engine_options(args))
    params = SamplingParams(max_new_tokens=M, ignore_eos=True)
    rids = [engine.add(Request(query=list(ids), params=params, mode=mode)) for _ in range(B)]
    context, ms, kv, t0, t_end = _timed_steps(engine, rids, recorder, N, M, device, progress, mode)
    peak_mem = memory.peak()
    stats = [engine.result(r).stats for r in rids]
    s = stats[0]
    if any(st.generated_tokens != M for st in stats):
        raise RuntimeError(f"{mode}: generated {[st.generated_tokens for st in stats]} tokens, asked for {M} "
                           f"(cache capacity {capacity}); raise --max-cache-tokens")
    ttft = max(st.ttft_s for st in stats)
    decode_s = (t_end - t0) - ttft
    dflops = [sum(decode_flops(fshape, x).values()) for x in kv]
    cflops = sum(chunk_flops(fshape, e) for e in recorder.compress_kv) / B
    end = flops_per_token(fshape, s.kv_tokens, mode)
    usage = engine.cache_usage()
    return {
        "batch": B, "prompt_tokens": s.prompt_tokens, "new_tokens": s.generated_tokens,
        "finish_reasons": sorted({st.finish_reason for st in stats}),
        "cache_capacity": capacity, "kv_expected": need,
        "ttft_s": ttft, "ttft_s_per_request": [st.ttft_s for st in stats],
        "prefill_rows_per_forward_max": recorder.prefill_rows,
        "decode_s": decode_s, "decode_tokens_per_s": B * (M - 1) / decode_s,
        "decode_tokens_per_s_per_sequence": (M - 1) / decode_s,
        "engine_tokens_per_s": [st.tokens_per_s for st in stats],
        "ms_per_token_mean": statistics.fmean(ms) if ms else None,
        "kv_tokens": s.kv_tokens, "kv_tokens_peak": s.kv_tokens_peak,
        "kv_tokens_uncompressed": s.kv_tokens_uncompressed,
        "kv_bytes": s.kv_bytes, "kv_bytes_peak": s.kv_bytes_peak,
        "kv_bytes_allocated": usage["bytes_allocated"], "kv_bytes_per_entry": usage["bytes_per_token"],
        "dtype_bytes": next(model.parameters()).element_size(),
        "chunks_compressed": s.chunks_compressed, "visual_tokens": s.visual_tokens,
        "compression": recorder.compression(decode_s),
        "phase_seconds": recorder.seconds,
        "memory_baseline_bytes": base_mem, "peak_memory_bytes": peak_mem, "memory_kind": memory.kind,
        "flops_per_token": {
            "mean": (sum(dflops) + cflops) / len(dflops) if dflops else None,
            "at_end": end["total"], "terms_at_end": end,
        },
        "_context": context, "_ms": ms, "_kv": kv,
    }


def _engine_options(args) -> dict:
    opts = {"prefill_budget": args.prefill_budget, "render_workers": args.render_workers}
    if args.cuda_graphs != "auto":
        opts["cuda_graphs"] = args.cuda_graphs == "on"
    return opts


def measure_stall(model, processor, ids, args, device, mode: str = "gcc", stream_tokens: int = 32) -> dict:
    """The longest step a running stream sees while a long prompt (``ids``) is admitted.

    One short request decodes; after its first token the long one is added, and every step is timed
    until the long one has its first token. ``stall_ms`` is the longest of those steps, ``steady_ms``
    the median step of the stream alone before the admission.
    """
    from .engine import Engine, Request, SamplingParams

    c = model.config
    need = kv_layout(len(ids), 4, c.chunk_tokens, c.n_visual, mode, c.prompt_encoding)["peak"] + stream_tokens * 4
    recorder = _Recorder()
    engine = Engine(model, processor, max_batch=2, max_cache_tokens=max(need, 4 * stream_tokens), observer=recorder,
                    **_engine_options(args))
    short = Request(query=list(ids[:stream_tokens]), mode=mode,
                    params=SamplingParams(max_new_tokens=10**6, ignore_eos=True))
    long = Request(query=list(ids), mode=mode, params=SamplingParams(max_new_tokens=2, ignore_eos=True))
    a = engine.add(short)
    steady = []
    for _ in range(9):
        t = time.perf_counter()
        engine.step()
        _sync(device)
        steady.append((time.perf_counter() - t) * 1e3)
    b = engine.add(long)
    steps, first = [], False
    while not first:  # until the long request has its first token
        t = time.perf_counter()
        events = engine.step()
        _sync(device)
        steps.append((time.perf_counter() - t) * 1e3)
        first = any(e.request_id == b for e in events)
    engine.abort(a)
    engine.abort(b)
    return {"mode": mode, "prompt_tokens": len(ids), "prefill_budget": engine.prefill_budget,
            "steady_ms": statistics.median(steady[1:]), "stall_ms": max(steps), "admission_steps": len(steps),
            "max_prefill_tokens_per_step": recorder.max_prefill_tokens, "step_ms": [round(x, 3) for x in steps]}


def hf_model(model):
    """A plain transformers causal LM holding the VIST2 model's LLM weights (body and head)."""
    import copy

    from transformers import AutoModelForCausalLM

    p = next(model.parameters())
    tc = copy.deepcopy(model.config.text_config)
    hf = AutoModelForCausalLM.from_config(tc, dtype=p.dtype)
    getattr(hf, hf.base_model_prefix).load_state_dict(model.model.language_model.state_dict())
    hf.get_output_embeddings().weight.data.copy_(model.lm_head.weight.data)
    return hf.to(p.device).eval()


def _hf_generate(hf, ids, B, M, tc, device, progress):
    """``generate()`` of M greedy tokens for B copies of the prompt, a timestamp after every step."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        """Called once per generated token, right after its forward: a timestamp per step."""

        def __init__(self, bar):
            self.times, self.bar = [], bar

        def __call__(self, input_ids, scores):
            _sync(device)
            self.times.append(time.perf_counter())
            self.bar.update(1)
            return scores

    x = torch.tensor([ids] * B, device=device)
    pad = eos_ids(tc)[0]  # generate() wants one pad id; every row has the same length, so none is padded
    with progress(total=M, desc="hf  ") as bar, torch.no_grad():
        clock = Clock(bar)
        _sync(device)
        t0 = time.perf_counter()
        out = hf.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=M, min_new_tokens=M, do_sample=False,
            logits_processor=LogitsProcessorList([clock]), pad_token_id=pad, return_dict_in_generate=True,
        )
        _sync(device)
    return out, clock, t0


def _run_hf(model, ids, args, device, fshape, memory, progress) -> dict:
    N, M, B = len(ids), args.new_tokens, args.batch
    hf = hf_model(model)
    base_mem = memory.start()
    tc = model.config.text_config
    out, clock, t0 = _hf_generate(hf, ids, B, M, tc, device, progress)
    peak_mem = memory.peak()
    generated = out.sequences.shape[1] - N
    if generated != M:
        raise RuntimeError(f"hf: generated {generated} tokens, asked for {M}")
    kv_final = int(out.past_key_values.get_seq_length())
    t = clock.times
    ttft, decode_s = t[0] - t0, t[-1] - t[0]
    # interval i holds the forward of generated token i: N + i entries once it is cached
    context = [N + i for i in range(1, len(t))]
    ms = [(b - a) * 1e3 for a, b in zip(t[:-1], t[1:])]
    kv = list(context)
    elem = next(hf.parameters()).element_size()
    per_entry = kv_geometry(tc).bytes_per_entry(elem)
    dflops = [sum(decode_flops(fshape, k).values()) for k in kv]
    end = flops_per_token(fshape, kv_final, "hf")
    del out, hf
    return {
        "batch": B, "prompt_tokens": N, "new_tokens": generated, "finish_reasons": ["length"],
        "cache_capacity": None, "kv_expected": kv_layout(N, M, 1, 1, "hf"),
        "ttft_s": ttft, "ttft_s_per_request": [ttft] * B,
        "decode_s": decode_s, "decode_tokens_per_s": B * (M - 1) / decode_s,
        "decode_tokens_per_s_per_sequence": (M - 1) / decode_s,
        "engine_tokens_per_s": None,
        "ms_per_token_mean": statistics.fmean(ms) if ms else None,
        "kv_tokens": kv_final, "kv_tokens_peak": kv_final, "kv_tokens_uncompressed": N + M,
        "kv_bytes": kv_final * per_entry, "kv_bytes_peak": kv_final * per_entry,
        "kv_bytes_allocated": None, "kv_bytes_per_entry": per_entry, "dtype_bytes": elem,
        "chunks_compressed": 0, "visual_tokens": 0,
        "compression": {"prefill_chunks": 0, "prefill_s": 0.0, "prefill_render_s": 0.0, "decode_chunks": 0,
                        "decode_s": 0.0, "decode_render_s": 0.0, "fraction_of_decode": 0.0},
        "memory_baseline_bytes": base_mem, "peak_memory_bytes": peak_mem, "memory_kind": memory.kind,
        "flops_per_token": {"mean": sum(dflops) / len(dflops) if dflops else None,
                            "at_end": end["total"], "terms_at_end": end},
        "_context": context, "_ms": ms, "_kv": kv,
    }


def _warm_up(model, processor, modes, device) -> None:
    """One short run per kind of work, so fonts, kernels and allocator pools exist before timing."""
    import torch

    from .engine import Engine, Request, SamplingParams

    c = model.config
    ids = _prompt_ids(processor.tokenizer, c.chunk_tokens + c.n_visual + 1)
    engine = Engine(model, processor, max_batch=1, max_cache_tokens=4 * c.chunk_tokens + 4 * c.n_visual)
    engine.generate([Request(query=ids, params=SamplingParams(max_new_tokens=c.chunk_tokens + 2, ignore_eos=True),
                             mode="gcc")])
    if "hf" in modes:
        hf = hf_model(model)
        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                        pad_token_id=0)
        del hf
    _sync(device)


# -- reporting ----------------------------------------------------------------------------


def _plots(out: Path, modes: dict, args) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    colors = {"gcc": "tab:red", "pcc": "tab:orange", "none": "tab:blue", "hf": "tab:gray"}
    files = []
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    for name, m in modes.items():
        ctx, ms = m["_context"], m["_ms"]
        if not ms:
            continue
        w = max(1, len(ms) // 40)  # a mean over a window keeps gcc's compression spikes as their amortised cost
        smooth = [statistics.fmean(ms[max(0, i - w + 1) : i + 1]) for i in range(len(ms))]
        ax.plot(ctx, ms, color=colors.get(name), alpha=0.15, linewidth=0.5)
        ax.plot(ctx, smooth, color=colors.get(name), label=name, linewidth=1.5)
    ax.set_xlabel("context (prompt + generated tokens)")
    ax.set_ylabel("decode ms / step")
    ax.set_title(f"decode latency, batch {args.batch}", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "decode_ms_per_token.png")
    files.append("decode_ms_per_token.png")

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    for name, m in modes.items():
        style = "--" if name == "hf" else "-"
        ax.plot(m["_context"], m["_kv"], style, color=colors.get(name), label=name, linewidth=1.5)
    ax.set_xlabel("context (prompt + generated tokens)")
    ax.set_ylabel("KV cache entries per sequence")
    ax.set_title("KV cache size as the context grows", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "kv_entries.png")
    files.append("kv_entries.png")
    return files


def _table(modes: dict) -> str:
    names = list(modes)
    first = modes[names[0]]["buckets"]
    head = (f"{'mode':5} {'TTFT ms':>9} {'tok/s':>8} " + " ".join(
        f"{'ms@' + str(b['context_to']):>9}" for b in first) + f" {'KV end':>7} {'KV peak':>7} {'KV MiB':>7} "
            f"{'peak MiB':>9} {'compr%':>6} {'MFLOP/tok':>10}")
    lines = [head]
    for name in names:
        m = modes[name]
        buckets = " ".join(f"{b['ms_per_token_mean']:9.3f}" if b["ms_per_token_mean"] is not None else f"{'-':>9}"
                           for b in m["buckets"])
        lines.append(
            f"{name:5} {m['ttft_s'] * 1e3:9.1f} {m['decode_tokens_per_s']:8.1f} {buckets} {m['kv_tokens']:7d} "
            f"{m['kv_tokens_peak']:7d} {m['kv_bytes'] / 2**20:7.2f} {m['peak_memory_bytes'] / 2**20:9.1f} "
            f"{100 * m['compression']['fraction_of_decode']:6.1f} {m['flops_per_token']['mean'] / 1e6:10.2f}")
    return "\n".join(lines)


def _command_line(args) -> str:
    src = f"--model {shlex.quote(str(args.model))}" if args.model else f"--preset {args.preset}"
    parts = [f"vist2 bench {src}", f"--prompt-tokens {args.prompt_tokens}", f"--new-tokens {args.new_tokens}",
             f"--modes {args.modes}", f"--batch {args.batch}", f"--device {args.device or 'auto'}",
             f"--dtype {args.dtype}", f"--seed {args.seed}", f"--buckets {args.buckets}"]
    if args.threads:
        parts.append(f"--threads {args.threads}")
    if args.max_cache_tokens:
        parts.append(f"--max-cache-tokens {args.max_cache_tokens}")
    if args.prefill_budget != 2048:
        parts.append(f"--prefill-budget {args.prefill_budget}")
    if args.prefills_per_step:
        parts.append(f"--prefills-per-step {args.prefills_per_step}")
    if args.render_workers != 1:
        parts.append(f"--render-workers {args.render_workers}")
    if args.cuda_graphs != "auto":
        parts.append(f"--cuda-graphs {args.cuda_graphs}")
    if args.stall:
        parts.append("--stall")
    if args.no_warmup:
        parts.append("--no-warmup")
    parts.append(f"--out {shlex.quote(str(args.out))}")
    return " ".join(parts)


def _dumps(report: dict) -> str:
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


def _machine(device) -> dict:
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


def _model_info(model, fshape: FlopShape) -> dict:
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


# -- the command --------------------------------------------------------------------------


def _parse_modes(text: str) -> list[str]:
    modes = []
    for m in (x.strip() for x in text.split(",")):
        if m not in BENCH_MODES:
            raise CLIError(f"--modes: unknown mode {m!r}; choose from {', '.join(BENCH_MODES)}")
        if m not in modes:
            modes.append(m)
    return modes


def _load(args, device, dtype):
    if args.model:
        return load_checkpoint(args.model, device, dtype)
    from .build import build_from_preset, load_tokenizer
    from .config import PRESETS
    from .processing import VIST2Processor

    if args.preset not in PRESETS:
        raise CLIError(f"--preset {args.preset}: unknown; choose from {', '.join(PRESETS)}")
    model = build_from_preset(args.preset, seed=args.seed).to(dtype)
    processor = VIST2Processor(load_tokenizer(), model.config.render_config)
    return model.to(device).eval(), processor


def _report(args, device, model, fshape, results, files) -> dict:
    return {
        "command": _command_line(args),
        "machine": _machine(device),
        "model": _model_info(model, fshape),
        "source": str(args.model) if args.model else f"preset {args.preset} (random weights, seed {args.seed})",
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "batch": args.batch,
        "notes": {
            "context": "prompt tokens + generated tokens fed through the LLM so far",
            "kv": "per sequence; kv_bytes_allocated is the engine's preallocated cache for the whole batch",
            "decode_tokens_per_s": "batch * (new_tokens - 1) / time from the first to the last token",
            "flops_per_token": "analytic, see vist2.benchmark.flops_per_token; mean over the run's decode steps "
                               "(compressions counted where they happened), at_end at the final KV length",
        },
        "modes": {name: {k: v for k, v in m.items() if not k.startswith("_")} | {
            "curve": _bin_curve(m["_context"], m["_ms"], m["_kv"])} for name, m in results.items()},
        "plots": files,
    }


def _check_args(args) -> None:
    if bool(args.model) == bool(args.preset):
        raise CLIError("give exactly one of --model DIR or --preset NAME")
    if args.prompt_tokens <= 0 or args.new_tokens <= 0:
        raise CLIError(f"--prompt-tokens and --new-tokens must be > 0, got {args.prompt_tokens} and {args.new_tokens}")
    if args.new_tokens < 3:
        raise CLIError("--new-tokens must be at least 3 (a first token, then steps to time)")
    if args.batch <= 0:
        raise CLIError(f"--batch must be > 0, got {args.batch}")
    if args.buckets <= 0:
        raise CLIError(f"--buckets must be > 0, got {args.buckets}")
    if args.threads is not None and args.threads <= 0:
        raise CLIError(f"--threads must be > 0, got {args.threads}")
    if args.max_cache_tokens is not None and args.max_cache_tokens <= 0:
        raise CLIError(f"--max-cache-tokens must be > 0, got {args.max_cache_tokens}")
    if args.prefill_budget <= 0:
        raise CLIError(f"--prefill-budget must be > 0, got {args.prefill_budget}")
    if args.prefills_per_step is not None and args.prefills_per_step <= 0:
        raise CLIError(f"--prefills-per-step must be > 0, got {args.prefills_per_step}")
    if args.render_workers <= 0:
        raise CLIError(f"--render-workers must be > 0, got {args.render_workers}")


def _setup(args):
    """Pick the device, load the model: ``(device, model, processor)``."""
    import torch

    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available")
    try:
        device = torch.device(default_device(args.device))
    except RuntimeError as e:
        raise CLIError(f"--device {args.device}: {e}") from e
    dtype = torch_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        model, processor = _load(args, device, dtype)
    except ValueError as e:
        raise CLIError(str(e)) from e
    return device, model, processor


def _run_modes(args, modes, device, model, processor, ids) -> dict:
    import torch
    from tqdm.auto import tqdm

    def progress(**kw):
        return tqdm(file=sys.stderr, leave=False, dynamic_ncols=True, disable=None, **kw)

    fshape, memory = flop_shape(model), _Memory(device)
    if not args.no_warmup:
        _warm_up(model, processor, modes, device)
    results = {}
    for mode in modes:
        if mode == "hf":
            results[mode] = _run_hf(model, ids, args, device, fshape, memory, progress)
        else:
            results[mode] = _run_engine(model, processor, ids, mode, args, device, fshape, memory, progress)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lo, hi = args.prompt_tokens + 1, args.prompt_tokens + args.new_tokens - 1
    for m in results.values():
        m["buckets"] = _buckets(m["_context"], m["_ms"], lo, hi, args.buckets)
    return results


def _print_summary(args, report, results, model, device, out: Path) -> None:
    print(f"vist2 bench: {report['source']}, {device}, {args.dtype}; prompt {args.prompt_tokens} + "
          f"{args.new_tokens} new tokens, batch {args.batch}; K={model.config.chunk_tokens}, "
          f"n_visual={model.config.n_visual}")
    print("ms@C: mean decode ms per step for contexts up to C; tok/s counts the whole batch; "
          "KV per sequence; compr%: compression time / decode time")
    print(_table(results))
    if "stall" in report:
        st = report["stall"]
        print(f"stall: a running stream's longest step while a {st['prompt_tokens']}-token prompt is admitted: "
              f"{st['stall_ms']:.1f} ms (alone {st['steady_ms']:.1f} ms; budget {st['prefill_budget']} entries, "
              f"{st['admission_steps']} steps)")
    print(f"wrote {out / 'bench.json'} and {', '.join(report['plots'])}")


def cmd_bench(args) -> int:
    _check_args(args)
    modes = _parse_modes(args.modes)
    device, model, processor = _setup(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = _prompt_ids(processor.tokenizer, args.prompt_tokens)
    results = _run_modes(args, modes, device, model, processor, ids)
    report = _report(args, device, model, flop_shape(model), results, _plots(out, results, args))
    if args.stall:
        report["stall"] = measure_stall(model, processor, ids, args, device)
    (out / "bench.json").write_text(_dumps(report))
    _print_summary(args, report, results, model, device, out)
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``bench`` sub-command to an argparse sub-parsers object."""
    q = sub.add_parser(
        "bench", help="benchmark decode speed, KV cache and FLOPs in gcc / pcc / none mode and plain transformers",
        description="Decode one prompt for a fixed number of greedy tokens in each mode; write OUT/bench.json, "
                    "plots, and print a table.",
    )
    q.add_argument("--model", metavar="DIR", help="a VIST2 checkpoint folder")
    q.add_argument("--preset", metavar="NAME", help="build a random model at a preset's shapes (e.g. tiny, qwen3-0.6b)")
    q.add_argument("--prompt-tokens", type=int, required=True, metavar="N", help="prompt length in tokens")
    q.add_argument("--new-tokens", type=int, required=True, metavar="M", help="tokens to generate (EOS ignored)")
    q.add_argument("--modes", default=",".join(BENCH_MODES), metavar="LIST",
                   help=f"comma-separated, from {','.join(BENCH_MODES)} (default: all)")
    q.add_argument("--batch", type=int, default=1, metavar="B", help="copies of the request decoded together")
    q.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    q.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    q.add_argument("--seed", type=int, default=0, help="seed of the random preset weights")
    q.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice); 1 is steadiest on a shared machine")
    q.add_argument("--buckets", type=int, default=4, metavar="N", help="context buckets of the table (default 4)")
    q.add_argument("--max-cache-tokens", type=int, default=None, metavar="N",
                   help="engine cache capacity per row (default: what each mode needs)")
    q.add_argument("--prefill-budget", type=int, default=2048, metavar="N",
                   help="prompt entries run through the LLM per engine step while other rows decode (default 2048)")
    q.add_argument("--prefills-per-step", type=int, default=None, metavar="N",
                   help="requests the engine admits per step (default: the batch, prefilled together)")
    q.add_argument("--render-workers", type=int, default=1, metavar="N",
                   help="threads drawing chunk images (engine render_workers, default 1)")
    q.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="capture the engine's decode step as CUDA graphs (auto: on CUDA)")
    q.add_argument("--stall", action="store_true",
                   help="also measure the longest step a running stream sees while the prompt is admitted (gcc)")
    q.add_argument("--no-warmup", action="store_true", help="skip the short untimed warm-up run")
    q.add_argument("--out", required=True, metavar="DIR", help="output folder")
    q.set_defaults(func=cmd_bench)
    return q
