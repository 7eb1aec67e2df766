"""The ``hf`` mode of ``vist2 bench``: the same LLM weights in a plain ``transformers`` causal LM and
``generate()``, what a user has without this package. A logits processor timestamps every step."""

from __future__ import annotations

import time

from ..layout import Raw
from ..runtime import eos_ids, kv_geometry
from .flops import FlopShape, decode_flops, flops_per_token
from .kv import kv_layout
from .memory import PeakMemory, sync
from .runners import ModeResult, Recorder


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
            sync(device)
            self.times.append(time.perf_counter())
            self.bar.update(1)
            return scores

    x = torch.tensor([ids] * B, device=device)
    pad = eos_ids(tc)[0]  # generate() wants one pad id; every row has the same length, so none is padded
    with progress(total=M, desc="hf  ") as bar, torch.no_grad():
        clock = Clock(bar)
        sync(device)
        t0 = time.perf_counter()
        out = hf.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=M, min_new_tokens=M, do_sample=False,
            logits_processor=LogitsProcessorList([clock]), pad_token_id=pad, return_dict_in_generate=True,
        )
        sync(device)
    return out, clock, t0


def run_hf(model, ids, args, device, fshape: FlopShape, memory: PeakMemory, progress) -> ModeResult:
    """Generate ``args.new_tokens`` greedy tokens for ``args.batch`` copies of ``ids`` with ``generate()``."""
    N, M, B = len(ids), args.new_tokens, args.batch
    hf = hf_model(model)
    base_mem = memory.start()
    tc = model.config.text_config
    out, clock, t0 = _hf_generate(hf, ids, B, M, tc, device, progress)
    peak_mem = memory.peak()
    generated = out.sequences.shape[1] - N
    if generated != M:
        raise RuntimeError(f"hf: generated {generated} tokens, asked for {M}")
    from ..modeling import output_cache

    kv_final = int(output_cache(out).get_seq_length())
    t = clock.times
    ttft, decode_s = t[0] - t0, t[-1] - t[0]
    # interval i holds the forward of generated token i: N + i entries once it is cached
    context = [N + i for i in range(1, len(t))]
    ms = [(b - a) * 1e3 for a, b in zip(t[:-1], t[1:])]
    elem = next(hf.parameters()).element_size()
    per_entry = kv_geometry(tc).bytes_per_entry(elem)
    dflops = [sum(decode_flops(fshape, k).values()) for k in context]
    end = flops_per_token(fshape, kv_final, "hf")
    del out, hf
    c = model.config
    return ModeResult(
        batch=B, prompt_tokens=N, new_tokens=generated, finish_reasons=["length"], cache_capacity=None,
        kv_expected=kv_layout([Raw(tuple(ids))], M, c.chunk_tokens, c.n_visual, "hf"),
        ttft_s=ttft, ttft_s_per_request=[ttft] * B, prefill_rows_per_forward_max=None, decode_s=decode_s,
        engine_tokens_per_s=None,
        kv_tokens=kv_final, kv_tokens_peak=kv_final, kv_tokens_uncompressed=N + M,
        kv_bytes=kv_final * per_entry, kv_bytes_peak=kv_final * per_entry,
        kv_bytes_allocated=None, kv_bytes_per_entry=per_entry, dtype_bytes=elem,
        chunks_compressed=0, visual_tokens=0, compression=Recorder().compression(decode_s), phase_seconds=None,
        memory_baseline_bytes=base_mem, peak_memory_bytes=peak_mem, memory_kind=memory.kind,
        flops_per_token={"mean": sum(dflops) / len(dflops) if dflops else None,
                         "at_end": end["total"], "terms_at_end": end},
        context=context, ms=ms, kv=list(context),
    )
