"""Build VIST2 checkpoints: random init from a preset, or composed from an LLM and a vision checkpoint.

A VIST2 checkpoint is an ordinary transformers folder (``config.json`` with the
render config inside, ``model.safetensors``, the processor: tokenizer files and
``processor_config.json``) that ``VIST2ForCausalLM.from_pretrained`` and
``VIST2Processor.from_pretrained`` (or ``AutoModelForCausalLM`` / ``AutoProcessor``
after ``import vist2``) read.

Example::

    >>> from vist2.build import build_from_preset, save_checkpoint
    >>> model = build_from_preset("tiny")
    >>> save_checkpoint(model, "runs/tiny")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .config import VIST2Config, preset_config
from .modeling import VIST2ForCausalLM
from .processing import VIST2Processor, load_tokenizer  # noqa: F401 (load_tokenizer: its older import path)


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

    ``chunk_tokens`` (K) defaults to ``ratio * n_visual`` when only the ratio is given.
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
    """Write an ordinary HF folder: config.json (with the render config), safetensors, and the
    processor (tokenizer files, ``processor_config.json``). ``tokenizer`` defaults to the bundled one."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    processor = VIST2Processor.from_config(model.config, tokenizer)
    _check_vocab(model.config, processor.tokenizer)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out
