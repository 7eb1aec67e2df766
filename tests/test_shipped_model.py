"""The shipped nano model (models/vist2-nano, trained from scratch by recipes/nano): it loads with the
project's own classes, reads a held-out passage back from its pages, and is what ``vist2 demo`` uses.
A regression guard for the renderer and the model code: a change that moves a pixel or a position
the model was trained on shows up here as a higher character error rate."""

from pathlib import Path

import pytest

from vist2.cli import SHIPPED_MODEL, main
from vist2.eval.ocr import read_back
from vist2.runtime import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# Modern prose written for this test, not from the training corpora (the Bibles), cut into pages of
# the model's K = 64 tokens (one byte a token) by the processor's chunker.
PASSAGE = (ROOT / "recipes" / "nano" / "heldout.txt").read_text(encoding="utf-8")[:1280]
# Measured on these 20 pages when the model was shipped: mean CER 0.023 (worst page 0.16), and 0.98
# with blank pages (bench/notes/nano.md, round 7; round 6: 0.023, the round 3 model: 0.035). 0.06 leaves room for a greedy near-tie that flips
# on another machine's floats (one derailed page moves the mean by at most ~0.05), not for a renderer
# or model change that moves the pixels or positions the model was trained on.
CER_BOUND = 0.06


# Memory in use (issue 21's protocol: 8-token continuations after 256 context tokens of the held-out
# passage, 14 windows, the context as the model's own pages): mean NLL 1.683 nats a token with the
# real pages, 2.195 with blank ones, a gap of 0.513 when measured for the shipped model (round 7 of
# bench/notes/nano.md; round 6: 0.559, the round 3 model: 0.159). Half of it: the forward pass is deterministic on one
# machine, so the margin is for other machines' floats; a change that stops the LLM reading its pages
# (renderer, positions, the visual path) takes the gap to about 0.
MEMORY_GAP_BOUND = 0.28

# Memory worth more than no context (issue 21's retention R on 8-token continuations, a window every
# 32 tokens of the held-out passage: 115 windows, 920 targets): mean NLL 1.815 nats a token from the
# pages, 1.803 from the text, 1.926 from no context (the context's last token) when shipped, i.e. the
# memory is worth 0.111 nats a token more than no context and R = 0.91 (round 7 of
# bench/notes/nano.md; round 6: 0.119 and 1.22; the round 3 model: -0.045 and R = -0.41, it would
# fail both). Half of each.
MEMORY_USE_BOUND = 0.06
RETENTION_BOUND = 0.45
# The same windows with the context as a user's prompt, laid out as the engine lays it out under the
# shipped prompt_encoding (interleaved): 1.821 nats a token, 0.105 better than no context, R = 0.86
# (the visual encoding: 1.893, R = 0.28; the round 6 model, shipped with visual: perplexity 236 against
# 6.5 from no context on 100 windows 8 tokens apart, R = -233: a prompt worth far less than nothing).
# Half of each.
PROMPT_USE_BOUND = 0.05
PROMPT_RETENTION_BOUND = 0.43


@pytest.fixture(scope="module")
def shipped():
    assert (SHIPPED_MODEL / "model.safetensors").is_file(), "models/vist2-nano is part of the repository"
    return load_checkpoint(SHIPPED_MODEL, "cpu")


def _pages(model, proc, text):
    ids = proc.encode(text)
    cuts = proc.chunker(model.config.chunk_tokens)(ids, b"")
    return [proc.decode(c) for c in cuts.closed]


def test_shipped_model_is_small_and_reads_held_out_pages(shipped):
    model, proc = shipped
    size = sum(p.stat().st_size for p in SHIPPED_MODEL.iterdir() if p.is_file())
    assert size <= 25 * 2**20
    assert model.config.chunk_tokens == 64 and model.config.n_visual == 16
    pages = _pages(model, proc, PASSAGE)
    assert len(pages) == 20
    rows = read_back(model, proc, pages)
    got = sum(r["cer"] for r in rows) / len(rows)
    blank = sum(r["cer"] for r in read_back(model, proc, pages, blank=True)) / len(rows)
    assert got <= CER_BOUND, [(r["reference"], r["transcription"]) for r in rows if r["cer"] > 0][:3]
    assert blank > 0.5  # without its pages the model cannot know the text: the reading is in the pixels


def test_shipped_model_continues_from_its_pages_not_only_blank_ones(shipped):
    """Teacher-forced 8-token continuations after whole chunks of memory: the real pages must be worth
    more than blank ones (the blank-page control: same layout, same targets, white pixels)."""
    from vist2.eval.olm import blank_page_gap

    model, proc = shipped
    ids = proc.encode((ROOT / "recipes" / "nano" / "heldout.txt").read_text(encoding="utf-8"))
    res = blank_page_gap(model, proc, ids, 256, 8)
    assert res["windows"] == 14 and res["targets"] == 8 * 14
    assert res["gap_nats"] >= MEMORY_GAP_BOUND, res


def test_shipped_model_memory_is_worth_more_than_no_context(shipped):
    """Memory in use, not only read: on 8-token continuations after 256 tokens of held-out text (a
    window every 32 tokens), the pages must predict better than no context (the context's last token)
    and keep a share R of what the same context is worth as text."""
    from vist2.eval.olm import evaluate_olm

    model, proc = shipped
    res = evaluate_olm(model, proc, [(ROOT / "recipes" / "nano" / "heldout.txt").read_text(encoding="utf-8")],
                       256, 8, stride=32, progress=False, prompt_encodings=(model.config.prompt_encoding,))
    assert res["windows"] == 115
    prompt = f"prompt-{model.config.prompt_encoding}"  # the path a user's prompt takes through the engine
    nll = {k: res[k]["nll_nats"] / res[k]["tokens"] for k in ("optical", "text", "none", prompt)}
    assert nll["none"] - nll["optical"] >= MEMORY_USE_BOUND, nll
    assert res["retention"] >= RETENTION_BOUND, res["retention"]
    assert nll["none"] - nll[prompt] >= PROMPT_USE_BOUND, nll
    assert res["prompt_retention"][prompt] >= PROMPT_RETENTION_BOUND, res["prompt_retention"]


def test_demo_uses_the_shipped_model_and_prints_recall(tmp_path, capsys):
    assert main(["demo", "--new-tokens", "16", "--save-images", "0", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "the nano model trained from scratch" in out and "the model is as trained" in out
    line = next(x for x in out.splitlines() if "character error rate over the memory:" in x)
    assert float(line.rsplit(":", 1)[1].strip().rstrip("%")) / 100 <= 0.2  # 14.7 % when shipped (round 7; round 6: 15.0 %)
    # 4. memory in use: the continuation written from the memory, from text and from nothing, beside the truth
    assert "4. memory in use" in out
    section = out.split("4. memory in use")[1].split("\n5. ")[0].splitlines()  # up to the needle section
    for label in ("true text:", "from memory (gcc):", "as a prompt (interleaved):", "from text context:", "no context:"):
        assert sum(x.strip().startswith(label) for x in section) == 1, label
    ppl = next(x for x in section if "perplexity of the true text" in x)
    assert "retention R =" in ppl
