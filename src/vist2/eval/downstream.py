"""What the downstream benchmarks share (LongBench, paper Table 4; LooGLE, Table 5): prompts cut to a
KV budget, generation through the engine in each compression mode, and results written as JSON and
as a markdown table.

    vist2 eval longbench --model runs/sft --data LongBench/data --out runs/eval/longbench.json
    vist2 eval loogle --model runs/sft --data LooGLE/data --out runs/eval/loogle.json

**The KV budget** (``--max-kv``) is the number of cache entries a request may hold, the compressed
model's counterpart of a plain LLM's context window (LongBench's ``max_length``). A prompt whose
footprint (:meth:`vist2.engine.Engine.footprint`: raw text plus β visual tokens a compressed chunk)
and generation do not fit it is cut in the middle, LongBench's rule: the query keeps as many tokens
from its start and its end as fit. In ``gcc`` and ``pcc`` a 32k-token context at r = 4 enters as
about 8k visual tokens, so only a context past about r x the budget is cut; in ``none`` (the plain
backbone) every token is an entry. The generated text is counted at its full length in every mode,
so a cut prompt always leaves room for it.

**Thinking.** The paper's SFT responses open with a chain of thought in ``<think>...</think>``; what
is scored is the answer after it (:func:`answer_of`). ``--think-tokens N`` adds N tokens to every
generation length for it (the benchmarks' own lengths are for the answer alone).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from ..engine import Engine, Request, SamplingParams
from ..modes import MODES


@dataclass
class Item:
    """One prompt to answer: its text (the compressed query), whether it is wrapped in the model's chat
    template (as a user message), and how many tokens may be generated."""

    prompt: str
    max_new_tokens: int
    chat: bool = True


def middle_cut(ids: Sequence[int], keep: int) -> list[int]:
    """``keep`` tokens of ``ids``: the first ``keep // 2`` and the last ``keep - keep // 2`` (all of them
    when ``keep >= len(ids)``), LongBench's truncation.

        >>> middle_cut([1, 2, 3, 4, 5, 6, 7], 4)
        [1, 2, 6, 7]
    """
    if keep >= len(ids):
        return list(ids)
    head = keep // 2
    return [*ids[:head], *ids[len(ids) - (keep - head):]]


def fit_to_budget(engine: Engine, request: Request, budget: int) -> tuple[Request, int]:
    """The request with its query cut in the middle (:func:`middle_cut`) so that its prompt footprint
    plus ``max_new_tokens`` fits ``budget`` KV entries, and how many query tokens were cut (0: none).
    The footprint grows with the query, so the longest query that fits is found by bisection.
    ``ValueError`` when not even an empty query fits (the template's text and the generation alone)."""
    room = budget - request.params.max_new_tokens

    def fits(n: int) -> bool:
        return engine.footprint(replace(request, query=middle_cut(request.query, n), question=None)) <= room

    if fits(len(request.query)):
        return request, 0
    if not fits(0):
        raise ValueError(f"--max-kv {budget} cannot hold the prompt's template text and "
                         f"{request.params.max_new_tokens} generated tokens (mode {request.mode})")
    lo, hi = 0, len(request.query)  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return replace(request, query=middle_cut(request.query, lo), question=None), len(request.query) - lo


def answer_of(text: str) -> str:
    r"""The answer in a generated text: what follows its last ``</think>``; nothing when a ``<think>``
    block never closed (the generation ran out inside it); else the text itself.

        >>> answer_of("<think>Paris is in France.</think>\n\nParis"), answer_of("<think>hmm"), answer_of("Paris")
        ('\n\nParis', '', 'Paris')
    """
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    return "" if "<think>" in text else text


def make_request(engine: Engine, item: Item, mode: str) -> Request:
    """The item's prompt as a request: a user message in the chat template, or the plain text."""
    params = SamplingParams(max_new_tokens=item.max_new_tokens)  # greedy, as the benchmarks' own runs
    if item.chat and getattr(engine.processor.tokenizer, "chat_template", None):
        return engine.request(messages=[{"role": "user", "content": item.prompt}], params=params, mode=mode)
    return engine.request(item.prompt, params=params, mode=mode)


def generate(engine: Engine, items: Sequence[Item], mode: str, budget: int, desc: str = "generate",
             progress: bool = True) -> list[dict]:
    """Each item answered by ``engine`` in ``mode`` (greedy), its prompt cut to ``budget``:
    ``{"text", "answer", "prompt_tokens", "cut_tokens", "kv_peak", "generated_tokens", "finish_reason"}`` per
    item, in order (``answer``: :func:`answer_of` the text). ``prompt_tokens`` counts the prompt before any
    cut (the context length)."""
    from tqdm.auto import tqdm

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out: list[dict] = []
    bar = tqdm(total=len(items), desc=f"{desc} [{mode}]", unit="prompt", disable=not progress, file=sys.stderr)
    for i in range(0, len(items), engine.max_batch):
        batch = items[i : i + engine.max_batch]
        reqs, cuts, lengths = [], [], []
        for item in batch:
            req = make_request(engine, item, mode)
            lengths.append(len(req.prompt_ids))
            req, cut = fit_to_budget(engine, req, budget)
            reqs.append(req)
            cuts.append(cut)
        for r, n, cut in zip(engine.generate(reqs), lengths, cuts):
            if r.stats.finish_reason == "error":
                raise RuntimeError(f"generation failed: {r.stats.error}")
            out.append({"text": r.text, "answer": answer_of(r.text), "prompt_tokens": n, "cut_tokens": cut,
                        "kv_peak": r.stats.kv_tokens_peak, "generated_tokens": r.stats.generated_tokens,
                        "finish_reason": r.stats.finish_reason})
        bar.update(len(batch))
    bar.close()
    return out


def footprint_summary(rows: Sequence[dict]) -> dict:
    """Context length and KV entries over a set of generations: means, maxima, prompts cut."""
    n = max(len(rows), 1)
    return {"prompts": len(rows), "prompt_tokens_mean": sum(r["prompt_tokens"] for r in rows) / n,
            "prompt_tokens_max": max((r["prompt_tokens"] for r in rows), default=0),
            "kv_peak_mean": sum(r["kv_peak"] for r in rows) / n,
            "kv_peak_max": max((r["kv_peak"] for r in rows), default=0),
            "prompts_cut": sum(1 for r in rows if r["cut_tokens"])}


def generation_length(official: int, cap: int | None, think: int) -> int:
    """A task's generation length: the benchmark's own, capped at ``cap`` (quick runs), plus ``think``."""
    if think < 0 or (cap is not None and cap <= 0):
        raise ValueError(f"--think-tokens must be >= 0 and --max-new-tokens > 0, got {think}, {cap}")
    return (official if cap is None else min(official, cap)) + think


def parse_modes(text: str) -> list[str]:
    """``"gcc,pcc,none"`` -> the modes, checked."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise ValueError(f"--modes: each must be one of {', '.join(MODES)}; got {text!r}")
    return modes


def command(prog: str, args) -> str:
    """:func:`~vist2.eval.common.command_line` without the sub-command selectors argparse stores."""
    import argparse

    from .common import command_line

    return command_line(prog, argparse.Namespace(**{k: v for k, v in vars(args).items()
                                                     if k not in ("command", "eval_command")}))


def folder_provenance(model_dir, config, data_dir: Path, files: Sequence[Path], command: str) -> dict:
    """:func:`~vist2.eval.common.provenance` for a data folder: the sha256 of every file read."""
    from .common import provenance, sha256_file

    prov = provenance(model_dir, config, files[0], command)
    prov.update(data=str(data_dir), data_sha256={f.name: sha256_file(f) for f in files})
    return prov


def markdown_table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out: str | Path, results: dict, markdown: str) -> tuple[Path, Path]:
    """The results JSON at ``out`` and the markdown table beside it (same name, ``.md``)."""
    from ..runtime import write_json

    path = write_json(out, results)
    md = path.with_suffix(".md")
    md.write_text(markdown + "\n", encoding="utf-8")
    return path, md


def engine_for(model, processor, budget: int | None, max_batch: int) -> tuple[Engine, int]:
    """An engine whose rows hold ``budget`` KV entries (default: the LLM's position limit), and the budget."""
    limit = model.config.text_config.max_position_embeddings
    budget = limit if budget is None else budget
    if budget <= 0:
        raise ValueError(f"--max-kv must be > 0, got {budget}")
    if max_batch <= 0:
        raise ValueError(f"--max-batch must be > 0, got {max_batch}")
    return Engine(model, processor, max_batch=max_batch, max_cache_tokens=budget), budget



def check_limit(limit: int | None) -> None:
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be > 0, got {limit}")


def report(out: str | Path, results: dict, table: str) -> int:
    """Write the results JSON and its markdown table (:func:`write_results`), print the table and where
    both went; the command's exit status."""
    path, md = write_results(out, results, table)
    print(table)
    print(f"wrote {path} and {md}")
    return 0


def add_run_arguments(q, *, max_kv_note: str = "", limit_of: str = "records of each dataset",
                      lengths_of: str = "the official generation lengths") -> None:
    """The flags every downstream table shares: modes, KV budget, quick-run caps, batch, device, output."""
    q.add_argument("--modes", default="gcc,pcc,none", metavar="M,M",
                   help="compression modes, a row each (default gcc,pcc,none)")
    q.add_argument("--max-kv", type=int, default=None, metavar="N",
                   help=f"KV entries a request may hold; a longer prompt is cut in the middle ({max_kv_note}"
                        "default: the LLM's max_position_embeddings)")
    q.add_argument("--limit", type=int, default=None, metavar="N", help=f"quick run: the first N {limit_of}")
    q.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help=f"quick run: cap {lengths_of} at N (recorded in the results)")
    q.add_argument("--think-tokens", type=int, default=0, metavar="N",
                   help="tokens added to every generation length for a <think> block before the answer "
                        "(the answer after </think> is scored; default 0)")
    q.add_argument("--max-batch", type=int, default=4, metavar="N", help="prompts generated at once (default 4)")
    q.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.add_argument("--out", required=True, metavar="FILE", help="results JSON (the markdown table goes beside it, .md)")
