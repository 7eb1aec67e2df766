"""VIST2Config: a vision sub-config, a text sub-config, and how text becomes pictures.

The geometry is derived, not repeated: the render config gives the image size,
the vision config the patch size, ``merge`` folds ``merge x merge`` patches into
one visual token, so

    n_visual (beta) = (height / patch) * (width / patch) / merge**2
    compression ratio r = chunk_tokens / n_visual

Example::

    >>> from vist2.config import VIST2Config, preset_config
    >>> cfg = preset_config("tiny")
    >>> cfg.chunk_tokens, cfg.n_visual, cfg.compression_ratio
    (64, 16, 4.0)
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.models.qwen3 import Qwen3Config
from transformers.models.siglip2 import Siglip2VisionConfig

from .layout import PROMPT_ENCODINGS
from .render import RENDER_PRESETS, RenderConfig

ALIGNERS = ("linear_tanh", "mlp")
# The merge a render preset is read with when none is given. The paper reads its 256x256 images
# patch by patch (256 patches = 256 visual tokens); the 512x512 default folds 2x2 patches to the same 256.
RENDER_MERGE = {"paper": 1, "nano": 4, "nano-char": 1}
DEFAULT_MERGE = 2
VISION_TYPES = ("siglip2_vision_model", "siglip_vision_model")


def _sub_config(value: Any, default_type: str, field: str) -> PretrainedConfig:
    if value is None:
        value = {"model_type": default_type}
    if isinstance(value, PretrainedConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be a dict or a transformers config, got {type(value).__name__}")
    value = dict(value)
    model_type = value.pop("model_type", default_type)
    return AutoConfig.for_model(model_type, **value)


class VIST2Config(PretrainedConfig):
    """Configuration of a VIST2 model.

    Args:
        text_config: the decoder LLM (any HF RoPE decoder; Qwen3 by default).
        vision_config: the vision tower (SigLIP2 by default, SigLIP accepted). A full
            SigLIP/SigLIP2 (text + vision) config is reduced to its vision part.
        chunk_tokens: K, text tokens per rendered image.
        merge: fold ``merge x merge`` neighbouring patches into one visual token; None: the render
            preset's (1 for ``paper``, else 2).
        aligner: ``linear_tanh`` (paper eq.: tanh(xW+b)) or ``mlp`` (paper §4.1).
        aligner_hidden_size: hidden width of the ``mlp`` aligner (paper: 19,456).
        prompt_encoding: how prompt chunks enter the LLM, ``visual`` or ``interleaved``
            (see :func:`vist2.layout.prompt_segments`); the same value is used in training and inference.
        render: the render config (a dict, see :class:`vist2.render.RenderConfig`), or
            the name of a render preset. A model is tied to how it learned to read.
        visual_tokens / compression_ratio: optional checks; when given they must match
            the derived n_visual and K / n_visual.
        ocr_prompt: text between an image and its transcription in MT-OCR samples (None: the image's
            text follows it directly, as in the paper). A model trained with one transcribes only when
            given it, and takes text right after its pages as the continuation it is (set by
            ``TrainConfig.ocr_prompt``; read by ``vist2 eval ocr`` and the demo's recall).
    """

    model_type = "vist2"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(
        self,
        text_config: dict | PretrainedConfig | None = None,
        vision_config: dict | PretrainedConfig | None = None,
        chunk_tokens: int | None = 1024,
        merge: int | None = None,
        aligner: str = "linear_tanh",
        aligner_hidden_size: int = 19456,
        prompt_encoding: str = "visual",
        render: dict | str | None = None,
        visual_tokens: int | None = None,
        compression_ratio: float | None = None,
        initializer_range: float = 0.02,
        ocr_prompt: str | None = None,
        **kwargs,
    ):
        self.text_config = _sub_config(text_config, "qwen3", "text_config")
        vision = _sub_config(vision_config, "siglip2_vision_model", "vision_config")
        if getattr(vision, "vision_config", None) is not None and vision.model_type not in VISION_TYPES:
            vision = vision.vision_config  # a full SigLIP(2) config: keep the tower we use
        self.vision_config = vision
        self.chunk_tokens = chunk_tokens
        self.aligner = aligner
        self.aligner_hidden_size = aligner_hidden_size
        self.prompt_encoding = prompt_encoding
        if render is None:
            render = "default"
        if merge is None:
            merge = RENDER_MERGE.get(render, DEFAULT_MERGE) if isinstance(render, str) else DEFAULT_MERGE
        self.merge = merge
        if isinstance(render, str):
            if render not in RENDER_PRESETS:
                raise ValueError(f"render: unknown preset {render!r}; known: {sorted(RENDER_PRESETS)}")
            render = RENDER_PRESETS[render].to_dict()
        if isinstance(render, RenderConfig):
            render = render.to_dict()
        self.render = dict(render)
        self.initializer_range = initializer_range
        if ocr_prompt is not None and (not isinstance(ocr_prompt, str) or not ocr_prompt):
            raise ValueError(f"ocr_prompt must be a non-empty string or None, got {ocr_prompt!r}")
        self.ocr_prompt = ocr_prompt
        kwargs.setdefault("tie_word_embeddings", bool(getattr(self.text_config, "tie_word_embeddings", False)))
        super().__init__(**kwargs)
        self.visual_tokens = self._validate(visual_tokens, compression_ratio)
        self.compression_ratio = self.chunk_tokens / self.visual_tokens

    # -- derived geometry ---------------------------------------------------------

    @property
    def render_config(self) -> RenderConfig:
        return RenderConfig.from_dict(self.render)

    @property
    def patch_size(self) -> int:
        p = self.vision_config.patch_size
        return int(p[0] if isinstance(p, (list, tuple)) else p)

    @property
    def patch_grid(self) -> tuple[int, int]:
        r = self.render
        return r["height"] // self.patch_size, r["width"] // self.patch_size

    @property
    def n_visual(self) -> int:
        """β, the visual tokens per image (saved in ``config.json`` as ``visual_tokens``)."""
        return self.visual_tokens

    def _validate(self, visual_tokens, compression_ratio) -> int:
        if self.aligner not in ALIGNERS:
            raise ValueError(f"aligner must be one of {ALIGNERS}, got {self.aligner!r}")
        if self.prompt_encoding not in PROMPT_ENCODINGS:
            raise ValueError(f"prompt_encoding must be one of {PROMPT_ENCODINGS}, got {self.prompt_encoding!r}")
        if self.vision_config.model_type not in VISION_TYPES:
            raise ValueError(f"vision_config: model_type {self.vision_config.model_type!r} is not one of {VISION_TYPES}")
        if not isinstance(self.merge, int) or self.merge <= 0:
            raise ValueError(f"merge must be a positive integer, got {self.merge!r}")
        rc = self.render_config  # validates the render dict itself
        p, m = self.patch_size, self.merge
        for side in ("height", "width"):
            if getattr(rc, side) % (p * m):
                raise ValueError(
                    f"render.{side}={getattr(rc, side)} must be a multiple of patch_size*merge={p * m}"
                )
        gh, gw = rc.height // p, rc.width // p
        n_visual = gh * gw // (m * m)
        if visual_tokens is not None and visual_tokens != n_visual:
            raise ValueError(
                f"visual_tokens={visual_tokens} does not match the image: a {rc.height}x{rc.width} render gives "
                f"{gh * gw} patches of {p}px, {n_visual} visual tokens after a {m}x{m} merge"
            )
        if self.chunk_tokens is None:
            self.chunk_tokens = int(round((compression_ratio or 4) * n_visual))
        if not isinstance(self.chunk_tokens, int) or self.chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be a positive integer, got {self.chunk_tokens!r}")
        if compression_ratio is not None and abs(compression_ratio * n_visual - self.chunk_tokens) > 1e-6:
            raise ValueError(
                f"chunk_tokens={self.chunk_tokens} is not compatible with compression_ratio={compression_ratio}: "
                f"a {rc.height}x{rc.width} render read with merge {m} gives {n_visual} visual tokens per image, so "
                f"chunk_tokens={self.chunk_tokens} means r={self.chunk_tokens / n_visual:g}; "
                f"for r={compression_ratio:g} chunk_tokens must be {compression_ratio * n_visual:g} "
                "(give one of the two)"
            )
        return n_visual

    def hash(self) -> str:
        """A short stable hash of the config (for evaluation records)."""
        d = self.to_dict()
        for k in ("_name_or_path", "transformers_version"):
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# Presets: random init at the paper's shapes (plus a tiny one for CPU tests)
# ---------------------------------------------------------------------------

SIGLIP2_L16 = dict(  # SigLIP2 ViT-L/16
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    patch_size=16, num_patches=256, vision_use_head=False,
)
_QWEN3_COMMON = dict(
    vocab_size=151936, head_dim=128, num_key_value_heads=8, max_position_embeddings=40960,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
    bos_token_id=151643, eos_token_id=151645,
)
QWEN3 = {
    "qwen3-0.6b": dict(_QWEN3_COMMON, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3_COMMON, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3_COMMON, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=False),
}
TINY_TEXT = dict(
    vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=8192, tie_word_embeddings=True,
    bos_token_id=151643, eos_token_id=151645,
)
TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=16,
    num_patches=64, vision_use_head=False,
)

PRESETS: dict[str, dict] = {
    "tiny": dict(text=TINY_TEXT, vision=TINY_VISION, chunk_tokens=64, merge=2, render="tiny"),
    **{name: dict(text=text, vision=SIGLIP2_L16, chunk_tokens=1024, merge=2, render="default")
       for name, text in QWEN3.items()},
    # the paper's own geometry: a 256x256 image, one visual token per 16 px patch
    **{f"{name}-paper": dict(text=text, vision=SIGLIP2_L16, chunk_tokens=1024, merge=1, render="paper")
       for name, text in QWEN3.items()},
}


def preset_config(name: str, text: dict | None = None, vision: dict | None = None, **overrides) -> VIST2Config:
    """A VIST2Config from a named preset, with field overrides (e.g. ``chunk_tokens=512``);
    ``text`` / ``vision`` override fields of the sub-configs (see :func:`size_overrides`).

    The preset's compression ratio r = K / n_visual is kept when the geometry changes: a
    ``render`` override brings its own merge (``paper``: 1) unless ``merge`` is given, and
    unless ``chunk_tokens`` or ``compression_ratio`` is given, K follows n_visual. Both given and
    disagreeing is a ``ValueError`` naming the two.

        >>> c = preset_config("tiny", merge=1)
        >>> c.n_visual, c.chunk_tokens, c.compression_ratio
        (64, 256, 4.0)
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    p = copy.deepcopy(PRESETS[name])
    new_patch = "patch_size" in (vision or {}) and "num_patches" not in vision
    text = Qwen3Config(**{**p.pop("text"), **(text or {})})
    vision = Siglip2VisionConfig(**{**p.pop("vision"), **(vision or {})})
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "chunk_tokens" not in overrides:  # K = r x n_visual, r the given one or the preset's
        if "compression_ratio" not in overrides:
            own = Siglip2VisionConfig(**PRESETS[name]["vision"])  # the preset's own geometry gives its r
            overrides["compression_ratio"] = VIST2Config(text_config=text, vision_config=own, **p).compression_ratio
        overrides["chunk_tokens"] = None
    if "render" in overrides and "merge" not in overrides:
        p["merge"] = None  # the new render's own merge
    p.update(overrides)
    cfg = VIST2Config(text_config=text, vision_config=vision, **p)
    if new_patch:
        gh, gw = cfg.patch_grid  # a new patch size: one position embedding per patch of the page
        cfg.vision_config.num_patches = gh * gw
    return cfg


# ---------------------------------------------------------------------------
# Model sizes from the command line (``vist2 init --preset P --llm-layers 4 ...``)
# ---------------------------------------------------------------------------

SIZE_FLAGS: dict[str, tuple[str, str]] = {  # flag -> (sub-config, field)
    "--llm-hidden-size": ("text", "hidden_size"),
    "--llm-layers": ("text", "num_hidden_layers"),
    "--llm-heads": ("text", "num_attention_heads"),
    "--llm-kv-heads": ("text", "num_key_value_heads"),
    "--llm-intermediate-size": ("text", "intermediate_size"),
    "--vocab-size": ("text", "vocab_size"),
    "--vision-hidden-size": ("vision", "hidden_size"),
    "--vision-layers": ("vision", "num_hidden_layers"),
    "--vision-heads": ("vision", "num_attention_heads"),
    "--vision-intermediate-size": ("vision", "intermediate_size"),
    "--vision-patch-size": ("vision", "patch_size"),
}


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def size_overrides(preset: str | None, values: dict, tokenizer=None) -> dict[str, dict]:
    """``{"text": {...}, "vision": {...}}`` for :func:`preset_config` from the size flags in ``values``
    (argparse names: ``llm_layers`` ...; None = the preset's). Checked after merging with the preset, so
    errors name the flags.

    With a ``tokenizer``, the vocabulary defaults to its length and the LLM's end/padding ids to its
    own (a small trained tokenizer has none of Qwen3's ids).

        >>> size_overrides("tiny", {"llm_layers": 4, "llm_hidden_size": 128})["text"]
        {'hidden_size': 128, 'num_hidden_layers': 4, 'head_dim': 32}
    """
    given = {f: values[_dest(f)] for f in SIZE_FLAGS if values.get(_dest(f)) is not None}
    if preset is None:
        if given:
            raise ValueError(f"{', '.join(given)}: size flags apply to --preset (a composed model keeps its sizes)")
        return {"text": {}, "vision": {}}
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    for flag, v in given.items():
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{flag} must be a positive integer, got {v!r}")
    out: dict[str, dict] = {"text": {}, "vision": {}}
    for flag, v in given.items():
        part, name = SIZE_FLAGS[flag]
        out[part][name] = v
    if tokenizer is not None:
        out["text"].setdefault("vocab_size", len(tokenizer))
        if len(tokenizer) > out["text"]["vocab_size"]:
            raise ValueError(f"--vocab-size {out['text']['vocab_size']} is smaller than the tokenizer "
                             f"({len(tokenizer)} tokens)")
        eos, pad, bos = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id
        out["text"].update(eos_token_id=eos, pad_token_id=pad, bos_token_id=bos if bos is not None else pad)
    for part, prefix in (("text", "--llm"), ("vision", "--vision")):
        merged = {**PRESETS[preset][part], **out[part]}
        width, heads = merged["hidden_size"], merged["num_attention_heads"]
        if width % heads:
            raise ValueError(f"{prefix}-heads {heads} must divide {prefix}-hidden-size {width}")
        if part == "text":
            kv = merged.get("num_key_value_heads") or heads
            if heads % kv:
                raise ValueError(f"--llm-kv-heads {kv} must divide --llm-heads {heads}")
            if {"hidden_size", "num_attention_heads"} & set(out["text"]):
                out["text"]["head_dim"] = width // heads  # Qwen3 keeps head_dim apart; follow the width
    return out
