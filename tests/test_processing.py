"""The fit rule (VIST2Processor.chunker): nothing dropped, images kept full, the same cuts and
the same styled pixels in training and in generation; the processor saved with a checkpoint and
loaded back (or built from an older folder's config.json) renders the same pixels."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from transformers import AutoProcessor

from vist2.build import load_tokenizer
from vist2.config import VIST2Config, preset_config
from vist2.layout import ChunkInfo, build_sample, collate, sft_segments
from vist2.processing import VIST2Processor
from vist2.render import RENDER_PRESETS, LineFit, Renderer, RenderConfig

DATA = Path(__file__).parent / "data"
TEXTS = {
    "prose": (DATA / "prose_hard_breaks.txt").read_text() * 3,
    "code": (DATA / "code_sample.py.txt").read_text(),
    "zh": (Path(__file__).parents[1] / "src/vist2/data/sample_zh.txt").read_text() * 3,
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _proc(tok, preset):
    cfg = preset_config(preset)
    return VIST2Processor(tok, cfg.render_config, cfg.chunk_tokens)


@pytest.mark.parametrize("preset, fill", [("qwen3-0.6b", {"prose": 0.95, "code": 0.80, "zh": 0.95}),
                                          ("tiny", {"prose": 0.5, "code": 0.3, "zh": 0.5})])
@pytest.mark.parametrize("kind", ["prose", "code", "zh"])
def test_no_character_dropped_and_images_stay_full(tok, preset, fill, kind):
    proc = _proc(tok, preset)
    ids = tok(TEXTS[kind], add_special_tokens=False)["input_ids"]
    chunks = proc.chunker()(ids).chunks
    assert sum(chunks, []) == ids
    texts = proc.chunk_texts([ChunkInfo(tuple(c), 1) for c in chunks])
    assert "".join(texts) == proc.decode(ids)  # every character is in exactly one image
    for t in texts:
        assert proc.renderer.fits(t)
    closed = chunks[:-1]
    assert all(0 < len(c) <= proc.chunk_tokens for c in closed) and len(chunks[-1]) < proc.chunk_tokens
    assert sum(map(len, closed)) / (len(closed) * proc.chunk_tokens) >= fill[kind]


def test_fit_rule_cuts_exactly_where_the_next_token_would_overflow(tok):
    cfg = preset_config("tiny")  # read through a coarser font (25 x 12 cells), as in test_engine
    proc = VIST2Processor(tok, cfg.render_config.replace(font_size=8, min_font_size=8), cfg.chunk_tokens)
    ids = tok(TEXTS["prose"], add_special_tokens=False)["input_ids"]
    cuts = proc.chunker()(ids)
    assert any(cuts.fit_cut)
    carry, i = b"", 0
    for c, by_fit in zip(cuts.closed, cuts.fit_cut):
        text, nxt = proc.chunk_text(carry, c)
        assert proc.renderer.fits(text)
        if by_fit:  # one more token would not fit
            assert len(c) < proc.chunk_tokens
            assert not proc.renderer.fits(proc.chunk_text(carry, ids[i : i + len(c) + 1])[0])
        carry, i = nxt, i + len(c)


@pytest.mark.parametrize("preset", ["tiny", "default"])
@pytest.mark.parametrize("kind", ["prose", "code", "zh"])
def test_running_fit_state_equals_a_full_fit_check(preset, kind):
    r = Renderer.get(RENDER_PRESETS[preset])
    rng = np.random.default_rng(0)
    src = TEXTS[kind]
    for start in rng.integers(0, len(src) - 3000, 5).tolist():
        fit, acc, i = LineFit(r), "", start
        while i < len(src):
            piece = src[i : i + int(rng.integers(1, 7))]
            i += len(piece)
            ok = fit.try_append(piece)
            assert ok == r.fits(acc + piece)
            if not ok:
                break
            acc += piece
        assert not ok  # the text ran out of room


def test_a_token_that_cannot_fit_alone_is_an_error_naming_it(tok):
    cfg = preset_config("tiny")
    proc = VIST2Processor(tok, cfg.render_config.replace(width=32, height=32, font_size=8, min_font_size=8), 64)
    ids = tok("a" + "汉" * 20, add_special_tokens=False)["input_ids"]
    big = tok("=" * 32, add_special_tokens=False)["input_ids"]
    assert len(big) == 1
    with pytest.raises(ValueError, match=f"token {big[0]}"):
        proc.chunker()(ids[:1] + big)
    with pytest.raises(ValueError, match="does not fit"):
        proc.render_chunk("=" * 200)  # no silent truncation


def test_query_chunks_render_in_the_user_style_in_training_and_prefill(tok):
    from vist2.engine.engine import Engine, Request
    from vist2.engine.sampling import SamplingParams
    from vist2.modeling import VIST2ForCausalLM

    torch.manual_seed(0)
    model = VIST2ForCausalLM(preset_config("tiny")).eval()
    proc = VIST2Processor(tok, model.config.render_config, model.config.chunk_tokens)
    K, beta = model.config.chunk_tokens, model.config.n_visual
    query = tok(TEXTS["prose"], add_special_tokens=False)["input_ids"][: 2 * K + 30]
    segs = sft_segments([1], query, [2], [5, 6, 7], K, beta, "visual", proc.chunker())
    plan = collate([build_sample(segs)])
    assert [c.style for c in plan.chunks] == ["user"] * 3
    train_px = proc.pixels_for(plan.chunks)
    # the engine's prefill renders the same chunks with the same style
    seen = []
    eng = Engine(model, proc)
    orig = proc.pixels_from_texts
    proc.pixels_from_texts = lambda texts, styles=None: seen.append(orig(texts, styles)) or seen[-1]
    eng.generate([Request(query=query, prefix=[1], suffix=[2], params=SamplingParams(max_new_tokens=1), mode="pcc")])
    assert torch.equal(torch.cat(seen), train_px)
    # grey background: the user style is not the plain render
    plain = proc.pixels_from_texts(proc.chunk_texts(plan.chunks)[:1])
    assert not torch.equal(plain, train_px[:1])
    assert ((train_px[0] * 255).round() == 224).float().mean() > 0.3


def test_the_question_renders_red_inside_query_chunks_in_training_and_prefill(tok):
    """Paper Fig. 7: a question that spans a compressed chunk boundary is red on grey in the SFT
    layout's images and in the engine's prefill, pixel for pixel; the cuts do not depend on it."""
    from vist2.chat import chat_prompt
    from vist2.engine.engine import Engine
    from vist2.engine.sampling import SamplingParams
    from vist2.modeling import VIST2ForCausalLM

    torch.manual_seed(0)
    model = VIST2ForCausalLM(preset_config("tiny")).eval()
    proc = VIST2Processor(tok, model.config.render_config, model.config.chunk_tokens)
    K, beta = model.config.chunk_tokens, model.config.n_visual
    doc = proc.decode(proc.encode(TEXTS["prose"])[: K + 60])
    question = "Which ship did the narrator board, and who was waiting on the quay when it sailed at dawn?"
    msgs = [{"role": "user", "content": doc, "question": question}]
    prefix, query, suffix, span = chat_prompt(tok, msgs)
    assert proc.decode(query) == doc + "\n" + question and proc.decode(query[span[0]:span[1]]) == question
    segs = sft_segments(prefix, query, suffix, [5, 6, 7], K, beta, "visual", proc.chunker(), span)
    plan = collate([build_sample(segs)])
    styles = [c.style for c in plan.chunks]
    # the question starts inside a closed chunk and runs on into the next (the compressed tail)
    assert len(styles) == 3 and isinstance(styles[1], tuple) and isinstance(styles[2], tuple)
    assert styles[1][0] == "user" and styles[1][-1] == "question" and set(styles[2]) == {"question"}
    plain_plan = collate([build_sample(sft_segments(prefix, query, suffix, [5, 6, 7], K, beta, "visual",
                                                    proc.chunker()))])
    assert [c.tokens for c in plain_plan.chunks] == [c.tokens for c in plan.chunks]  # same cuts
    train_px = proc.pixels_for(plan.chunks)
    assert train_px.shape[1] == 3  # colour: the question is red
    red = (train_px[:, 0] > 0.6) & (train_px[:, 1] < 0.3) & (train_px[:, 2] < 0.3)
    assert red[0].sum() == 0 and red[1].sum() > 20 and red[2].sum() > 20
    grey = ((train_px * 255).round() == 224).all(dim=1)
    assert grey[2].float().mean() > 0.2  # the question keeps the user's grey background

    seen = []
    eng = Engine(model, proc)
    req = eng.request(messages=msgs, params=SamplingParams(max_new_tokens=1), mode="pcc")
    assert (req.query, req.prefix, req.suffix, req.question) == (query, prefix, suffix, span)
    orig = proc.pixels_from_texts
    proc.pixels_from_texts = lambda texts, styles=None: seen.append(orig(texts, styles)) or seen[-1]
    eng.generate([req])
    # the engine renders chunk by chunk (the all-user one grey); the model expands grey to 3 channels
    assert torch.equal(torch.cat([x.expand(-1, 3, -1, -1) for x in seen]), train_px)


def test_styles_never_change_the_layout(tok):
    """A style boundary inside a run of spaces or a line break: the image is the plain one's layout."""
    from vist2.render import Span

    # styles drawn like plain text: a styled render must then be the plain render, pixel for pixel
    r = Renderer.get(RENDER_PRESETS["tiny"].replace(styles={"user": (0, 255), "question": (0, 255)}))
    text = "def f():\n        return 1\r\n  e\u0301t\u00e9"
    plain = r.render(text)
    for cut in range(1, len(text)):
        styled = r.render([Span(text[:cut], "user"), Span(text[cut:], "question")])
        assert np.array_equal(styled, plain), cut


# -- the processor in a checkpoint folder ------------------------------------------------

SAVED_TEXT = "The tide\tturned at dawn;\n  the quay was empty."


def _saved_render_config():
    """Unlike the tiny preset in every field a folder must keep: size, fonts, spacing, colours, mode, styles."""
    return RENDER_PRESETS["tiny"].replace(
        width=96, height=64, cjk_font=None, font_size=9, min_font_size=5, margin=3, line_spacing=1.35,
        background=250, foreground=20, tab_size=2, mode="RGB",
        styles={"user": (None, 230), "question": ((180, 0, 20), 230), "note": ((0, 0, 160), None)},
    )


def _pixels(proc):
    styles = ["plain", "user", ("user",) * 9 + ("question",) * 20 + ("note",) * (len(SAVED_TEXT) - 29)]
    return proc.pixels_from_texts([SAVED_TEXT] * 3, styles)


def test_processor_round_trips_through_save_pretrained(tok, tmp_path):
    rc = _saved_render_config()
    proc = VIST2Processor(tok, rc, 48)
    proc.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved == {"processor_class": "VIST2Processor", "chunk_tokens": 48,
                     "render_config": json.loads(json.dumps(rc.to_dict()))}
    want = _pixels(proc)
    assert want.shape == (3, 3, 64, 96)
    for back in (VIST2Processor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert type(back) is VIST2Processor and back.renderer is not proc.renderer
        assert back.render_config == rc and back.chunk_tokens == 48
        assert torch.equal(_pixels(back), want)
        assert back.encode(SAVED_TEXT) == proc.encode(SAVED_TEXT) and len(back.tokenizer) == len(tok)
        assert back.chunker()(proc.encode(SAVED_TEXT * 9)) == proc.chunker()(proc.encode(SAVED_TEXT * 9))


def test_folder_saved_before_processor_files_still_loads(tmp_path):
    """A checkpoint written with only config.json and tokenizer files (as before the processor was
    saved): the render config and K come from config.json; with no tokenizer files, the bundled one."""
    tok = load_tokenizer()  # fresh: no processor class recorded in its files
    cfg = preset_config("tiny", render=_saved_render_config().to_dict(), merge=1)
    old, bare = tmp_path / "old", tmp_path / "bare"
    for folder in (old, bare):
        cfg.save_pretrained(folder)
    tok.save_pretrained(old)
    want = _pixels(VIST2Processor(tok, cfg.render_config, cfg.chunk_tokens))
    for folder in (old, bare):
        assert not (folder / "processor_config.json").exists()
        for back in (VIST2Processor.from_pretrained(folder), AutoProcessor.from_pretrained(folder)):
            assert type(back) is VIST2Processor
            assert back.render_config == cfg.render_config and back.chunk_tokens == cfg.chunk_tokens == 96  # r=4 of beta=24
            assert torch.equal(_pixels(back), want)
            assert back.encode(SAVED_TEXT) == tok(SAVED_TEXT, add_special_tokens=False)["input_ids"]


def test_processor_files_must_agree_with_the_model_config(tok, tmp_path):
    cfg = preset_config("tiny")
    cfg.save_pretrained(tmp_path)
    for rc, K in ((cfg.render_config.replace(font_size=9), cfg.chunk_tokens),
                  (cfg.render_config, cfg.chunk_tokens * 2)):
        VIST2Processor(tok, rc, K).save_pretrained(tmp_path)
        with pytest.raises(ValueError, match="disagree"):
            VIST2Processor.from_pretrained(tmp_path)
    VIST2Processor.from_config(cfg, tok).save_pretrained(tmp_path)
    assert VIST2Processor.from_pretrained(tmp_path).render_config == cfg.render_config
    with pytest.raises(ValueError, match="neither"):
        VIST2Processor.from_pretrained(tmp_path / "empty")


def test_init_writes_the_processor_beside_the_model(tiny_dir):
    cfg = VIST2Config.from_pretrained(tiny_dir)
    saved = json.loads((tiny_dir / "processor_config.json").read_text())
    assert RenderConfig.from_dict(saved["render_config"]) == cfg.render_config == RENDER_PRESETS["tiny"]
    assert saved["chunk_tokens"] == cfg.chunk_tokens == 64
    assert AutoProcessor.from_pretrained(tiny_dir).render_config == cfg.render_config
