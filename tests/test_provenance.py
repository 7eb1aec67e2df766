"""provenance.json: the pieces of a record, and the shipped model's (reconstructed) one.

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


def test_the_shipped_model_has_a_reconstructed_record_of_its_recipe():
    """models/vist2-nano predates the trainer's provenance.json: its record was written by hand from the
    round 3 notes and the recipe, says so, and pins the weights it describes."""
    rec = provenance.read(SHIPPED)
    assert rec is not None and rec["reconstructed"] is True and "not written by the trainer" in rec["written_by"]
    assert (rec["stage"], rec["steps"], rec["seed"]) == ("olm", 2000, 0)
    (weights,) = rec["weights"]
    blob = (SHIPPED / "model.safetensors").read_bytes()
    assert weights["bytes"] == len(blob) and weights["sha256"] == hashlib.sha256(blob).hexdigest()
    assert rec["config_file"]["path"] == "recipes/nano/olm.yaml" and rec["config_file"]["values"]["stage"] == "olm"
    assert rec["code"]["git_commit"] is None and len(rec["shipped_in_commit"]) == 40
    ocr = rec["parent"]["provenance"]
    assert (ocr["stage"], ocr["steps"], ocr["seed"]) == ("ocr", 2500, 0)
    assert ocr["config_file"]["path"] == "recipes/nano/ocr.yaml"
    init = ocr["parent"]["provenance"]
    assert init["stage"] == "init" and "--vocab-size 261" in init["command"]
    tok = json.loads((SHIPPED / "tokenizer.json").read_text(encoding="utf-8"))
    assert len(tok["model"]["vocab"]) == 261 and not tok["model"]["merges"]  # what the record says: bytes, no merges
    assert "--corpora kjv,web,chat --chats 500" in rec["data"]["command"]


def test_paths_under_the_working_directory_are_recorded_relative(tmp_path, monkeypatch):
    (tmp_path / "runs" / "data").mkdir(parents=True)
    (tmp_path / "runs" / "data" / "t.jsonl").write_bytes(b'{"text": "a"}\n')
    monkeypatch.chdir(tmp_path)
    assert provenance.shown("runs/data/t.jsonl") == "runs/data/t.jsonl"
    assert provenance.shown(tmp_path / "runs" / "data") == "runs/data"
    assert [f["path"] for f in provenance.describe_files("runs")] == ["runs/data/t.jsonl"]
    outside = tmp_path.parent / "elsewhere.txt"
    assert provenance.shown(outside) == str(outside.resolve())  # not under it: absolute
