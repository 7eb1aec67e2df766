"""What every evaluation shares: reading the data, loading the model, ROUGE that reads Chinese,
and the provenance block of a results JSON.

    vist2 eval ocr --model runs/tiny --data passage.txt --out runs/eval/ocr.json
    vist2 eval olm --model runs/tiny --data docs.jsonl --out runs/eval/olm.json

A results file records where its numbers came from: the model folder, its config hash
(:meth:`vist2.config.VIST2Config.hash`), the sha256 of the data file and the command line,
so two results files can be compared without guessing.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import shlex
import time
from pathlib import Path
from typing import Sequence

# CJK ideographs (with extension A and compatibility forms), kana and hangul: scripts written
# without spaces, where one character is the natural unit of ROUGE
_CJK = (
    "\u3040-\u30ff"  # hiragana, katakana
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uac00-\ud7af"  # hangul syllables
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\U00020000-\U0002ffff"  # CJK extensions B and later
)
_TOKEN = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])[^\W_])+")


class CJKTokenizer:
    """ROUGE tokenisation for any script: each CJK character is one token, other text splits into
    runs of letters and digits (lower-cased); punctuation and whitespace are dropped.

    rouge-score's own tokenizer keeps only ``[a-z0-9]``, so Chinese text would score 0 against
    itself; this one is passed as ``RougeScorer(..., tokenizer=CJKTokenizer())``.

        >>> CJKTokenizer().tokenize("红楼梦 Dream of the Red Chamber, 1791")
        ['红', '楼', '梦', 'dream', 'of', 'the', 'red', 'chamber', '1791']
    """

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(text.lower())


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_scorer():
    from rouge_score import rouge_scorer as rs

    return rs.RougeScorer(list(ROUGE_TYPES), tokenizer=CJKTokenizer())


def rouge(reference: str, hypothesis: str, scorer=None) -> dict[str, float]:
    """ROUGE-1/2/L F-measures of a hypothesis against its reference (1.0 when they are equal).

        >>> rouge("春眠不觉晓", "春眠不觉晓")["rougeL"]
        1.0
    """
    scores = (scorer or rouge_scorer()).score(reference, hypothesis)
    return {k: float(scores[k].fmeasure) for k in ROUGE_TYPES}


# -- data -----------------------------------------------------------------------------


def read_documents(path: str | Path, limit: int | None = None) -> list[str]:
    """The documents of a data file: a ``.jsonl`` file gives one per line (its ``"text"`` field),
    any other file is one document (UTF-8 plain text).

    Raises ``ValueError`` for a missing or empty file, a jsonl line that is not an object with a
    string ``"text"``, or data with no text at all.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data {path}: no such file")
    raw = path.read_text(encoding="utf-8")
    if not raw.strip():
        raise ValueError(f"--data {path}: the file is empty")
    if path.suffix.lower() == ".jsonl":
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--data {path}, line {n}: not JSON ({e.msg})") from e
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ValueError(f'--data {path}, line {n}: expected an object with a string "text" field')
            if rec["text"].strip():
                docs.append(rec["text"])
    else:
        docs = [raw]
    if not docs:
        raise ValueError(f"--data {path}: no text in the file")
    return docs[:limit] if limit else docs


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- provenance -------------------------------------------------------------------------


def command_line(prog: str, args) -> str:
    """The command that reproduces a run, rebuilt from its parsed arguments (not ``sys.argv``, which
    names whatever launched the process: pytest, python -m, accelerate)."""
    parts = prog.split()
    for key, value in sorted(vars(args).items()):
        if key in ("func", "verbose") or callable(value) or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)


def model_geometry(config, **extra) -> dict:
    """The compression geometry a results file reports: K, n_visual and r = K / n_visual (plus ``extra``)."""
    return {"chunk_tokens": config.chunk_tokens, "n_visual": config.n_visual,
            "compression_ratio": config.compression_ratio, **extra}


def provenance(model_dir: str | Path, config, data_path: str | Path, command: str) -> dict:
    """Where the numbers come from: model folder, config hash, data hash, the command, versions."""
    import torch
    import transformers

    from .. import __version__

    return {
        "model": str(model_dir),
        "config_hash": config.hash(),
        "data": str(data_path),
        "data_sha256": sha256_file(data_path),
        "command": command,
        "vist2": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    """A plain fixed-width table (first column left-aligned, the rest right-aligned)."""
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join(fmt(r) for r in cells)
