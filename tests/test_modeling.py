"""VIST2 model: composition from real HF checkpoints, the plan's mask in the LLM, freezing, config errors."""

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache

import vist2  # noqa: F401  (registers the Auto classes)
from vist2.cli import main
from vist2.chunking import fixed_chunker
from vist2.config import VIST2Config, preset_config
from vist2.layout import Chunk, Kind, Raw, build_sample, collate, olm_segments, sft_segments
from vist2.modeling import VIST2ForCausalLM, VIST2Model, cache_kwarg, merge_patches, output_cache


def _tiny(**overrides):
    torch.manual_seed(0)
    cfg = preset_config("tiny", **overrides)
    cfg.text_config.initializer_range = 0.5  # large weights: a wrong mask shows as a large difference
    return VIST2ForCausalLM(cfg).eval()


def _pixels(n, seed=0, size=128):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g)


@pytest.fixture(scope="module")
def composed(tmp_path_factory, qwen3_dir, siglip2_dir):
    out = tmp_path_factory.mktemp("composed")
    # merge 1: 8x8 patches of a 128px render -> beta = 64, K = 4 * 64
    assert main(["init", "--llm", str(qwen3_dir), "--vision", str(siglip2_dir), "--render", "tiny",
                 "--merge", "1", "--out", str(out)]) == 0
    return out


def test_composed_llm_equals_the_llm_it_came_from(composed, qwen3_dir):
    model = VIST2ForCausalLM.from_pretrained(composed).eval()
    lm = AutoModelForCausalLM.from_pretrained(qwen3_dir).eval()
    ids = [5, 900, 17, 33000, 151000, 42, 7]
    plan = collate([build_sample([Raw(ids)])])
    with torch.no_grad():
        ours = model(plan=plan).logits
        theirs = lm(torch.tensor([ids])).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert model.config.chunk_tokens == 256 and model.config.n_visual == 64


def test_composed_vision_equals_siglip2_with_its_own_processor(composed, siglip2_dir):
    from PIL import Image
    from transformers import Siglip2ImageProcessor

    model = VIST2ForCausalLM.from_pretrained(composed).eval()
    tower = AutoModel.from_pretrained(siglip2_dir).vision_model.eval()
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(128, 128), dtype=np.uint8)
    proc = Siglip2ImageProcessor(max_num_patches=64, patch_size=16)
    batch = proc(images=Image.fromarray(img).convert("RGB"), return_tensors="pt")
    assert batch["spatial_shapes"].tolist() == [[8, 8]]
    with torch.no_grad():
        ref = tower(batch["pixel_values"], batch["pixel_attention_mask"], batch["spatial_shapes"]).last_hidden_state
        ours = model.model.encode_images(torch.from_numpy(img)[None, None].float() / 255)
        proj = model.model.aligner.proj
        expect = torch.tanh(ref @ proj.weight.T + proj.bias)  # the paper's aligner, tanh(x W + b)
    assert torch.allclose(ours, expect, atol=1e-5), (ours - expect).abs().max()


def test_siglip_v1_tower_is_accepted(tmp_path, qwen3_dir, siglip_dir):
    assert main(["init", "--llm", str(qwen3_dir), "--vision", str(siglip_dir), "--render", "tiny",
                 "--ratio", "2", "--out", str(tmp_path)]) == 0
    model = VIST2ForCausalLM.from_pretrained(tmp_path).eval()
    assert model.config.vision_config.model_type == "siglip_vision_model"
    assert (model.config.n_visual, model.config.chunk_tokens) == (16, 32)
    tower = AutoModel.from_pretrained(siglip_dir).vision_model.eval()
    x = _pixels(2)
    with torch.no_grad():
        ref = tower(x.expand(2, 3, 128, 128) * 2 - 1).last_hidden_state
        proj = model.model.aligner.proj
        expect = torch.tanh(merge_patches(ref, 8, 8, 2) @ proj.weight.T + proj.bias)
        assert torch.allclose(model.model.encode_images(x), expect, atol=1e-5)


def test_auto_classes_load_the_checkpoint(tiny_dir):
    assert isinstance(AutoConfig.from_pretrained(tiny_dir), VIST2Config)
    assert isinstance(AutoModel.from_pretrained(tiny_dir), VIST2Model)
    m = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert isinstance(m, VIST2ForCausalLM)
    assert m.lm_head.weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()  # Qwen3 ties them
    assert (tiny_dir / "tokenizer.json").exists() and (tiny_dir / "model.safetensors").exists()


def test_merge_patches_groups_spatial_neighbours():
    gh, gw = 4, 4
    rc = torch.tensor([[r, c] for r in range(gh) for c in range(gw)], dtype=torch.float)[None]  # (1, 16, 2)
    merged = merge_patches(rc, gh, gw, 2)
    assert merged.shape == (1, 4, 8)
    # token 1 is the block at rows 0-1, columns 2-3, read row by row
    assert merged[0, 1].view(4, 2).tolist() == [[0, 2], [0, 3], [1, 2], [1, 3]]
    assert merged[0, 2].view(4, 2).tolist() == [[2, 0], [2, 1], [3, 0], [3, 1]]


def test_sparse_mask_eager_equals_sdpa():
    model = _tiny()
    K, beta = model.config.chunk_tokens, model.config.n_visual
    segs = sft_segments([1, 2], list(range(100, 100 + K + 20)), [3], list(range(500, 500 + 2 * K + 5)), K, beta,
                        "interleaved", chunker=fixed_chunker(K))
    plan = collate([build_sample(segs), build_sample(olm_segments(range(900, 960), K, beta, chunker=fixed_chunker(K)))])
    px = _pixels(len(plan.chunks))
    outs = {}
    for impl in ("eager", "sdpa"):
        model.config.text_config._attn_implementation = impl
        model.model.language_model.config._attn_implementation = impl
        with torch.no_grad():
            outs[impl] = model(plan=plan, pixel_values=px).logits
    real = plan.kind != Kind.PAD
    diff = (outs["eager"] - outs["sdpa"])[real].abs().max()
    assert diff < 1e-4, diff


def test_what_each_token_can_influence():
    """Evicted text reaches later text only through its visual tokens; a chunk's image
    reaches nothing before its visual tokens."""
    model = _tiny()
    K, beta = model.config.chunk_tokens, model.config.n_visual
    ids = list(range(1000, 1000 + 2 * K + 10))
    plan = collate([build_sample(olm_segments(ids, K, beta, chunker=fixed_chunker(K)))])
    px = _pixels(2)
    with torch.no_grad():
        base = model(plan=plan, pixel_values=px).logits[0]
        px2 = px.clone()
        px2[1] = 1 - px2[1]  # change the image of chunk 2 only
        other = model(plan=plan, pixel_values=px2).logits[0]
    c2 = (plan.chunk[0] == 1) & (plan.kind[0] == Kind.TEXT)
    c3 = plan.chunk[0] == 2
    v2 = (plan.chunk[0] == 1) & (plan.kind[0] == Kind.VISUAL)
    before_v2 = torch.arange(plan.shape[1]) < torch.nonzero(v2)[0].item()
    assert torch.equal(base[before_v2], other[before_v2])  # nothing before v2 sees its image
    assert (base[c3] - other[c3]).abs().max() > 1e-2  # the next chunk reads it
    assert torch.equal(base[c2], other[c2])


def test_dropping_evicted_text_from_the_cache_is_exact():
    """Teacher-forced logits of chunk 2 equal those of a run that physically drops chunk 1's
    text from the KV cache after v1 is written: the plan's positions are cache indices."""
    from vist2.attention import additive_mask

    model = _tiny()
    K, beta = model.config.chunk_tokens, model.config.n_visual
    ids = list(range(2000, 2000 + K + 9))
    plan = collate([build_sample([Raw((7, 8, 9))] + olm_segments(ids, K, beta, chunker=fixed_chunker(K)))])
    px = _pixels(1)
    lm = model.model.language_model
    n_first = 3 + K + beta  # raw, c1, v1
    first = collate([build_sample([Raw((7, 8, 9)), Chunk(ids[:K], beta, "interleaved")])])
    rest = ids[K:]

    def incremental(drop_evicted: bool):
        with torch.no_grad():
            emb = model.model.embed(first.input_ids, first.kind == Kind.VISUAL, pixel_values=px)
            cache = DynamicCache()
            lm(inputs_embeds=emb, position_ids=first.position, attention_mask=additive_mask(first, emb.dtype),
               use_cache=True, **cache_kwarg(lm, cache))
            keep = (~first.evicted[0]).nonzero().flatten() if drop_evicted else torch.arange(n_first)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
            n = len(keep)
            pos = torch.arange(3 + beta, 3 + beta + len(rest))[None]  # the plan's positions
            causal = torch.ones(len(rest), n + len(rest)).tril(n).bool()
            mask = torch.where(causal, 0.0, torch.finfo(torch.float32).min)[None, None]
            out = lm(inputs_embeds=model.model.embed(torch.tensor([rest]), torch.zeros(1, len(rest), dtype=torch.bool)),
                     position_ids=pos, attention_mask=mask, use_cache=True, **cache_kwarg(lm, cache))
            return model.lm_head(out.last_hidden_state)[0], pos[0]

    with torch.no_grad():
        full = model(plan=plan, pixel_values=px).logits[0, n_first:]
    inc, pos = incremental(drop_evicted=True)
    assert torch.equal(plan.position[0, n_first:], pos)
    assert torch.allclose(full, inc, atol=1e-4), (full - inc).abs().max()
    # control: the same run with the evicted text left in the cache disagrees
    kept, _ = incremental(drop_evicted=False)
    assert (full - kept).abs().max() > 1e-2


def test_loss_counts_only_target_tokens():
    model = _tiny()
    K, beta = model.config.chunk_tokens, model.config.n_visual
    plan = collate([build_sample(olm_segments(range(3000, 3000 + K + 5), K, beta, chunker=fixed_chunker(K)))])
    px = _pixels(1)
    with torch.no_grad():
        out = model(plan=plan, pixel_values=px)
    lab = plan.labels[0]
    ref = torch.nn.functional.cross_entropy(out.logits[0][lab != -100], lab[lab != -100])
    assert torch.allclose(out.loss, ref)
    assert int((lab != -100).sum()) == K - 1 + 5  # every text token but the very first


def test_loss_only_gives_the_same_loss_and_gradients():
    """The training path (chunked linear cross-entropy at the labelled slots) against the full logits."""
    model = _tiny().train()
    K, beta = model.config.chunk_tokens, model.config.n_visual
    plan = collate([build_sample(olm_segments(range(3000, 3000 + 2 * K + 7), K, beta, chunker=fixed_chunker(K))),
                    build_sample(olm_segments(range(4000, 4000 + K + 3), K, beta, chunker=fixed_chunker(K)))])
    px = _pixels(len(plan.chunks))
    watched = {"aligner": model.model.aligner.proj.weight, "head": model.lm_head.weight,
               "attention": model.model.language_model.layers[0].self_attn.q_proj.weight}

    def loss_and_grads(**kw):
        model.zero_grad()
        out = model(plan=plan, pixel_values=px, **kw)
        out.loss.backward()
        return out, {k: p.grad.clone() for k, p in watched.items()}

    full, g_full = loss_and_grads()
    sparse, g_sparse = loss_and_grads(loss_only=True)
    assert sparse.logits is None
    # fp32 sums in another order (chunks vs all logits at once): ~1e-6 relative, 1.3e-6 with transformers 5.25
    torch.testing.assert_close(sparse.loss, full.loss, rtol=1e-5, atol=1e-6)
    for k in watched:  # fp32 sums in another order: equal to ~1e-6 of the gradient's size
        rel = float((g_sparse[k] - g_full[k]).norm() / g_full[k].norm())
        assert rel < 1e-5, (k, rel)
    with pytest.raises(ValueError, match="loss_only needs labels"):
        model(input_ids=torch.tensor([[5, 6, 7]]), loss_only=True)


def test_missing_or_extra_images_are_errors():
    model = _tiny()
    K, beta = model.config.chunk_tokens, model.config.n_visual
    plan = collate([build_sample(olm_segments(range(3 * K), K, beta, chunker=fixed_chunker(K)))])
    with pytest.raises(ValueError, match="visual slots"):
        model(plan=plan)
    with pytest.raises(ValueError, match="visual slots"):
        model(plan=plan, pixel_values=_pixels(3))
    with pytest.raises(ValueError, match="64x64"):
        model(plan=plan, pixel_values=_pixels(2, size=64))


def test_set_trainable_freezes_parts():
    model = _tiny()
    model.set_trainable(vision=False, aligner=True, llm=False)
    trainable = {n.split(".")[1] if n.startswith("model.") else n.split(".")[0]
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"aligner"}
    model.set_trainable(vision=True)
    assert all(p.requires_grad for p in model.model.vision.parameters())
    assert not any(p.requires_grad for p in model.model.language_model.parameters())


@pytest.mark.parametrize("kind", ["linear_tanh", "mlp"])
def test_aligner_is_tanh_of_its_projection(kind):
    """Computed here from the module's weights, not by calling the aligner on both sides."""
    model = _tiny(aligner=kind, aligner_hidden_size=48)
    a = model.model.aligner
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, a.proj.in_features if kind == "linear_tanh" else a.fc1.in_features, generator=g)
    with torch.no_grad():
        for p in a.parameters():  # weights large enough that tanh bends
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if kind == "linear_tanh":
            pre = x @ a.proj.weight.T + a.proj.bias
        else:
            pre = torch.nn.functional.gelu(x @ a.fc1.weight.T + a.fc1.bias) @ a.fc2.weight.T + a.fc2.bias
        out = a(x)
    assert out.shape == pre.shape
    assert torch.allclose(out, torch.tanh(pre), atol=1e-6)
    assert (pre - torch.tanh(pre)).abs().max() > 0.1  # the inputs reach where tanh bends


def test_mlp_aligner_runs_and_saves(tmp_path):
    model = _tiny(aligner="mlp", aligner_hidden_size=48)
    assert model.model.aligner.fc1.out_features == 48
    model.save_pretrained(tmp_path)
    again = VIST2ForCausalLM.from_pretrained(tmp_path)
    x = _pixels(1)
    with torch.no_grad():
        assert torch.allclose(model.model.encode_images(x), again.model.encode_images(x))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(visual_tokens=32), "visual_tokens"),
        (dict(chunk_tokens=60, compression_ratio=4), "compression_ratio"),
        (dict(aligner="conv"), "aligner"),
        (dict(merge=3), "render.height"),
        (dict(prompt_encoding="text"), "prompt_encoding"),
        (dict(chunk_tokens=0), "chunk_tokens"),
        (dict(render="huge"), "render"),
    ],
)
def test_inconsistent_config_fails_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        preset_config("tiny", **overrides)


def test_paper_geometry_preset():
    cfg = preset_config("qwen3-0.6b-paper")
    assert (cfg.render["height"], cfg.patch_size, cfg.merge, cfg.n_visual, cfg.chunk_tokens) == (256, 16, 1, 256, 1024)
    cfg = preset_config("qwen3-0.6b")
    assert (cfg.render["height"], cfg.merge, cfg.n_visual, cfg.chunk_tokens) == (512, 2, 256, 1024)


def test_a_forward_with_a_cache_returns_it_without_a_deprecation_message(capfd):
    """transformers renamed an output's ``past_key_values`` to ``cache`` and warns on the old name (getter
    and constructor); the model's outputs and our readers use whichever name this transformers has, so
    ``vist2 eval`` and ``generate`` print no such line."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers").warning_once.cache_clear()  # earlier tests may have used up the once
    model = _tiny()
    cache = DynamicCache()
    plan = collate([build_sample([Raw((5, 6, 7))])])
    with torch.no_grad():
        out = model(plan=plan, past_key_values=cache, use_cache=True)
        out_loss = model(plan=plan, labels=plan.labels, loss_only=True)
    assert output_cache(out) is cache and cache.get_seq_length() == 3
    assert out_loss.loss is not None
    err = capfd.readouterr().err
    assert "deprecated" not in err, err
