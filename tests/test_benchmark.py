"""``vist2 bench`` on the tiny preset: every mode runs, the KV counts follow the layout rules, bad flags fail."""

import argparse
import json
import sys

import pytest
import torch

from vist2 import bench
from vist2.bench import FlopShape, chunk_flops, decode_flops, flops_per_token, image_flops, kv_layout
from vist2.chunking import fixed_chunker
from vist2.cli import main
from vist2.errors import CLIError
from vist2.layout import Raw, prompt_segments

N, M = 150, 140
K, N_VISUAL = 64, 16  # the tiny preset
BYTES_PER_ENTRY = 2 * 2 * 2 * 16 * 4  # K and V x 2 layers x 2 KV heads x head_dim 16 x float32


def _args(argv):
    parser = argparse.ArgumentParser(prog="vist2")
    bench.add_parser(parser.add_subparsers())
    return parser.parse_args(["bench", *argv])


def _bench(argv) -> int:
    """``vist2 bench ARGV`` as the entry point runs it: ``main()`` parsing ``sys.argv``, one torch thread."""
    threads = torch.get_num_threads()
    try:  # one thread: tiny matmuls on a busy shared CPU are far steadier (and faster) that way
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "argv", ["vist2", "bench", *argv, "--threads", "1"])
            return main()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert _bench(["--preset", "tiny", "--prompt-tokens", str(N), "--new-tokens", str(M), "--modes", "gcc,pcc,none,hf",
                   "--no-warmup", "--prefill-budget", "32", "--stall", "--out", str(out)]) == 0
    return out, json.loads((out / "bench.json").read_text())


def test_every_mode_runs_for_the_fixed_length(report):
    out, r = report
    assert list(r["modes"]) == ["gcc", "pcc", "none", "hf"]
    for name, m in r["modes"].items():
        assert m["new_tokens"] == M and m["prompt_tokens"] == N, name
        assert m["ttft_s"] > 0 and m["decode_tokens_per_s"] > 0 and m["decode_s"] > 0, name
        assert m["flops_per_token"]["mean"] > 0, name
        assert len(m["buckets"]) == 4 and all(b["steps"] > 0 for b in m["buckets"]), name
    assert r["model"]["K"] == K and r["model"]["n_visual"] == N_VISUAL
    # the command as it was run (sys.argv), not rebuilt from the flags
    assert r["command"] == (f"vist2 bench --preset tiny --prompt-tokens 150 --new-tokens 140 --modes gcc,pcc,none,hf "
                            f"--no-warmup --prefill-budget 32 --stall --out {out} --threads 1")
    assert r["machine"]["torch"] == torch.__version__


def test_kv_entries_follow_the_layout(report):
    _, r = report
    g, p, n, h = (r["modes"][k] for k in ("gcc", "pcc", "none", "hf"))
    # prompt 150 = 64 + 64 + a tail of 22 > n_visual=16, so the tail is compressed too: 3 images, 48 entries.
    # The last of the 140 tokens is sampled but never fed back: 139 tokens enter the cache.
    prompt_kv, fed = 3 * N_VISUAL, M - 1
    # gcc: 139 = 2 windows of 64 (-> 16 each) + 11 open tokens
    assert g["kv_tokens"] == prompt_kv + 2 * N_VISUAL + 11 == 91
    # peak: while the second window is compressed it and its visual tokens are both held
    assert g["kv_tokens_peak"] == prompt_kv + N_VISUAL + K + N_VISUAL == 144
    assert g["chunks_compressed"] == 3 + 2 and g["compression"]["decode_chunks"] == 2
    assert p["kv_tokens"] == p["kv_tokens_peak"] == prompt_kv + fed == 187
    assert p["chunks_compressed"] == 3 and p["compression"]["decode_chunks"] == 0
    assert n["kv_tokens"] == n["kv_tokens_peak"] == N + fed == 289
    assert h["kv_tokens"] == n["kv_tokens"]  # the plain transformers cache holds what mode none holds
    for name, m in r["modes"].items():
        assert m["kv_bytes"] == m["kv_tokens"] * BYTES_PER_ENTRY, name
        assert (m["kv_expected"]["final"], m["kv_expected"]["peak"]) == (m["kv_tokens"], m["kv_tokens_peak"]), name
    assert 0 < g["compression"]["fraction_of_decode"] < 1
    assert g["flops_per_token"]["terms_at_end"]["compression"] > 0
    assert n["flops_per_token"]["at_end"] == h["flops_per_token"]["at_end"]


def test_stall_while_a_prompt_is_admitted(report):
    _, r = report
    st = r["stall"]
    # the gcc prompt is 3 images = 48 entries; with a budget of 32 it enters as 32 + 16 over two steps,
    # the running stream decoding in both
    assert (st["prompt_tokens"], st["prefill_budget"]) == (N, 32)
    assert st["max_prefill_tokens_per_step"] == 32 and st["admission_steps"] == len(st["step_ms"]) == 2
    assert st["stall_ms"] == pytest.approx(max(st["step_ms"]), abs=1e-3) and st["stall_ms"] > 0 and st["steady_ms"] > 0
    assert "--prefill-budget 32" in r["command"] and "--stall" in r["command"]


def test_curves_and_plots(report):
    out, r = report
    for name, m in r["modes"].items():
        c = m["curve"]
        # engine: steps 2..M-1 (the first token comes with prefill, the last step runs no forward); hf: 1..M-1
        assert len(c["context"]) == len(c["ms_per_token"]) == len(c["kv_tokens"]) == (M - 1 if name == "hf" else M - 2)
        assert c["context"][-1] == N + M - 1
    assert r["modes"]["none"]["curve"]["kv_tokens"] == r["modes"]["none"]["curve"]["context"]
    assert min(r["modes"]["gcc"]["curve"]["kv_tokens"]) < r["modes"]["gcc"]["curve"]["kv_tokens"][0] + K
    for png in r["plots"]:
        assert (out / png).stat().st_size > 1000
    assert {"decode_ms_per_token.png", "kv_entries.png"} <= set(r["plots"])


def test_a_batch_is_prefilled_together(tmp_path):
    """By default the bench admits the whole batch in its first step: one prefill forward of every row."""
    assert _bench(["--preset", "tiny", "--prompt-tokens", str(N), "--new-tokens", "4", "--modes", "gcc,none",
                   "--batch", "3", "--no-warmup", "--render-workers", "2", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "bench.json").read_text())
    for name, m in r["modes"].items():
        assert m["prefill_rows_per_forward_max"] == 3 and m["new_tokens"] == 4, name
        assert len(m["curve"]["context"]) == 4 - 2, name  # only decode steps are timed: every row was in at once
    assert r["modes"]["gcc"]["compression"]["prefill_chunks"] == 3 * 3
    assert "--render-workers 2" in r["command"]


def test_from_a_checkpoint_folder(tiny_dir, tmp_path):
    assert _bench(["--model", str(tiny_dir), "--prompt-tokens", "40", "--new-tokens", "5", "--modes", "none",
                   "--no-warmup", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "bench.json").read_text())
    assert r["modes"]["none"]["kv_tokens"] == 40 + 4


@pytest.mark.parametrize("argv, message", [
    (["--preset", "tiny", "--prompt-tokens", "10", "--new-tokens", "10", "--modes", "gcc,fast"], "unknown mode"),
    (["--preset", "tiny", "--prompt-tokens", "0", "--new-tokens", "10"], "must be > 0"),
    (["--preset", "tiny", "--prompt-tokens", "10", "--new-tokens", "-3"], "must be > 0"),
    (["--preset", "tiny", "--model", "x", "--prompt-tokens", "10", "--new-tokens", "10"], "exactly one"),
    (["--prompt-tokens", "10", "--new-tokens", "10"], "exactly one"),
    (["--preset", "huge", "--prompt-tokens", "10", "--new-tokens", "10"], "unknown"),
    (["--preset", "tiny", "--prompt-tokens", "10", "--new-tokens", "10", "--batch", "0"], "--batch"),
    (["--preset", "tiny", "--prompt-tokens", "10", "--new-tokens", "10", "--render-workers", "0"], "--render-workers"),
    (["--preset", "tiny", "--prompt-tokens", "10", "--new-tokens", "10", "--prefills-per-step", "0"],
     "--prefills-per-step"),
    (["--preset", "tiny", "--prompt-tokens", "10", "--new-tokens", "10", "--batch-fit", "0"], "--batch-fit"),
    (["--preset", "tiny", "--prompt-tokens", "10", "--new-tokens", "10", "--batch-fit", "1"], "leave hf out"),
    (["--preset", "tiny", "--prompt-tokens", "100", "--new-tokens", "10", "--modes", "none", "--batch-fit", "1e-4"],
     "holds no row"),
])
def test_bad_arguments(argv, message, tmp_path):
    args = _args([*argv, "--out", str(tmp_path / "o")])
    with pytest.raises(CLIError, match=message):
        args.func(args)


def test_a_folder_without_config_is_refused(tmp_path):
    (tmp_path / "ckpt").mkdir()
    args = _args(["--model", str(tmp_path / "ckpt"), "--prompt-tokens", "10", "--new-tokens", "10",
                  "--out", str(tmp_path / "o")])
    with pytest.raises(CLIError, match="no config.json"):
        args.func(args)


def test_flops_formula_by_hand():
    s = FlopShape(llm_layers=2, llm_heads=4, llm_head_dim=16, llm_body_params=1000, lm_head_params=500,
                  vit_layers=1, vit_hidden=8, vit_params=100, n_patches=4, aligner_params=10,
                  chunk_tokens=8, n_visual=2)
    # decode at 10 live entries: 2 * (1000 + 500) matmul, 4 * 2 * 4 * 16 * 10 attention
    assert decode_flops(s, 10) == {"matmul": 3000, "attention": 5120}
    # image: 2*100*4 patches + 4*1*8*4^2 attention + 2*10*2 aligner
    assert image_flops(s) == 800 + 512 + 40
    # chunk at 10 entries: image + 2*1000*2 (n_visual tokens) + 4*2*4*16 * (2*10 + 2*3/2)
    assert chunk_flops(s, 10) == 1352 + 4000 + 512 * 23
    gcc = flops_per_token(s, 10, "gcc")
    assert gcc["compression"] == 17128 / 8 and gcc["total"] == 8120 + 17128 / 8
    for mode in ("pcc", "none", "hf"):
        assert flops_per_token(s, 10, mode) == {"matmul": 3000, "attention": 5120, "compression": 0.0,
                                                "total": 8120}


def _prompt(n, encoding="visual"):
    """A query of n tokens laid out by the tail rule, chunks cut every K tokens."""
    return prompt_segments([], list(range(n)), [], K, N_VISUAL, encoding, chunker=fixed_chunker(K))


def test_kv_layout_tail_rule():
    assert kv_layout(_prompt(150), 140, K, N_VISUAL, "gcc") == {"prompt": 48, "final": 91, "peak": 144}
    assert kv_layout(_prompt(140), 2, K, N_VISUAL, "pcc") == {"prompt": 2 * N_VISUAL + 12, "final": 45,
                                                               "peak": 45}  # tail 12 raw
    assert kv_layout(_prompt(128), 65, K, N_VISUAL, "gcc") == {"prompt": 32, "final": 48, "peak": 32 + K + N_VISUAL}
    assert kv_layout([Raw(tuple(range(150)))], 140, K, N_VISUAL, "none") == {"prompt": 150, "final": 289, "peak": 289}
    # interleaved: a chunk's text is held with its visual tokens while they read it
    assert kv_layout(_prompt(150, "interleaved"), 1, K, N_VISUAL, "pcc")["peak"] == N_VISUAL + K + N_VISUAL


def test_the_cache_is_sized_by_the_engines_plan():
    """A prompt the fit rule cuts early (runs of '#': 24 tokens fill the tiny image) needs more entries than
    chunks of K tokens would: the bench asks the engine's plan, so its cache holds the prompt and the
    layout's count is the engine's."""
    from vist2.build import build_from_preset, load_tokenizer
    from vist2.engine import Engine, Request, SamplingParams
    from vist2.processing import VIST2Processor

    model = build_from_preset("tiny")
    proc = VIST2Processor(load_tokenizer(), model.config.render_config)
    ids = proc.tokenizer("#" * 16 * 150, add_special_tokens=False)["input_ids"]
    req = Request(query=ids, mode="gcc", params=SamplingParams(max_new_tokens=3, ignore_eos=True))
    need, capacity = bench.cache_need(Engine(model, proc, max_batch=1), req, 3)
    # 38 tokens: a chunk of 24 closed by the fit rule, a raw tail of 14 <= n_visual; at K=64 it would be one chunk
    assert len(ids) == 38 and need == {"prompt": N_VISUAL + 14, "final": N_VISUAL + 16, "peak": N_VISUAL + 16}
    assert kv_layout(_prompt(38), 3, K, N_VISUAL, "gcc")["prompt"] == N_VISUAL
    res = Engine(model, proc, max_batch=1, max_cache_tokens=capacity).generate([req])[0]
    assert res.stats.generated_tokens == 3 and res.stats.chunks_compressed == 1
    assert (res.stats.kv_tokens, res.stats.kv_tokens_peak) == (need["final"], need["peak"])


def test_batch_fit_counts_rows_and_the_scratch_row():
    # 1 MiB / (100 entries x 512 B) = 20 rows, one of them the engine's scratch row
    assert bench.fit_batch(1 / 1024, 100, 512) == 19
    with pytest.raises(ValueError, match="holds no row"):
        bench.fit_batch(1 / 1024, 2048, 512)  # 1 MiB a row: the scratch row alone fills the budget
    assert bench.fit_batch(1 / 1024, 1024, 512) == 1  # 512 KiB a row: one row beside the scratch row


@pytest.mark.slow
def test_the_gpu_suite_smoke_run_writes_every_figure(tmp_path):
    """``SMOKE=1 bash bench/gpu_suite.sh`` is the GPU suite's very flow at tiny shapes on CPU: every step
    writes its JSON and the summary holds every figure, a number or null with a reason."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "suite"
    env = {**os.environ, "SMOKE": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", str(root / "bench" / "gpu_suite.sh"), str(out)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [(s["step"], s["rc"]) for s in steps] == [(name, 0) for name in
                                                     ("preflight", "gpu_tests", "ttft", "long", "fit", "train")]
    for step in ("ttft", "long", "fit"):
        assert json.loads((out / step / "bench.json").read_text())["modes"], step
    assert json.loads((out / "train.json").read_text())["runs"]["sdpa"]["tokens_per_s"] > 0
    assert json.loads((out / "gpu_tests.json").read_text())["failed"] == 0
    s = json.loads((out / "summary.json").read_text())
    keys = ("kv_ratio_32k", "ttft_speedup_vs_hf", "decode_speedup_vs_hf", "decode_speedup_vs_none_32k",
            "fit_ratio_32k", "batch_throughput_ratio", "compression_share", "train_mfu_flex", "stall_ms", "gpu_tests")
    for key in keys:
        assert key in s and (s[key] is not None or s["reasons"].get(key)), key
        assert s["how"][key], key
    assert s["smoke"] is True and s["device"] and s["versions"]["torch"] == torch.__version__
    assert s["train_mfu_flex"] is None and "CUDA" in s["reasons"]["train_mfu_flex"]  # flex is CUDA-only
    # 320 generated tokens = 5 windows of K: the extrapolation from the measured rate lands on the layout rule
    assert s["kv_ratio_32k"] == pytest.approx(s["extra"]["kv_ratio_32k_layout"], rel=1e-9)
    assert s["extra"]["fit_batches"]["gcc"] > s["extra"]["fit_batches"]["none"] >= 1
    assert (out / "summary.md").read_text().count("\n|") >= len(keys)
