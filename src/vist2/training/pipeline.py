"""The batch stream: records -> samples -> packed rows -> batches -> rendered pixels.

Two halves, so that resuming and parallel rendering stay exact:

1. the *cheap* half (:meth:`StageDataset.layouts`) reads, shuffles, tokenizes,
   lays out, deals the samples to the ranks and packs — a deterministic function
   of the seed, the rank and the epoch, numbering batches ``0, 1, 2, ...`` across
   epochs (it cycles the source; the trainer stops after its step budget). Every
   rank walks every record and keeps samples ``rank, rank + world, ...``, so a
   single long document trains on any number of processes;
2. the *expensive* half (:func:`render_batch`) loads caption images, renders
   chunk text and collates the plan. Batch ``i`` is rendered by DataLoader worker
   ``(i - skip) % num_workers``; every worker walks the cheap half and renders
   only its own batches, and the DataLoader hands batches back round-robin, so
   the order — and every pixel — is the same for any number of workers.

Resuming skips the first ``skip`` batches in the cheap half, without rendering.
Randomness (shuffle buffer, OCR images per sample) is seeded per epoch and per
record, never by worker.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from itertools import count
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..layout import IGNORE, Kind, Plan, collate
from .config import TrainConfig
from .data import SkipCounter, Source
from .stages import Item, StageBuilder


@dataclass
class Batch:
    plan: Plan
    pixel_values: torch.Tensor | None
    index: int  # global batch number in this rank's stream
    skipped: dict = field(default_factory=dict)  # records skipped while this batch was assembled
    n_tokens: int = 0  # real (non-pad) slots: text + visual
    n_targets: int = 0  # tokens with a loss


def _mix(*parts: int) -> int:
    """A stable seed from integers (Python's hash() of ints is stable too, but explicit is clearer)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h * 0x100000001B3 ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
    return h


def _shuffled(records: Iterator, buffer: int, rng: random.Random) -> Iterator:
    """A bounded shuffle buffer (streams larger than memory cannot be shuffled whole)."""
    if buffer <= 1:
        yield from records
        return
    buf = []
    for r in records:
        buf.append(r)
        if len(buf) >= buffer:
            yield buf.pop(rng.randrange(len(buf)))
    rng.shuffle(buf)
    yield from buf


def load_image(image, height: int, width: int) -> np.ndarray:
    """An image (path, PIL image, or HF ``{"bytes"|"path"}``) as uint8 RGB at the model's size."""
    import io

    from PIL import Image

    if isinstance(image, dict):
        image = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    im = image if hasattr(image, "convert") else Image.open(image)
    im = im.convert("RGB")
    if im.size != (width, height):
        im = im.resize((width, height), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def render_batch(rows: list[list[Item]], processor, index: int, skipped: dict, pad_multiple: int = 1) -> Batch:
    """Load images, collate the rows into a plan, render its chunks."""
    skipped = Counter(skipped)
    rc = processor.renderer.config
    kept_rows, images = [], []
    for row in rows:
        kept = []
        for it in row:
            if it.image is not None:
                try:
                    images.append(load_image(it.image, rc.height, rc.width))
                except Exception:  # a corrupt or unreadable image costs one sample, never the run
                    skipped["bad_image"] += 1
                    continue
            kept.append(it.sample)
        if kept:
            kept_rows.append(kept)
    if not kept_rows:  # every image in the batch was bad: an empty batch has no targets and loss 0
        kept_rows = [[]]
    longest = max(sum(len(s) for s in r) for r in kept_rows)
    pad_to = max(pad_multiple, -(-longest // pad_multiple) * pad_multiple)
    plan = collate(kept_rows, pad_to=pad_to)
    pixels = processor.pixels_for(plan.chunks, images) if plan.chunks else None
    return Batch(plan=plan, pixel_values=pixels, index=index, skipped=dict(skipped),
                 n_tokens=int((plan.kind != Kind.PAD).sum()), n_targets=int((plan.labels != IGNORE).sum()))


MIN_EVAL_SLICE = 256  # characters: a text whose 1/holdout share is at least this long is split, not held whole


def holdout_cut(text: str, holdout: int) -> int:
    """Where a text splits into training (before) and eval (after): its last ``1/holdout``,
    moved forward to the next whitespace (within 64 characters) so no word is cut.

        >>> text = "word " * 1000
        >>> cut = holdout_cut(text, 100)
        >>> cut, text[cut - 5:cut + 5]
        (4955, 'word word ')
    """
    cut = len(text) - len(text) // holdout
    for i in range(cut, min(cut + 64, len(text))):
        if text[i].isspace():
            return i + 1
    return cut


class _RankRows:
    """One rank's rows and batches, fed one sample at a time: :func:`~vist2.training.stages.pack`
    turned around (the same greedy rule), so a rank can also follow another's batch count."""

    def __init__(self, cfg: TrainConfig):
        self.max_length, self.pack, self.batch_size = cfg.max_length, cfg.pack, cfg.batch_size
        self.row, self.used, self.rows, self.batch_index = [], 0, [], 0

    def push(self, it: Item) -> list[list[Item]] | None:
        """Add a sample; returns a batch (``batch_size`` rows) when this one completes it."""
        n = len(it)
        if n > self.max_length:
            raise ValueError(f"a sample of {n} slots is longer than max_length={self.max_length}")
        done = None
        if self.row and (not self.pack or self.used + n > self.max_length):
            done = self._close_row()
        self.row.append(it)
        self.used += n
        return done

    def _close_row(self) -> list[list[Item]] | None:
        self.rows.append(self.row)
        self.row, self.used = [], 0
        if len(self.rows) < self.batch_size:
            return None
        rows, self.rows = self.rows, []
        self.batch_index += 1
        return rows

    def end_epoch(self) -> list[list[list[Item]]]:
        """The epoch's last batches: the open row closed, a short batch of what is left."""
        out = [b for b in [self._close_row() if self.row else None] if b is not None]
        if self.rows:
            out.append(self.rows)
            self.rows = []
            self.batch_index += 1
        return out


class StageDataset(IterableDataset):
    """Batches of one stage for one rank (see the module docstring for the order guarantees).

    ``split="train"`` cycles the source forever (minus held-out records);
    ``split="eval"`` is one pass over the held-out records (or a separate eval source).
    """

    def __init__(self, source: Source, builder: StageBuilder, processor, cfg: TrainConfig, *,
                 split: str = "train", holdout: int = 0, rank: int = 0, world: int = 1,
                 total_steps: int | None = None, skip: int = 0, pad_multiple: int = 1,
                 max_batches: int | None = None):
        self.source, self.builder, self.processor, self.cfg = source, builder, processor, cfg
        self.split, self.holdout, self.rank, self.world = split, holdout, rank, world
        self.total_steps, self.skip, self.pad_multiple, self.max_batches = total_steps, skip, pad_multiple, max_batches

    def _progress(self, batch_index: int) -> float:
        if not self.total_steps:
            return 0.0  # counting pass: the curriculum's first phase
        return min(1.0, (batch_index // self.cfg.grad_accum) / self.total_steps)

    def _keep(self, idx: int) -> bool:
        """Is raw record ``idx`` in this split? Held-out records are every ``holdout``-th (a long
        text is split instead, see :func:`holdout_cut`)."""
        return not self.holdout or (idx % self.holdout == 0) == (self.split == "eval")

    def _records(self, counter: SkipCounter) -> Iterator[tuple[int, dict]]:
        if not self.holdout:
            yield from self.source.records(self.cfg.stage, skipped=counter)
            return
        # Records are read on both splits here: a text long enough is split (its end held out, so a
        # single book can be trained on), any other record goes whole to the split _keep gives it.
        for idx, rec in self.source.records(self.cfg.stage, skipped=counter):
            text = rec.get("text")
            if isinstance(text, str) and len(text) >= self.holdout * MIN_EVAL_SLICE:
                cut = holdout_cut(text, self.holdout)
                yield idx, {**rec, "text": text[cut:] if self.split == "eval" else text[:cut]}
            elif self._keep(idx):
                yield idx, rec

    def samples(self, epoch: int, counter: SkipCounter, progress=lambda: 0.0) -> Iterator[Item]:
        """Every sample of one epoch, the same on every rank: the split's records in the epoch's
        shuffled order, each laid out with ``progress()`` (0..1 of the run, for the curriculum)."""
        cfg = self.cfg
        records = self._records(counter)
        if self.split == "train":  # rank 0's seed on every rank (one process keeps its order from before sharding)
            records = _shuffled(records, cfg.shuffle_buffer, random.Random(_mix(cfg.seed, epoch, 0)))
        for idx, rec in records:
            its, reason = self.builder.items(rec, random.Random(_mix(cfg.seed, epoch, idx)), progress())
            if reason:
                counter[reason] += 1
            yield from its

    def layouts(self, one_epoch: bool = False) -> Iterator[tuple[int, list[list[Item]], dict]]:
        """The cheap half: (batch index, rows of items, skips since the previous batch).

        Data parallel deals *samples*, not records: every rank lays out every record and takes
        samples ``rank, rank + world, ...`` of the epoch, so one long document feeds every rank and
        the ranks' shares are the epoch's samples, each once. The curriculum's progress is rank 0's
        batch count (tracked on every rank), so all ranks lay a record out alike."""
        cfg = self.cfg
        counter, last = SkipCounter(), Counter()
        mine = _RankRows(cfg)
        lead = mine if self.rank == 0 else _RankRows(cfg)

        def batch(rows):
            nonlocal last
            delta = dict(counter - last) if self.rank == 0 else {}  # rank 0 counts the skips of all
            last = Counter(counter)
            return mine.batch_index - 1, rows, delta

        epochs = count() if self.split == "train" and not one_epoch else range(1)
        for epoch in epochs:
            dealt = 0
            for it in self.samples(epoch, counter, lambda: self._progress(lead.batch_index)):
                owner, dealt = dealt % self.world, dealt + 1
                if owner == self.rank:
                    if (rows := mine.push(it)) is not None:
                        yield batch(rows)
                        if self.max_batches is not None and mine.batch_index >= self.max_batches:
                            return
                elif owner == 0:  # rank 0's batch count, for the curriculum's progress
                    lead.push(it)
            if dealt < self.world and self.split == "train":  # every rank knows it: all raise, none waits
                raise ValueError(self._too_few(dealt, counter))
            for rows in mine.end_epoch():
                yield batch(rows)
                if self.max_batches is not None and mine.batch_index >= self.max_batches:
                    return
            if lead is not mine:
                lead.end_epoch()
            if not dealt:
                return  # an eval split with nothing in it

    def shortfall(self) -> str | None:
        """The error every rank would stop with when an epoch has fewer samples than ranks (the
        same on every rank), else None. Cheap: it stops at the ``world``-th sample."""
        counter, dealt = SkipCounter(), 0
        for _ in self.samples(0, counter):
            dealt += 1
            if dealt >= self.world:
                return None
        return self._too_few(dealt, counter)

    def _too_few(self, dealt: int, counter: SkipCounter) -> str:
        """Why an epoch of the training split gave some rank no sample (the same words on every rank)."""
        cfg = self.cfg
        what = f"{self.source.path}: no usable training samples for stage {cfg.stage!r} ({counter.report()}"
        if dealt:
            return (f"{self.source.path}: {dealt} training sample{'s' if dealt > 1 else ''} for stage {cfg.stage!r}, "
                    f"fewer than the {self.world} processes, so some process has nothing to train on: give more "
                    f"data, a shorter --max-length, or launch fewer processes")
        if self.holdout:
            return what + (f"; every {self.holdout}-th record, from the first, is held out for eval, and a text "
                           f"shorter than {self.holdout * MIN_EVAL_SLICE} characters is held out whole: pass "
                           f"--eval-data FILE, or set eval_holdout: 0 in a --config file (no eval))")
        return what + ")"

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for i, rows, skipped in self.layouts():
            if i < self.skip or (i - self.skip) % nw != wid:
                continue
            yield render_batch(rows, self.processor, i, skipped, self.pad_multiple)

    def count_batches(self) -> int:
        """Batches in one epoch (train) or the whole pass (eval), from the cheap half alone.

        ``total_steps`` is unknown while counting, so the OCR curriculum sits at its
        first phase; with packing, images per sample barely change the row count.
        """
        n = 0
        for i, _, _ in self.layouts(one_epoch=True):
            n = i + 1
        return n


def make_loader(ds: StageDataset, num_workers: int) -> DataLoader:
    # batch_size=None: the dataset yields finished batches; workers fork with the tokenizer
    # and renderer already built (Renderer pickles by config)
    return DataLoader(ds, batch_size=None, num_workers=num_workers, collate_fn=lambda b: b,
                      prefetch_factor=2 if num_workers else None, persistent_workers=False)
