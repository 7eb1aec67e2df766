"""The paper's Table 6 (general abilities) from lm-eval runs: one run a mode, one table.

    for mode in gcc pcc none; do
      python -m vist2.eval.lm_eval_adapter run --model vist2 --model_args pretrained=runs/sft,mode=$mode \\
          --tasks gsm8k,hendrycks_math,agieval_aqua_rat,cmmlu --apply_chat_template --output_path runs/eval/general/$mode
    done
    vist2 eval general --runs gcc=runs/eval/general/gcc,pcc=runs/eval/general/pcc,none=runs/eval/general/none \\
        --out runs/eval/general.json

Each run's newest ``results_*.json`` (lm-eval writes it under ``--output_path``, in a folder named
after the model) gives the columns, as fractions like the paper's: GSM-8k = ``gsm8k``'s
``exact_match`` (``strict-match`` filter), MATH = ``hendrycks_math``'s ``exact_match``, AQUA =
``agieval_aqua_rat``'s ``acc``, CMMLU = ``cmmlu``'s ``acc``. A task the run did not include is ``-``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .downstream import markdown_table, report

COLUMNS = (  # (column, lm-eval task or group, metric key)
    ("GSM-8k", "gsm8k", "exact_match,strict-match"),
    ("MATH", "hendrycks_math", "exact_match,none"),
    ("AQUA", "agieval_aqua_rat", "acc,none"),
    ("CMMLU", "cmmlu", "acc,none"),
)


def results_file(path: str | Path) -> Path:
    """The lm-eval results JSON of a run: ``path`` itself, or the newest ``results_*.json`` under it."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(path.rglob("results_*.json"), key=lambda p: p.stat().st_mtime) if path.is_dir() else []
    if not found:
        raise ValueError(f"{path}: no lm-eval results (results_*.json) there")
    return found[-1]


def read_run(path: str | Path) -> dict:
    """``{"file", "model_args", "scores": {column: float | None}}`` of one lm-eval run."""
    f = results_file(path)
    try:
        res = json.loads(f.read_text(encoding="utf-8"))
        results = res["results"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{f}: not an lm-eval results file ({e})") from e
    scores = {}
    for col, task, key in COLUMNS:
        value = results.get(task, {}).get(key)
        scores[col] = None if value is None else float(value)
    return {"file": str(f), "model_args": (res.get("config") or {}).get("model_args"), "scores": scores}


def format_table(runs: dict[str, dict]) -> str:
    head = ["Methods", *(c for c, _, _ in COLUMNS)]
    rows = [[name, *("-" if r["scores"][c] is None else f"{r['scores'][c]:.4f}" for c, _, _ in COLUMNS)]
            for name, r in runs.items()]
    return "General abilities (paper Table 6), fractions\n\n" + markdown_table(rows, head)


def parse_runs(text: str) -> dict[str, str]:
    """``"gcc=DIR,none=DIR"`` -> ``{"gcc": "DIR", "none": "DIR"}``."""
    runs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, path = part.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--runs: expected NAME=PATH[,NAME=PATH...], got {part!r}")
        runs[name] = path
    if not runs:
        raise ValueError("--runs: no run given")
    return runs


def cmd_eval_general(args) -> int:
    from ..errors import CLIError

    try:
        runs = {name: read_run(path) for name, path in parse_runs(args.runs).items()}
    except ValueError as e:
        raise CLIError(str(e)) from e
    table = format_table(runs)
    results = {"evaluation": "general", "columns": {c: f"{t} {k}" for c, t, k in COLUMNS}, "runs": runs}
    return report(args.out, results, table)


def add_parser(sub) -> None:
    q = sub.add_parser("general", help="the paper's Table 6 (GSM-8k, MATH, AQUA, CMMLU) from lm-eval runs, a row a run",
                       description="Collect lm-eval results (gsm8k, hendrycks_math, agieval_aqua_rat, cmmlu; one "
                                   "run a mode through the vist2 model type) into the paper's Table 6 layout. "
                                   "Writes a JSON and a markdown table beside it (.md).")
    q.add_argument("--runs", required=True, metavar="NAME=PATH,...",
                   help="a row each: its name and the run's --output_path (or its results JSON)")
    q.add_argument("--out", required=True, metavar="FILE", help="JSON (the markdown table goes beside it, .md)")
    q.set_defaults(func=cmd_eval_general)
