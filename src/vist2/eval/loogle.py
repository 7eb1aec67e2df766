"""LooGLE (the paper's Table 5): long-text generation with the context compressed, in each mode.

    vist2 eval loogle --model runs/sft --data LooGLE/data --max-kv 8192 --out runs/eval/loogle.json
    vist2 eval loogle --model runs/sft --data LooGLE/data --tasks longdep_qa --judge path/to/judge-lm --out runs/eval/lg.json

``--data`` holds LooGLE's task files, ``<task>.jsonl`` for shortdep_qa, shortdep_cloze, longdep_qa and
longdep_summarization (``summarization.jsonl``, the Hugging Face config's name, is read for the last).
A record is a document: ``input`` (the long text), ``title``, ``qa_pairs`` (a list, or its Python
literal as a string, of ``{"Q", "A", "S"}``: question, answer, evidence; ``"none"`` for summaries) and
``output`` (the reference summary; ``"none"`` for QA). A QA task asks every pair of a document; the
summarization task asks for the document's summary; a cloze's answer (mask -> entity) is scored as its
JSON. The prompts are LooGLE's (:data:`TASKS`; ``--prompts`` reads the release's
``config/task2prompt.json`` instead). Maximum generation lengths are LooGLE's: 300,
50, 500 and 500 tokens. A prompt past the KV budget is cut in the middle (:mod:`vist2.eval.downstream`);
the paper's setting is "8k x 4": ``--max-kv 8192`` at r = 4.

Scores (each mean x 100 over the task's answers; the answer is what follows a ``<think>`` block, if the
model writes one, and ``--think-tokens`` gives it room):

- **BLEU-1 / BLEU-4**: NLTK's ``sentence_bleu`` on whitespace words, weights (1, 0, 0, 0) and
  (0, 0, 0, 1) (the 4-gram precision alone), brevity penalty included, no smoothing;
- **ROUGE-1 / ROUGE-2 / ROUGE-L**: F-measures (rouge-score, with :class:`~vist2.eval.common.CJKTokenizer`);
- **METEOR**: NLTK's ``meteor_score`` on whitespace words. It needs NLTK's WordNet data
  (``python -m nltk.downloader wordnet``); without it METEOR is reported as null and the results say so;
- **judged** (``--judge DIR``, the paper's GPT4_score with a local causal LM instead of GPT-4): the judge
  reads the question (or the task), the reference and the answer and is asked whether the answer says the
  same; the share it answers "True" (its log-probability of " True" above " False").

BERTScore (Table 5's Bert_score) is not computed here.
"""

from __future__ import annotations

import ast
import json
import math
import warnings
from pathlib import Path
from typing import Sequence

from .downstream import Item, add_run_arguments, check_limit, command, engine_for, folder_provenance, \
    footprint_summary, generate, generation_length, markdown_table, parse_modes, report

TASKS = {  # task: (prompt, max new tokens)
    "shortdep_qa": ("Please answer the question based on the long texts below. \n{input}\nQuestion: {Q}\nAnswer: ", 300),
    "shortdep_cloze": ("Please fill in the clozes based on the given long texts below. Each of the placeholder "
                       "'<mask-n>' in the question could be an entity of Person, Location or Organization. The same "
                       "masks represent the same entity. Output a json format answer, for example: {{'<mask-0>': "
                       "'Bob', '<mask-1>': 'Gorrosion Magazine','<mask-2>': 'Bethel Horizon'}}\n{input}\n"
                       "Question: {Q} What are the masked entities? \nAnswer:", 50),
    "longdep_qa": ("Please answer the question based on the long texts below. \n{input}\nQuestion: {Q}\nAnswer: ", 500),
    "longdep_summarization": ("Please generate a summary of the below paper. \n{input}\n Summarization: ", 500),
}
FILE_NAMES = {"longdep_summarization": ("longdep_summarization.jsonl", "summarization.jsonl")}
METRICS = ("bleu1", "bleu4", "rouge1", "rouge2", "rougeL", "meteor")
JUDGE_PROMPT = ("Given one question, there is a groundtruth and a predict_answer. Please decide whether they are the "
                "same or not in semantic. Please only output 'True' or 'False' .\n\nQuestion: {q}\n"
                "groundtruth = {ref}\n\npredict_answer = {pred}\n\nAnswer:")
SUMMARY_QUESTION = "Summarize the paper."


def _pairs(value, where: str) -> list[dict]:
    if isinstance(value, str):
        if value.strip() == "none":
            return []
        try:
            value = ast.literal_eval(value)  # the release stores the list as a Python literal
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"{where}: 'qa_pairs' is not a list literal ({e})") from e
    if not isinstance(value, list) or not all(isinstance(p, dict) and isinstance(p.get("Q"), str)
                                              and isinstance(p.get("A"), (str, dict)) for p in value):
        raise ValueError(f"{where}: 'qa_pairs' must be a list of {{'Q', 'A', 'S'}} with string Q and A "
                         "(a cloze's A: a mask -> entity object)")
    # a cloze's answer maps each mask to its entity: scored as the JSON the prompt asks for
    return [{**p, "A": p["A"] if isinstance(p["A"], str) else json.dumps(p["A"], ensure_ascii=False)} for p in value]


def read_task(path: Path, task: str, limit: int | None = None) -> list[dict]:
    """``[{"input", "question", "reference", "title"}]``: one per QA pair (QA tasks) or document (summaries);
    ``limit`` counts documents. ``ValueError`` naming the file and line of a malformed record."""
    out, docs = [], 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from e
            if not isinstance(rec, dict) or not isinstance(rec.get("input"), str):
                raise ValueError(f"{where}: expected an object with a string 'input' (LooGLE's format)")
            if task == "longdep_summarization":
                if not isinstance(rec.get("output"), str) or rec["output"].strip() in ("", "none"):
                    raise ValueError(f"{where}: a summarization record needs its reference summary in 'output'")
                out.append({"input": rec["input"], "question": None, "reference": rec["output"],
                            "title": rec.get("title")})
            else:
                pairs = _pairs(rec.get("qa_pairs"), where)
                if not pairs:
                    raise ValueError(f"{where}: a {task} record needs 'qa_pairs'")
                out += [{"input": rec["input"], "question": p["Q"], "reference": p["A"], "title": rec.get("title")}
                        for p in pairs]
            docs += 1
            if limit is not None and docs >= limit:
                break
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def find_tasks(data_dir: str | Path, names: Sequence[str] | None = None) -> dict[str, Path]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"--data {data_dir}: no such folder")
    if names:
        unknown = [n for n in names if n not in TASKS]
        if unknown:
            raise ValueError(f"--tasks: unknown {', '.join(unknown)}; LooGLE has {', '.join(TASKS)}")
    found = {}
    for task in names or TASKS:
        path = next((data_dir / f for f in FILE_NAMES.get(task, (f"{task}.jsonl",)) if (data_dir / f).is_file()), None)
        if path is not None:
            found[task] = path
        elif names:
            raise ValueError(f"--data {data_dir}: no {' or '.join(FILE_NAMES.get(task, (f'{task}.jsonl',)))}")
    if not found:
        raise ValueError(f"--data {data_dir}: none of LooGLE's files ({', '.join(f'{t}.jsonl' for t in TASKS)})")
    return found


# -- metrics ----------------------------------------------------------------------------------


def wordnet_available() -> bool:
    try:
        from nltk.corpus import wordnet

        wordnet.synsets("text")
        return True
    except LookupError:
        return False


def scores(reference: str, prediction: str, meteor: bool, rouge_scorer=None) -> dict[str, float | None]:
    """BLEU-1/4, ROUGE-1/2/L and METEOR (None unless ``meteor``) of one answer, each in [0, 1].

        >>> round(scores("the cat sat on the mat", "the cat sat", meteor=False)["bleu1"], 4)  # brevity penalty e^-1
        0.3679
    """
    from nltk.translate.bleu_score import sentence_bleu

    from .common import rouge

    ref, hyp = reference.split(), prediction.split()
    with warnings.catch_warnings():  # NLTK warns when an n-gram order has no match (the score is then 0)
        warnings.simplefilter("ignore")
        bleu1 = sentence_bleu([ref], hyp, weights=(1, 0, 0, 0)) if hyp else 0.0
        bleu4 = sentence_bleu([ref], hyp, weights=(0, 0, 0, 1)) if hyp else 0.0
    out = {"bleu1": float(bleu1), "bleu4": float(bleu4), **rouge(reference, prediction, rouge_scorer), "meteor": None}
    if meteor:
        from nltk.translate.meteor_score import meteor_score

        out["meteor"] = float(meteor_score([ref], hyp)) if hyp else 0.0
    return out


def judged_true(judge, tokenizer, question: str, reference: str, prediction: str) -> bool:
    """Whether the judge LM, asked if the answer means what the reference says, prefers " True" to " False"."""
    from .olm import judge_nll

    ctx = JUDGE_PROMPT.format(q=question, ref=reference, pred=prediction)
    return judge_nll(judge, tokenizer, ctx, " True")[0] < judge_nll(judge, tokenizer, ctx, " False")[0]


def read_prompts(path: str | Path) -> dict[str, str]:
    """Prompt templates from a JSON file ``{task: template}`` (LooGLE's ``config/task2prompt.json`` has this
    form): each must name ``{input}``, a QA task's ``{Q}`` too. Tasks it leaves out keep :data:`TASKS`'s."""
    path = Path(path)
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--prompts {path}: not a readable JSON file ({e})") from e
    if not isinstance(prompts, dict):
        raise ValueError(f"--prompts {path}: expected an object {{task: template}}")
    out = {}
    for task, template in prompts.items():
        if task not in TASKS:
            continue  # the release's file may hold prompts of other tasks
        if not isinstance(template, str) or "{input}" not in template or (
                task != "longdep_summarization" and "{Q}" not in template):
            raise ValueError(f"--prompts {path}: {task!r} must be a string naming {{input}}"
                             + ("" if task == "longdep_summarization" else " and {Q}"))
        out[task] = template
    return out


def evaluate_loogle(model, processor, data: dict[str, list[dict]], modes: Sequence[str], budget: int | None = None,
                    max_batch: int = 4, max_new_tokens: int | None = None, judge=None, progress: bool = True,
                    prompts: dict[str, str] | None = None, think_tokens: int = 0) -> dict:
    """``{"modes": {mode: {task: {metric: x100, ...}}}, "meteor": bool, ...}``: each task's questions
    answered in each mode and scored. ``judge``: ``(model, tokenizer)`` from :func:`vist2.eval.olm.load_judge`;
    ``prompts``: templates that replace :data:`TASKS`'s (:func:`read_prompts`). The answer after a
    ``<think>`` block is scored; ``think_tokens`` are added to the generation lengths for it."""
    from .common import rouge_scorer

    engine, budget = engine_for(model, processor, budget, max_batch)
    meteor, scorer = wordnet_available(), rouge_scorer()
    out: dict = {"max_kv": budget, "max_new_tokens_cap": max_new_tokens, "think_tokens": think_tokens, "meteor": meteor,
                 "meteor_note": None if meteor else "NLTK's WordNet data not found: METEOR not computed "
                                                    "(python -m nltk.downloader wordnet)",
                 "judged": judge is not None, "modes": {}}
    for mode in modes:
        per_task = {}
        for task, recs in data.items():
            template = (prompts or {}).get(task, TASKS[task][0])
            cap = generation_length(TASKS[task][1], max_new_tokens, think_tokens)
            items = [Item(template.format(input=r["input"], Q=r["question"] or ""), cap) for r in recs]
            rows = generate(engine, items, mode, budget, desc=task, progress=progress)
            for row, rec in zip(rows, recs):
                row.update(question=rec["question"], reference=rec["reference"],
                           **scores(rec["reference"], row["answer"], meteor, scorer))
                if judge is not None:
                    row["judged"] = judged_true(*judge, rec["question"] or SUMMARY_QUESTION, rec["reference"],
                                                row["answer"])
            mean = lambda k: 100 * sum(r[k] for r in rows) / len(rows)  # noqa: E731
            per_task[task] = {**{k: mean(k) if (k != "meteor" or meteor) else None for k in METRICS},
                              "judged": mean("judged") if judge is not None else None, "max_new_tokens": cap,
                              **footprint_summary(rows), "samples": rows}
        out["modes"][mode] = per_task
    return out


def format_tables(res: dict) -> str:
    """Markdown in Table 5's layout: a block per task, a row per mode."""
    head = ["task", "mode", "context tokens (mean)", "KV peak (mean)", "Bleu1", "Bleu4", "Rouge1", "Rouge2", "RougeL",
            "Meteor", "judged"]
    fmt = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"  # noqa: E731
    tasks = list(next(iter(res["modes"].values())))
    rows = [[task, mode, f"{m[task]['prompt_tokens_mean']:.0f}", f"{m[task]['kv_peak_mean']:.0f}",
             *(fmt(m[task][k]) for k in METRICS), fmt(m[task]["judged"])]
            for task in tasks for mode, m in res["modes"].items()]
    notes = [f"LooGLE (paper Table 5), KV budget {res['max_kv']} entries a request; scores x 100"]
    if res["meteor_note"]:
        notes.append(res["meteor_note"])
    if not res["judged"]:
        notes.append("judged: not run (--judge DIR)")
    return "\n\n".join(notes) + "\n\n" + markdown_table(rows, head)


def cmd_eval_loogle(args) -> int:
    from ..errors import CLIError
    from ..runtime import load_checkpoint
    from .common import model_geometry
    from .olm import load_judge

    try:
        modes = parse_modes(args.modes)
        names = [n.strip() for n in args.tasks.split(",") if n.strip()] if args.tasks else None
        files = find_tasks(args.data, names)
        check_limit(args.limit)
        data = {t: read_task(f, t, args.limit) for t, f in files.items()}
        prompts = read_prompts(args.prompts) if args.prompts else None
        judge = load_judge(args.judge, args.device, args.dtype) if args.judge else None
        model, processor = load_checkpoint(args.model, args.device, args.dtype)
        res = evaluate_loogle(model, processor, data, modes, args.max_kv, args.max_batch, args.max_new_tokens,
                              judge=judge, progress=not args.no_progress, prompts=prompts,
                              think_tokens=args.think_tokens)
    except ValueError as e:
        raise CLIError(str(e)) from e
    import nltk

    results = {"evaluation": "loogle",
               "provenance": folder_provenance(args.model, model.config, Path(args.data), list(files.values()),
                                               command("vist2 eval loogle", args)) | {"nltk": nltk.__version__},
               "model_geometry": model_geometry(model.config), "judge": args.judge,
               "protocol": "LooGLE: its prompts and generation lengths, greedy, middle cut past the KV budget; "
                           "BLEU-1/4 (NLTK, whitespace words), ROUGE-1/2/L F (rouge-score), METEOR (NLTK, needs "
                           "WordNet), judged = share the judge LM calls True; means x 100",
               **res}
    return report(args.out, results, format_tables(res))


def add_parser(sub) -> None:
    q = sub.add_parser("loogle", help="LooGLE (paper Table 5): long-text QA and summarization in each compression mode",
                       description="Answer LooGLE's questions and summarize its papers with the engine in each mode "
                                   "(gcc, pcc, none) under one KV budget; BLEU-1/4, ROUGE-1/2/L, METEOR (when NLTK's "
                                   "WordNet data is installed) and, with --judge, the judged score. Writes the results "
                                   "JSON and a markdown table beside it (.md).")
    q.add_argument("--model", required=True, metavar="DIR", help="a VIST2 checkpoint folder")
    q.add_argument("--data", required=True, metavar="DIR",
                   help="LooGLE's task files: shortdep_qa.jsonl, shortdep_cloze.jsonl, longdep_qa.jsonl, "
                        "longdep_summarization.jsonl (or summarization.jsonl)")
    q.add_argument("--tasks", metavar="A,B", help="only these tasks (default: every LooGLE file in --data)")
    q.add_argument("--prompts", metavar="FILE",
                   help="prompt templates as JSON {task: template} with {input} and {Q} (e.g. LooGLE's "
                        "config/task2prompt.json); default: the built-in ones")
    q.add_argument("--judge", metavar="DIR", help="a local causal-LM folder (with tokenizer) that judges each answer "
                                                  "True/False against the reference (paper: GPT-4)")
    add_run_arguments(q, max_kv_note="paper: 8192 at r = 4; ", limit_of="documents of each task",
                      lengths_of="LooGLE's generation lengths")
    q.set_defaults(func=cmd_eval_loogle)
