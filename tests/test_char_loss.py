"""The character loss's targets are what the renderer draws, cell by cell and region by region;
the loss trains the vision tower and switches off on time."""

import numpy as np
import pytest
import torch

from vist2.render import RENDER_PRESETS, Renderer
from vist2.training.losses.char import IGNORE, N_CLASSES, CharLoss, char_targets, region_map
from vist2.training.config import stage_preset

PROSE = "It was the best of times,\nit was the worst of times;\n\n    it was the age of wisdom (1859)."


def test_cells_with_a_character_are_the_cells_with_ink():
    r = Renderer.get(RENDER_PRESETS["nano"])
    size, codes = r.cells(PROSE)
    cw, ch, cols, rows = r.grid(size)
    assert codes.shape == (rows, cols)
    page = r.render(PROSE)
    m = r.config.margin
    cells = 255 - page[m : m + rows * ch, m : m + cols * cw].reshape(rows, ch, cols, cw).astype(int)
    inked = cells.sum(axis=(1, 3)) > 0
    drawn = (codes != 0) & (codes != 32)
    assert drawn.sum() > 40
    assert np.array_equal(inked, drawn)
    # reading order: the first line holds the text's first characters
    assert "".join(chr(c) for c in codes[0] if c).startswith("It was the best of ")


def test_regions_follow_the_cell_centres_in_reading_order():
    m = region_map(128, 128, 1, 5, 11, 11, 25, 32)
    # token 0: cell rows 0-2 (centres 6.5, 17.5, 28.5 px) x columns 0-5 (centres 3.5 .. 28.5 px)
    expect0 = [r * 25 + c for r in range(3) for c in range(6)]
    assert m.slot_cell[0, :18].tolist() == expect0 and (m.slot_cell[0, 18:] == -1).all()
    # every cell is read by exactly one slot
    used = m.slot_cell[m.slot_cell >= 0]
    assert sorted(used.tolist()) == list(range(11 * 25))


def test_targets_name_the_characters_of_each_region():
    r = Renderer.get(RENDER_PRESETS["nano"])
    cw, ch, cols, rows = r.grid(7)
    slots = region_map(128, 128, 0, cw, ch, rows, cols, 32).slots
    t = char_targets(r, ["abcdefghij", None], 32, slots)
    assert t.shape == (2, 16, slots)
    assert slots == 32  # 4x8 px cells, 32x32 px regions: 4 lines of 8 characters
    assert t[0, 0, :8].tolist() == [ord(c) - 32 for c in "abcdefgh"]  # token 0 holds columns 0-7
    assert t[0, 1, :2].tolist() == [ord(c) - 32 for c in "ij"] and t[0, 1, 2:].eq(0).all()
    assert (t[1] == IGNORE).all()  # not rendered text: no target


def test_char_loss_trains_the_vision_tower_and_switches_off(tiny_dir):
    from vist2.modeling import VIST2ForCausalLM
    from vist2.processing import VIST2Processor

    model = VIST2ForCausalLM.from_pretrained(str(tiny_dir)).train()
    proc = VIST2Processor.from_pretrained(tiny_dir)
    assert CharLoss.build(stage_preset("ocr"), model, proc) is None  # weight 0: off
    aux = CharLoss.build(stage_preset("ocr", aux_char_weight=0.5, aux_char_until=0.5), model, proc)
    texts = [PROSE, "def f(x):\n    return x + 1\n"]
    pixels = proc.pixels_from_texts(texts)
    model.model.encode_images(pixels)
    loss = aux.loss(texts, progress=0.1)
    # a fresh head is near uniform over the alphabet: weight x ln(classes)
    assert float(loss.detach()) == pytest.approx(0.5 * np.log(N_CLASSES), rel=0.1)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("model.vision.")]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    before = aux.head.weight.detach().clone()
    aux.step()
    assert not torch.equal(before, aux.head.weight)
    model.model.encode_images(pixels)
    assert aux.loss(texts, progress=0.5) == 0.0  # past aux_char_until
    aux.close()


def test_char_loss_config_is_checked():
    with pytest.raises(ValueError, match="aux_char_weight"):
        stage_preset("ocr", aux_char_weight=-1.0)
