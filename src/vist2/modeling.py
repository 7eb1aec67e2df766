"""VIST2: vision tower -> aligner -> visual embeddings in the plan's visual slots -> LLM.

``VIST2Model`` holds the three parts (no LM head); ``VIST2ForCausalLM`` adds the
head and the loss. Both read a :class:`~vist2.layout.Plan` for positions, the
attention mask and labels, so no layout rule lives here.

Example (random tiny model, CPU)::

    >>> import torch
    >>> from vist2.config import preset_config
    >>> from vist2.chunking import fixed_chunker
    >>> from vist2.layout import build_sample, collate, olm_segments
    >>> from vist2.modeling import VIST2ForCausalLM
    >>> cfg = preset_config("tiny")
    >>> model = VIST2ForCausalLM(cfg).eval()
    >>> K = cfg.chunk_tokens  # chunks of K tokens: the ids stand for no text the fit rule could measure
    >>> plan = collate([build_sample(olm_segments(range(100, 200), K, cfg.n_visual, chunker=fixed_chunker(K)))])
    >>> pixels = torch.rand(len(plan.chunks), 1, 128, 128)  # normally: rendered chunk text
    >>> out = model(plan=plan, pixel_values=pixels)
    >>> out.logits.shape[:2], out.loss.ndim
    (torch.Size([1, 116]), 0)
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .attention import additive_mask, block_mask
from .config import VIST2Config
from .layout import IGNORE, Kind, Plan
from .loss import linear_cross_entropy


def cache_kwarg(language_model: nn.Module, cache) -> dict:
    """The KV cache as the LLM's forward names it: ``cache`` in newer transformers (which deprecate
    ``past_key_values`` with a warning on every call), ``past_key_values`` in older ones; nothing
    when there is no cache."""
    if cache is None:
        return {}
    params = inspect.signature(type(language_model).forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def output_cache(output):
    """The KV cache a transformers model output carries, under the field name this transformers uses
    (``cache``; ``past_key_values`` before it, whose getter now warns)."""
    fields = getattr(type(output), "__dataclass_fields__", {})
    return getattr(output, "cache" if "cache" in fields else "past_key_values")


def _lm_output(**fields) -> CausalLMOutputWithPast:
    """``CausalLMOutputWithPast`` with its cache under the field name this transformers uses."""
    if "cache" in CausalLMOutputWithPast.__dataclass_fields__:
        fields["cache"] = fields.pop("past_key_values")
    return CausalLMOutputWithPast(**fields)


class Aligner(nn.Module):
    """Projects (merged) vision features into the LLM's embedding space, bounded by tanh."""

    def __init__(self, in_dim: int, out_dim: int, kind: str, hidden: int):
        super().__init__()
        self.kind = kind
        if kind == "linear_tanh":  # paper eq.: tanh(x W_m + b_m)
            self.proj = nn.Linear(in_dim, out_dim)
        else:  # paper §4.1: an MLP with a wide hidden layer; tanh kept on the output as in the eq.
            self.fc1 = nn.Linear(in_dim, hidden)
            self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x_NLd: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear_tanh":
            return torch.tanh(self.proj(x_NLd))
        return torch.tanh(self.fc2(F.gelu(self.fc1(x_NLd))))


def merge_patches(f_NPd: torch.Tensor, gh: int, gw: int, m: int) -> torch.Tensor:
    """Fold each m x m block of neighbouring patches (row-major grid gh x gw) into one token.

    ``(N, gh*gw, d) -> (N, (gh/m)*(gw/m), m*m*d)``; within a token the features are ordered
    (row in block, column in block).
    """
    if m == 1:
        return f_NPd
    N, _, d = f_NPd.shape
    f = f_NPd.reshape(N, gh // m, m, gw // m, m, d)  # (N, block row, row in block, block col, col in block, d)
    return f.permute(0, 1, 3, 2, 4, 5).reshape(N, (gh // m) * (gw // m), m * m * d)


class VIST2PreTrainedModel(PreTrainedModel):
    config_class = VIST2Config
    config: VIST2Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["Qwen3DecoderLayer", "Siglip2EncoderLayer", "SiglipEncoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Aligner):
            for lin in (m for m in module.modules() if isinstance(m, nn.Linear)):
                lin.weight.normal_(0.0, self.config.initializer_range)
                lin.bias.zero_()


class VIST2Model(VIST2PreTrainedModel):
    """Vision tower, aligner and decoder LLM (without its LM head)."""

    def __init__(self, config: VIST2Config):
        super().__init__(config)
        self.vision = AutoModel.from_config(config.vision_config)
        self.language_model = AutoModel.from_config(config.text_config)
        merged = config.vision_config.hidden_size * config.merge**2
        self.aligner = Aligner(merged, config.text_config.hidden_size, config.aligner, config.aligner_hidden_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    # -- images -> visual embeddings ---------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` pixels in [0, 1] (C = 1 for rendered text, or 3) -> ``(N, n_visual, D)``."""
        cfg = self.config
        N, C, H, W = pixel_values.shape
        if (H, W) != (cfg.render["height"], cfg.render["width"]):
            raise ValueError(f"images are {H}x{W}, the model reads {cfg.render['height']}x{cfg.render['width']}")
        if C not in (1, 3):
            raise ValueError(f"images need 1 or 3 channels, got {C}")
        dtype = next(self.vision.parameters()).dtype
        x = (pixel_values.to(dtype) * 2 - 1).expand(N, 3, H, W)  # SigLIP normalisation: mean 0.5, std 0.5
        p = cfg.patch_size
        gh, gw = H // p, W // p
        if cfg.vision_config.model_type == "siglip2_vision_model":
            # SigLIP2 (NaFlex) takes flattened patches in (row, col, py, px, channel) order
            patches = x.reshape(N, 3, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(N, gh * gw, p * p * 3)
            shapes = torch.tensor([[gh, gw]], device=x.device).expand(N, 2)
            mask = torch.ones(N, gh * gw, dtype=torch.long, device=x.device)
            feats = self.vision(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)
        else:
            feats = self.vision(pixel_values=x, interpolate_pos_encoding=(H != cfg.vision_config.image_size))
        f = merge_patches(feats.last_hidden_state, gh, gw, cfg.merge)  # (N, n_visual, m*m*dv)
        return self.aligner(f)  # (N, n_visual, D)

    def embed(
        self,
        input_ids: torch.Tensor,
        visual_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        visual_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the visual slots (``visual_mask``) filled from images, in order."""
        embeds = self.get_input_embeddings()(input_ids.clamp(min=0))  # (B, T, D); -1 slots filled below
        n_slots = int(visual_mask.sum())
        if visual_embeds is None and pixel_values is not None:
            visual_embeds = self.encode_images(pixel_values)
        if visual_embeds is None:
            if n_slots:
                raise ValueError(f"the plan has {n_slots} visual slots but no pixel_values or visual_embeds were given")
            return embeds
        flat = visual_embeds.reshape(-1, embeds.shape[-1])
        if flat.shape[0] != n_slots:
            raise ValueError(
                f"{flat.shape[0]} visual embeddings ({visual_embeds.shape[0]} images) for {n_slots} visual slots"
            )
        return embeds.masked_scatter(visual_mask[..., None], flat.to(embeds.dtype))

    def mask_for(self, plan: Plan, dtype: torch.dtype):
        """The plan's attention mask in the form the configured attention implementation takes."""
        if self.config.text_config._attn_implementation == "flex_attention":
            return block_mask(plan)
        return additive_mask(plan, dtype)

    def forward(
        self,
        plan: Plan | None = None,
        pixel_values: torch.Tensor | None = None,
        visual_embeds: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Run on a plan (training, teacher forcing), or on explicit ids/positions/mask (the engine)."""
        if plan is not None:
            plan = plan.to(self.device)
            input_ids, visual_mask, position_ids = plan.input_ids, plan.kind == Kind.VISUAL, plan.position
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass a plan, input_ids or inputs_embeds")
            if visual_mask is None:
                visual_mask = input_ids < 0
            inputs_embeds = self.embed(input_ids, visual_mask, pixel_values, visual_embeds)
        if plan is not None and attention_mask is None:
            attention_mask = self.mask_for(plan, inputs_embeds.dtype)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **cache_kwarg(self.language_model, past_key_values),
            **kwargs,
        )

    # -- what trains --------------------------------------------------------------

    def set_trainable(self, vision: bool | None = None, aligner: bool | None = None, llm: bool | None = None):
        """Freeze or unfreeze whole parts (None leaves a part as it is)."""
        for part, flag in ((self.vision, vision), (self.aligner, aligner), (self.language_model, llm)):
            if flag is not None:
                part.requires_grad_(flag)


class VIST2ForCausalLM(VIST2PreTrainedModel, GenerationMixin):
    """VIST2 with an LM head; ``forward(plan=..., pixel_values=...)`` returns logits and the plan's loss."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: VIST2Config):
        super().__init__(config)
        self.model = VIST2Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def set_trainable(self, vision: bool | None = None, aligner: bool | None = None, llm: bool | None = None):
        """Freeze or unfreeze vision tower, aligner and LLM (the LM head goes with the LLM)."""
        self.model.set_trainable(vision, aligner, llm)
        if llm is not None:
            self.lm_head.requires_grad_(llm)

    def forward(
        self,
        plan: Plan | None = None,
        pixel_values: torch.Tensor | None = None,
        visual_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        loss_only: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits and the mean loss over the plan's targets.

        ``loss_only=True`` returns the loss without logits (``logits`` is None), computed by
        :func:`vist2.loss.linear_cross_entropy`: the LM head runs only at positions that carry a
        label, a chunk of them at a time, so no ``(targets, vocab)`` logits tensor is ever held
        (a 151,936-word head over the targets of an 8k row is 4 GB in fp32). Training uses it.
        """
        out = self.model(plan=plan, pixel_values=pixel_values, visual_embeds=visual_embeds, **kwargs)
        hidden = out.last_hidden_state
        if labels is None and plan is not None:
            labels = plan.labels
        if loss_only:
            if labels is None:
                raise ValueError("loss_only needs labels (or a plan)")
            labels = labels.to(hidden.device)
            n = (labels != IGNORE).sum()
            # a batch without targets gives loss 0 (not NaN), so accumulation stays finite
            loss = linear_cross_entropy(hidden, self.lm_head.weight, labels) / n.clamp(min=1)
            return _lm_output(loss=loss, past_key_values=output_cache(out), hidden_states=out.hidden_states)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None and logits.shape[1] == labels.shape[1]:
            labels = labels.to(logits.device)
            n = (labels != IGNORE).sum()
            # a batch without targets gives loss 0 (not NaN), so accumulation stays finite
            loss = F.cross_entropy(
                logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
            ) / n.clamp(min=1)
        return _lm_output(loss=loss, logits=logits, past_key_values=output_cache(out), hidden_states=out.hidden_states)
