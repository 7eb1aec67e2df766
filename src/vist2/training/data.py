"""Data sources: text files and folders, jsonl, local HF datasets (arrow / parquet / save_to_disk).

A source yields plain dict records, one of three kinds:

- ``{"text": str}`` — a document (PT-2 OCR, PT-3 OLM);
- ``{"image": path, "caption": str}`` — an image and its caption (PT-1); a relative
  path is taken relative to the jsonl file that names it;
- ``{"messages": [{"role", "content"}, ...]}`` — a chat whose last message is the
  assistant's reply (SFT). The last user message may add ``"question": str``: its ``content``
  is then the document and ``question`` the question asked about it (drawn red on the
  query's grey, paper Fig. 7; see ``vist2.chat.chat_prompt``).

Records are read lazily (jsonl line by line, HF datasets with ``streaming=True``
when asked), so corpora larger than memory work. Bad records — empty text,
broken JSON, missing fields, missing images — are skipped and counted in a
:class:`SkipCounter`, never fatal; a source with no usable record at all fails
at once (:func:`check_source`).

    >>> from vist2.training.data import open_source
    >>> src = open_source("data/text_en.jsonl")          # doctest: +SKIP
    >>> next(iter(src.records("olm")))[1]["text"][:20]       # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
HF_SUFFIXES = (".parquet", ".arrow")
# the field each stage needs
STAGE_FIELD = {"lm": "text", "caption": "caption", "ocr": "text", "olm": "text", "sft": "messages"}


class SkipCounter(Counter):
    """Skipped records by reason (``empty_text``, ``bad_json``, ``missing_image`` ...)."""

    def report(self) -> str:
        if not self:
            return "no records skipped"
        return f"{sum(self.values())} skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.items()))


@dataclass
class Source:
    """One or more files read in a fixed order; ``records(stage)`` yields valid records only."""

    path: Path
    files: list[Path] = field(default_factory=list)
    kind: str = "files"  # files | hf
    streaming: bool = False
    skipped: SkipCounter = field(default_factory=SkipCounter)

    def raw(self) -> Iterator[tuple[dict | None, Path, str | None]]:
        """Every record as (dict or None, file it came from, reason when None)."""
        if self.kind == "hf":
            yield from _hf_records(self.path, self.files, self.streaming)
            return
        for f in self.files:
            if f.suffix in TEXT_SUFFIXES:
                try:
                    yield {"text": f.read_text(encoding="utf-8")}, f, None
                except (UnicodeDecodeError, OSError):
                    yield None, f, "unreadable_file"
            else:
                yield from _jsonl_records(f)

    def records(self, stage: str, skipped: SkipCounter | None = None, keep=None) -> Iterator[tuple[int, dict]]:
        """(index, record) of the valid records for ``stage``; the others are counted in
        ``skipped`` (default ``self.skipped``). ``keep(index)`` selects a share of the raw
        records (a rank's, the eval split) before validation, so shares count disjointly."""
        counter = self.skipped if skipped is None else skipped
        for idx, (rec, origin, reason) in enumerate(self.raw()):
            if keep is not None and not keep(idx):
                continue
            if rec is not None:
                rec, reason = validate(rec, stage, origin)
            if rec is None:
                counter[reason] += 1
                continue
            yield idx, rec


def _jsonl_records(f: Path) -> Iterator[tuple[dict | None, Path, str | None]]:
    with open(f, "rb") as fh:  # bytes, so one undecodable line cannot end the file
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                yield None, f, "bad_json"
                continue
            if not isinstance(rec, dict):
                yield None, f, "not_an_object"
                continue
            yield rec, f, None


def _hf_records(path: Path, files: list[Path], streaming: bool) -> Iterator[tuple[dict | None, Path, str | None]]:
    import datasets

    if not files:  # a save_to_disk folder
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        if streaming:
            ds = ds.to_iterable_dataset()
    else:
        builder = "parquet" if files[0].suffix == ".parquet" else "arrow"
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=streaming)
    for rec in ds:
        yield dict(rec), path, None


def validate(rec: dict, stage: str, origin: Path) -> tuple[dict | None, str | None]:
    """The record cleaned for ``stage``, or (None, reason)."""
    need = STAGE_FIELD[stage]
    if need == "text":
        text = rec.get("text")
        if not isinstance(text, str):
            return None, "no_text_field"
        if not text.strip():
            return None, "empty_text"
        return {"text": text}, None
    if need == "caption":
        cap, img = rec.get("caption"), rec.get("image")
        if not isinstance(cap, str) or not cap.strip():
            return None, "empty_caption"
        if isinstance(img, str):
            p = Path(img)
            if not p.is_absolute():
                p = origin.parent / p  # relative to the jsonl that names it
            if not p.is_file():
                return None, "missing_image"
            return {"image": str(p), "caption": cap.strip()}, None
        if img is not None and hasattr(img, "convert"):  # a PIL image from an HF dataset
            return {"image": img, "caption": cap.strip()}, None
        if isinstance(img, dict) and (img.get("bytes") or img.get("path")):  # HF Image feature, not decoded
            return {"image": img, "caption": cap.strip()}, None
        return None, "no_image_field"
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or len(msgs) < 2:
        return None, "no_messages"
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return None, "bad_message"
        if m.get("question") is not None and (m["role"] != "user" or not isinstance(m["question"], str)
                                              or not m["question"]):
            return None, "bad_question"
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
        return None, "no_assistant_reply"
    if not any(m["role"] == "user" for m in msgs[:-1]):
        return None, "no_user_message"
    return {"messages": [{"role": m["role"], "content": m["content"],
                          **({"question": m["question"]} if m.get("question") is not None else {})}
                         for m in msgs]}, None


def _list_files(path: Path) -> tuple[str, list[Path]]:
    if path.is_file():
        if path.suffix in HF_SUFFIXES:
            return "hf", [path]
        if path.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES:
            return "files", [path]
        raise ValueError(f"--data {path}: unsupported file type {path.suffix!r} "
                         f"(use .txt, .md, .jsonl, .parquet, .arrow or a folder)")
    if not path.is_dir():
        raise ValueError(f"--data {path}: no such file or folder")
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return "hf", []  # datasets.save_to_disk output
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    hf = [p for p in files if p.suffix in HF_SUFFIXES]
    plain = [p for p in files if p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES]
    if hf and plain:
        raise ValueError(f"--data {path}: mixes HF dataset files with text/jsonl files; point at one kind")
    if hf:
        if len({p.suffix for p in hf}) > 1:
            raise ValueError(f"--data {path}: mixes .parquet and .arrow files")
        return "hf", hf
    if not plain:
        raise ValueError(f"--data {path}: no .txt, .md, .jsonl, .parquet or .arrow files in the folder")
    return "files", plain


def open_source(path: str | Path, streaming: bool = False) -> Source:
    path = Path(path)
    kind, files = _list_files(path)
    return Source(path=path, files=files, kind=kind, streaming=streaming)


def check_source(source: Source, stage: str, what: str = "--data") -> None:
    """Fail now, with the reasons, if the source holds no record usable for ``stage``.

    Stops at the first usable record, so it is cheap even for a huge corpus.
    """
    seen = SkipCounter()
    for _ in source.records(stage, skipped=seen):
        return
    need = STAGE_FIELD[stage]
    example: dict[str, Any] = {"text": '{"text": "..."}', "caption": '{"image": "img.png", "caption": "..."}',
                               "messages": '{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}'}[need]
    raise ValueError(f"{what} {source.path}: no usable record for stage {stage!r} "
                     f"({seen.report()}); each record needs a non-empty {need!r} field, e.g. {example}")
