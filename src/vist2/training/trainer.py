"""The trainer: one stage of VIST2 on ``accelerate`` (one GPU, many GPUs, or CPU).

    vist2 train --stage olm --model runs/tiny --data data/text_en.jsonl --out runs/olm --max-steps 200
    accelerate launch --config_file configs/accelerate/ddp.yaml -m vist2.training train \\
        --stage olm --model runs/vist2-0.6b --data corpus/ --out runs/olm-0.6b --config configs/olm.yaml

What it does, in order: load the model (fp32 master weights; bf16 autocast on
GPU), freeze what the stage does not train (optionally LoRA on the LLM), open
and check the data, fix the number of optimizer steps (``max_steps``, or one
epoch counted from the data), then loop: micro-batches with gradient
accumulation, clipping, AdamW, warm-up + cosine; a tqdm bar with loss, LR and
tokens/s; TensorBoard scalars under ``OUT/logs``; eval loss every
``eval_every`` steps; atomic checkpoints under ``OUT/checkpoints`` (weights as
safetensors, optimizer, scheduler, RNG states, data position). ``--resume``
continues from the newest complete checkpoint exactly: the data stream skips
the batches already consumed, and the RNG states come back.

The result in ``OUT`` is an ordinary HF folder (``save_pretrained`` + tokenizer;
LoRA merged) that ``vist2 generate --model OUT`` loads.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..layout import IGNORE
from ..runtime import default_device, require_checkpoint, write_json
from .checkpoint import STATE_FILE, atomic_dir, checkpoint_name, clean_partial, latest_checkpoint, prune
from .config import TrainConfig
from .data import SkipCounter, check_source, open_source
from .pipeline import StageDataset, make_loader
from .page_loss import PageLoss
from .probe import PROBED_STAGES, VisualProbe
from .probe import report as report_probe
from .stages import StageBuilder

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    out: Path
    steps: int
    total_steps: int
    last_loss: float | None = None
    eval_loss: float | None = None
    skipped: dict = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    probe: dict | None = None  # the last eval's visual-path probe (blind gap, aligner spread, collapse)


def runtime_choices(cfg: TrainConfig, device_type: str) -> tuple[str, str, int]:
    """(mixed precision, attention implementation, row padding multiple) for this device."""
    gpu = device_type == "cuda"
    precision = {"auto": "bf16" if gpu else "no", "bf16": "bf16", "fp32": "no"}[cfg.precision]
    attention = cfg.attention
    if attention == "auto":
        attention = "flex" if gpu else "sdpa"
    if attention == "flex" and not gpu:
        raise ValueError("attention: flex needs a CUDA device; use sdpa (the dense mask) on CPU")
    # FlexAttention's block mask needs the row length to be a multiple of its block size
    return precision, ("flex_attention" if attention == "flex" else attention), (128 if attention == "flex" else 8)


def set_attention(model, impl: str) -> None:
    # the VIST2 config decides which mask the model builds; the LLM's own config which kernel runs
    model.config.text_config._attn_implementation = impl
    model.model.language_model.config._attn_implementation = impl


def apply_trainable(model, cfg: TrainConfig):
    """Freeze / unfreeze by stage; with LoRA the LLM stays frozen and adapters train. Returns the model."""
    model.set_trainable(vision=cfg.train_vision, aligner=cfg.train_aligner, llm=cfg.train_llm and not cfg.lora.enabled)
    if cfg.lora.enabled:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise ValueError("lora.enabled needs the peft package: pip install peft") from e
        lc = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                        target_modules=list(cfg.lora.target_modules))
        model.model.language_model = get_peft_model(model.model.language_model, lc)
    return model


def merge_lora(model) -> None:
    lm = model.model.language_model
    if hasattr(lm, "merge_and_unload"):
        model.model.language_model = lm.merge_and_unload()


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter trains: check train_vision / train_aligner / train_llm")
    # weight decay on matrices only: decaying norms and biases toward 0 fights their role; the vision
    # tower and aligner at learning_rate x vision_lr_scale
    groups = []
    for visual in (False, True):
        lr = cfg.learning_rate * (cfg.vision_lr_scale if visual else 1.0)
        part = [p for n, p in params if _is_visual(n) == visual]
        groups += [{"params": [p for p in part if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr": lr},
                   {"params": [p for p in part if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def _is_visual(name: str) -> bool:
    return name.startswith(("model.vision.", "model.aligner.", "vision.", "aligner."))


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


class Trainer:
    def __init__(self, cfg: TrainConfig, model_dir: str | Path, data: str | Path, out: str | Path,
                 eval_data: str | Path | None = None, resume: bool = False, progress: bool = True):
        self.cfg, self.model_dir, self.data, self.out = cfg, Path(model_dir), Path(data), Path(out)
        self.eval_data = Path(eval_data) if eval_data else None
        self.resume, self.progress = resume, progress
        self.ckpt_root = self.out / "checkpoints"

    # -- setup ------------------------------------------------------------------------

    def _accelerator(self, precision: str):
        from accelerate import Accelerator, DistributedDataParallelKwargs

        cfg = self.cfg
        # a batch without images leaves the vision tower and aligner idle; DDP must allow that
        unused = cfg.stage in ("olm", "sft") and (cfg.train_vision or cfg.train_aligner)
        return Accelerator(
            gradient_accumulation_steps=cfg.grad_accum, mixed_precision=precision,
            log_with="tensorboard" if _tensorboard_available() else None, project_dir=str(self.out),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)],
        )

    def _datasets(self, processor, model_cfg, acc, total_steps, skip, pad_multiple):
        cfg = self.cfg
        builder = StageBuilder(cfg, processor.tokenizer, model_cfg.chunk_tokens, model_cfg.n_visual,
                               model_cfg.prompt_encoding)
        source = open_source(self.data, streaming=cfg.streaming)
        check_source(source, cfg.stage, "--data")
        holdout = 0 if self.eval_data else cfg.eval_holdout
        kw = dict(rank=acc.process_index, world=acc.num_processes, pad_multiple=pad_multiple)
        train = StageDataset(source, builder, processor, cfg, split="train", holdout=holdout,
                             total_steps=total_steps, skip=skip, **kw)
        if self.eval_data:
            esource = open_source(self.eval_data, streaming=cfg.streaming)
            check_source(esource, cfg.stage, "--eval-data")
        else:
            esource = source
        evals = StageDataset(esource, builder, processor, cfg, split="eval", holdout=holdout,
                             max_batches=cfg.eval_batches, **kw) if (self.eval_data or holdout) else None
        return train, evals

    def _total_steps(self, train: StageDataset, acc) -> int:
        cfg = self.cfg
        if cfg.max_steps:
            return cfg.max_steps
        if cfg.streaming:
            raise ValueError("streaming: true needs max_steps (a stream has no known length)")
        n = torch.tensor(train.count_batches(), device=acc.device)
        n = int(acc.reduce(n, "min")) if acc.num_processes > 1 else int(n)  # every rank must stop together
        return max(1, math.ceil(cfg.epochs * n / cfg.grad_accum))

    # -- the run ----------------------------------------------------------------------

    def train(self, stop_after: int | None = None) -> TrainResult:
        """Run the stage; ``stop_after`` ends the loop after that many steps without the final
        save (what a preempted job looks like; used by the resume tests)."""
        from accelerate.utils import gather_object
        from tqdm.auto import tqdm

        from ..modeling import VIST2ForCausalLM
        from ..processing import VIST2Processor

        cfg = self.cfg
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork after tokenizing
        require_checkpoint(self.model_dir)
        device_type = default_device()
        precision, attn, pad_multiple = runtime_choices(cfg, device_type)
        acc = self._accelerator(precision)
        main = acc.is_main_process

        state = None
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            clean_partial(self.ckpt_root)
        acc.wait_for_everyone()
        latest = latest_checkpoint(self.ckpt_root)
        if latest is not None and not self.resume:
            raise ValueError(f"--out {self.out} already has checkpoints ({latest.name}); "
                             f"pass --resume to continue, or choose another --out")
        if self.resume:
            if latest is None:
                log.warning("--resume: no checkpoint in %s yet; starting from the beginning", self.ckpt_root)
            else:
                import json

                state = json.loads((latest / STATE_FILE).read_text(encoding="utf-8"))
                if state.get("stage") != cfg.stage:
                    raise ValueError(f"--resume: the checkpoint is for stage {state.get('stage')!r}, not {cfg.stage!r}")

        acc.wait_for_everyone()
        torch.manual_seed(cfg.seed)
        processor = VIST2Processor.from_pretrained(self.model_dir)
        model = VIST2ForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32)
        original_attn = model.config.text_config._attn_implementation
        set_attention(model, attn)
        apply_trainable(model, cfg)
        if cfg.gradient_checkpointing:
            # non-reentrant: frozen embeddings give inputs without grad, which reentrant checkpointing drops
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())

        skip = int(state["batches"]) if state else 0
        train_ds, eval_ds = self._datasets(processor, model.config, acc, None, skip, pad_multiple)
        total = int(cfg.max_steps or (state["total_steps"] if state else self._total_steps(train_ds, acc)))
        train_ds.total_steps = total

        optimizer = make_optimizer(model, cfg)
        scheduler = make_scheduler(optimizer, cfg, total)
        ds_plugin = getattr(acc.state, "deepspeed_plugin", None)
        if ds_plugin is not None:
            # DeepSpeed reads the micro-batch size off a prepared DataLoader; ours is not prepared
            # (every rank builds its own shard), so it is given here
            ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        page_loss = PageLoss.build(cfg, model)  # from scratch: visual tokens redraw their page (optional)
        model, optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(scheduler)  # stepped by hand: once per optimizer step, on every rank
        step, batches = 0, 0
        skipped = SkipCounter()
        if state:
            acc.load_state(str(latest))
            step, batches = int(state["step"]), int(state["batches"])
            if main:
                skipped.update(state.get("skipped", {}))
        if main:
            log.info("stage %s: %d of %d parameters train; %d steps of %d micro-batches x %d rows x %d slots",
                     cfg.stage, n_train, n_all, total, cfg.grad_accum, cfg.batch_size, cfg.max_length)
            if acc.log_with:
                acc.init_trackers("train", config={k: v for k, v in cfg.to_dict().items()
                                                   if isinstance(v, (int, float, str, bool))})

        def save(at_step: int) -> None:
            gathered = gather_object([dict(skipped)])
            total_skipped = sum((Counter(d) for d in gathered), Counter())
            with atomic_dir(self.ckpt_root / checkpoint_name(at_step), main, acc.wait_for_everyone) as tmp:
                acc.save_state(str(tmp), safe_serialization=True)
                if main:  # written last: its presence with complete=true marks a whole checkpoint
                    write_json(tmp / STATE_FILE, {
                        "complete": True, "stage": cfg.stage, "step": at_step, "batches": batches,
                        "total_steps": total, "skipped": dict(total_skipped), "config": cfg.to_dict(),
                        "world_size": acc.num_processes,
                    })
            if main:
                prune(self.ckpt_root, cfg.keep_checkpoints)

        result = TrainResult(out=self.out, steps=step, total_steps=total)
        bar = tqdm(total=total, initial=step, disable=not (main and self.progress), dynamic_ncols=True,
                   desc=f"{cfg.stage}")
        def fresh_window():
            return torch.zeros((), device=acc.device), 0, 0, time.perf_counter()

        window_loss, window_n, window_tokens, t_window = fresh_window()
        t_start, tokens_all = time.perf_counter(), 0
        model.train()
        loader = make_loader(train_ds, cfg.num_workers)
        if step < total:
            for batch in loader:
                skipped.update(batch.skipped)
                with acc.accumulate(model):
                    out = model(plan=batch.plan, logits_at_targets=True, pixel_values=None if batch.pixel_values is None
                                else batch.pixel_values.to(acc.device))
                    acc.backward(out.loss + (page_loss.loss(batch.pixel_values, step / total) if page_loss else 0.0))
                    if acc.sync_gradients and cfg.max_grad_norm:
                        acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if page_loss and acc.sync_gradients:
                        page_loss.step()
                batches += 1
                window_loss += out.loss.detach().float()  # stays on the device: no sync per micro-batch
                window_n += 1
                window_tokens += batch.n_tokens
                if not acc.sync_gradients:
                    continue
                scheduler.step()
                step += 1
                bar.update(1)
                if step % cfg.log_every == 0 or step == total:
                    counts = torch.tensor([window_n, window_tokens], dtype=torch.float64, device=acc.device)
                    stats = acc.reduce(torch.cat([window_loss.double()[None], counts]), "sum")
                    loss = float(stats[0] / max(stats[1], 1))
                    dt = time.perf_counter() - t_window
                    tps = float(stats[2]) / max(dt, 1e-9)
                    tokens_all += int(stats[2])
                    lr = scheduler.get_last_lr()[0]
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                    acc.log({"train/loss": loss, "train/lr": lr, "train/tokens_per_s": tps}, step=step)
                    if page_loss and page_loss.last is not None:
                        acc.log({"train/page_loss": page_loss.last}, step=step)
                    result.last_loss = loss
                    window_loss, window_n, window_tokens, t_window = fresh_window()
                if eval_ds is not None and (step % cfg.eval_every == 0 or step == total):
                    result.eval_loss = self.evaluate(model, eval_ds, acc)
                    if result.eval_loss is not None:
                        acc.log({"eval/loss": result.eval_loss}, step=step)
                        if main and self.progress:
                            bar.write(f"step {step}: eval loss {result.eval_loss:.4f}")
                    if self.probe is not None:  # is the visual path alive? (warns on a collapse)
                        warm = step >= max(math.ceil(cfg.warmup_ratio * total), total // 10, 1)
                        result.probe = report_probe(self.probe, step, warm, acc.log,
                                                    bar.write if main and self.progress else None, main)
                    model.train()
                if step % cfg.save_every == 0 and step < total:
                    save(step)
                if stop_after is not None and step >= stop_after and step < total:
                    result.stopped_early = True
                    break
                if step >= total:
                    break
        bar.close()
        result.steps = step
        result.tokens, result.seconds = tokens_all, time.perf_counter() - t_start
        gathered = gather_object([dict(skipped)])
        result.skipped = dict(sum((Counter(d) for d in gathered), Counter()))
        if result.stopped_early:
            acc.end_training()
            return result
        save(step)  # the final state, so a longer follow-up run (more --max-steps) can resume
        self._export(model, acc, processor, original_attn, result)
        acc.end_training()
        return result

    def evaluate(self, model, eval_ds: StageDataset, acc) -> float | None:
        """Mean loss per target token over the eval batches (all ranks together)."""
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=acc.device)
        probe = (VisualProbe(acc.unwrap_model(model), blank=eval_ds.processor.renderer.config.background / 255)
                 if self.cfg.stage in PROBED_STAGES else None)
        with torch.no_grad():
            for batch in make_loader(eval_ds, 0):
                out = model(plan=batch.plan, logits_at_targets=True, pixel_values=None if batch.pixel_values is None
                            else batch.pixel_values.to(acc.device))
                n = int((batch.plan.labels != IGNORE).sum())
                total += torch.tensor([float(out.loss) * n, n], dtype=torch.float64, device=acc.device)
                if probe is not None and batch.pixel_values is not None:  # the same batch with blank pages
                    probe.observe(model, batch.plan, batch.pixel_values.to(acc.device), float(out.loss), n)
        total = acc.reduce(total, "sum")
        self.probe = probe.finish(lambda t: acc.reduce(t, "sum")) if probe is not None else None
        return float(total[0] / total[1]) if total[1] > 0 else None

    def _export(self, model, acc, processor, original_attn: str, result: TrainResult) -> None:
        """Write OUT as an ordinary HF folder (LoRA merged), plus train_summary.json."""
        acc.wait_for_everyone()
        state_dict = acc.get_state_dict(model)  # gathers FSDP / DeepSpeed shards on every rank
        if acc.is_main_process:
            m = acc.unwrap_model(model)
            if self.cfg.lora.enabled:
                merge_lora(m)
                state_dict = m.state_dict()
            if self.cfg.gradient_checkpointing:
                m.gradient_checkpointing_disable()
            set_attention(m, original_attn)  # inference picks its own kernel
            m.save_pretrained(str(self.out), state_dict=state_dict, safe_serialization=True)
            processor.tokenizer.save_pretrained(str(self.out))
            write_json(self.out / "train_summary.json", {
                "stage": self.cfg.stage, "steps": result.steps, "total_steps": result.total_steps,
                "last_loss": result.last_loss, "eval_loss": result.eval_loss, "skipped": result.skipped,
                "tokens": result.tokens, "seconds": round(result.seconds, 3), "config": self.cfg.to_dict(),
                "probe": result.probe,
            })
            log.info("records skipped: %s", SkipCounter(result.skipped).report())
        acc.wait_for_everyone()
