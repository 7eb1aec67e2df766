"""Auxiliary character loss: every visual token must name the characters drawn in its region.

The page loss (:mod:`vist2.training.losses.page`) keeps a model trained from scratch from
collapsing, but it teaches the visual tokens to describe *pixels*; the LLM still has to find out
which token holds which word, and in the nano runs it learnt little more than where a page starts.
This loss is a reading signal local to each visual token. The renderer knows the cell of every
character it draws, so each visual token's region (the ``merge x merge`` block of
``patch x patch`` patches it was merged from) has a known set of character cells. A linear head
maps the aligner output to one classifier per cell of its region (the cells whose centre falls
in the region, in reading order) over a small alphabet: blank, printable ASCII, and "other". The
cross-entropy, over every cell of every page, is added to the stage loss with weight
``aux_char_weight`` while training progress is below ``aux_char_until``.

Because the head is linear, the characters must be linearly readable from each visual token: the
form in which the LLM can copy them. Like the page head, this head is not part of the model: it
has its own AdamW at the stage's learning rate and is dropped when training ends.

    >>> aux = CharLoss.build(cfg, model, processor)   # None when aux_char_weight is 0  # doctest: +SKIP
    >>> out = model(plan=plan, pixel_values=pixels)   # the hook records the aligner outputs  # doctest: +SKIP
    >>> loss = out.loss + aux.loss(texts, progress)   # texts: each image's chunk text  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...render import Renderer
from .page import AlignerHead

BLANK, OTHER = 0, 95
N_CLASSES = 96  # blank, the 94 printable ASCII characters '!'..'~', other
IGNORE = -100


def char_class(codes: np.ndarray) -> np.ndarray:
    """Codepoints -> classes: 0 for an empty cell or a space, 1..94 for ``!``..``~``, 95 otherwise.

    >>> char_class(np.array([0, 32, 33, 65, 126, 0x4E00])).tolist()
    [0, 0, 1, 33, 94, 95]
    """
    out = np.full(codes.shape, OTHER, np.int64)
    out[(codes == 0) | (codes == 32)] = BLANK
    ascii_ = (codes >= 33) & (codes <= 126)
    out[ascii_] = codes[ascii_] - 32
    return out


@dataclass(frozen=True)
class RegionMap:
    """Which cell of the page each region's classifier slot reads, at one font size.

    ``slot_cell[t, s]`` is the flat cell index (row * cols + col) read by slot ``s`` of visual token
    ``t`` (row-major over regions, as :func:`vist2.modeling.merge_patches`), or -1 where the region
    has fewer cells than the widest region.
    """

    slot_cell: np.ndarray  # (n_visual, slots)

    @property
    def slots(self) -> int:
        return self.slot_cell.shape[1]


@lru_cache(maxsize=64)
def region_map(width: int, height: int, margin: int, cell_w: int, cell_h: int, rows: int, cols: int,
               region: int) -> RegionMap:
    """Cells grouped by the region their centre falls in (see :class:`RegionMap`).

    >>> m = region_map(128, 128, 1, 5, 11, 11, 25, 32)
    >>> m.slot_cell.shape, int(m.slot_cell[0, 0]), int(m.slot_cell[1, 0])
    ((16, 21), 0, 6)
    """
    if width % region or height % region:
        raise ValueError(f"images {width}x{height} do not split into {region}x{region} regions")
    ry = (margin + np.arange(rows) * cell_h + cell_h / 2) // region  # region row of each cell row
    rx = (margin + np.arange(cols) * cell_w + cell_w / 2) // region
    n_ry, n_rx = height // region, width // region
    groups = [
        [r * cols + c for r in np.flatnonzero(ry == a) for c in np.flatnonzero(rx == b)]
        for a in range(n_ry)
        for b in range(n_rx)
    ]
    slots = max(1, max(len(g) for g in groups))
    out = np.full((len(groups), slots), -1, np.int64)
    for t, g in enumerate(groups):
        out[t, : len(g)] = g
    return RegionMap(out)


def char_targets(renderer: Renderer, texts: Sequence[str | None], region: int, slots: int) -> torch.Tensor:
    """``(N, n_visual, slots)`` class targets for the pages of ``texts`` (``IGNORE`` for slots a region
    does not have and for images that are not rendered text, ``None``). ``slots`` is at least the
    widest region's cell count at any font size the pages use."""
    cfg = renderer.config
    n_visual = (cfg.width // region) * (cfg.height // region)
    out = np.full((len(texts), n_visual, slots), IGNORE, np.int64)
    for i, text in enumerate(texts):
        if text is None:
            continue
        size, codes = renderer.cells(text)
        cw, ch, cols, rows = renderer.grid(size)
        m = region_map(cfg.width, cfg.height, cfg.margin, cw, ch, rows, cols, region)
        if m.slots > slots:
            raise ValueError(f"a page has {m.slots} cells per region, the head {slots}")
        flat = np.append(char_class(codes).reshape(-1), IGNORE)  # index -1 -> IGNORE
        out[i, :, : m.slots] = flat[m.slot_cell]
    return torch.from_numpy(out)


class CharLoss(AlignerHead):
    """The auxiliary character loss of one training run (see the module docstring)."""

    def __init__(self, model, processor, weight: float, until: float, lr: float):
        self.processor, self.renderer = processor, processor.renderer
        rc, region = self.renderer.config, model.config.patch_size * model.config.merge
        # the most slots any font size can give (the smallest cells), so one head serves every page
        cw, ch, cols, rows = self.renderer.grid(rc.min_font_size)
        self.slots = region_map(rc.width, rc.height, rc.margin, cw, ch, rows, cols, region).slots
        super().__init__(model, self.slots * N_CLASSES, weight, until, lr)
        self.last_acc: float | None = None  # accuracy on non-blank cells

    @classmethod
    def build(cls, cfg, model, processor) -> "CharLoss | None":
        if not cfg.aux_char_weight:
            return None
        return cls(model, processor, cfg.aux_char_weight, cfg.aux_char_until, cfg.learning_rate)

    def loss(self, texts: Sequence[str | None] | None, progress: float) -> torch.Tensor | float:
        """Weighted loss for the forward pass just run (0.0 past ``until`` or without images)."""
        out = self._take(progress)
        if not texts or out is None:
            return 0.0
        target = char_targets(self.renderer, texts, self.region, self.slots).to(out.device)
        if target.shape[:2] != out.shape[:2]:
            raise ValueError(f"{out.shape[1]} visual tokens per image but {target.shape[1]} page regions")
        logits = self.head(out.float()).view(*out.shape[:2], self.slots, N_CLASSES)
        loss = F.cross_entropy(logits.reshape(-1, N_CLASSES), target.reshape(-1), ignore_index=IGNORE)
        with torch.no_grad():
            ink = target > BLANK
            self.last_acc = float((logits.argmax(-1)[ink] == target[ink]).float().mean()) if ink.any() else None
        self.last = float(loss.detach())
        return self.weight * loss

    def for_batch(self, batch, progress: float) -> torch.Tensor | float:
        """:meth:`loss` for a training batch: the texts are its plan's chunk texts (rendered a second
        time here, as cells only: the pixels were drawn in a data-loader worker)."""
        texts = self.processor.chunk_texts(batch.plan.chunks) if batch.pixel_values is not None else None
        return self.loss(texts, progress)

    def log_values(self) -> dict:
        out = {} if self.last is None else {"train/char_loss": self.last}
        if self.last_acc is not None:
            out["train/char_acc"] = self.last_acc
        return out
