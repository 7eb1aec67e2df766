"""The paper's Table 3 protocol for ``vist2 eval olm --judge``: generate with the engine, then let a
judge causal LM score what was written.

From the first P tokens of each document the model writes up to G tokens (greedy) twice: in mode
``gcc`` (VIST2, context and output compressed) and in mode ``none`` (the same model as a plain LLM:
its backbone). A judge causal LM (a local HF folder; the paper used GPT-4) reads the context as
text and scores each generated text: ``exp(total NLL of the generated text's judge tokens / their
number)``, over all documents. Lower is better.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .common import table

# judged generation: (row name, engine mode); ``none`` is the backbone LLM writing on its own
GENERATORS = (("vist2", "gcc"), ("backbone", "none"))


def load_judge(folder, device: str | None = None, dtype: str = "float32"):
    """``(judge, tokenizer)``: any causal LM in a local HF folder, with its own tokenizer files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..processing import has_tokenizer
    from ..runtime import default_device, is_checkpoint, torch_dtype

    folder = Path(folder)
    if not is_checkpoint(folder):
        raise ValueError(f"--judge {folder}: not a transformers checkpoint folder (no config.json)")
    if not has_tokenizer(folder):
        raise ValueError(f"--judge {folder}: no tokenizer files (the judge must read text its own way)")
    judge = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype(dtype)).to(default_device(device)).eval()
    return judge, AutoTokenizer.from_pretrained(str(folder))


@torch.no_grad()
def judge_nll(judge, tokenizer, context: str, text: str) -> tuple[float, int]:
    """Total NLL (nats) the judge gives ``text`` right after ``context``, and the number of scored
    tokens. The two are tokenized apart, so exactly the text's own tokens are scored."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ctx:  # the first token needs something before it
        ctx, ids = ids[:1], ids[1:]
    if not ids:
        return 0.0, 0
    x = torch.tensor([ctx + ids], device=judge.device)
    # only the last len(ids) + 1 positions' logits: the predictions of the text's tokens (and one spare)
    logits = judge(input_ids=x, logits_to_keep=len(ids) + 1).logits[0, :-1]
    return float(F.cross_entropy(logits.float(), x[0, len(ctx):], reduction="sum")), len(ids)


def evaluate_generation(model, processor, documents: Sequence[str], judge, judge_tokenizer,
                        prompt_tokens: int = 1024, max_new_tokens: int = 4096, limit: int | None = None,
                        max_batch: int = 8, progress: bool = True) -> dict:
    """The paper's Table 3 protocol: ``{"vist2": {...}, "backbone": {...}, "documents": n, ...}``.

    Each document's first ``prompt_tokens`` tokens are the prompt; both generators write up to
    ``max_new_tokens`` greedily (stopping at EOS), and the judge scores the generated text after
    the prompt's text. ``ValueError`` when no document is long enough.
    """
    from ..engine import Engine, Request, SamplingParams

    if prompt_tokens <= 0 or max_new_tokens <= 0:
        raise ValueError(f"--prompt-tokens and --max-new-tokens must be > 0, got {prompt_tokens}, {max_new_tokens}")
    docs_ids = [processor.encode(d) for d in documents]
    prompts = [ids[:prompt_tokens] for ids in docs_ids if len(ids) >= prompt_tokens]
    if not prompts:
        raise ValueError(f"no document has the {prompt_tokens} prompt tokens of the judged generation; "
                         f"the longest has {max((len(x) for x in docs_ids), default=0)}")
    if limit is not None:
        prompts = prompts[:limit]
    engine = Engine(model, processor, max_batch=min(max_batch, len(prompts)))
    params = SamplingParams(max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    res: dict = {}
    for name, mode in GENERATORS:
        results = engine.generate([Request(query=list(p), params=params, mode=mode) for p in prompts])
        nll = judged = generated = 0
        samples = []
        for p, r in zip(_bar(prompts, f"judge {name}", progress), results):
            n_nll, n = judge_nll(judge, judge_tokenizer, processor.decode(p), r.text)
            nll, judged, generated = nll + n_nll, judged + n, generated + r.stats.generated_tokens
            samples.append({"generated_tokens": r.stats.generated_tokens, "judged_tokens": n,
                            "judge_perplexity": math.exp(n_nll / n) if n else None,
                            "finish_reason": r.stats.finish_reason, "kv_tokens_peak": r.stats.kv_tokens_peak,
                            "text": r.text})
        res[name] = {"mode": mode, "generated_tokens": generated, "judged_tokens": judged, "judge_nll_nats": nll,
                     "judge_perplexity": math.exp(nll / judged) if judged else None, "samples": samples}
    res.update(documents=len(prompts), prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens,
               seconds=round(time.perf_counter() - t0, 3))
    return res


def _bar(items, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="doc", disable=not progress, file=sys.stderr)


def format_generation_table(res: dict, judge: str) -> str:
    rows = [[name, res[name]["mode"], res[name]["generated_tokens"], res[name]["judged_tokens"],
             "-" if res[name]["judge_perplexity"] is None else f"{res[name]['judge_perplexity']:.3f}"]
            for name, _ in GENERATORS]
    head = ["writer", "mode", "generated tokens", "judge tokens", "judge perplexity"]
    return (f"judged generation (paper Table 3; judge {judge}):\n" + table(rows, head)
            + f"\n{res['documents']} document(s): {res['prompt_tokens']} prompt tokens, up to "
              f"{res['max_new_tokens']} generated, greedy")
