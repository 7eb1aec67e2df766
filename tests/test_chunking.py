"""vist2.chunking: one entry point (VIST2Processor.chunker) whose cuts and running windows agree; the
layout functions and the stage builder never fall back to K-token cuts on their own."""

import random
from pathlib import Path

import pytest

from vist2.build import load_tokenizer
from vist2.chunking import ChunkFit, Cuts, FitChunker, fixed_chunker, pays
from vist2.config import preset_config
from vist2.layout import olm_segments, prompt_segments, query_parts, sft_segments
from vist2.processing import VIST2Processor

PROSE = (Path(__file__).parent / "data" / "prose_hard_breaks.txt").read_text()


@pytest.fixture(scope="module")
def proc():
    """The tiny geometry read through a coarse font (25 x 12 cells), so prose is cut early by the fit rule."""
    cfg = preset_config("tiny")
    return VIST2Processor(load_tokenizer(), cfg.render_config.replace(font_size=8, min_font_size=8), cfg.chunk_tokens)


def test_the_processor_hands_out_one_chunker(proc):
    fit = proc.chunker()
    assert isinstance(fit, FitChunker) and fit.K == proc.chunk_tokens and proc.chunker(16).K == 16
    assert isinstance(fit.window(), ChunkFit) and fit.window().K == proc.chunk_tokens
    for removed in ("cuts", "chunk_ids", "chunk_fit"):  # the one entry point is chunker()
        assert not hasattr(proc, removed)


def test_windows_filled_token_by_token_close_where_the_chunker_cuts(proc):
    ids = proc.encode(PROSE * 3 + "Größe: 漢字かな " * 20)
    cuts = proc.chunker()(ids)
    assert any(cuts.fit_cut) and not all(cuts.fit_cut)  # both kinds of cut are exercised
    closed, carries, w = [], [], proc.chunker().window()
    carries.append(w.carry)
    for t in ids:
        if not w.push(t):  # full, or the token's text no longer fits: a new window takes it
            closed.append(w.tokens)
            w = proc.chunker().window(w.carry)
            carries.append(w.carry)
            assert w.push(t)
    assert closed == cuts.closed and w.tokens == cuts.tail
    assert carries[:-1] == cuts.carries and carries[-1] == cuts.carry and w.carry == cuts.carry_tail
    assert [len(c) < proc.chunk_tokens for c in cuts.closed] == cuts.fit_cut
    assert cuts.chunks == [*cuts.closed, cuts.tail] and sum(cuts.chunks, []) == ids


def test_a_cut_resumes_from_the_carry_it_was_left(proc):
    ids = proc.encode("漢字かな " * 40)
    fit = proc.chunker(7)  # 7 tokens: borders fall inside characters
    whole = fit(ids)
    assert any(whole.carries)  # some chunk starts with the bytes of a split character
    i = sum(map(len, whole.closed[:3]))
    rest = fit(ids[i:], whole.carries[3])
    assert rest.closed == whole.closed[3:] and rest.tail == whole.tail and rest.carry_tail == whole.carry_tail


def test_a_bad_K_is_an_error(proc):
    with pytest.raises(ValueError, match="chunk_tokens must be a positive int"):
        proc.chunker(0)
    no_k = VIST2Processor(proc.tokenizer, proc.render_config)
    with pytest.raises(ValueError, match="got None"):
        no_k.chunker()


def test_fixed_chunker_cuts_token_counts_every_K():
    cuts = fixed_chunker(4)(list(range(10)))
    assert cuts == Cuts([[0, 1, 2, 3], [4, 5, 6, 7]], [False, False], [8, 9])
    assert cuts.chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and cuts.carry_before(0) is None
    assert [pays(n, 2) for n in (1, 2, 3)] == [False, False, True]


def test_the_layout_functions_require_a_chunker():
    ids = list(range(10))
    with pytest.raises(TypeError, match="chunker"):
        olm_segments(ids, 4, 2)
    with pytest.raises(TypeError, match="chunker"):
        query_parts(ids, 4, 2)
    with pytest.raises(TypeError, match="chunker"):
        prompt_segments([1], ids, [2], 4, 2, "visual")
    with pytest.raises(TypeError, match="chunker"):
        sft_segments([1], ids, [2], [3], 4, 2, "visual")
    with pytest.raises(ValueError, match="chunker must be a Chunker"):
        olm_segments(ids, 4, 2, chunker=None)
    # the same tokens cut by the fit rule and every K tokens lay out differently: the choice is the caller's
    assert len(olm_segments(ids, 4, 2, chunker=fixed_chunker(4))) == 3


def test_the_stage_builder_cuts_with_its_processor_only(proc):
    from vist2.training.config import stage_preset
    from vist2.training.stages import StageBuilder

    cfg = stage_preset("olm", max_length=256)
    rec = {"text": PROSE * 2}
    with pytest.raises(ValueError, match="processor"):
        StageBuilder(cfg, proc.tokenizer, 64, 16, "visual").items(rec, random.Random(0), 0.0)
    items, _ = StageBuilder(cfg, proc.tokenizer, 64, 16, "visual", processor=proc).items(rec, random.Random(0), 0.0)
    ids = proc.encode(rec["text"])
    first = items[0].sample.chunks  # the first window's closed chunks are the fit rule's
    paying = [c for c in proc.chunker(64)(ids).closed if pays(len(c), 16)]  # the others stay text
    assert [list(c.tokens) for c in first] == paying[: len(first)] and any(c.fit_cut for c in first)
