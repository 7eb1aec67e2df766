"""Model presets and init flags: every preset's geometry and r, and the traps that used to change r silently."""

import pytest

from vist2.cli import main
from vist2.config import PRESETS, VIST2Config, preset_config

# preset -> (image side, merge, beta, K); r = K / beta is 4 everywhere, as in the paper
GEOMETRY = {
    "tiny": (128, 2, 16, 64),
    "qwen3-0.6b": (512, 2, 256, 1024),
    "qwen3-4b": (512, 2, 256, 1024),
    "qwen3-8b": (512, 2, 256, 1024),
    "qwen3-0.6b-paper": (256, 1, 256, 1024),
    "qwen3-4b-paper": (256, 1, 256, 1024),
    "qwen3-8b-paper": (256, 1, 256, 1024),
}


def test_every_preset_has_its_geometry_and_r_4():
    assert set(PRESETS) == set(GEOMETRY)
    for name, (side, merge, beta, K) in GEOMETRY.items():
        c = preset_config(name)
        assert (c.render["height"], c.merge, c.n_visual, c.chunk_tokens) == (side, merge, beta, K), name
        assert c.compression_ratio == 4.0, name


def test_paper_presets_share_the_llm_of_their_size():
    for size in ("0.6b", "4b", "8b"):
        a, b = preset_config(f"qwen3-{size}"), preset_config(f"qwen3-{size}-paper")
        assert a.text_config.to_dict() == b.text_config.to_dict()
    assert preset_config("qwen3-8b-paper").text_config.hidden_size == 4096
    assert preset_config("qwen3-4b-paper").text_config.num_hidden_layers == 36


@pytest.mark.parametrize("name", ["tiny", "qwen3-0.6b", "qwen3-4b-paper"])
def test_merge_keeps_r_and_k_follows_beta(name):
    base = preset_config(name)
    for m in (1, 2, 4):
        if (base.render["height"] // base.patch_size) % m:
            continue
        c = preset_config(name, merge=m)
        assert c.merge == m and c.compression_ratio == 4.0
        assert c.chunk_tokens == 4 * c.n_visual == 4 * (base.render["height"] // 16) ** 2 // m**2


def test_render_paper_implies_merge_1():
    c = preset_config("qwen3-4b", render="paper")  # used to give merge 2: beta 64, r 16
    assert (c.render["height"], c.merge, c.n_visual, c.chunk_tokens, c.compression_ratio) == (256, 1, 256, 1024, 4.0)
    c = preset_config("qwen3-4b-paper", render="default")  # and back: 512 px folds 2x2 again
    assert (c.merge, c.n_visual, c.chunk_tokens) == (2, 256, 1024)
    c = preset_config("qwen3-4b", render="paper", merge=2)  # an explicit merge wins; r stays 4
    assert (c.merge, c.n_visual, c.chunk_tokens) == (2, 64, 256)
    assert VIST2Config(render="paper").merge == 1 and VIST2Config().merge == 2


def test_chunk_tokens_or_ratio_given_explicitly():
    assert preset_config("tiny", merge=1, chunk_tokens=128).compression_ratio == 2.0  # K given: r follows
    assert preset_config("tiny", merge=1, compression_ratio=2).chunk_tokens == 128
    assert preset_config("tiny", chunk_tokens=128, compression_ratio=8).chunk_tokens == 128
    with pytest.raises(ValueError, match=r"chunk_tokens=64 .*compression_ratio=4"):
        preset_config("tiny", merge=1, chunk_tokens=64, compression_ratio=4)  # r would be 1


def _init(tmp_path, *flags):
    out = tmp_path / "m"
    rc = main(["init", "--preset", *flags, "--out", str(out)])
    return rc, (VIST2Config.from_pretrained(out) if rc == 0 else None)


def test_init_traps(tmp_path, capsys):
    rc, c = _init(tmp_path, "tiny", "--merge", "1")  # used to give K=64 with beta=64: r = 1
    assert rc == 0 and (c.n_visual, c.chunk_tokens, c.compression_ratio) == (64, 256, 4.0)
    rc, c = _init(tmp_path, "tiny", "--render", "paper")  # 256 px, merge 1 implied
    assert rc == 0 and (c.merge, c.n_visual, c.chunk_tokens) == (1, 256, 1024)
    rc, c = _init(tmp_path, "tiny", "--merge", "1", "--chunk-tokens", "128")
    assert rc == 0 and c.compression_ratio == 2.0
    capsys.readouterr()
    rc, _ = _init(tmp_path, "tiny", "--merge", "1", "--chunk-tokens", "64", "--ratio", "4")
    err = capsys.readouterr().err
    assert rc == 2 and "chunk_tokens=64" in err and "compression_ratio=4" in err
