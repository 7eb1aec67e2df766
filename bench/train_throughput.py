"""Training throughput of PT-3 OLM: FlexAttention block mask vs. the dense mask with SDPA.

    # GPU, the issue's setting: the qwen3-0.6b shape, 8k slots per row, bf16
    python bench/train_throughput.py --preset qwen3-0.6b --length 8192 --steps 20 --warmup 5 \
        --attention flex,sdpa --out bench/results/train_throughput_h100.json
    # CPU smoke run (checks the script, says nothing about GPU speed)
    python bench/train_throughput.py --preset tiny --length 512 --steps 2 --warmup 1 --attention sdpa \
        --out bench/results/train_throughput_cpu_tiny.json

One optimizer step per timed iteration on one packed OLM row built by the
training pipeline itself (``StageBuilder`` -> ``pack`` -> ``render_batch``), with
the OLM preset's trainable parts (LLM + aligner; vision frozen). Rendering is
done once, outside the timing: this measures the model, not the data loader.

Reported per attention implementation: step time, tokens/s (real slots, text
+ visual, per second) and MFU = model FLOPs per step / step time / peak:

- LLM matmuls: ``6 * N * T`` (forward + backward) over the decoder and LM head
  weights (embedding lookups are free);
- attention: ``3 * 4 * d_attn * pairs`` per layer, ``pairs`` counted from the
  plan's real mask (the sparse OLM mask sees less than causal);
- vision tower: ``2 * N_vit * patches`` per image (frozen: forward only) and
  the aligner ``6 * N_aligner * beta`` per image.

Peak bf16 dense TFLOPS: 989 for H100 / H200 SXM (``--peak-tflops`` overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from vist2.attention import dense_mask
from vist2.build import build_from_preset, load_tokenizer
from vist2.layout import Kind
from vist2.modeling import VIST2ForCausalLM
from vist2.processing import VIST2Processor
from vist2.runtime import default_device
from vist2.samples import sample_text
from vist2.training.config import stage_preset
from vist2.training.pipeline import render_batch
from vist2.training.stages import StageBuilder, pack
from vist2.training.trainer import apply_trainable, make_optimizer, set_attention

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def one_row(processor, model_cfg, length: int, pad_multiple: int):
    """One packed OLM row of about ``length`` slots from the embedded sample, repeated."""
    cfg = stage_preset("olm", max_length=length)
    builder = StageBuilder(cfg, processor.tokenizer, model_cfg.chunk_tokens, model_cfg.n_visual,
                           model_cfg.prompt_encoding, processor=processor)
    text = sample_text("en")
    need = length * 5  # characters: plenty for `length` tokens
    doc = (text + "\n\n") * (need // len(text) + 1)
    items, _ = builder.items({"text": doc}, __import__("random").Random(0), 0.0)
    row = next(pack(items, length))
    return render_batch([row], processor, 0, {}, pad_multiple)


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def step_flops(model, batch) -> float:
    cfg = model.config
    tc = cfg.text_config
    plan = batch.plan
    T = int((plan.kind != Kind.PAD).sum())
    lm = model.model.language_model
    n_lm = count_params(lm) - lm.get_input_embeddings().weight.numel() + model.lm_head.weight.numel()
    flops = 6.0 * n_lm * T
    d_attn = tc.num_attention_heads * getattr(tc, "head_dim", tc.hidden_size // tc.num_attention_heads)
    real = plan.kind != Kind.PAD
    pairs = int((dense_mask(plan) & real[:, :, None] & real[:, None, :]).sum())
    flops += 3 * 4.0 * d_attn * pairs * tc.num_hidden_layers
    n_img = len(plan.chunks)
    gh, gw = cfg.patch_grid
    flops += n_img * (2.0 * count_params(model.model.vision) * gh * gw
                      + 6.0 * count_params(model.model.aligner) * cfg.n_visual)
    return flops


def run_one(model, batch, impl: str, steps: int, warmup: int, device, dtype) -> dict:
    set_attention(model, impl)
    opt = make_optimizer(model, stage_preset("olm"))
    plan = batch.plan.to(device)
    pixels = batch.pixel_values.to(device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(plan=plan, pixel_values=pixels, loss_only=True).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    del opt
    times.sort()
    return {"step_s_median": times[len(times) // 2], "step_s_min": times[0], "loss_last": float(loss.detach())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen3-0.6b")
    p.add_argument("--model", metavar="DIR", help="a VIST2 checkpoint instead of a random preset")
    p.add_argument("--length", type=int, default=8192, help="slots per row")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (FlexAttention compiles on the first)")
    p.add_argument("--attention", default="flex,sdpa", help="comma-separated: flex, sdpa, eager")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--threads", default=None,
                   help="CPU: comma-separated torch thread counts, timed in turn (--rounds times each, interleaved)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    device = torch.device(default_device())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model:
        model = VIST2ForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        processor = VIST2Processor.from_pretrained(args.model)
    else:
        model = build_from_preset(args.preset)
        processor = VIST2Processor(load_tokenizer(None), model.config.render_config)
    apply_trainable(model, stage_preset("olm"))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()
    batch = one_row(processor, model.config, args.length, 128)
    flops = step_flops(model, batch)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    tokens = int((batch.plan.kind != Kind.PAD).sum())
    result = {"device": name, "torch": torch.__version__, "preset": args.model or args.preset,
              "length": args.length, "row_slots": batch.plan.shape[1], "real_tokens": tokens,
              "images": len(batch.plan.chunks), "dtype": str(dtype), "flops_per_step": flops,
              "peak_tflops": peak, "gradient_checkpointing": args.gradient_checkpointing,
              "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "runs": {}}
    if args.threads:  # interleaved rounds, so a change in the machine's load hits every count alike
        counts = [int(t) for t in args.threads.split(",")]
        impl = args.attention.split(",")[0].strip()
        times = {t: [] for t in counts}
        for _ in range(args.rounds):
            for t in counts:
                torch.set_num_threads(t)
                times[t].append(run_one(model, batch, impl, args.steps, args.warmup, device, dtype)["step_s_median"])
        for t in counts:
            xs = sorted(times[t])
            result["runs"][f"{impl}@{t}threads"] = {"step_s_median": xs[len(xs) // 2], "step_s_rounds": times[t],
                                                    "tokens_per_s": tokens / xs[len(xs) // 2]}
            print(f"{t} thread(s): step {xs[len(xs) // 2] * 1e3:8.1f} ms (rounds: "
                  f"{', '.join(f'{x * 1e3:.0f}' for x in times[t])} ms)")
        result["loadavg_1min_after"] = os.getloadavg()[0]
    for impl in ([] if args.threads else [a.strip() for a in args.attention.split(",") if a.strip()]):
        key = {"flex": "flex_attention"}.get(impl, impl)
        if key == "flex_attention" and device.type != "cuda":
            print("skipping flex: needs CUDA", file=sys.stderr)
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        r = run_one(model, batch, key, args.steps, args.warmup, device, dtype)
        r["tokens_per_s"] = tokens / r["step_s_median"]
        r["mfu"] = flops / r["step_s_median"] / (peak * 1e12) if peak else None
        if device.type == "cuda":
            r["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        # the process's peak so far (this run and any before it in this process), in GB
        r["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
        result["runs"][impl] = r
        print(f"{impl:5s}  step {r['step_s_median'] * 1e3:8.1f} ms  {r['tokens_per_s']:10,.0f} tok/s  "
              f"MFU {r['mfu'] * 100 if r['mfu'] else float('nan'):5.1f}%  peak RSS {r['peak_rss_gb']:.2f} GB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
