"""``vist2 bench``: speed, KV footprint and FLOPs of generation with and without compression.

    vist2 bench --preset tiny --prompt-tokens 2000 --new-tokens 1000 --modes gcc,pcc,none,hf \\
        --device cpu --out bench/results/engine-cpu-tiny
    vist2 bench --preset qwen3-0.6b --prompt-tokens 32768 --new-tokens 32768 --dtype bfloat16 \\
        --device cuda --out runs/bench-0.6b
    vist2 bench --model runs/vist2-0.6b --prompt-tokens 8192 --new-tokens 4096 --batch 8 --out runs/bench

One prompt of N token ids (the embedded English sample, repeated) is decoded for exactly M greedy
tokens (``ignore_eos``) in each mode: the engine's ``gcc`` (prompt and output compressed, the
paper), ``pcc`` (the prompt only, Glyph-style) and ``none`` (a plain LLM), and ``hf``, the same LLM
weights in an ordinary ``transformers`` causal LM and ``generate()``: what a user has without this
package.

TTFT is the time until every sequence of the batch has its first token. Decode throughput is
``batch * (M - 1) / (time from first to last token)``. Compressing a generated chunk (render,
vision tower, aligner, n_visual tokens through the LLM) is reported as a fraction of decode time.
``--stall`` adds the longest step a running stream sees while the prompt is admitted.

The engine's cache is sized per mode from the engine's own prompt plan plus the generation
(:mod:`.kv`) unless ``--max-cache-tokens`` is given: the cache is preallocated, so its capacity,
not its live length, is what peak memory shows.

Modules: :mod:`.flops` (analytic FLOPs), :mod:`.kv` (cache entries), :mod:`.memory` (peak memory),
:mod:`.runners` (the engine modes, one :class:`ModeResult` each), :mod:`.hf` (transformers),
:mod:`.report` (``bench.json``, plots, table), :mod:`.cli` (the command).
"""

from .cli import BENCH_MODES, add_parser, cmd_bench
from .flops import FlopShape, chunk_flops, decode_flops, flop_shape, flops_per_token, image_flops
from .hf import hf_model
from .kv import cache_need, fit_batch, kv_layout, prompt_plan
from .runners import ModeResult, measure_stall, prompt_ids

__all__ = [
    "BENCH_MODES", "FlopShape", "ModeResult", "add_parser", "cache_need", "chunk_flops", "cmd_bench", "decode_flops",
    "fit_batch", "flop_shape", "flops_per_token", "hf_model", "image_flops", "kv_layout", "measure_stall", "prompt_ids",
    "prompt_plan",
]
