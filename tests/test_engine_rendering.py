"""Chunk images drawn by worker threads are the serial images, pixel for pixel, and the engine's
output does not depend on how many threads draw them."""

import pytest
import torch

from vist2.build import load_tokenizer
from vist2.config import preset_config
from vist2.engine import Engine, Request, SamplingParams
from vist2.engine.rendering import ChunkRenderer
from vist2.modeling import VIST2ForCausalLM
from vist2.processing import VIST2Processor
from vist2.samples import sample_text


@pytest.fixture(scope="module")
def proc():
    return VIST2Processor(load_tokenizer(), preset_config("tiny").render_config, 64)


def _chunks(proc, n):
    """``n`` chunk texts cut by the fit rule from English and Chinese, one drawn with a red question."""
    texts = []
    for lang in ("en", "zh"):
        ids = proc.encode(sample_text(lang))
        texts += [t for t, _ in (proc.chunk_text(b"", c) for c in proc.chunker()(ids).chunks)]
    texts = texts[:n]
    styles = ["user"] * len(texts)
    styles[1] = tuple("user" if i < len(texts[1]) // 2 else "question" for i in range(len(texts[1])))
    return texts, styles


@pytest.mark.parametrize("workers", [2, 3])
def test_threads_draw_the_serial_pixels(proc, workers):
    texts, styles = _chunks(proc, 12)
    assert len(texts) == 12 and len(set(texts)) == 12
    serial = proc.pixels_from_texts(texts, styles)
    pool = ChunkRenderer(proc, workers)
    try:
        for _ in range(2):  # the second pass draws with the threads' grown glyph atlases
            assert torch.equal(pool.pixels(texts, styles), serial)
    finally:
        pool.close()
    assert serial[1].std() > 0 and not torch.equal(serial[0], serial[1])


def test_bad_worker_count(proc):
    with pytest.raises(ValueError, match="render_workers"):
        ChunkRenderer(proc, 0)


def test_engine_output_does_not_depend_on_render_workers(proc):
    out = []
    for workers in (1, 2):
        torch.manual_seed(0)
        model = VIST2ForCausalLM(preset_config("tiny")).eval()
        eng = Engine(model, VIST2Processor(proc.tokenizer, model.config.render_config), max_batch=2,
                     max_prefills_per_step=2, record_logits=True, render_workers=workers)
        reqs = [Request(query=proc.encode(sample_text(lang))[:200], params=SamplingParams(max_new_tokens=70, ignore_eos=True))
                for lang in ("en", "zh")]
        out.append(eng.generate(reqs))
        # per row 3 prompt chunks (a raw tail of 8) and one generated window, drawn two at a time
        assert [r.stats.chunks_compressed for r in out[-1]] == [4, 4]
        assert (eng.runner.renderer._pool is not None) == (workers > 1)  # the threads did draw them
    for a, b in zip(*out):
        assert a.token_ids == b.token_ids and a.memory == b.memory
        assert torch.equal(torch.stack(a.logits), torch.stack(b.logits))
