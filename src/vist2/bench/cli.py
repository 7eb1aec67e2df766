"""The ``vist2 bench`` command: flags, checks, loading the model, running the modes in turn."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CLIError
from ..modes import MODES, Mode
from ..runtime import cast_model, default_device, load_checkpoint, torch_dtype
from .flops import flop_shape
from .hf import hf_model, run_hf
from .memory import PeakMemory, sync
from .report import batch_label, build_report, buckets, dumps, plots, print_summary
from .runners import ModeResult, measure_stall, prompt_ids, run_engine

HF = "hf"  # a bench-only mode: the LLM alone in transformers' generate(), not an engine mode
BENCH_MODES = (*MODES, HF)


def parse_modes(text: str) -> list[str]:
    modes = []
    for m in (x.strip() for x in text.split(",")):
        if m not in BENCH_MODES:
            raise CLIError(f"--modes: unknown mode {m!r}; choose from {', '.join(BENCH_MODES)}")
        if m not in modes:
            modes.append(m)
    return modes


def check_args(args) -> None:
    if bool(args.model) == bool(args.preset):
        raise CLIError("give exactly one of --model DIR or --preset NAME")
    if args.prompt_tokens <= 0 or args.new_tokens <= 0:
        raise CLIError(f"--prompt-tokens and --new-tokens must be > 0, got {args.prompt_tokens} and {args.new_tokens}")
    if args.new_tokens < 3:
        raise CLIError("--new-tokens must be at least 3 (a first token, then steps to time)")
    for flag, value in (("--batch", args.batch), ("--buckets", args.buckets), ("--prefill-budget", args.prefill_budget),
                        ("--render-workers", args.render_workers)):
        if value <= 0:
            raise CLIError(f"{flag} must be > 0, got {value}")
    for flag, value in (("--threads", args.threads), ("--max-cache-tokens", args.max_cache_tokens),
                        ("--prefills-per-step", args.prefills_per_step), ("--batch-fit", args.batch_fit)):
        if value is not None and value <= 0:
            raise CLIError(f"{flag} must be > 0, got {value}")


def _load(args, device, dtype):
    if args.model:
        return load_checkpoint(args.model, device, dtype)
    from ..build import build_from_preset, load_tokenizer
    from ..config import PRESETS
    from ..processing import VIST2Processor

    if args.preset not in PRESETS:
        raise CLIError(f"--preset {args.preset}: unknown; choose from {', '.join(PRESETS)}")
    model = cast_model(build_from_preset(args.preset, seed=args.seed), dtype)
    processor = VIST2Processor(load_tokenizer(), model.config.render_config)
    return model.to(device).eval(), processor


def setup(args):
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


def warm_up(model, processor, modes, device) -> None:
    """One short run per kind of work, so fonts, kernels and allocator pools exist before timing."""
    import torch

    from ..engine import Engine, Request, SamplingParams

    c = model.config
    ids = prompt_ids(processor.tokenizer, c.chunk_tokens + c.n_visual + 1)
    engine = Engine(model, processor, max_batch=1, max_cache_tokens=4 * c.chunk_tokens + 4 * c.n_visual)
    engine.generate([Request(query=ids, params=SamplingParams(max_new_tokens=c.chunk_tokens + 2, ignore_eos=True),
                             mode=Mode.GCC)])
    if HF in modes:
        hf = hf_model(model)
        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                        pad_token_id=0)
        del hf
    sync(device)


def run_modes(args, modes, device, model, processor, ids) -> dict[str, ModeResult]:
    import torch
    from tqdm.auto import tqdm

    def progress(**kw):
        return tqdm(file=sys.stderr, leave=False, dynamic_ncols=True, disable=None, **kw)

    fshape, memory = flop_shape(model), PeakMemory(device)
    if not args.no_warmup:
        warm_up(model, processor, modes, device)
    results = {}
    for mode in modes:
        if mode == HF:
            results[mode] = run_hf(model, ids, args, device, fshape, memory, progress)
        else:
            try:
                results[mode] = run_engine(model, processor, ids, mode, args, device, fshape, memory, progress)
            except ValueError as e:  # what the flags asked for cannot run (cache limits, --batch-fit)
                raise CLIError(f"{mode}: {e}") from e
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lo, hi = args.prompt_tokens + 1, args.prompt_tokens + args.new_tokens - 1
    for m in results.values():
        m.buckets = buckets(m.context, m.ms, lo, hi, args.buckets)
    return results


def cmd_bench(args) -> int:
    check_args(args)
    modes = parse_modes(args.modes)
    if args.batch_fit and HF in modes:
        raise CLIError("--batch-fit sizes the engine's preallocated cache; leave hf out of --modes")
    device, model, processor = setup(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = prompt_ids(processor.tokenizer, args.prompt_tokens)
    results = run_modes(args, modes, device, model, processor, ids)
    files = plots(out, results, batch_label(args, results))
    report = build_report(args, device, model, flop_shape(model), results, files)
    if args.stall:
        report["stall"] = measure_stall(model, processor, ids, args, device)
    (out / "bench.json").write_text(dumps(report))
    print_summary(args, report, results, model, device, out)
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
    q.add_argument("--batch-fit", type=float, default=None, metavar="GIB",
                   help="instead of --batch: per mode, as many copies as the preallocated KV cache holds in GIB "
                        "GiB (what fits in the same memory; weights and activations come on top)")
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
