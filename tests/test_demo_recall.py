"""Recall from memory: read_back scores the model's own greedy transcription; the demo prints it and
picks its model (a trained checkpoint with its own passage, else a random preset)."""

import math
import shutil

import torch

from vist2.cli import main
from vist2.eval.ocr import read_back, transcribe
from vist2.metrics import cer
from vist2.runtime import eos_ids, load_checkpoint


def test_read_back_is_greedy_transcription_of_the_rendered_pages(tiny_dir):
    model, proc = load_checkpoint(tiny_dir, "cpu")
    texts = ["In the beginning God created the heaven and the earth.", "And the earth was without form."]
    stop, n = eos_ids(model.config.text_config, proc.tokenizer), len(proc.tokenizer)
    L = max(len(proc.encode(t)) for t in texts)
    pixels = proc.pixels_from_texts(texts)
    for blank, px in ((False, pixels), (True, torch.ones_like(pixels))):  # the renderer's background is white
        rows = read_back(model, proc, texts, blank=blank)
        with torch.no_grad():
            want = transcribe(model, model.model.encode_images(px), L + math.ceil(0.1 * L), stop, n)
        assert [r["reference"] for r in rows] == texts
        assert [r["transcription"] for r in rows] == [proc.decode(g) for g in want]
        assert [r["cer"] for r in rows] == [cer(t, proc.decode(g)) for t, g in zip(texts, want)]


def test_demo_reads_its_memory_back_and_uses_a_models_own_passage(tiny_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir)
    (model_dir / "demo.txt").write_text("A passage the model was never trained on. " * 12, encoding="utf-8")
    assert main(["demo", "--model", str(model_dir), "--new-tokens", "2", "--save-images", "0",
                 "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    index = (tmp_path / "out" / "memory" / "index.json").read_text(encoding="utf-8")
    assert "A passage the model was never trained on." in index  # the model folder's demo.txt
    assert "3. recall from memory" in out and "character error rate over the memory:" in out
    assert "the model is as trained" in out
    assert "5. a needle in memory: 'One of the special magic numbers for " in out and "from text context:" in out


def test_demo_lang_picks_the_embedded_sample_over_a_models_passage(tiny_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir)
    (model_dir / "demo.txt").write_text("A passage the model was never trained on. " * 12, encoding="utf-8")
    assert main(["demo", "--model", str(model_dir), "--lang", "en", "--new-tokens", "2", "--save-images", "0",
                 "--out", str(tmp_path / "out")]) == 0
    index = (tmp_path / "out" / "memory" / "index.json").read_text(encoding="utf-8")
    assert "never trained on" not in index and "In the beginning" in index  # KJV Genesis, as asked
