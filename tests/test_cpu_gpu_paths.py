"""Paths a GPU run takes, checked on CPU: FlexAttention training, the decode step's buckets, bf16.

- FlexAttention: torch 2.13 runs ``flex_attention`` on CPU only without gradients (the public function
  refuses inputs that require grad: "FlexAttention does not support backward on CPU"). Its forward
  compiles (transformers wraps it in ``torch.compile``; inductor's CPU kernel, which walks the
  ``BlockMask``'s block-sparse index, needs a C++ compiler). For the backward, the flex higher-order
  op itself runs eagerly on CPU with autograd: its reference (math) implementation, which applies the
  ``BlockMask``'s ``mask_mod`` to every score and differentiates through it. Both are compared with the
  dense mask (SDPA), loss and every gradient.
- The decode step's batch and span buckets (``vist2.engine.runner``): CUDA graphs are captured per
  bucket on a GPU; the choice of bucket is the same eagerly on CPU, so it is checked here.
- bf16: the layout's masks and positions in bfloat16, and the loss of a bf16 model against fp32.
"""

import shutil

import pytest
import torch
import torch.nn.functional as F

from vist2.attention import additive_mask, block_mask, dense_mask
from vist2.chunking import fixed_chunker
from vist2.config import preset_config
from vist2.layout import Raw, build_sample, collate, olm_segments, sft_segments
from vist2.modeling import VIST2ForCausalLM
from vist2.training.trainer import set_attention


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = preset_config("tiny")
    cfg.text_config.initializer_range = 0.5  # large weights: a wrong mask or position shows in the loss
    return VIST2ForCausalLM(cfg)


def _plan(cfg, pad_multiple=8, raw=0):
    """Two rows: an OLM sample (optionally after ``raw`` plain tokens) packed with an SFT sample, and an
    SFT sample alone; padded to ``pad_multiple`` as the trainer pads (128 for FlexAttention)."""
    K, beta = cfg.chunk_tokens, cfg.n_visual
    cut = fixed_chunker(K)
    olm = [Raw(tuple(range(300, 300 + raw)))] if raw else []
    olm += olm_segments(list(range(100, 100 + 2 * K + 5)), K, beta, chunker=cut)
    sft = sft_segments([1], list(range(40, 40 + K + 3)), [2], list(range(60, 71)), K, beta, "interleaved",
                       chunker=cut)
    rows = [[build_sample(olm), build_sample(sft)], [build_sample(sft)]]
    T = collate(rows).shape[1]
    plan = collate(rows, pad_to=-(-T // pad_multiple) * pad_multiple)
    assert len(plan.chunks) >= 3 and int(plan.evicted.sum()) > 0  # compressed chunks: the sparse mask matters
    return plan


def _pixels(cfg, plan):
    g = torch.Generator().manual_seed(3)
    return torch.rand(len(plan.chunks), 1, cfg.render["height"], cfg.render["width"], generator=g)


def _loss_and_grads(model, plan, pixels, impl, attention_mask=None):
    set_attention(model, impl)
    model.zero_grad(set_to_none=True)
    kw = {} if attention_mask is None else {"attention_mask": attention_mask}
    loss = model(plan=plan, pixel_values=pixels, loss_only=True, **kw).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _causal_block_mask(plan):
    """A wrong mask for the controls: plain causal over the row, blind to samples and evicted chunks."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = plan.shape
    return create_block_mask(lambda b, h, q, k: k <= q, B=B, H=None, Q_LEN=T, KV_LEN=T, device="cpu",
                             BLOCK_SIZE=128)


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


# -- FlexAttention ----------------------------------------------------------------------------

# Tolerances, fp32: both paths compute the same softmax(QK^T)V in fp32 and differ only in the order
# of the sums. Measured on this model and plan: loss 19.648 on both within 1e-7 relative; gradients
# (the largest 1.2) within 1.5e-6 absolute, the worst element at 0.57 of 1e-6 + 1e-4 |g|, as fp32
# rounding over sums of hundreds of terms of size ~1 gives. A mask blind to samples and evicted
# chunks moves the loss by 1.5e-2 relative. So: 1e-5 relative on the loss (100x the rounding), the
# gradients at 1e-5 + 1e-4 |g|, and the control below at 100x the loss tolerance, still ten times
# under what a wrong mask does.
LOSS_RTOL = 1e-5
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def test_flex_forward_on_cpu_equals_the_dense_mask():
    """The forward the GPU trainer runs (the plan's ``BlockMask``, row padded to 128), compiled for CPU."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    if not _has_cxx():
        pytest.skip("FlexAttention's CPU forward is compiled by inductor, which needs a C++ compiler")
    model = _model()
    plan = _plan(model.config, pad_multiple=128)
    # several 128-blocks: the block-sparse index has empty, partial and full blocks
    assert plan.shape[1] % 128 == 0 and plan.shape[1] >= 256
    pixels = _pixels(model.config, plan)
    with torch.no_grad():
        set_attention(model, "sdpa")
        dense = model.model(plan=plan, pixel_values=pixels).last_hidden_state
        dense_loss = model(plan=plan, pixel_values=pixels, loss_only=True).loss
        set_attention(model, "flex_attention")
        assert model.model.mask_for(plan, torch.float32).__class__.__name__ == "BlockMask"
        flex = model.model(plan=plan, pixel_values=pixels).last_hidden_state
        flex_loss = model(plan=plan, pixel_values=pixels, loss_only=True).loss
    torch.testing.assert_close(flex_loss, dense_loss, rtol=LOSS_RTOL, atol=0)
    real = plan.sample >= 0  # padding slots attend to themselves on both paths, but nothing reads them
    torch.testing.assert_close(flex[real], dense[real], rtol=1e-4, atol=1e-5)


def test_flex_backward_on_cpu_equals_the_dense_mask(monkeypatch):
    """Loss and the gradient of every trained parameter through the flex op (its autograd on CPU: the
    eager reference implementation; the public ``flex_attention`` refuses a backward on CPU) equal
    those of the dense mask; a wrong ``BlockMask`` does not."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch._higher_order_ops.flex_attention import flex_attention as flex_op
    import transformers.integrations.flex_attention as hf_flex

    calls = []

    def eager_flex(query, key, value, score_mod=None, block_mask=None, scale=None, kernel_options=None, **kw):
        calls.append(block_mask)
        # (B, H, T, d): the op repeats the K/V heads for grouped-query attention itself
        return flex_op(query, key, value, score_mod, block_mask.as_tuple(), scale, kernel_options or {})[0]

    # transformers' flex_attention_forward (GQA, scaling, score_mod, layout) stays; only the kernel call changes
    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", eager_flex)
    model = _model()
    plan = _plan(model.config, pad_multiple=128)
    pixels = _pixels(model.config, plan)
    dense_loss, dense_grads = _loss_and_grads(model, plan, pixels, "sdpa")
    flex_loss, flex_grads = _loss_and_grads(model, plan, pixels, "flex_attention")
    n_layers = model.config.text_config.num_hidden_layers
    assert len(calls) == n_layers and all(type(c).__name__ == "BlockMask" for c in calls)
    torch.testing.assert_close(flex_loss, dense_loss, rtol=LOSS_RTOL, atol=0)
    assert set(flex_grads) == set(dense_grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, g in dense_grads.items():
        torch.testing.assert_close(flex_grads[name], g, **GRAD_TOL, msg=lambda m: f"{name}: {m}")
    # the control: the same path with a mask that ignores samples and evicted chunks is far off
    wrong_loss, _ = _loss_and_grads(model, plan, pixels, "flex_attention", attention_mask=_causal_block_mask(plan))
    assert abs(float(wrong_loss - dense_loss)) > 100 * LOSS_RTOL * float(dense_loss)


@pytest.mark.parametrize("block", [128, 16])
def test_block_mask_block_index_matches_the_dense_mask(block):
    """What the fused kernels read (on GPU and CPU alike) is the ``BlockMask``'s block index, not only its
    mask_mod: every (query block, key block) with an allowed pair is listed, as a full block exactly when
    every pair in it is allowed; blocks with none are skipped."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    plan = _plan(preset_config("tiny"), pad_multiple=128)
    B, T = plan.shape
    n = T // block
    bm = block_mask(plan, block_size=block)
    allowed = dense_mask(plan).view(B, n, block, n, block)
    any_, all_ = allowed.any(4).any(2), allowed.all(4).all(2)  # (B, q block, k block)

    def listed(counts, indices):
        out = torch.zeros(B, n, n, dtype=torch.bool)
        for b in range(B):
            for q in range(n):
                out[b, q, indices[b, 0, q, : counts[b, 0, q]]] = True
        return out

    partial, full = listed(bm.kv_num_blocks, bm.kv_indices), listed(bm.full_kv_num_blocks, bm.full_kv_indices)
    assert torch.equal(full, all_) and torch.equal(partial, any_ & ~all_)
    assert (~any_).any() and (any_ & ~all_).any()  # the plan has skipped and partial blocks to get wrong


def test_flex_block_mask_needs_the_trainer_padding():
    """The trainer pads rows to 128 for flex (``runtime_choices``); a row that is not a multiple is refused
    rather than read past its end by the mask_mod."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from vist2.training.config import stage_preset
    from vist2.training.trainer import runtime_choices

    assert runtime_choices(stage_preset("olm", attention="flex"), "cuda")[1:] == ("flex_attention", 128)
    with pytest.raises(ValueError, match="flex needs a CUDA device"):
        runtime_choices(stage_preset("olm", attention="flex"), "cpu")
    plan = _plan(preset_config("tiny"), pad_multiple=8)
    assert plan.shape[1] % 128
    with pytest.raises(ValueError, match="multiple of block_size=128"):
        block_mask(plan)


# -- the decode step's buckets ---------------------------------------------------------------


def test_span_bucket_is_monotone_and_covers_every_length():
    from vist2.engine.runner import span_bucket

    for capacity in (64, 100, 1000, 4096, 5000):
        spans = [span_bucket(n, capacity) for n in range(1, capacity + 1)]
        assert all(n <= s <= capacity for n, s in zip(range(1, capacity + 1), spans)), capacity
        assert all(a <= b for a, b in zip(spans, spans[1:])), capacity  # monotone
        for n, s in zip(range(1, capacity + 1), spans):
            # a multiple of a quarter of the power of two below n (at least 64), or the capacity itself
            assert s == capacity or s % max(64, 1 << max(0, n.bit_length() - 3)) == 0, (n, s)
            # what a step reads past the live entries: under 64, and under 25 % from 256 entries on
            assert s - n < max(64, n / 4), (n, s)
        # few distinct spans, so few graphs: four per doubling above 64
        octaves = max(1, (capacity // 64).bit_length())
        assert len(set(spans)) <= 4 * octaves + 1, (capacity, sorted(set(spans)))
    assert span_bucket(4096, 4096) == 4096 and span_bucket(1, 4096) == 64


@pytest.fixture(scope="module")
def runner():
    from vist2.build import load_tokenizer
    from vist2.engine.runner import ModelRunner
    from vist2.processing import VIST2Processor

    model = _model().eval()
    return ModelRunner(model, VIST2Processor(load_tokenizer(), model.config.render_config), max_batch=5,
                       max_cache_tokens=300, cuda_graphs=False)


def test_decode_step_picks_the_smallest_buckets_that_hold_its_rows(runner, monkeypatch):
    """Every decode step runs over the smallest batch bucket holding its highest row and reads the
    smallest span holding every row's next entry; the layers read exactly that span, no more."""
    from vist2.engine.runner import span_bucket

    cache = runner.cache
    steps, reads, prepared = [], [], []
    step_fn, update, prepare = runner.step_fn, cache.update, cache.prepare

    def record_step(ids_B1, active_B, span):
        steps.append((ids_B1.shape[0], span, active_B.tolist()))
        return step_fn(ids_B1, active_B, span)

    def record_update(k, v, layer_idx, *a, **kw):
        out = update(k, v, layer_idx, *a, **kw)
        reads.append(out[0].shape[2])
        return out

    def record_prepare(rows, write_BT, span, write_rows=None):
        mask = prepare(rows, write_BT, span, write_rows=write_rows)
        prepared.append((write_BT.clone(), mask.clone()))
        return mask

    monkeypatch.setattr(runner, "step_fn", record_step)
    monkeypatch.setattr(cache, "update", record_update)
    monkeypatch.setattr(cache, "prepare", record_prepare)
    assert runner._batch_buckets == [1, 2, 4, 5]
    cases = [({0: 5}, [10, 0, 0, 0, 0]), ({1: 5}, [3, 63, 0, 0, 0]), ({2: 7, 0: 1}, [64, 0, 100, 0, 0]),
             ({4: 9}, [0, 0, 0, 0, 128]), ({3: 2}, [0, 0, 0, 299, 0]), ({0: 1, 4: 1}, [290, 1, 2, 3, 4])]
    n_layers = runner.model.config.text_config.num_hidden_layers
    for tokens, lengths in cases:
        for row, n in enumerate(lengths):
            cache.set_length(row, n)
        for log in (steps, reads, prepared):
            log.clear()
        runner.decode(tokens)
        (b, span, active), = steps
        assert b == min(x for x in runner._batch_buckets if x > max(tokens)), tokens
        assert span == span_bucket(max(lengths[:b]) + 1, cache.capacity), (tokens, lengths)
        assert max(lengths[:b]) < span <= cache.capacity  # every row's new entry is inside the span
        assert active == [r in tokens for r in range(b)]
        assert reads == [span] * n_layers  # each layer reads the bucket, no more
        (write, mask), = prepared
        assert write[:, 0].tolist() == [min(n, cache.capacity - 1) for n in lengths[:b]]
        # each row sees its live entries and the new one, never an entry past it
        assert mask[:, 0, 0].sum(-1).tolist() == [w + 1 for w in write[:, 0].tolist()]
        for row, n in enumerate(lengths):
            assert cache.host_length[row] == n + (row in tokens)
            assert int(cache.length[row]) == cache.host_length[row]  # the device copy advanced alike


def test_a_generation_captures_few_graphs(runner, monkeypatch):
    """Decoding a row from an empty cache to capacity goes through a handful of (batch, span) keys: the
    graphs ``_CapturedStep`` would capture on a GPU (the capture itself needs CUDA)."""
    from vist2.engine.runner import span_bucket

    keys = set()
    step_fn = runner.step_fn

    def record(ids_B1, active_B, span):
        keys.add((ids_B1.shape[0], span))
        return step_fn(ids_B1, active_B, span)

    monkeypatch.setattr(runner, "step_fn", record)
    cache = runner.cache
    for row in range(cache.rows):
        cache.set_length(row, 0)
    for _ in range(cache.capacity):
        runner.decode({1: 7})
    assert cache.host_length[1] == cache.capacity
    spans = sorted({span_bucket(n, cache.capacity) for n in range(1, cache.capacity + 1)})
    assert keys == {(2, s) for s in spans} and len(keys) <= 8


# -- bf16 --------------------------------------------------------------------------------------


def test_additive_mask_in_bf16_is_zero_or_the_minimum():
    plan = _plan(preset_config("tiny"))
    add = additive_mask(plan, torch.bfloat16)
    assert add.dtype == torch.bfloat16
    assert set(add.unique().tolist()) == {0.0, torch.finfo(torch.bfloat16).min}
    assert torch.equal(add[:, 0] == 0, dense_mask(plan))


def test_dense_and_additive_masks_agree_in_bf16():
    """SDPA with the bool mask, SDPA with the bf16 additive mask, and the eager sum-then-softmax (what
    transformers' eager attention does) give the same attention in bf16; no row is empty (no NaN)."""
    plan = _plan(preset_config("tiny"))
    B, T = plan.shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, 4, T, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    allowed = dense_mask(plan)[:, None]
    add = additive_mask(plan, torch.bfloat16)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed)
    with_bool = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    with_add = F.scaled_dot_product_attention(q, k, v, attn_mask=add)
    scores = (q @ k.transpose(-1, -2)) * 16 ** -0.5 + add  # (B, H, T, T) in bf16
    eager = torch.softmax(scores.float(), dim=-1).to(torch.bfloat16) @ v
    for out in (with_bool, with_add, eager):
        assert out.dtype == torch.bfloat16 and not out.isnan().any()
        # bf16 keeps 8 significant bits: outputs of size ~1 agree to a few units of 2^-8
        torch.testing.assert_close(out.float(), ref, rtol=2 ** -6, atol=2 ** -6)
    torch.testing.assert_close(with_add, with_bool, rtol=2 ** -7, atol=2 ** -7)


BF16_RTOL = 2 ** -8  # one unit in the last place of a bf16 number: a loss computed in bf16 is known to this


def _bf16_copy(model, folder):
    """The model in bf16 as the engine loads it (``from_pretrained(dtype=...)``). Not ``model.to(bf16)``:
    that casts every float buffer, RoPE's ``inv_freq`` included, and the angles drift with position
    (cos off by 0.69 at position 4000 on the tiny model); ``from_pretrained`` keeps them in fp32."""
    model.save_pretrained(folder)
    return VIST2ForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)


def test_bf16_loss_equals_fp32_within_bf16_tolerance(tmp_path):
    """The loss of a collated plan in fp32, under bf16 autocast (how the trainer runs on GPU: fp32 master
    weights) and with bf16 weights (how the engine serves), agrees within bf16 precision; a wrong mask
    moves it by more than that (measured on the tiny model: 1.2e-4, 1.0e-4 and 1.2e-4 relative; the wrong
    mask 2.3e-2)."""
    model = _model()
    plan = _plan(model.config, raw=300)
    pixels = _pixels(model.config, plan)
    with torch.no_grad():
        fp32 = float(model(plan=plan, pixel_values=pixels, loss_only=True).loss)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = float(model(plan=plan, pixel_values=pixels, loss_only=True).loss)
        bf16 = _bf16_copy(model, tmp_path)
        assert bf16.dtype == torch.bfloat16
        weights = float(bf16(plan=plan, pixel_values=pixels, loss_only=True).loss)
        set_attention(bf16, "eager")  # the additive mask added to bf16 scores
        eager = float(bf16(plan=plan, pixel_values=pixels, loss_only=True).loss)
        set_attention(bf16, "sdpa")
        T = plan.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        wrong_mask = torch.where(causal, 0.0, torch.finfo(torch.bfloat16).min).to(torch.bfloat16)
        wrong = float(bf16(plan=plan, pixel_values=pixels, loss_only=True,
                           attention_mask=wrong_mask.expand(plan.shape[0], 1, T, T)).loss)
    for name, got in (("autocast", autocast), ("bf16 weights", weights), ("bf16 eager", eager)):
        assert got != fp32 and abs(got - fp32) <= BF16_RTOL * fp32, (name, got, fp32)
    assert abs(wrong - fp32) > BF16_RTOL * fp32, (wrong, fp32)


def test_positions_survive_bf16(tmp_path):
    """Positions stay integers and the rotary angles are computed in fp32 whatever the model's dtype:
    past 256 a bf16 position would round (257 -> 256), and the cos/sin here would differ."""
    model = _model()
    plan = _plan(model.config, raw=300)
    assert plan.position.dtype == torch.long and int(plan.position.max()) > 300
    bf16 = _bf16_copy(model, tmp_path)
    rotary32, rotary16 = model.model.language_model.rotary_emb, bf16.model.language_model.rotary_emb
    x = torch.zeros(1, dtype=torch.bfloat16)
    cos16, sin16 = rotary16(x, plan.position)
    cos32, sin32 = rotary32(x.float(), plan.position)
    assert cos16.dtype == torch.bfloat16
    assert torch.equal(cos16, cos32.to(torch.bfloat16)) and torch.equal(sin16, sin32.to(torch.bfloat16))
    rounded = plan.position.to(torch.bfloat16).long()
    assert not torch.equal(rounded, plan.position)  # the failure this guards against is real
    assert not torch.equal(rotary16(x, rounded)[0], cos16)
