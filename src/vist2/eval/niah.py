"""Needle in a haystack: can the model find one exact fact in a long context it holds as pictures?

    vist2 eval niah --model models/vist2-nano --lengths 512,1024,2048 --depths 0,50,100 --samples 3 --out runs/niah/niah.json
    vist2 eval niah --model runs/sft --value-type uuids --keys 4 --haystack novel.txt --modes gcc,pcc,none --out runs/niah/uuid.json

RULER's NIAH task (Hsieh et al. 2024) as lm-eval ships it: needle sentences ``One of the special
magic {numbers} for {key} is: {value}.`` in a haystack (RULER's repeated "The grass is green. The sky
is blue. ..." lines, or any text file's sentences), RULER's question, and the answer's start. Keys
are adjective-noun words (wonderwords' lists, as RULER's); values 7-digit numbers, words or UUIDs.
``--keys`` > 1 adds distractors (other keys, random depths), ``--values`` > 1 gives a key several
values, ``--queries`` > 1 asks for several keys at once.

The grid: context lengths (tokens of the model's tokenizer, the whole prompt) x needle depths (0 %:
the needles open the haystack, 100 %: they close it), ``--samples`` seeded samples a cell, each asked
in every mode (``none``: the same model reading the context as text) as a user sends a prompt:
through :class:`vist2.engine.Engine`, greedy; a chat when the tokenizer has a chat template (the
haystack is the user's message, the question its ``question`` field, the answer's start opens the
assistant's turn), else plain text. Score: RULER's ``string_match_all`` (the share of the expected
values in the output). The JSON holds every output; the heatmap PNG (depth x length, a panel a
mode) is written beside it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable, Sequence

from ..engine import Request, SamplingParams
from ..modes import MODES
from ..needle import NEEDLE, PROMPT_FORMATS, VALUE_TYPES, NeedleSample, build_sample, check_task, haystack_sentences, \
    needle_prompt, word_lists


def request(tokenizer, sample: NeedleSample, prompt_format: str, mode: str, params=None) -> Request:
    """The engine request of a sample (:func:`vist2.needle.needle_prompt`) in ``mode``."""
    parts = needle_prompt(tokenizer, sample, prompt_format)
    kw = {} if params is None else {"params": params}
    return Request(query=parts.query, prefix=parts.prefix, suffix=parts.suffix, mode=mode, question=parts.question,
                   styles=parts.styles, **kw)


def resolve_format(tokenizer, prompt_format: str) -> str:
    """``auto``: ``chat`` when the tokenizer has a chat template, else ``plain``."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format not in PROMPT_FORMATS or (prompt_format == "chat" and not chat):
        raise ValueError(f"--prompt-format must be one of {', '.join(PROMPT_FORMATS)} (chat needs a tokenizer with a "
                         f"chat template), got {prompt_format!r}")
    return ("chat" if chat else "plain") if prompt_format == "auto" else prompt_format


# -- scoring ----------------------------------------------------------------------------------


def postprocess(prediction: str) -> str:
    """RULER's clean-up of a prediction: control characters become newlines, then strip."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER's ``string_match_all`` for one sample: the share of answers found in the prediction
    (case-insensitive).

        >>> string_match_all(" 1234567. And 7654321.", ["1234567", "7654321", "1111111"])
        0.6666666666666666
    """
    pred = postprocess(prediction).lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


# -- the sweep --------------------------------------------------------------------------------

Generator = Callable[[list[Request]], list[str]]


def engine_generator(model, processor, max_batch: int = 4) -> Generator:
    """Greedy generation through :class:`vist2.engine.Engine`, as ``vist2 generate`` runs a prompt."""
    from ..engine import Engine

    engine = Engine(model, processor, max_batch=max_batch)
    return lambda requests: [r.text for r in engine.generate(requests)]


def build_grid(tokenizer, lengths: Sequence[int], depths: Sequence[float], samples: int, prompt_format: str,
               **kw) -> list[NeedleSample]:
    """Every cell's samples, lengths outer, depths inner (built once, asked in every mode)."""
    if not lengths or not depths or samples < 1 or min(lengths) < 1:
        raise ValueError(f"need --lengths > 0 tokens, one --depths at least and --samples >= 1; got {lengths}, "
                         f"{depths}, {samples}")
    kw.setdefault("words", word_lists())
    return [build_sample(tokenizer, L, d, i, prompt_format=prompt_format, **kw)
            for L in lengths for d in depths for i in range(samples)]


def evaluate_niah(generate: Generator, tokenizer, grid: list[NeedleSample], modes: Sequence[str],
                  prompt_format: str, max_new_tokens: int = 64, batch: int = 4, progress: bool = True) -> dict:
    """Ask every sample in every mode; ``{"cells": [...], "samples": [...], "modes": {mode: mean}}``."""
    from tqdm.auto import tqdm

    check_task([], modes=modes)
    params = SamplingParams(max_new_tokens=max_new_tokens).validate()  # greedy
    out: dict[str, list[str]] = {}
    bar = tqdm(total=len(grid) * len(modes), desc="niah", unit="prompt", disable=not progress, file=sys.stderr)
    for mode in modes:
        reqs = [request(tokenizer, s, prompt_format, mode, params) for s in grid]
        out[mode] = []
        for i in range(0, len(reqs), batch):
            out[mode] += generate(reqs[i : i + batch])
            bar.update(len(reqs[i : i + batch]))
    bar.close()
    rows, cells = [], {}
    for j, s in enumerate(grid):
        row = {"length": s.length, "depth": s.depth, "index": s.index, "depth_actual": round(s.depth_actual, 2),
               "prompt_tokens": len(request(tokenizer, s, prompt_format, "none").prompt_ids),
               "haystack_sentences": s.haystack_sentences, "queries": s.queries, "answers": s.answers,
               "outputs": {m: out[m][j] for m in modes},
               "scores": {m: string_match_all(out[m][j], s.answers) for m in modes}}
        rows.append(row)
        cells.setdefault((s.length, s.depth), []).append(row)
    cell_rows = [{"length": L, "depth": d, "samples": len(rs), "depth_actual": sum(r["depth_actual"] for r in rs) / len(rs),
                  "prompt_tokens": sum(r["prompt_tokens"] for r in rs) / len(rs),
                  "scores": {m: sum(r["scores"][m] for r in rs) / len(rs) for m in modes}}
                 for (L, d), rs in cells.items()]
    return {"modes": {m: sum(r["scores"][m] for r in rows) / len(rows) for m in modes},
            "cells": cell_rows, "samples": rows}


def heatmap(res: dict, modes: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Depth (rows, 0 % on top) x context length (columns), one panel a mode, score 0 (red) to 1 (green)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = sorted({c["length"] for c in res["cells"]})
    depths = sorted({c["depth"] for c in res["cells"]})
    fig, axes = plt.subplots(1, len(modes), figsize=(1.2 + 0.9 * len(lengths) * len(modes), 0.9 + 0.45 * len(depths)),
                             squeeze=False)
    for ax, mode in zip(axes[0], modes):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for c in res["cells"]:
            grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["scores"][mode]
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set(xticks=range(len(lengths)), xticklabels=lengths, yticks=range(len(depths)),
               yticklabels=[f"{d:g}%" for d in depths], xlabel="context length (tokens)",
               title=f"{mode}: {res['modes'][mode]:.2f}")
        ax.tick_params(labelleft=ax is axes[0][0])  # the depths once, on the left
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="string_match_all")
    fig.suptitle(title, fontsize=9, y=1.06)  # above the panels' titles
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def format_table(res: dict, modes: Sequence[str]) -> str:
    from .common import table

    rows = [[c["length"], f"{c['depth']:g}%", f"{c['depth_actual']:.1f}%", f"{c['prompt_tokens']:.0f}",
             *(f"{c['scores'][m]:.2f}" for m in modes)] for c in res["cells"]]
    return table(rows + [["all", "", "", "", *(f"{res['modes'][m]:.2f}" for m in modes)]],
                 ["length", "depth", "needle at", "prompt tokens", *modes])


# -- the demo's section -----------------------------------------------------------------------


def needle_demo(model, processor, length: int = 512, depth: float = 50, seed: int = 0,
                max_new_tokens: int = 24) -> dict:
    """One 7-digit needle at ``depth`` % of a RULER haystack of ``length`` tokens, asked in gcc (the
    haystack becomes picture memory) and in none (the same model reading it as text):
    ``{"needle", "answer", "prompt_tokens", "pages", "written": {mode: text}, "found": {mode: bool}}``."""
    from ..engine import Engine

    tok = processor.tokenizer
    fmt = resolve_format(tok, "auto")
    s = build_sample(tok, length, depth, 0, seed=seed, prompt_format=fmt)
    engine = Engine(model, processor, max_batch=1)
    params = SamplingParams(max_new_tokens=max_new_tokens).validate()
    written, pages = {}, 0
    for mode in ("gcc", "none"):
        r = engine.generate([request(tok, s, fmt, mode, params)])[0]
        written[mode] = r.text
        pages = r.stats.chunks_compressed if mode == "gcc" else pages
    needle = NEEDLE.format(type_v="numbers", key=s.keys[0], value=s.answers[0])
    return {"needle": needle, "answer": s.answers[0], "question": s.question, "prompt_format": fmt,
            "prompt_tokens": len(request(tok, s, fmt, "none").prompt_ids), "depth_actual": s.depth_actual,
            "pages": pages, "written": written, "found": {m: string_match_all(t, s.answers) == 1
                                                         for m, t in written.items()}}


def print_needle_demo(model, processor, length: int = 1024) -> None:
    """The demo's section 5: :func:`needle_demo`, printed (skipped when the length cannot hold the prompt)."""
    try:
        n = needle_demo(model, processor, length=length)
    except ValueError as e:
        print(f"\n5. a needle in memory: skipped ({e})")
        return
    print(f"\n5. a needle in memory: {n['needle']!r} hidden at {n['depth_actual']:.0f}% of RULER's haystack "
          f"({n['prompt_format']} prompt of {n['prompt_tokens']} tokens), then {n['question']!r}")
    for mode, name in (("gcc", f"from memory (gcc, {n['pages']} pages)"), ("none", "from text context")):
        print(f"   {name + ':':30}{n['written'][mode][:80]!r} ({'found' if n['found'][mode] else 'not found'})")


# -- command line -----------------------------------------------------------------------------


def _numbers(flag: str, text: str, kind=int) -> list:
    try:
        out = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out:
        raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}")
    return out


def cmd_eval_niah(args) -> int:
    import argparse
    import platform

    import torch
    import transformers

    from .. import __version__
    from ..errors import CLIError
    from ..runtime import load_checkpoint, write_json
    from .common import command_line, model_geometry, sha256_file

    try:
        lengths = _numbers("--lengths", args.lengths)
        depths = _numbers("--depths", args.depths, float)
        modes = [m.strip() for m in args.modes.split(",") if m.strip()] or [""]
        check_task(depths, args.keys, args.values, args.queries, modes)
        if args.max_new_tokens < 1 or args.batch < 1 or args.samples < 1:
            raise ValueError("--max-new-tokens, --batch and --samples must be >= 1")
        hay = haystack_sentences(args.haystack)  # everything checked before the model loads
        model, processor = load_checkpoint(args.model, args.device, args.dtype)
        tok = processor.tokenizer
        fmt = resolve_format(tok, args.prompt_format)
        limit = model.config.text_config.max_position_embeddings
        if max(lengths) + args.max_new_tokens > limit:
            raise ValueError(f"--lengths {max(lengths)} + --max-new-tokens {args.max_new_tokens} is over the "
                             f"model's {limit} positions")
        grid = build_grid(tok, lengths, depths, args.samples, fmt, seed=args.seed, value_type=args.value_type,
                          keys=args.keys, values=args.values, queries=args.queries, haystack=hay)
        res = evaluate_niah(engine_generator(model, processor, args.batch), tok, grid, modes, fmt,
                            args.max_new_tokens, args.batch, progress=not args.no_progress)
    except ValueError as e:
        raise CLIError(str(e)) from e
    out = Path(args.out)
    png = heatmap(res, modes, out.with_suffix(".png"),
                  f"{Path(args.model).name}: {args.value_type}, {args.keys} key(s), {args.values} value(s), "
                  f"{args.queries} query(ies), {args.samples} sample(s) a cell")
    results = {
        "evaluation": "niah",
        "provenance": {"model": str(args.model), "config_hash": model.config.hash(),
                       "command": command_line("vist2 eval niah", argparse.Namespace(**{
                           k: v for k, v in vars(args).items() if k not in ("command", "eval_command")})),
                       "haystack": str(args.haystack) if args.haystack else "ruler-repeat",
                       "haystack_sha256": sha256_file(args.haystack) if args.haystack else None,
                       "vist2": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                       "python": platform.python_version()},
        "model_geometry": model_geometry(model.config),
        "task": {"needle": NEEDLE, "value_type": args.value_type, "keys": args.keys, "values": args.values,
                 "queries": args.queries, "prompt_format": fmt, "max_new_tokens": args.max_new_tokens,
                 "decoding": "greedy, through vist2.engine.Engine", "seed": args.seed,
                 "score": "RULER string_match_all: share of the expected values in the output, case-insensitive",
                 "length": "tokens of the whole prompt (model's tokenizer), at most the cell's length"},
        "lengths": lengths, "depths": depths, "samples_per_cell": args.samples, "heatmap": str(png), **res,
    }
    path = write_json(out, results)
    print(format_table(res, modes))
    print(f"wrote {path} and {png}")
    return 0


def add_parser(sub) -> None:
    q = sub.add_parser("niah", help="needle in a haystack (RULER's NIAH): exact-fact retrieval by context length "
                                    "and needle depth, in each mode",
                       description="A RULER needle sweep through the engine: for each context length x needle depth, "
                                   "--samples seeded prompts (the same in every mode) asking for the value of a key "
                                   "hidden in a haystack; scored with RULER's string_match_all. Writes a JSON (every "
                                   "output) and a heatmap PNG beside it (one panel a mode).")
    q.add_argument("--model", required=True, metavar="DIR", help="a VIST2 checkpoint folder")
    q.add_argument("--lengths", default="1024,2048,4096", metavar="L,...",
                   help="context lengths in tokens of the model's tokenizer: the whole prompt (default 1024,2048,4096)")
    q.add_argument("--depths", default="0,25,50,75,100", metavar="D,...",
                   help="needle depths in %% of the context (default 0,25,50,75,100)")
    q.add_argument("--samples", type=int, default=5, metavar="N", help="seeded samples a cell (default 5)")
    q.add_argument("--modes", default="gcc,none", metavar="M,...",
                   help=f"comma-separated, from {', '.join(MODES)} (none: the same model reading the context as "
                        "text; default gcc,none)")
    q.add_argument("--value-type", choices=VALUE_TYPES, default="numbers",
                   help="needle values: 7-digit numbers, adjective-noun words or UUIDs (default numbers)")
    q.add_argument("--keys", type=int, default=1, help="keys in the haystack; all but the queried are distractors")
    q.add_argument("--values", type=int, default=1, help="values a key has (each its own needle)")
    q.add_argument("--queries", type=int, default=1, help="keys asked for at once (at most --keys)")
    q.add_argument("--haystack", metavar="FILE",
                   help="a UTF-8 text file whose sentences fill the haystack (default: RULER's repeated lines)")
    q.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                   help="chat: the haystack and question as the user's message, the answer's start opening the "
                        "assistant's turn; plain: a completion prompt; auto: chat if the tokenizer has a chat "
                        "template (default)")
    q.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens written per answer (default 64)")
    q.add_argument("--batch", type=int, default=4, metavar="N", help="prompts generated at once (default 4)")
    q.add_argument("--seed", type=int, default=0, help="the samples' seed (default 0)")
    q.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.add_argument("--out", required=True, metavar="FILE", help="results JSON (the heatmap: the same name, .png)")
    q.set_defaults(func=cmd_eval_niah)
