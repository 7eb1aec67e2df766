"""The trainer: one stage of VIST2 on ``accelerate`` (one GPU, many GPUs, or CPU).

    vist2 train --stage olm --model runs/tiny --data data/text_en.jsonl --out runs/olm --max-steps 200
    accelerate launch --config_file configs/accelerate/ddp.yaml -m vist2.training train \\
        --stage olm --model runs/vist2-0.6b --data corpus/ --out runs/olm-0.6b --config configs/olm.yaml

What it does, in order: load the model (fp32 master weights; bf16 autocast on
GPU), freeze what the stage does not train (optionally LoRA on the LLM), open
and check the data, fix the number of optimizer steps (``max_steps``, or one
epoch counted from the data), then loop: micro-batches with gradient
accumulation, clipping, AdamW, warm-up + cosine; a tqdm bar with loss, LR and
tokens/s (with ``--no-progress``: a printed line every ``log_every`` steps);
TensorBoard scalars under ``OUT/logs``; eval loss every ``eval_every`` steps;
atomic checkpoints under ``OUT/checkpoints`` (each step folder is a model folder
that generate / eval / serve load, plus the training state: optimizer,
scheduler, RNG states, data position). Every model folder it writes records how
it was made in ``provenance.json`` (:mod:`vist2.training.provenance`). On CPU, torch uses half the cores unless
``OMP_NUM_THREADS`` says otherwise. ``--resume``
continues from the newest complete checkpoint exactly: the data stream skips
the batches already consumed, and the RNG states come back.

The result in ``OUT`` is an ordinary HF folder (the model and its processor saved;
LoRA merged) that ``vist2 generate --model OUT`` loads.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..layout import IGNORE
from ..runtime import default_device, require_checkpoint, write_json
from .checkpoint_manager import CheckpointManager
from .config import TrainConfig
from .data import SkipCounter, check_source, open_source
from .launch import make_accelerator
from .metrics import StepLog, all_ranks
from .optim import make_optimizer, make_scheduler  # noqa: F401 (part of this module's interface)
from .losses import build_aux_losses
from .pipeline import StageDataset, make_loader
from .probe import PROBED_STAGES, VisualProbe
from .probe import report as report_probe
from .provenance import Provenance
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
    main: bool = True  # this process is the main one (its summary is the one to print)


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


def forward(model, batch, device):
    """The model's output (with ``loss``) on one batch, logits only where a target is."""
    pixels = None if batch.pixel_values is None else batch.pixel_values.to(device)
    return model(plan=batch.plan, loss_only=True, pixel_values=pixels)


def train_step(model, batch, optimizer, acc, max_grad_norm: float, aux_losses: Sequence = (),
               progress: float = 0.0) -> torch.Tensor:
    """One micro-batch: forward and backward; on the last micro-batch of an optimizer step also clip
    and step (``acc.accumulate`` turns ``optimizer.step`` into a no-op before that). Returns the LM
    loss, detached, on the device. ``aux_losses`` (:mod:`vist2.training.losses`) are added at
    ``progress`` (step / total) and step their own heads."""
    with acc.accumulate(model):
        out = forward(model, batch, acc.device)
        aux = sum((a.for_batch(batch, progress) for a in aux_losses), 0.0)
        acc.backward(out.loss + aux)
        if acc.sync_gradients and max_grad_norm:
            acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients:
            for a in aux_losses:
                a.step()
    return out.loss.detach()


@dataclass
class _Run:
    """What one ``Trainer.train`` call sets up and the loop's parts share."""

    acc: Any
    ckpt: CheckpointManager
    processor: Any
    model: Any
    optimizer: Any
    scheduler: Any
    train_ds: StageDataset
    eval_ds: StageDataset | None
    total: int
    attn: str  # the attention implementation for training
    original_attn: str  # the one the model was saved with; exported folders get it back
    result: TrainResult
    step: int = 0
    batches: int = 0  # micro-batches consumed (the data position a resume skips to)
    skipped: SkipCounter = field(default_factory=SkipCounter)
    aux_losses: list = field(default_factory=list)  # optional auxiliary losses (models trained from scratch)
    logged: dict = field(default_factory=dict)  # the scalars logged at the current step, for the callbacks

    def log(self, values: dict, step: int) -> None:
        """Every scalar of the run goes through here: to the trackers, and to the step's callbacks."""
        self.acc.log(values, step=step)
        self.logged.update(values)


class Trainer:
    """One stage's run. :meth:`train` is :meth:`_setup` (accelerator, resume point, model, data,
    optimizer), then :meth:`_loop`: :func:`train_step` per micro-batch and, after each optimizer
    step, :meth:`_after_step` (log through :class:`StepLog`, :meth:`_eval_step`, :meth:`_save`
    through :class:`~vist2.training.checkpoint_manager.CheckpointManager`), then the final save and export.

        res = Trainer(stage_preset("olm", max_steps=200), "runs/tiny", "data/text_en.jsonl", "runs/olm").train()

    ``callbacks`` are called after each optimizer step, on every rank, as ``callback(step, logged)``
    with the scalars logged at that step (``train/loss``, ``eval/loss``, ``probe/*``, ...; empty
    between log lines). One that returns True stops the run there, as a job that must end before
    its allocation does: the step is checkpointed (if it is not already), nothing is exported,
    ``TrainResult.stopped_early`` is set and ``--resume`` continues it. Any rank asking stops all.

        def out_of_time(step, logged):
            return time.time() > deadline
    """

    def __init__(self, cfg: TrainConfig, model_dir: str | Path, data: str | Path, out: str | Path,
                 eval_data: str | Path | None = None, resume: bool = False, progress: bool = True,
                 callbacks: Sequence[Callable[[int, dict], bool | None]] = ()):
        self.cfg, self.model_dir, self.data, self.out = cfg, Path(model_dir), Path(data), Path(out)
        self.eval_data = Path(eval_data) if eval_data else None
        self.resume, self.progress, self.callbacks = resume, progress, list(callbacks)
        self.ckpt_root = self.out / "checkpoints"
        self.probe = None  # the last eval's visual-path probe result (stages with images)
        self.provenance: Provenance | None = None  # what each saved model folder records (main process)

    # -- setup ------------------------------------------------------------------------

    def _datasets(self, processor, model_cfg, acc, total_steps, skip, pad_multiple):
        cfg = self.cfg
        if cfg.ocr_prompt is None:  # a reader trained to transcribe on a prompt keeps it in later stages
            cfg.ocr_prompt = getattr(model_cfg, "ocr_prompt", None)
        model_cfg.ocr_prompt = cfg.ocr_prompt  # saved with the model: eval and the demo transcribe with it
        builder = StageBuilder(cfg, processor.tokenizer, model_cfg.chunk_tokens, model_cfg.n_visual,
                               model_cfg.prompt_encoding, processor=processor)
        source = open_source(self.data, streaming=cfg.streaming)
        check_source(source, cfg.stage, "--data")
        holdout = 0 if self.eval_data else cfg.eval_holdout
        kw = dict(rank=acc.process_index, world=acc.num_processes, pad_multiple=pad_multiple)
        train = StageDataset(source, builder, processor, cfg, split="train", holdout=holdout,
                             total_steps=total_steps, skip=skip, **kw)
        # the same on every rank: all stop here, together (one process stops in its stream, no one waits)
        if acc.num_processes > 1 and (short := train.shortfall()) is not None:
            acc.wait_for_everyone()
            raise ValueError(short)
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

    def _load_model(self, attn: str):
        """The model in fp32 (master weights), with the stage's trainable parts; returns it and the
        attention implementation it was saved with (the exported folders get that one back)."""
        from ..modeling import VIST2ForCausalLM

        model = VIST2ForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32)
        original_attn = model.config.text_config._attn_implementation
        set_attention(model, attn)
        apply_trainable(model, self.cfg)
        if self.cfg.gradient_checkpointing:
            # non-reentrant: frozen embeddings give inputs without grad, which reentrant checkpointing drops
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, original_attn

    def _optimization(self, model, acc, total: int, processor):
        """AdamW and the LR schedule for ``total`` steps, the model and optimizer prepared by accelerate,
        and the auxiliary losses the config switches on (:mod:`vist2.training.losses`; none when all
        are off)."""
        cfg = self.cfg
        optimizer = make_optimizer(model, cfg)
        scheduler = make_scheduler(optimizer, cfg, total)
        ds_plugin = getattr(acc.state, "deepspeed_plugin", None)
        if ds_plugin is not None:
            # DeepSpeed reads the micro-batch size off a prepared DataLoader; ours is not prepared
            # (every rank builds its own shard), so it is given here
            ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        # from scratch: visual tokens redraw their page and name its characters; olm: the text twin
        aux = build_aux_losses(cfg, model, processor)
        model, optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(scheduler)  # stepped by hand: once per optimizer step, on every rank
        return model, optimizer, scheduler, aux

    def _setup(self) -> _Run:
        """Everything before the first step: device, accelerator, resume state, model, data, optimizer."""
        from ..processing import VIST2Processor

        cfg = self.cfg
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork after tokenizing
        require_checkpoint(self.model_dir)
        device_type = default_device()
        if device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(default_cpu_threads())
        precision, attn, pad_multiple = runtime_choices(cfg, device_type)
        acc = make_accelerator(cfg, self.out, precision)  # refuses a launch that is not one job
        ckpt = CheckpointManager(self.ckpt_root, acc, cfg)
        latest, state = ckpt.open(self.out, self.resume)

        torch.manual_seed(cfg.seed)
        processor = VIST2Processor.from_pretrained(self.model_dir)
        model, original_attn = self._load_model(attn)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        skip = int(state["batches"]) if state else 0
        train_ds, eval_ds = self._datasets(processor, model.config, acc, None, skip, pad_multiple)
        total = int(cfg.max_steps or (state["total_steps"] if state else self._total_steps(train_ds, acc)))
        train_ds.total_steps = total
        model, optimizer, scheduler, aux_losses = self._optimization(model, acc, total, processor)
        run = _Run(acc=acc, ckpt=ckpt, processor=processor, model=model, optimizer=optimizer, scheduler=scheduler,
                   aux_losses=aux_losses,
                   train_ds=train_ds, eval_ds=eval_ds, total=total, attn=attn, original_attn=original_attn,
                   result=TrainResult(out=self.out, steps=0, total_steps=total, main=acc.is_main_process))
        if state:
            ckpt.load(latest)
            run.step, run.batches = int(state["step"]), int(state["batches"])
            run.result.steps = run.step
            if acc.is_main_process:
                run.skipped.update(state.get("skipped", {}))
        if acc.is_main_process:
            self.provenance = Provenance(cfg, self.model_dir, self.data, self.eval_data, total, acc.num_processes,
                                         device_type, acc.distributed_type.value, run.step if state else None)
            log.info("stage %s: %d of %d parameters train; %d steps of %d micro-batches x %d rows x %d slots",
                     cfg.stage, n_train, n_all, total, cfg.grad_accum, cfg.batch_size, cfg.max_length)
            if acc.log_with:
                acc.init_trackers("train", config={k: v for k, v in cfg.to_dict().items()
                                                   if isinstance(v, (int, float, str, bool))})
        return run

    # -- the run ----------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Run the stage: to the last step (then save and export) or until a callback stops it."""
        run = self._setup()
        try:
            self._loop(run)
        finally:
            for a in run.aux_losses:  # their heads go; the model keeps no hook of theirs
                a.close()
        run.result.skipped = all_ranks(run.skipped)
        if not run.result.stopped_early:
            self._save(run)  # the final state, so a longer follow-up run (more --max-steps) can resume
            self._export(run.model, run.acc, run.processor, run.original_attn, run.result)
        run.acc.end_training()
        return run.result

    def _loop(self, run: _Run) -> None:
        """Micro-batches until ``run.total`` optimizer steps (or a callback stops the run)."""
        cfg, acc, result = self.cfg, run.acc, run.result
        logs = StepLog(acc, cfg.stage, run.total, run.step, self.progress, log=run.log)
        t_start = time.perf_counter()
        run.model.train()
        loader = make_loader(run.train_ds, cfg.num_workers)
        if run.step < run.total:
            for batch in loader:
                run.skipped.update(batch.skipped)
                loss = train_step(run.model, batch, run.optimizer, acc, cfg.max_grad_norm,
                                  run.aux_losses, run.step / run.total)
                run.batches += 1
                logs.add(loss, batch.n_tokens)
                if not acc.sync_gradients:
                    continue
                run.scheduler.step()
                run.step += 1
                self._after_step(run, logs)
                stop = self._callbacks_stop(run)
                if run.step >= run.total:
                    break
                if stop:
                    result.stopped_early = True
                    break
        logs.close()
        result.steps = run.step
        result.tokens, result.seconds = logs.tokens_all, time.perf_counter() - t_start

    def _after_step(self, run: _Run, logs: StepLog) -> None:
        """After each optimizer step, in this order: log the loss window, move the bar, evaluate, save.
        Anything else that runs once per optimizer step belongs here too."""
        cfg, step = self.cfg, run.step
        if step % cfg.log_every == 0 or step == run.total:
            run.result.last_loss = logs.flush(step, run.scheduler.get_last_lr()[0])
            for a in run.aux_losses:
                run.log(a.log_values(), step=step)
        logs.advance()
        if run.eval_ds is not None and (step % cfg.eval_every == 0 or step == run.total):
            self._eval_step(run, logs)
        if step % cfg.save_every == 0 and step < run.total:
            self._save(run)

    def _callbacks_stop(self, run: _Run) -> bool:
        """Call the callbacks with this step's scalars; True (on every rank) when any of them, on any
        rank, asks to stop before the last step; the step is then checkpointed unless
        :meth:`_after_step` just did."""
        logged, run.logged = run.logged, {}
        if not self.callbacks:
            return False
        ask = any([bool(cb(run.step, dict(logged))) for cb in self.callbacks])  # a list: every callback runs
        stop = float(run.acc.reduce(torch.tensor(float(ask), device=run.acc.device), "sum")) > 0
        stop = stop and run.step < run.total
        if stop and run.step % self.cfg.save_every:
            self._save(run)
        return stop

    def _eval_step(self, run: _Run, logs: StepLog) -> None:
        """Eval loss (logged and written) and, for stages with images, the visual-path probe."""
        step, result = run.step, run.result
        result.eval_loss = self.evaluate(run.model, run.eval_ds, run.acc)
        if result.eval_loss is not None:
            run.log({"eval/loss": result.eval_loss}, step=step)
            logs.write(f"step {step}: eval loss {result.eval_loss:.4f}")
        if self.probe is not None:  # is the visual path alive? (warns on a collapse)
            warm = step >= max(math.ceil(self.cfg.warmup_ratio * run.total), run.total // 10, 1)
            result.probe = report_probe(self.probe, step, warm, run.log, logs.writer(), logs.main)
        run.model.train()

    def _save(self, run: _Run) -> None:
        """A step folder for ``run.step`` (every rank takes part)."""
        state = {"stage": self.cfg.stage, "step": run.step, "batches": run.batches, "total_steps": run.total,
                 "skipped": all_ranks(run.skipped), "config": self.cfg.to_dict(),
                 "world_size": run.acc.num_processes}
        run.ckpt.save(run.step, run.model, state, lambda folder: self._write_model(
            folder, run.model, run.acc, run.processor, run.original_attn, run.step, final=False))

    def evaluate(self, model, eval_ds: StageDataset, acc) -> float | None:
        """Mean loss per target token over the eval batches (all ranks together)."""
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=acc.device)
        probe = (VisualProbe(acc.unwrap_model(model), blank=eval_ds.processor.renderer.config.background / 255)
                 if self.cfg.stage in PROBED_STAGES else None)
        with torch.no_grad():
            for batch in make_loader(eval_ds, 0):
                out = forward(model, batch, acc.device)
                n = int((batch.plan.labels != IGNORE).sum())
                total += torch.tensor([float(out.loss) * n, n], dtype=torch.float64, device=acc.device)
                if probe is not None and batch.pixel_values is not None:  # the same batch with blank pages
                    probe.observe(model, batch.plan, batch.pixel_values.to(acc.device), float(out.loss), n)
        total = acc.reduce(total, "sum")
        self.probe = probe.finish(lambda t: acc.reduce(t, "sum")) if probe is not None else None
        return float(total[0] / total[1]) if total[1] > 0 else None

    def _write_model(self, folder: Path, model, acc, processor, original_attn: str, steps: int,
                     final: bool) -> None:
        """``folder`` as an ordinary HF model folder (config with the render settings, safetensors
        weights, the processor: tokenizer and processor_config.json, and provenance.json), LoRA merged.
        Between steps LoRA is merged into a copy, and the model keeps training as it was. Every rank
        calls it (FSDP / DeepSpeed gather the weights on all of them); only the main process writes."""
        state_dict = acc.get_state_dict(model)
        if not acc.is_main_process:
            return
        m = acc.unwrap_model(model)
        if self.cfg.lora.enabled:
            if not final:
                m = copy.deepcopy(m)
            merge_lora(m)
            state_dict = m.state_dict()
        train_attn = m.config.text_config._attn_implementation
        set_attention(m, original_attn)  # inference picks its own kernel
        try:
            m.save_pretrained(str(folder), state_dict=state_dict, safe_serialization=True)
        finally:
            if not final:
                set_attention(m, train_attn)
        processor.save_pretrained(str(folder))
        self.provenance.write(folder, steps, final)

    def _export(self, model, acc, processor, original_attn: str, result: TrainResult) -> None:
        """Write OUT as an ordinary HF folder (LoRA merged), plus train_summary.json."""
        acc.wait_for_everyone()
        if self.cfg.gradient_checkpointing:
            acc.unwrap_model(model).gradient_checkpointing_disable()
        self._write_model(self.out, model, acc, processor, original_attn, result.steps, final=True)
        if acc.is_main_process:
            write_json(self.out / "train_summary.json", {
                "stage": self.cfg.stage, "steps": result.steps, "total_steps": result.total_steps,
                "last_loss": result.last_loss, "eval_loss": result.eval_loss, "skipped": result.skipped,
                "tokens": result.tokens, "seconds": round(result.seconds, 3), "config": self.cfg.to_dict(),
                "probe": result.probe,
            })
            log.info("records skipped: %s", SkipCounter(result.skipped).report())
        acc.wait_for_everyone()


def default_cpu_threads() -> int:
    """Torch threads for CPU training when ``OMP_NUM_THREADS`` does not say: half the cores.

    Tiny steps gain little from a second thread and lose a lot when other processes share the
    cores (bench/notes/train.md), so the default leaves room for the data workers and the rest.
    """
    return max(1, (os.cpu_count() or 1) // 2)
