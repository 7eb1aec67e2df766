"""Running one mode of ``vist2 bench`` through the engine: timed steps, one :class:`ModeResult`.

Every ``Engine.step()`` is timed (synchronised on CUDA) and recorded against the context length
after it, i.e. the prompt plus the generated tokens fed through the LLM so far. Phases come from the
engine's public step reports (``Engine(observer=...)``), the bench's only view inside it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

from ..modes import Mode
from ..samples import sample_text
from .flops import FlopShape, chunk_flops, decode_flops, flops_per_token
from ..runtime import kv_geometry
from .kv import cache_need, fit_batch
from .memory import PeakMemory, sync


@dataclass
class ModeResult:
    """What one mode's run measured. :meth:`to_json` is its ``modes.<name>`` entry in ``bench.json``;
    ``context`` / ``ms`` / ``kv`` are the per-step curve (stored binned, under ``curve``)."""

    batch: int
    prompt_tokens: int
    new_tokens: int
    finish_reasons: list[str]
    cache_capacity: int | None  # entries per row the engine preallocated (None: transformers' own cache)
    kv_expected: dict  # the layout's prompt / final / peak entries (:func:`vist2.bench.kv.kv_layout`)
    ttft_s: float  # until every sequence of the batch has its first token
    ttft_s_per_request: list[float]
    prefill_rows_per_forward_max: int | None  # most prompts fed in one prefill forward
    decode_s: float  # from the batch's first token to its last
    engine_tokens_per_s: list[float] | None  # each request's own Stats.tokens_per_s
    kv_tokens: int  # per sequence, at the end
    kv_tokens_peak: int
    kv_tokens_uncompressed: int  # what a plain LLM holds for the same tokens
    kv_bytes: int
    kv_bytes_peak: int
    kv_bytes_allocated: int | None  # the engine's cache for the whole batch
    kv_bytes_per_entry: int
    dtype_bytes: int
    chunks_compressed: int
    visual_tokens: int
    compression: dict  # see Recorder.compression
    phase_seconds: dict | None
    memory_baseline_bytes: int
    peak_memory_bytes: int
    memory_kind: str
    flops_per_token: dict
    context: list[int] = field(default_factory=list, repr=False)
    ms: list[float] = field(default_factory=list, repr=False)
    kv: list[int] = field(default_factory=list, repr=False)
    buckets: list[dict] | None = None  # ms per token over context buckets, set once every mode ran

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch * (self.new_tokens - 1) / self.decode_s

    @property
    def ms_per_token_mean(self) -> float | None:
        return statistics.fmean(self.ms) if self.ms else None

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("context", "ms", "kv")}
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        d["decode_tokens_per_s_per_sequence"] = self.decode_tokens_per_s / self.batch
        d["ms_per_token_mean"] = self.ms_per_token_mean
        return d


def prompt_ids(tokenizer, n: int) -> list[int]:
    """``n`` token ids of the embedded English sample, repeated (whole passages tokenized together,
    so the joins tokenize as real text would)."""
    text = sample_text("en")
    per_passage = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = tokenizer("\n\n".join([text] * (n // per_passage + 2)), add_special_tokens=False)["input_ids"]
    return ids[:n]


class Recorder:
    """The engine's public step reports (``Engine(observer=...)``), summed per phase of the run
    (``prefill``: the first step; ``decode``: every later one)."""

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
        """Chunks compressed and the seconds they took, at prefill and during decode; the decode part
        as a fraction of decode time (all zero for a run that compressed nothing)."""
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
    sync(device)
    t0 = time.perf_counter()
    engine.step()  # admit + prefill every row, sample and feed the first token
    sync(device)
    recorder.phase = "decode"
    k = 0
    with progress(total=M, desc=f"{label:4}", initial=1) as bar:
        while engine.busy:
            t = time.perf_counter()
            engine.step()
            sync(device)
            dt = time.perf_counter() - t
            k += 1
            bar.update(1)
            if engine.busy:  # the last step only samples: no forward, not a point of the curve
                context.append(N + k + 1)
                ms.append(dt * 1e3)
                kv.append(recorder.kv_tokens[rids[0]])
    return context, ms, kv, t0, time.perf_counter()


def engine_options(args) -> dict:
    opts = {"prefill_budget": args.prefill_budget, "render_workers": args.render_workers}
    if args.cuda_graphs != "auto":
        opts["cuda_graphs"] = args.cuda_graphs == "on"
    return opts


def run_engine(model, processor, ids, mode, args, device, fshape: FlopShape, memory: PeakMemory,
               progress) -> ModeResult:
    """Decode ``args.batch`` copies of ``ids`` (with ``args.batch_fit``: as many as fit that many GiB of cache)
    for exactly ``args.new_tokens`` greedy tokens in ``mode``."""
    from ..engine import Engine, Request, SamplingParams

    N, M = len(ids), args.new_tokens
    params = SamplingParams(max_new_tokens=M, ignore_eos=True)
    request = Request(query=list(ids), params=params, mode=mode)
    need, capacity = cache_need(Engine(model, processor, max_batch=1), request, M)
    capacity = args.max_cache_tokens or capacity
    per_entry = kv_geometry(model.config.text_config).bytes_per_entry(next(model.parameters()).element_size())
    B = fit_batch(args.batch_fit, capacity, per_entry) if args.batch_fit else args.batch
    base_mem = memory.start()
    recorder = Recorder()
    engine = Engine(model, processor, max_batch=B, max_cache_tokens=capacity, observer=recorder,
                    max_prefills_per_step=args.prefills_per_step or B, **engine_options(args))
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
    return ModeResult(
        batch=B, prompt_tokens=s.prompt_tokens, new_tokens=s.generated_tokens,
        finish_reasons=sorted({st.finish_reason for st in stats}), cache_capacity=capacity, kv_expected=need,
        ttft_s=ttft, ttft_s_per_request=[st.ttft_s for st in stats],
        prefill_rows_per_forward_max=recorder.prefill_rows, decode_s=decode_s,
        engine_tokens_per_s=[st.tokens_per_s for st in stats],
        kv_tokens=s.kv_tokens, kv_tokens_peak=s.kv_tokens_peak, kv_tokens_uncompressed=s.kv_tokens_uncompressed,
        kv_bytes=s.kv_bytes, kv_bytes_peak=s.kv_bytes_peak,
        kv_bytes_allocated=usage["bytes_allocated"], kv_bytes_per_entry=usage["bytes_per_token"],
        dtype_bytes=next(model.parameters()).element_size(),
        chunks_compressed=s.chunks_compressed, visual_tokens=s.visual_tokens,
        compression=recorder.compression(decode_s), phase_seconds=recorder.seconds,
        memory_baseline_bytes=base_mem, peak_memory_bytes=peak_mem, memory_kind=memory.kind,
        flops_per_token={"mean": (sum(dflops) + cflops) / len(dflops) if dflops else None,
                         "at_end": end["total"], "terms_at_end": end},
        context=context, ms=ms, kv=kv,
    )


def measure_stall(model, processor, ids, args, device, mode: str = Mode.GCC, stream_tokens: int = 32) -> dict:
    """The longest step a running stream sees while a long prompt (``ids``) is admitted.

    One short request decodes; after its first token the long one is added, and every step is timed
    until the long one has its first token. ``stall_ms`` is the longest of those steps, ``steady_ms``
    the median step of the stream alone before the admission.
    """
    from ..engine import Engine, Request, SamplingParams

    short = Request(query=list(ids[:stream_tokens]), mode=mode,
                    params=SamplingParams(max_new_tokens=10**6, ignore_eos=True))
    long = Request(query=list(ids), mode=mode, params=SamplingParams(max_new_tokens=2, ignore_eos=True))
    need, _ = cache_need(Engine(model, processor, max_batch=1), long, 4)
    capacity = max(need["peak"] + stream_tokens * 4, 4 * stream_tokens)  # room for the stream's 4 x 32 tokens
    recorder = Recorder()
    engine = Engine(model, processor, max_batch=2, max_cache_tokens=capacity, observer=recorder,
                    **engine_options(args))
    a = engine.add(short)
    steady = []
    for _ in range(9):
        t = time.perf_counter()
        engine.step()
        sync(device)
        steady.append((time.perf_counter() - t) * 1e3)
    b = engine.add(long)
    steps, first = [], False
    while not first:  # until the long request has its first token
        t = time.perf_counter()
        events = engine.step()
        sync(device)
        steps.append((time.perf_counter() - t) * 1e3)
        first = any(e.request_id == b for e in events)
    engine.abort(a)
    engine.abort(b)
    return {"mode": mode, "prompt_tokens": len(ids), "prefill_budget": engine.prefill_budget,
            "steady_ms": statistics.median(steady[1:]), "stall_ms": max(steps), "admission_steps": len(steps),
            "max_prefill_tokens_per_step": recorder.max_prefill_tokens, "step_ms": [round(x, 3) for x in steps]}
