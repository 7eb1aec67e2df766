"""provenance.json: the pieces of a record, and the shipped model's one.

A trainer run writing it into every saved folder is tested in test_training_run.py."""

import hashlib
import json
from pathlib import Path

from vist2.training import provenance

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "vist2-nano"


def test_describe_files_digests_a_file_or_every_file_of_a_folder(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.jsonl").write_bytes(b'{"text": "b"}\n')
    (tmp_path / "d" / "sub" / "a.txt").write_bytes(b"abc")
    (tmp_path / "d" / ".cache").mkdir()
    (tmp_path / "d" / ".cache" / "x").write_bytes(b"skip me")
    got = provenance.describe_files(tmp_path / "d")
    assert [Path(f["path"]).relative_to(tmp_path / "d").as_posix() for f in got] == ["b.jsonl", "sub/a.txt"]
    assert got[1] == {"path": str((tmp_path / "d" / "sub" / "a.txt").resolve()), "bytes": 3,
                      "sha256": hashlib.sha256(b"abc").hexdigest()}
    assert provenance.describe_files(tmp_path / "d" / "b.jsonl") == [got[0]]
    assert provenance.describe_files(tmp_path / "missing") is None


def test_read_is_none_without_a_readable_record(tmp_path):
    assert provenance.read(tmp_path) is None
    (tmp_path / provenance.FILE).write_text("{half", encoding="utf-8")
    assert provenance.read(tmp_path) is None
    (tmp_path / provenance.FILE).write_text('{"stage": "olm"}', encoding="utf-8")
    assert provenance.read(tmp_path) == {"stage": "olm"}


def test_the_shipped_model_has_the_trainers_record_of_its_recipe():
    """models/vist2-nano (round 7) carries the record the trainer wrote for its prompt stage, whose parent
    is the round-6 model with the record of its PT-3 (paths made relative to the repository), pinned to
    the recipe's config and its PT-2 parent's weights; the PT-2 ran before the trainer wrote records, so
    that part is reconstructed from the recipe and says so."""
    top = provenance.read(SHIPPED)
    assert top is not None and top["written_by"] == "vist2 trainer" and "reconstructed" not in top
    assert (top["stage"], top["steps"], top["total_steps"], top["seed"], top["final"]) == ("olm", 2000, 2000, 0, True)
    assert top["config"]["prompt_samples"] == 1.0 and top["config"]["twin_weight"] == 1.0
    # launched from a working tree whose prompt-sample code was not committed yet: the record says so
    assert len(top["code"]["git_commit"]) == 40 and isinstance(top["code"]["git_dirty"], bool)
    assert top["parent"]["path"] == "models/vist2-nano" and len(top["parent"]["weights"][0]["sha256"]) == 64
    rec = top["parent"]["provenance"]  # the round-6 model: the recipe's PT-3
    assert rec["written_by"] == "vist2 trainer" and "reconstructed" not in rec
    assert (rec["stage"], rec["steps"], rec["total_steps"], rec["seed"], rec["final"]) == ("olm", 4000, 4000, 0, True)
    assert rec["config"]["twin_weight"] == 1.0 and rec["config"]["ocr_mix"] == 0.5
    assert len(rec["code"]["git_commit"]) == 40 and rec["code"]["git_dirty"] is False
    assert rec["data"]["path"] == "runs/nano5/data/text_en.jsonl" and rec["data"]["files"][0]["bytes"] == 8215823
    assert top["data"]["files"][0]["sha256"] == rec["data"]["files"][0]["sha256"]  # the same prepared corpus
    assert rec["parent"]["path"] == "runs/nano5/ocr" and len(rec["parent"]["weights"][0]["sha256"]) == 64
    recorded = [top["data"]["path"], top["parent"]["path"], rec["data"]["path"], rec["parent"]["path"],
                *(f["path"] for f in rec["data"]["files"]), *(w["path"] for w in rec["parent"]["weights"])]
    assert not any(Path(p).is_absolute() for p in recorded), recorded  # relative to the repository
    ocr = rec["parent"]["provenance"]
    assert ocr["reconstructed"] is True and (ocr["stage"], ocr["steps"], ocr["seed"]) == ("ocr", 2500, 0)
    assert ocr["config_file"]["path"] == "recipes/nano/ocr.yaml"
    assert hashlib.sha256((ROOT / "recipes" / "nano" / "ocr.yaml").read_bytes()).hexdigest() == ocr["config_file"]["sha256"]
    init = ocr["parent"]["provenance"]
    assert init["stage"] == "init" and "--vocab-size 261" in init["command"]
    tok = json.loads((SHIPPED / "tokenizer.json").read_text(encoding="utf-8"))
    assert len(tok["model"]["vocab"]) == 261 and not tok["model"]["merges"]  # what the record says: bytes, no merges
    assert "--corpora kjv,web,chat --chats 500" in ocr["data"]["command"]


def test_paths_under_the_working_directory_are_recorded_relative(tmp_path, monkeypatch):
    (tmp_path / "runs" / "data").mkdir(parents=True)
    (tmp_path / "runs" / "data" / "t.jsonl").write_bytes(b'{"text": "a"}\n')
    monkeypatch.chdir(tmp_path)
    assert provenance.shown("runs/data/t.jsonl") == "runs/data/t.jsonl"
    assert provenance.shown(tmp_path / "runs" / "data") == "runs/data"
    assert [f["path"] for f in provenance.describe_files("runs")] == ["runs/data/t.jsonl"]
    outside = tmp_path.parent / "elsewhere.txt"
    assert provenance.shown(outside) == str(outside.resolve())  # not under it: absolute
