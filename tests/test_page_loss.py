"""From-scratch training aids: the page loss's regions match the model's visual tokens, it trains the
vision tower and switches off on time; shuffled OCR text keeps the words; vision_lr_scale reaches AdamW."""

import random

import pytest
import torch

from vist2.modeling import merge_patches
from vist2.training.config import stage_preset
from vist2.training.losses.page import PageLoss, page_regions


def test_regions_hold_the_pixels_each_merged_token_is_made_of():
    p, m, H, W = 4, 2, 16, 24
    pixels = torch.rand(2, 1, H, W)
    regions = page_regions(pixels, p * m)  # (N, beta, (p*m)^2) ink
    # the model's path: patches in row-major order, each flattened, then merge_patches
    gh, gw = H // p, W // p
    patches = pixels[:, 0].reshape(2, gh, p, gw, p).permute(0, 1, 3, 2, 4).reshape(2, gh * gw, p * p)
    merged = merge_patches(patches, gh, gw, m)
    assert regions.shape == merged.shape == (2, 6, 64)
    # the same pixels per token (their order inside a token may differ)
    torch.testing.assert_close(regions.sort(dim=-1).values, (1 - merged).sort(dim=-1).values)
    # a dark block at block-row 1, block-column 2 is token 1 * 3 + 2 = 5, and only that token
    page = torch.ones(1, 1, H, W)
    page[..., 8:16, 16:24] = 0
    ink = page_regions(page, 8).sum(-1)[0]
    assert ink.tolist() == [0, 0, 0, 0, 0, 64]


def test_regions_reject_a_page_that_does_not_split():
    with pytest.raises(ValueError, match="do not split"):
        page_regions(torch.ones(1, 1, 20, 16), 8)


def test_page_loss_trains_the_vision_tower_and_switches_off(tiny_dir):
    from vist2.modeling import VIST2ForCausalLM

    model = VIST2ForCausalLM.from_pretrained(str(tiny_dir)).train()
    assert PageLoss.build(stage_preset("ocr"), model) is None  # weight 0: off
    cfg = stage_preset("ocr", aux_page_weight=2.0, aux_page_until=0.5)
    aux = PageLoss.build(cfg, model)
    assert aux.region == model.config.patch_size * model.config.merge
    pixels = torch.rand(3, 1, 128, 128)
    model.model.encode_images(pixels)  # the hook records the aligner's outputs
    loss = aux.loss(pixels, progress=0.1)
    # weight x MSE / variance of the targets; a head near 0 predicts ~0 ink, so about (var + mean^2) / var
    ink = 1 - pixels
    expected = 2.0 * float(((ink**2).mean()) / ink.var())
    assert float(loss.detach()) == pytest.approx(expected, rel=0.1)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("model.vision.")]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    assert model.model.aligner.proj.weight.grad.abs().sum() > 0
    before = aux.head.weight.detach().clone()
    aux.step()
    assert not torch.equal(before, aux.head.weight)
    model.model.encode_images(pixels)
    assert aux.loss(pixels, progress=0.5) == 0.0  # past aux_page_until
    aux.close()


def test_config_fields_are_checked():
    with pytest.raises(ValueError, match="ocr_text"):
        stage_preset("ocr", ocr_text="random")
    with pytest.raises(ValueError, match="aux_page_weight"):
        stage_preset("ocr", aux_page_weight=-1.0)
    with pytest.raises(ValueError, match="vision_lr_scale"):
        stage_preset("ocr", vision_lr_scale=0.0)


def test_vision_lr_scale_reaches_the_optimizer(tiny_dir):
    from vist2.modeling import VIST2ForCausalLM
    from vist2.training.trainer import apply_trainable, make_optimizer

    model = VIST2ForCausalLM.from_pretrained(str(tiny_dir))
    cfg = stage_preset("ocr", train_llm=True, learning_rate=1e-3, vision_lr_scale=0.1)
    opt = make_optimizer(apply_trainable(model, cfg), cfg)
    by_lr = {}
    for g in opt.param_groups:
        by_lr.setdefault(g["lr"], set()).update(id(p) for p in g["params"])
    visual = {id(p) for n, p in model.named_parameters() if n.startswith(("model.vision.", "model.aligner."))}
    assert sorted(by_lr) == [pytest.approx(1e-4), pytest.approx(1e-3)]
    assert by_lr[min(by_lr)] == visual
    assert len(by_lr[max(by_lr)]) == sum(1 for n, p in model.named_parameters() if id(p) not in visual)


def test_shuffled_ocr_text_keeps_the_words_in_another_order(tiny_dir):
    from vist2.processing import VIST2Processor
    from vist2.training.stages import StageBuilder, shuffle_words

    proc = VIST2Processor.from_pretrained(tiny_dir)
    text = " ".join(f"w{i}" for i in range(40))
    texts = {}
    for mode in ("natural", "shuffled"):
        cfg = stage_preset("ocr", ocr_text=mode, max_length=2000,
                           curriculum=[{"until": 1.0, "min_images": 8, "max_images": 8}])
        b = StageBuilder(cfg, proc.tokenizer, 64, 16, "visual", processor=proc)
        items, reason = b.items({"text": text}, random.Random(0), 0.0)
        assert reason is None
        ids = [t for it in items for c in it.sample.chunks for t in c.tokens]
        texts[mode] = proc.tokenizer.decode(ids)
    assert texts["natural"].split() == text.split()
    assert texts["shuffled"].split() != text.split()
    assert sorted(texts["shuffled"].split()) == sorted(text.split())
    # line breaks come with the shuffle (about one word in 16), single and double
    many = shuffle_words(" ".join(f"w{i}" for i in range(2000)), random.Random(1))
    doubles, singles = many.count("\n\n"), many.replace("\n\n", "").count("\n")
    assert 80 < doubles + singles < 170 and doubles > 20 and singles > 20  # ~125 breaks, half of each
    assert sorted(many.split()) == sorted(f"w{i}" for i in range(2000))


def test_nano_render_preset_is_one_legible_size():
    from vist2.render import RENDER_PRESETS, Renderer

    r = Renderer.get(RENDER_PRESETS["nano"])
    assert r.grid(7) == (4, 8, 32, 16)  # 4x8 px cells, 32 columns x 16 rows fill 128x128 exactly
    assert r.font_size_for("a short line") == 7  # never larger
    assert r.fits("x" * 512) and not r.fits("x" * 513)  # never smaller: 32 x 16 cells is the page
