"""LongBench (the paper's Table 4) on the official release files, through the engine in each mode.

    vist2 eval longbench --model runs/sft --data LongBench/data --max-kv 8192 --out runs/eval/longbench.json
    vist2 eval longbench --model runs/sft --data LongBench/data --datasets hotpotqa,trec --limit 20 --out runs/eval/lb.json

``--data`` is the folder of LongBench's ``data.zip`` (``<dataset>.jsonl``, one record a line with
``input``, ``context``, ``answers``, ``length``, ``dataset``, ``language``, ``all_classes``, ``_id``);
every dataset file found there is run (``--datasets`` picks some). The protocol is LongBench's
``pred.py`` and ``eval.py``:

- each dataset's prompt and maximum generation length as lm-eval's LongBench tasks carry them (the
  official ``dataset2prompt`` / ``dataset2maxlen``, read from the installed package, not copied);
- the prompt is a user message in the model's chat template, except for trec, triviaqa, samsum, lsht,
  lcc and repobench-p (plain text, as ``pred.py``); greedy decoding;
- a prompt past the KV budget is cut in the middle (:mod:`vist2.eval.downstream`);
- scoring: the answer after a ``<think>`` block, if the model writes one (the paper's SFT responses
  do; ``--think-tokens`` gives it room); its first line for trec, triviaqa, samsum, lsht; the official metric of each
  dataset (qa_f1, rouge, classification, retrieval, count, code_sim; lm-eval's LongBench ``metrics``
  module), the best over the reference answers, mean x 100 per dataset;
- a category (Table 4's columns: SingleDoc QA, MultiDoc QA, Summ., FewShot, Synthetic, Code) is the
  unweighted mean of its datasets' scores, as LongBench reports it.

A row per mode (``gcc``: VIST2, ``pcc``: prompt compressed only, ``none``: the plain backbone), with
the context length (prompt tokens before any cut) and the KV entries each mode held at its peak.
"""

from __future__ import annotations

import json
import logging
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from .downstream import Item, add_run_arguments, check_limit, command, engine_for, folder_provenance, \
    footprint_summary, generate, generation_length, markdown_table, parse_modes, report

# Table 4's columns: LongBench's six categories, each the lm-eval group that lists its datasets
CATEGORIES = {"single": ("SingleDoc QA", "_longbench_single.yaml"), "multi": ("MultiDoc QA", "_longbench_multi.yaml"),
              "summarization": ("Summ.", "_longbench_summarization.yaml"),
              "fewshot": ("FewShot", "_longbench_fewshot.yaml"), "synthetic": ("Synthetic", "_longbench_synthetic.yaml"),
              "code": ("Code", "_longbench_code.yaml")}
NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})  # pred.py: no chat template
FIRST_LINE = frozenset({"trec", "triviaqa", "samsum", "lsht"})  # eval.py: only the answer's first line is scored
FIELDS = {"input": str, "context": str, "answers": list, "length": int, "dataset": str, "language": str,
          "all_classes": (list, type(None)), "_id": str}


def _task_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent / "longbench"


def _yaml(path: Path) -> dict:
    import yaml

    class Loader(yaml.SafeLoader):  # lm-eval's "!function module.name" tags, read as their names
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)


@lru_cache(maxsize=1)
def tasks() -> dict[str, dict]:
    """``{dataset: {"category", "prompt", "max_new_tokens", "metric"}}`` for LongBench's 21 datasets, from
    lm-eval's LongBench task files (prompt: a jinja template over ``context`` and ``question``; metric:
    the name of its function in lm-eval's LongBench ``metrics`` module)."""
    out = {}
    for cat, (_, group_file) in CATEGORIES.items():
        for task in _yaml(_task_dir() / group_file)["task"]:
            name = task.removeprefix("longbench_")
            cfg = _yaml(_task_dir() / f"{name}.yaml")
            out[name] = {"category": cat, "prompt": cfg["doc_to_text"],
                         "max_new_tokens": int(cfg["generation_kwargs"]["max_gen_toks"]),
                         "metric": cfg["process_results"].removeprefix("metrics.")}
    return out


def _metrics():
    with warnings.catch_warnings():  # fuzzywuzzy warns that python-Levenshtein would be faster
        warnings.simplefilter("ignore")
        from lm_eval.tasks.longbench import metrics
    import jieba  # the Chinese metrics' word splitter; it logs its dictionary loading at DEBUG

    jieba.setLogLevel(logging.WARNING)
    return metrics


def score(dataset: str, prediction: str, record: dict) -> float:
    """The official score of one answer, in [0, 1]: the dataset's metric (best over ``answers``), on the
    first line only for trec, triviaqa, samsum and lsht.

        >>> score("hotpotqa", "the cat sat", {"answers": ["cat sat on mat"], "all_classes": None})
        0.6666666666666666
    """
    if dataset in FIRST_LINE:
        prediction = prediction.lstrip("\n").split("\n")[0]
    fn = getattr(_metrics(), tasks()[dataset]["metric"])
    return float(fn({"answers": record["answers"], "all_classes": record.get("all_classes")}, [prediction])["score"])


def prompt(dataset: str, record: dict) -> str:
    """The official prompt of a record (lm-eval's templates name LongBench's ``input`` ``question``)."""
    from lm_eval.utils import apply_template

    return apply_template(tasks()[dataset]["prompt"], {"context": record["context"], "question": record["input"]})


def read_dataset(path: Path, limit: int | None = None) -> list[dict]:
    """The records of one LongBench ``<dataset>.jsonl``; ``ValueError`` naming the file and line of the
    first record that is not JSON or lacks a field of LongBench's format."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not JSON ({e.msg})") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object")
            for key, kind in FIELDS.items():
                if not isinstance(rec.get(key), kind):
                    raise ValueError(f"{path}, line {n}: field {key!r} missing or not "
                                     f"{getattr(kind, '__name__', 'list or null')} (LongBench's format)")
            if not rec["answers"] or not all(isinstance(a, str) for a in rec["answers"]):
                raise ValueError(f"{path}, line {n}: 'answers' must be a non-empty list of strings")
            records.append(rec)
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def find_datasets(data_dir: str | Path, names: Sequence[str] | None = None) -> dict[str, Path]:
    """``{dataset: file}`` of the LongBench files in ``data_dir`` (all of them, or ``names``)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"--data {data_dir}: no such folder (unzip LongBench's data.zip and pass its data/ folder)")
    known = tasks()
    if names:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"--datasets: unknown {', '.join(unknown)}; LongBench has {', '.join(known)}")
        missing = [n for n in names if not (data_dir / f"{n}.jsonl").is_file()]
        if missing:
            raise ValueError(f"--data {data_dir}: no {', '.join(f'{n}.jsonl' for n in missing)}")
    found = {n: data_dir / f"{n}.jsonl" for n in (names or known) if (data_dir / f"{n}.jsonl").is_file()}
    if not found:
        raise ValueError(f"--data {data_dir}: none of LongBench's files (<dataset>.jsonl, e.g. hotpotqa.jsonl)")
    return found


def evaluate_longbench(model, processor, data: dict[str, list[dict]], modes: Sequence[str], budget: int | None = None,
                       max_batch: int = 4, max_new_tokens: int | None = None, progress: bool = True,
                       think_tokens: int = 0) -> dict:
    """``{"modes": {mode: {"categories": {...}, "datasets": {...}, "average"}}, "max_kv", ...}``: every
    dataset's records answered in each mode and scored (x 100) on the answer after any ``<think>`` block.
    ``max_new_tokens`` caps the official generation lengths (quick runs), ``think_tokens`` is added to
    them (:func:`~vist2.eval.downstream.generation_length`); both are recorded in the results."""
    engine, budget = engine_for(model, processor, budget, max_batch)
    spec = tasks()
    out: dict = {"max_kv": budget, "max_new_tokens_cap": max_new_tokens, "think_tokens": think_tokens, "modes": {}}
    for mode in modes:
        per_ds, rows_all = {}, []
        for ds, records in data.items():
            cap = generation_length(spec[ds]["max_new_tokens"], max_new_tokens, think_tokens)
            items = [Item(prompt(ds, r), cap, chat=ds not in NO_CHAT) for r in records]
            rows = generate(engine, items, mode, budget, desc=ds, progress=progress)
            for r, rec in zip(rows, records):
                r.update(id=rec["_id"], length=rec["length"], score=score(ds, r["answer"], rec))
            per_ds[ds] = {"category": spec[ds]["category"], "score": 100 * sum(r["score"] for r in rows) / len(rows),
                          "max_new_tokens": cap, **footprint_summary(rows), "samples": rows}
            rows_all += rows
        cats = {}
        for cat in CATEGORIES:
            scores = [d["score"] for d in per_ds.values() if d["category"] == cat]
            if scores:
                cats[cat] = {"score": sum(scores) / len(scores), "datasets": len(scores)}
        out["modes"][mode] = {"categories": cats, "datasets": per_ds, **footprint_summary(rows_all),
                              "average": sum(c["score"] for c in cats.values()) / len(cats)}
    return out


def format_tables(res: dict) -> str:
    """Markdown: Table 4's layout (a row per mode, a column per category) and a table per dataset."""
    cats = [c for c in CATEGORIES if any(c in m["categories"] for m in res["modes"].values())]
    head = ["mode", *(CATEGORIES[c][0] for c in cats), "Avg", "context tokens (mean)", "KV peak (mean)", "prompts cut"]
    rows = [[mode, *(f"{m['categories'][c]['score']:.1f}" if c in m["categories"] else "-" for c in cats),
             f"{m['average']:.1f}", f"{m['prompt_tokens_mean']:.0f}", f"{m['kv_peak_mean']:.0f}",
             f"{m['prompts_cut']}/{m['prompts']}"] for mode, m in res["modes"].items()]
    datasets = list(next(iter(res["modes"].values()))["datasets"])
    drows = [[ds, *(f"{m['datasets'][ds]['score']:.1f}" for m in res["modes"].values()),
              *(f"{m['datasets'][ds]['kv_peak_mean']:.0f}" for m in res["modes"].values())] for ds in datasets]
    dhead = ["dataset", *res["modes"], *(f"KV {m}" for m in res["modes"])]
    return (f"LongBench (paper Table 4), KV budget {res['max_kv']} entries a request\n\n" + markdown_table(rows, head)
            + "\n\nPer dataset (score x 100; KV entries held at the peak, mean):\n\n" + markdown_table(drows, dhead))


def cmd_eval_longbench(args) -> int:
    from ..errors import CLIError
    from ..runtime import load_checkpoint
    from .common import model_geometry

    try:
        modes = parse_modes(args.modes)
        names = [n.strip() for n in args.datasets.split(",") if n.strip()] if args.datasets else None
        files = find_datasets(args.data, names)
        check_limit(args.limit)
        data = {ds: read_dataset(f, args.limit) for ds, f in files.items()}
        model, processor = load_checkpoint(args.model, args.device, args.dtype)
        res = evaluate_longbench(model, processor, data, modes, args.max_kv, args.max_batch, args.max_new_tokens,
                                 progress=not args.no_progress, think_tokens=args.think_tokens)
    except ValueError as e:
        raise CLIError(str(e)) from e
    import lm_eval

    results = {"evaluation": "longbench",
               "provenance": folder_provenance(args.model, model.config, Path(args.data), list(files.values()),
                                               command("vist2 eval longbench", args)) | {"lm_eval": lm_eval.__version__},
               "model_geometry": model_geometry(model.config),
               "protocol": "LongBench pred.py/eval.py: official prompts and generation lengths, greedy, middle cut "
                           "past the KV budget, first-line scoring for trec/triviaqa/samsum/lsht, lm-eval's LongBench "
                           "metrics x 100; a category is the mean of its datasets",
               **res}
    return report(args.out, results, format_tables(res))


def add_parser(sub) -> None:
    q = sub.add_parser("longbench", help="LongBench (paper Table 4) on the official files, in each compression mode",
                       description="Answer LongBench's records with the engine in each mode (gcc, pcc, none) under one KV "
                                   "budget, score them with the official metrics, and report the paper's Table 4 "
                                   "categories with the context lengths and KV entries each mode held. Writes the "
                                   "results JSON and a markdown table beside it (.md).")
    q.add_argument("--model", required=True, metavar="DIR", help="a VIST2 checkpoint folder")
    q.add_argument("--data", required=True, metavar="DIR",
                   help="LongBench's data folder (<dataset>.jsonl files, from the official data.zip)")
    q.add_argument("--datasets", metavar="A,B", help="only these datasets (default: every LongBench file in --data)")
    add_run_arguments(q)
    q.set_defaults(func=cmd_eval_longbench)
