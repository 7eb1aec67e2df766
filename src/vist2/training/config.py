"""Stage presets: what trains, the layout, and the optimiser settings of each stage.

The four presets follow the paper's Table 8 (AdamW, weight decay 1e-4, warm-up
1 %, cosine decay, one epoch, learning rate 5e-4 for pre-training and 1e-5 for
SFT, maximum length 1024 / 4096 / 8192 / 8192), with one departure: PT-2 rows
are 10240 slots, not 4096, because its curriculum's hard phase (up to 8 images
of K = 1024 text + n_visual = 256 visual tokens) does not fit in 4096 (3 images).
Table 8's batch sizes per model size are ``paper_batch``: a "batch" is packed
rows (each at most ``max_length`` slots) per optimizer step over all devices,
``batch_size x grad_accum x devices``. ``configs/<stage>.yaml`` holds the same
values; a YAML file only needs the fields it changes::

    stage: ocr
    max_length: 2048
    curriculum:
      - {until: 0.5, min_images: 1, max_images: 1}
      - {until: 1.0, min_images: 2, max_images: 4}

    >>> from vist2.training.config import load_config, stage_preset
    >>> cfg = stage_preset("olm")
    >>> cfg.learning_rate, cfg.max_length, cfg.train_llm, cfg.train_vision
    (0.0005, 8192, True, False)
    >>> cfg = load_config("olm", paper_batch="4b", devices=8)  # VIST2-4B's 16 rows per step on 8 GPUs
    >>> cfg.batch_size, cfg.grad_accum
    (1, 2)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("lm", "caption", "ocr", "olm", "sft")
ATTENTION = ("auto", "flex", "sdpa", "eager")
PRECISION = ("auto", "bf16", "fp32")


@dataclass
class CurriculumPhase:
    """Images per OCR sample while training progress (0..1 of all steps) is below ``until``."""

    until: float
    min_images: int
    max_images: int

    def __post_init__(self):
        if not 0 < self.until <= 1:
            raise ValueError(f"curriculum.until must be in (0, 1], got {self.until}")
        if not 1 <= self.min_images <= self.max_images:
            raise ValueError(
                f"curriculum: need 1 <= min_images <= max_images, got {self.min_images}..{self.max_images}"
            )


def paper_curriculum() -> list[CurriculumPhase]:
    """PT-2's easy -> medium -> hard schedule: 1 image, then 2-4, then more than 4."""
    return [CurriculumPhase(0.2, 1, 1), CurriculumPhase(0.6, 2, 4), CurriculumPhase(1.0, 5, 8)]


@dataclass
class LoRAConfig:
    """Low-rank adapters on the LLM (needs ``pip install peft``); merged into the weights on save."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"lora.r must be > 0, got {self.r}")


@dataclass
class TrainConfig:
    stage: str
    # what trains (the LM head goes with the LLM)
    train_vision: bool = False
    train_aligner: bool = True
    train_llm: bool = False
    # layout
    max_length: int = 1024  # slots (text + visual) per packed row
    pack: bool = True  # several samples per row; attention never crosses samples (layout.collate)
    prompt_encoding: str | None = None  # SFT prompt chunks: None = the model config's value
    ocr_tokens_per_image: int | None = None  # PT-2 text tokens per image; None = the model's K
    curriculum: list[CurriculumPhase] = field(default_factory=paper_curriculum)
    # PT-2 text: "natural", or "shuffled" (each record's words in random order: no sentence to guess
    # from, so the image is the only way to the next word; for models trained from scratch)
    ocr_text: str = "natural"
    # PT-2: end each OCR sample with the turn end (<|im_end|>, loss on it), so a reader learns where a
    # page's text stops; the paper's MT-OCR has no stop, and transcription then runs to a length cap
    ocr_stop: bool = False
    # text between each OCR image and its transcription (VIST2Config.ocr_prompt; saved with the model, and
    # inherited from it when None): text right after a page is then a transcription only when asked for,
    # so PT-3 no longer teaches two readings of the same place; None = the paper's MT-OCR
    ocr_prompt: str | None = None
    # olm / sft: the chance that each K-token page of a record's text is also an MT-OCR sample (one
    # image each; ocr_text and ocr_stop apply), so PT-3 and SFT keep what PT-2 taught; 0 = the paper's
    # pure stages
    ocr_mix: float = 0.0
    # sft: how a chat's earlier turns enter the prompt (vist2.chat.chat_prompt): "raw" (only the last user
    # message is compressed) or "compressed" (the whole history is memory, styled by role), as the engine's
    # and the server's --chat-history lay it out at inference
    chat_history: str = "raw"
    # olm: memory-use samples besides the stage's windows (bench/notes/nano.md, round 4), built from
    # each window's text, this many per window on average (3.5: 3, and a fourth half the time).
    # recall: whole chunks of a passage (compressed, no loss) then a repeat of one of its spans (loss on
    # the repeat only), best predicted by reading the passage's pages back; chunk start: whole chunks
    # of context (no loss) then only the first chunk_start_tokens tokens after them (loss): the
    # continuation across a page boundary, weighted up (in a window it is a few tokens in every K)
    recall_samples: float = 0.0
    chunk_start_samples: float = 0.0
    chunk_start_tokens: int = 8
    # olm: samples in the layout the engine gives a user's prompt (layout.prompt_segments under the
    # stage's prompt_encoding: with ``visual`` only the pages' visual tokens enter the LLM), 1..4 whole
    # chunks of a window's text (no loss) then the next prompt_sample_tokens tokens (loss), this many per
    # window on average; what a compressed prompt is followed by at inference (bench/notes/nano.md, round 7)
    prompt_samples: float = 0.0
    prompt_sample_tokens: int = 64
    # olm: needle-in-a-haystack prompts in RULER's shape over the window's own text (a 7-digit value for a
    # key at a random depth, the question after it), laid out as the engine lays out a prompt; loss on the
    # value; this many per window on average
    needle_samples: float = 0.0
    # olm: copying from raw text, this many per window on average: a span (the window's own text, 8..copy_tokens
    # tokens, or half the time random numbers and words), a line break and the same span again, loss on the
    # repeat; no pages (bench/notes/nano.md, round 8: copying before retrieving)
    copy_samples: float = 0.0
    copy_tokens: int = 128
    # lm: spans planted twice in each LM window, this many per window on average (the window's own text or
    # random numbers and words, 8..copy_tokens tokens, a line break before each copy, at random places, so
    # the distance between the copies varies over the whole window): an induction signal from the start
    # (bench/notes/nano.md, round 9); the text windows shrink by what is planted (at most half a window)
    lm_repeats: float = 0.0
    # from scratch: each visual token redraws its page region (training/losses/page.py), weight 0 = off,
    # until this share of the steps; and the vision tower + aligner at learning_rate x vision_lr_scale
    aux_page_weight: float = 0.0
    aux_page_until: float = 1.0
    # from scratch: each visual token names the characters drawn in its region (training/losses/char.py)
    aux_char_weight: float = 0.0
    aux_char_until: float = 1.0
    # olm: at the same slots (the first twin_span after each page; twin_page_slot: the page's last visual
    # slot too) every LLM layer's output is pulled towards the one it has on the sample laid out as plain
    # text, run without gradients (training/losses/twin.py); weight 0 = off
    twin_weight: float = 0.0
    twin_until: float = 1.0
    twin_span: int = 8
    twin_page_slot: bool = True
    vision_lr_scale: float = 1.0
    # optimisation (Table 8)
    learning_rate: float = 5e-4
    weight_decay: float = 1e-4
    warmup_ratio: float = 0.01
    lr_scheduler: str = "cosine"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs (needed for streaming sources)
    batch_size: int = 1  # packed rows per device and micro-step
    grad_accum: int = 1
    seed: int = 0
    # runtime
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    attention: str = "auto"  # auto: FlexAttention block mask on GPU, dense mask + SDPA on CPU
    gradient_checkpointing: bool = False
    num_workers: int = 2  # DataLoader workers that render chunks
    shuffle_buffer: int = 1000  # records; 0 keeps the source order
    streaming: bool = False  # read HF datasets lazily (then max_steps is required)
    # bookkeeping
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int = 20
    eval_holdout: int = 100  # without --eval-data, every n-th record is held out for eval (0: none)
    save_every: int = 1000
    keep_checkpoints: int = 2
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig(**_known(LoRAConfig, self.lora, "lora"))
        self.curriculum = [
            CurriculumPhase(**_known(CurriculumPhase, p, "curriculum")) if isinstance(p, dict) else p
            for p in self.curriculum
        ]
        if not self.curriculum or self.curriculum[-1].until != 1.0:
            raise ValueError("curriculum: the last phase must have until: 1.0")
        if any(a.until >= b.until for a, b in zip(self.curriculum, self.curriculum[1:])):
            raise ValueError("curriculum: 'until' must increase from phase to phase")
        for name in ("max_length", "batch_size", "grad_accum", "log_every", "eval_every", "save_every"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be > 0, got {self.max_steps}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.precision not in PRECISION:
            raise ValueError(f"precision must be one of {PRECISION}, got {self.precision!r}")
        if self.lr_scheduler not in ("cosine", "linear", "constant_with_warmup"):
            raise ValueError(f"lr_scheduler must be cosine, linear or constant_with_warmup, got {self.lr_scheduler!r}")
        if self.num_workers < 0 or self.shuffle_buffer < 0 or self.eval_holdout < 0 or self.keep_checkpoints < 1:
            raise ValueError("num_workers, shuffle_buffer and eval_holdout must be >= 0, keep_checkpoints >= 1")
        if self.ocr_prompt is not None and (not isinstance(self.ocr_prompt, str) or not self.ocr_prompt):
            raise ValueError(f"ocr_prompt must be a non-empty string or null, got {self.ocr_prompt!r}")
        if self.ocr_text not in ("natural", "shuffled"):
            raise ValueError(f"ocr_text must be natural or shuffled, got {self.ocr_text!r}")
        if self.chat_history not in ("raw", "compressed"):
            raise ValueError(f"chat_history must be raw or compressed, got {self.chat_history!r}")
        if not 0 <= self.ocr_mix <= 1:
            raise ValueError(f"ocr_mix must be in [0, 1], got {self.ocr_mix!r}")
        if self.ocr_mix and self.stage not in ("olm", "sft"):
            raise ValueError(f"ocr_mix mixes MT-OCR samples into the olm and sft stages, not {self.stage!r}")
        for name in ("recall_samples", "chunk_start_samples", "prompt_samples", "needle_samples", "copy_samples"):
            v = getattr(self, name)
            if not 0 <= v <= 16:
                raise ValueError(f"{name} must be in [0, 16] (samples per OLM window), got {v!r}")
            if v and self.stage != "olm":
                raise ValueError(f"{name} adds memory-use samples to the olm stage, not {self.stage!r}")
        if not 0 <= self.lm_repeats <= 16:
            raise ValueError(f"lm_repeats must be in [0, 16] (planted repeats per LM window), got {self.lm_repeats!r}")
        if self.lm_repeats and self.stage != "lm":
            raise ValueError(f"lm_repeats plants repeats in the lm stage's windows, not {self.stage!r}")
        if self.chunk_start_tokens <= 0:
            raise ValueError(f"chunk_start_tokens must be > 0, got {self.chunk_start_tokens}")
        if self.copy_tokens < 8:
            raise ValueError(f"copy_tokens must be >= 8, got {self.copy_tokens}")
        if self.prompt_sample_tokens <= 0:
            raise ValueError(f"prompt_sample_tokens must be > 0, got {self.prompt_sample_tokens}")
        if self.aux_char_weight < 0 or not 0 < self.aux_char_until <= 1:
            raise ValueError("aux_char_weight must be >= 0 and aux_char_until in (0, 1]; got "
                             f"{self.aux_char_weight}, {self.aux_char_until}")
        if self.twin_weight < 0 or not 0 < self.twin_until <= 1 or self.twin_span <= 0:
            raise ValueError("twin_weight must be >= 0, twin_until in (0, 1], twin_span > 0; got "
                             f"{self.twin_weight}, {self.twin_until}, {self.twin_span}")
        if self.twin_weight and self.stage != "olm":
            raise ValueError(f"twin_weight compares OLM samples with their text twins (olm), not {self.stage!r}")
        if self.aux_page_weight < 0 or not 0 < self.aux_page_until <= 1 or self.vision_lr_scale <= 0:
            raise ValueError("aux_page_weight must be >= 0, aux_page_until in (0, 1], vision_lr_scale > 0; got "
                             f"{self.aux_page_weight}, {self.aux_page_until}, {self.vision_lr_scale}")
        if self.lora.enabled and not self.train_llm:
            raise ValueError("lora.enabled needs train_llm: true (the adapters are the LLM's trainable part)")
        if self.stage == "lm" and (self.train_vision or self.train_aligner):
            raise ValueError("stage lm reads no images: train_vision and train_aligner must be false")
        if not (self.train_vision or self.train_aligner or self.train_llm):
            raise ValueError("nothing trains: set at least one of train_vision, train_aligner, train_llm")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        d = self.to_dict()
        d.update(changes)
        return TrainConfig(**d)


# Table 8 of the paper, one entry per stage; everything else takes the dataclass defaults.
_PRESETS: dict[str, dict[str, Any]] = {
    # backbone: plain causal LM on text, no images (what a pretrained Qwen3 brings; needed from scratch)
    "lm": dict(train_vision=False, train_aligner=False, train_llm=True, max_length=1024, learning_rate=5e-4),
    # PT-1: [v, caption]; only the aligner learns to speak the LLM's language
    "caption": dict(train_vision=False, train_aligner=True, train_llm=False, max_length=1024, learning_rate=5e-4),
    # PT-2: [v1 c1 v2 c2 ...] multi-turn OCR; the tower learns to read rendered text
    # (max_length: Table 8 says 4096, which holds 3 images of 1024 + 256 slots; the hard phase needs 8)
    "ocr": dict(train_vision=True, train_aligner=True, train_llm=False, max_length=10240, learning_rate=5e-4),
    # PT-3: [c1 v1 c2 v2 ... cn] with the sparse mask; the LLM learns to read its visual memory
    # (the aligner is optional in the paper; set train_aligner: false to freeze it)
    "olm": dict(train_vision=False, train_aligner=True, train_llm=True, max_length=8192, learning_rate=5e-4),
    # SFT: compressed query + response as OLM, loss on the response; everything trains
    # (train_vision: false, train_aligner: false gives the LLM-only variant)
    "sft": dict(train_vision=True, train_aligner=True, train_llm=True, max_length=8192, learning_rate=1e-5),
}


# Table 8's batch size per model size (VIST2-0.6B / 4B / 8B) and stage: packed rows of at most
# max_length slots per optimizer step, all devices together (the paper trained on 8 GPUs, some
# entries through gradient accumulation).
PAPER_BATCH: dict[str, dict[str, int]] = {
    "0.6b": {"caption": 96, "ocr": 64, "olm": 64, "sft": 64},
    "4b": {"caption": 64, "ocr": 32, "olm": 16, "sft": 16},
    "8b": {"caption": 48, "ocr": 24, "olm": 8, "sft": 8},
}


def paper_batch(size: str, stage: str, devices: int = 1, batch_size: int = 1) -> dict[str, int]:
    """``{"batch_size", "grad_accum"}`` giving Table 8's rows per optimizer step on ``devices`` devices.

    ``batch_size`` (rows per device and micro-step) is what fits in memory; gradient
    accumulation makes up the rest. Raises ``ValueError`` when they cannot multiply to the
    paper's batch exactly.

        >>> paper_batch("0.6b", "caption", devices=8)
        {'batch_size': 1, 'grad_accum': 12}
    """
    if size not in PAPER_BATCH:
        raise ValueError(f"paper_batch must be one of {sorted(PAPER_BATCH)} (the model size), got {size!r}")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if devices <= 0 or batch_size <= 0:
        raise ValueError(f"devices and batch_size must be > 0, got {devices} and {batch_size}")
    rows = PAPER_BATCH[size][stage]
    if rows % (batch_size * devices):
        raise ValueError(f"paper_batch {size!r}: the {stage} stage takes {rows} rows per optimizer step, which "
                         f"batch_size={batch_size} x devices={devices} does not divide (grad_accum must be whole)")
    return {"batch_size": batch_size, "grad_accum": rows // (batch_size * devices)}


_paper_batch = paper_batch  # load_config's argument of the same name shadows the function


def ocr_images_per_row(cfg: TrainConfig, chunk_tokens: int, n_visual: int, prompt_tokens: int = 0) -> int:
    """OCR images one sample can hold at ``cfg.max_length``; ``ValueError`` when the curriculum asks
    for more (a silently easier schedule would skip the paper's hard phase)."""
    text = cfg.ocr_tokens_per_image or chunk_tokens
    per_image = n_visual + prompt_tokens + text
    fits = (cfg.max_length - int(cfg.ocr_stop)) // per_image
    wants = max(p.max_images for p in cfg.curriculum)
    if wants > fits:
        raise ValueError(
            f"max_length={cfg.max_length} holds {fits} OCR images of {n_visual} visual + "
            f"{f'{prompt_tokens} prompt + ' if prompt_tokens else ''}{text} text tokens, but "
            f"the curriculum asks for up to {wants} per sample: raise max_length to "
            f"{wants * per_image + int(cfg.ocr_stop)}, or lower "
            f"the curriculum's max_images or ocr_tokens_per_image"
        )
    return fits


def stage_preset(stage: str, **overrides) -> TrainConfig:
    if stage not in _PRESETS:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return TrainConfig(stage=stage, **{**_PRESETS[stage], **overrides})


def _known(cls, values: dict, where: str) -> dict:
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return dict(values)


def load_config(stage: str | None, path: str | Path | None = None, paper_batch: str | None = None,
                devices: int | None = None, **overrides) -> TrainConfig:
    """The stage preset, updated by a YAML file (if given) and then by ``overrides`` (None values ignored).

    The YAML may name its stage; a different ``stage`` argument is an error, so a
    config written for OCR cannot silently drive SFT. ``paper_batch`` (``0.6b``, ``4b``,
    ``8b``) sets ``grad_accum`` so that ``batch_size x grad_accum x devices`` is Table 8's
    batch for that model size (it replaces a YAML's ``grad_accum``; a disagreeing
    ``grad_accum`` override is an error); ``devices`` defaults to ``$WORLD_SIZE`` (set by
    ``accelerate launch``), else 1.
    """
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config {p}: no such file")
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        values = _known(TrainConfig, loaded, f"config {p}")
        ystage = values.pop("stage", None)
        if stage is None:
            stage = ystage
        elif ystage is not None and ystage != stage:
            raise ValueError(f"config {p} is for stage {ystage!r}, but the stage is {stage!r}")
    if stage is None:
        raise ValueError("no stage given (--stage or 'stage:' in the config)")
    values.update({k: v for k, v in overrides.items() if v is not None})
    if paper_batch is not None:
        devices = devices or int(os.environ.get("WORLD_SIZE", "1"))
        batch = _paper_batch(paper_batch, stage, devices, values.get("batch_size", 1))
        if overrides.get("grad_accum") not in (None, batch["grad_accum"]):  # a YAML's grad_accum gives way
            raise ValueError(f"paper_batch {paper_batch!r} on {devices} device(s) with batch_size="
                             f"{batch['batch_size']} needs grad_accum={batch['grad_accum']}, but "
                             f"grad_accum={overrides['grad_accum']} is given (drop one of the two)")
        values.update(batch)
    return stage_preset(stage, **values)

