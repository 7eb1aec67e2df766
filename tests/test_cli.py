"""The command line: generate (stats JSON, memory viewer), render, and clear errors for bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from vist2.cli import main


def test_generate_streams_and_writes_stats_and_memory(tiny_dir, tmp_path, capsys):
    stats, mem = tmp_path / "stats.json", tmp_path / "memory"
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "In the beginning " * 30, "--max-new-tokens", "150",
               "--ignore-eos", "--stats-json", str(stats), "--save-memory", str(mem)])
    assert rc == 0
    out = capsys.readouterr()
    assert out.out.strip() and "chunks compressed" in out.err
    s = json.loads(stats.read_text())
    for key in ("prompt_tokens", "generated_tokens", "chunks_compressed", "kv_tokens", "kv_tokens_uncompressed",
                "kv_bytes", "ttft_s", "tokens_per_s"):
        assert key in s
    assert s["generated_tokens"] == 150 and s["chunks_compressed"] >= 3
    assert s["kv_tokens"] < s["kv_tokens_uncompressed"]
    index = json.loads((mem / "index.json").read_text())
    assert len(index) == s["chunks_compressed"]
    img = np.asarray(Image.open(mem / index[0]["file"]))
    assert img.shape[:2] == (128, 128) and img.min() < 128  # some ink


def test_generate_mode_none_holds_everything(tiny_dir, tmp_path):
    stats = tmp_path / "s.json"
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hello world " * 20, "--mode", "none",
                 "--max-new-tokens", "20", "--ignore-eos", "--stats-json", str(stats)]) == 0
    s = json.loads(stats.read_text())
    assert s["chunks_compressed"] == 0 and s["kv_tokens"] == s["kv_tokens_uncompressed"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "", "--max-new-tokens", "5"], "empty"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
        (["--prompt", "hi", "--temperature", "-1"], "temperature"),
        (["--prompt", "x " * 400, "--mode", "none", "--max-cache-tokens", "100"], "max_cache_tokens=100"),
        (["--prompt-file", "no/such/file.txt"], "no such file"),
    ],
)
def test_generate_bad_input(tiny_dir, capsys, argv, message):
    assert main(["generate", "--model", str(tiny_dir), *argv]) == 2
    assert message in capsys.readouterr().err


def test_generate_unknown_mode_is_rejected_by_the_parser(tiny_dir):
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--mode", "zip"])


def test_missing_model_folder(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_render_uses_the_model_config(tiny_dir, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["render", "--text", "你好，世界 hello", "--out", str(out), "--model", str(tiny_dir)]) == 0
    assert Image.open(out).size == (128, 128)
    assert main(["render", "--text", "", "--out", str(out), "--preset", "paper"]) == 0
    assert np.asarray(Image.open(out)).min() == 255  # empty text: a blank image
    assert main(["render", "--text", "word " * 5000, "--out", str(out), "--preset", "tiny"]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_init_rejects_conflicting_flags(tmp_path, capsys):
    assert main(["init", "--preset", "tiny", "--llm", "x", "--out", str(tmp_path)]) == 2
    assert main(["init", "--llm", str(tmp_path), "--vision", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["init", "--preset", "tiny", "--chunk-tokens", "60", "--ratio", "4", "--out", str(tmp_path)]) == 2
    assert "compression_ratio" in capsys.readouterr().err


def test_train_on_a_one_line_file_is_one_line(tiny_dir, tmp_path, capsys):
    """The "no usable samples" error is raised in a DataLoader worker; it used to reach the user as
    the worker's traceback."""
    data = tmp_path / "one.jsonl"
    data.write_text('{"text": "hello world"}\n', encoding="utf-8")
    assert main(["train", "--stage", "lm", "--model", str(tiny_dir), "--data", str(data), "--out",
                 str(tmp_path / "run"), "--max-steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"vist2: error: {data}: no usable training samples" in err
    assert "Traceback" not in err and "DataLoader worker" not in err, err


@pytest.mark.parametrize("argv,message", [
    (["--out", "{tmp}/file/x"], "--out {tmp}/file/x: cannot create the folder"),
    (["--out", "{tmp}/d", "--max-docs", "-1"], "--max-docs must be >= 1, got -1"),
    (["--out", "{tmp}/d", "--max-docs", "0"], "--max-docs must be >= 1, got 0"),
    (["--out", "{tmp}/d", "--images", "-5"], "--images must be >= 0, got -5"),
])
def test_data_prepare_user_errors(tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("a file, not a folder")
    assert main(["data", "prepare", *[a.format(tmp=tmp_path) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and "Traceback" not in err, err


def test_the_command_reference_is_what_the_parsers_say(tmp_path):
    """docs/cli.md is generated from the parsers behind --help; --check fails when a flag changed and the
    file was not regenerated (a stale copy, one row edited, is caught too)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "docs" / "make_cli.py"
    ok = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # the same check against a copy with one help text changed must fail
    docs = tmp_path / "docs"
    docs.mkdir()
    stale = (script.parent / "cli.md").read_text(encoding="utf-8").replace("render geometry preset", "render preset", 1)
    (docs / "cli.md").write_text(stale, encoding="utf-8")
    (docs / "make_cli.py").write_text(script.read_text(encoding="utf-8"), encoding="utf-8")
    bad = subprocess.run([sys.executable, str(docs / "make_cli.py"), "--check"], capture_output=True, text=True)
    assert bad.returncode == 1 and "out of date" in bad.stdout + bad.stderr
