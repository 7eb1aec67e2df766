"""What a training run reports: the loss window between two log lines, and skipped-record counts.

:class:`StepLog` is the trainer's only way to the terminal (a tqdm bar, or printed lines with
``--no-progress``) and, through ``log``, to the trackers (TensorBoard).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable

import torch


class StepLog:
    """The loss window between two log lines, and where the run's lines go.

    Micro-batch losses add up on the device (no sync per micro-batch); :meth:`flush` sums the window
    over the ranks once and reports mean loss, LR and tokens/s to the tqdm bar (or, without
    ``progress``, a printed line) and to the trackers (TensorBoard).
    """

    def __init__(self, acc, stage: str, total: int, initial: int, progress: bool,
                 log: Callable[..., None] | None = None):
        from tqdm.auto import tqdm

        self.acc, self.stage, self.total, self.progress = acc, stage, total, progress
        self.log = log or acc.log  # where the scalars go: the trainer adds its callbacks' view
        self.main = acc.is_main_process
        self.bar = tqdm(total=total, initial=initial, disable=not (self.main and progress), dynamic_ncols=True,
                        desc=f"{stage}")
        self.tokens_all = 0  # real slots of all ranks, counted at each flush
        self._fresh()

    def _fresh(self) -> None:
        self.loss, self.n, self.tokens = torch.zeros((), device=self.acc.device), 0, 0
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, n_tokens: int) -> None:
        self.loss += loss.float()
        self.n += 1
        self.tokens += n_tokens

    def flush(self, step: int, lr: float) -> float:
        """Report the window (all ranks) for ``step``, start a new one; returns the window's mean loss."""
        counts = torch.tensor([self.n, self.tokens], dtype=torch.float64, device=self.acc.device)
        stats = self.acc.reduce(torch.cat([self.loss.double()[None], counts]), "sum")
        loss = float(stats[0] / max(stats[1], 1))
        tps = float(stats[2]) / max(time.perf_counter() - self.t0, 1e-9)
        self.tokens_all += int(stats[2])
        # set before the bar moves, so the line for this step shows this window's loss
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
        if self.main and not self.progress:
            print(f"{self.stage} step {step}/{self.total}: loss {loss:.4f}, lr {lr:.2e}, {tps:,.0f} tokens/s",
                  flush=True)
        self.log({"train/loss": loss, "train/lr": lr, "train/tokens_per_s": tps}, step=step)
        self._fresh()
        return loss

    def advance(self) -> None:
        self.bar.update(1)

    def writer(self):
        """Where a line for the user goes on this rank (above the bar, or printed); None off the main rank."""
        if not self.main:
            return None
        return self.bar.write if self.progress else print

    def write(self, line: str) -> None:
        if self.main:
            self.writer()(line)

    def close(self) -> None:
        self.bar.close()


def all_ranks(skipped) -> dict:
    """The skipped-record counts of every rank, added up (each rank calls it)."""
    from accelerate.utils import gather_object

    return dict(sum((Counter(d) for d in gather_object([dict(skipped)])), Counter()))
