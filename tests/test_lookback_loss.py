"""The lookback loss asks, at the slots that continue after a page, for the tokens the page ended
with, and only those: never text the slot sees raw, never across packed samples, never in MT-OCR."""

import pytest
import torch

from vist2.chunking import fixed_chunker
from vist2.layout import IGNORE, Raw, build_sample, collate, ocr_segments, olm_segments
from vist2.training.config import stage_preset
from vist2.training.lookback_loss import LookbackLoss, lookback_targets


def _olm(tokens, K=4, n_visual=2):
    return build_sample(olm_segments(tokens, K, n_visual, chunker=fixed_chunker(K)))


def test_targets_are_the_tokens_before_each_prediction_that_lie_on_the_page():
    plan = collate([_olm(list(range(100, 112)))])  # chunks 100-103, 104-107 compressed; 108-111 open
    row, slot, tgt = lookback_targets(plan, span=3, tokens=3)
    ids, labels = plan.input_ids[0], plan.labels[0]
    assert row.tolist() == [0] * 6
    for s, t in zip(slot.tolist(), tgt.tolist()):
        predicted = int(labels[s])
        assert predicted != IGNORE
        # distance d names the token d before the predicted one, where that token is on the page
        for d, y in enumerate(t, start=1):
            before = predicted - d
            on_page = (before // 4) == (predicted // 4) - 1
            assert y == (before if on_page else IGNORE)
    # the first query of each boundary is the page's last visual slot, then the next chunk's text slots
    assert [int(plan.kind[0, s]) for s in slot.tolist()] == [2, 1, 1, 2, 1, 1]
    assert [int(labels[s]) for s in slot.tolist()] == [104, 105, 106, 108, 109, 110]
    assert ids[slot[1]] == 104  # its own raw text is the current chunk's, not the page's


def test_no_query_across_packed_samples_nor_in_ocr():
    a = _olm(list(range(100, 106)))  # one page, then 104-105 open
    b = build_sample([Raw((7, 8))])
    ocr = build_sample(ocr_segments([[1, 2, 3, 4]], 2))
    plan = collate([[a, b], [ocr]])
    row, slot, tgt = lookback_targets(plan, span=8, tokens=4)
    assert row.tolist() == [0, 0]  # the slots predicting 104 and 105; nothing of b; no OCR row
    assert int(plan.labels[0, slot[-1]]) == 105


def test_span_limits_the_queries_per_boundary():
    plan = collate([_olm(list(range(100, 112)))])
    row, slot, tgt = lookback_targets(plan, span=1, tokens=4)
    assert [int(plan.labels[0, s]) for s in slot.tolist()] == [104, 108]
    assert tgt.tolist() == [[103, 102, 101, 100], [107, 106, 105, 104]]


def _tiny_olm(tiny_dir):
    """The tiny model in training mode, its processor, and a plan of two pages and an open chunk (with
    the pages' pixels), run forward once so that the loss hooks have recorded it."""
    from vist2.modeling import VIST2ForCausalLM
    from vist2.processing import VIST2Processor

    model = VIST2ForCausalLM.from_pretrained(str(tiny_dir)).train()
    proc = VIST2Processor.from_pretrained(tiny_dir)
    K, nv = model.config.chunk_tokens, model.config.n_visual
    ids = proc.encode("It was the best of times, it was the worst of times. " * 40)[: 2 * K + 8]
    plan = collate([build_sample(olm_segments(ids, K, nv, chunker=proc.chunker(K)))])
    return model, plan, proc.pixels_for(plan.chunks)


def test_lookback_loss_trains_the_llm_below_its_layer_and_its_own_maps(tiny_dir):
    model, plan, pixels = _tiny_olm(tiny_dir)
    assert LookbackLoss.build(stage_preset("olm"), model) is None  # weight 0: off
    cfg = stage_preset("olm", lookback_weight=0.5, lookback_until=0.5, lookback_layer=1)
    aux = LookbackLoss.build(cfg, model)
    model(plan=plan, pixel_values=pixels)
    loss = aux.loss(plan, progress=0.1)
    assert float(loss.detach()) > 0 and aux.last_acc is not None
    loss.backward()
    layers = model.model.language_model.layers
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in layers[0].parameters())
    assert all(p.grad is None for p in layers[1].parameters())  # above the read-out layer: untouched
    before = aux.maps[0].weight.detach().clone()
    aux.step()
    assert not torch.equal(before, aux.maps[0].weight)
    model(plan=plan, pixel_values=pixels)
    assert aux.loss(plan, progress=0.5) == 0.0  # past lookback_until
    aux.close()


def test_lookback_config_is_checked():
    with pytest.raises(ValueError, match="lookback_weight"):
        stage_preset("olm", lookback_weight=-1.0)
    with pytest.raises(ValueError, match="olm, sft"):
        stage_preset("ocr", lookback_weight=1.0)
    with pytest.raises(ValueError, match="lookback_span"):
        stage_preset("olm", lookback_span=0)


def test_twin_pairs_predict_the_same_token_in_both_layouts():
    from vist2.training.twin_loss import twin_pairs

    ocr = build_sample(ocr_segments([[1, 2, 3, 4]], 2))
    plan = collate([[ocr, _olm(list(range(100, 112)))], [_olm(list(range(200, 206)))]])
    twins, student, teacher = twin_pairs(plan, span=3)
    assert twins is not None and len(student) == len(teacher) == 6 + 2
    for (b, q), (tb, tq) in zip(student.tolist(), teacher.tolist()):
        assert b == tb and int(plan.labels[b, q]) == int(twins.input_ids[tb, tq + 1])
    assert twins.input_ids[0, :12].tolist() == list(range(100, 112))  # no twin of the OCR sample
    _, student, _ = twin_pairs(plan, span=3, page_slot=False)
    assert all(int(plan.kind[b, q]) == 1 for b, q in student.tolist()) and len(student) == 4 + 1


def test_twin_loss_pulls_the_page_slots_towards_the_text_layout(tiny_dir):
    from vist2.training.twin_loss import TwinLoss

    model, plan, pixels = _tiny_olm(tiny_dir)
    assert TwinLoss.build(stage_preset("olm"), model) is None
    aux = TwinLoss.build(stage_preset("olm", twin_weight=2.0, twin_until=0.5), model)
    model(plan=plan, pixel_values=pixels)
    loss = aux.loss(plan, progress=0.1)
    assert float(loss.detach()) > 0 and aux.last is not None
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.model.aligner.parameters())
    model(plan=plan, pixel_values=pixels)
    assert aux.loss(plan, progress=0.5) == 0.0  # past twin_until
    aux.close()
    with pytest.raises(ValueError, match="twin_weight"):
        stage_preset("sft", twin_weight=1.0)
