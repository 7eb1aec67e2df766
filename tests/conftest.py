"""Shared fixtures: tiny HF checkpoints built and saved with transformers' own save_pretrained."""

import os
import socket

import pytest
import torch


def free_port() -> int:
    """A TCP port free now: each multi-process launch rendezvouses on its own, so launches in parallel
    test workers never meet on accelerate's default port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread a worker: the workers already share the cores
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY_QWEN3 = dict(
    vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True,
    initializer_range=0.2,
)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=16)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen3-tiny")
    Qwen3ForCausalLM(Qwen3Config(**TINY_QWEN3)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def siglip2_dir(tmp_path_factory):
    from transformers import Siglip2Config, Siglip2Model

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("siglip2-tiny")
    cfg = Siglip2Config(
        text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2),
        vision_config=dict(TINY_VISION, num_patches=64),
    )
    Siglip2Model(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def siglip_dir(tmp_path_factory):
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("siglip-tiny")
    cfg = SiglipConfig(
        text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2),
        vision_config=dict(TINY_VISION, image_size=128),
    )
    SiglipModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny preset saved as a checkpoint by ``vist2 init``."""
    from vist2.cli import main

    path = tmp_path_factory.mktemp("vist2-tiny")
    assert main(["init", "--preset", "tiny", "--out", str(path)]) == 0
    return path


class EveryK:
    """Stands in for a processor where token ids stand for no text (synthetic documents, slot counting):
    its chunker cuts every K tokens, with no image to fit."""

    def chunker(self, chunk_tokens: int):
        from vist2.chunking import fixed_chunker

        return fixed_chunker(chunk_tokens)


@pytest.fixture
def every_k():
    """A processor stand-in whose chunker cuts every K tokens (see :class:`EveryK`)."""
    return EveryK()
