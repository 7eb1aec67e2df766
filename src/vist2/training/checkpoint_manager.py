"""The trainer's checkpoints: open ``OUT`` (resume or refuse), write a step folder on every rank,
prune old ones. The atomic folder and the listing rules are :mod:`vist2.training.checkpoint`'s."""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from ..runtime import write_json
from .checkpoint import (STATE_FILE, TRAINING_STATE_DIR, atomic_dir, checkpoint_name, clean_partial,
                         latest_checkpoint, prune)

log = logging.getLogger(__name__)


class CheckpointManager:
    """The step folders of one run under ``root`` (``OUT/checkpoints``), for every rank of ``acc``.

        ckpt = CheckpointManager(out / "checkpoints", acc, cfg)
        latest, state = ckpt.open(out, resume=True)  # (None, None) on a fresh start
        if latest is not None:
            ckpt.load(latest)
        ...
        ckpt.save(100, model, state={"stage": "olm", "step": 100, ...}, write_model=save_model_folder)
    """

    def __init__(self, root: Path, acc, cfg):
        self.root, self.acc, self.cfg = Path(root), acc, cfg
        self.main = acc.is_main_process

    def open(self, out: Path, resume: bool) -> tuple[Path | None, dict | None]:
        """Create ``out``, delete half-written step folders, and return the newest checkpoint and its
        state file to resume from, or ``(None, None)``. Refuses (``ValueError``) to start over an ``out``
        that has checkpoints without ``resume``, or to resume another stage's checkpoint."""
        if self.main:
            Path(out).mkdir(parents=True, exist_ok=True)
            clean_partial(self.root)
        self.acc.wait_for_everyone()
        latest = latest_checkpoint(self.root)
        if latest is not None and not resume:
            raise ValueError(f"--out {out} already has checkpoints ({latest.name}); "
                             f"pass --resume to continue, or choose another --out")
        state = None
        if resume:
            if latest is None:
                log.warning("--resume: no checkpoint in %s yet; starting from the beginning", self.root)
            else:
                state = json.loads((latest / STATE_FILE).read_text(encoding="utf-8"))
                if state.get("stage") != self.cfg.stage:
                    raise ValueError(f"--resume: the checkpoint is for stage {state.get('stage')!r}, "
                                     f"not {self.cfg.stage!r}")
        self.acc.wait_for_everyone()
        return (latest, state) if state is not None else (None, None)

    def load(self, folder: Path) -> None:
        """Restore the training state (weights, optimizer, registered scheduler, RNG) saved in ``folder``."""
        # the training state has its own subfolder (older checkpoints kept it at the top)
        sub = folder / TRAINING_STATE_DIR
        self.acc.load_state(str(sub if sub.is_dir() else folder))

    def save(self, step: int, model, state: dict, write_model: Callable[[Path], None]) -> None:
        """Write ``step-NNNNNNNN`` atomically: the training state, the model folder that
        ``write_model(folder)`` writes, and ``state`` (plus ``complete``) as the state file, last.
        Every rank calls it; then the oldest folders beyond ``keep_checkpoints`` go."""
        with atomic_dir(self.root / checkpoint_name(step), self.main, self.acc.wait_for_everyone) as tmp:
            with quiet_tied_weights(self.acc.unwrap_model(model)):
                self.acc.save_state(str(tmp / TRAINING_STATE_DIR), safe_serialization=True)
            # the step folder is also a model folder: generate, eval and serve load it as it is
            write_model(tmp)
            if self.main:  # written last: its presence with complete=true marks a whole checkpoint
                write_json(tmp / STATE_FILE, {"complete": True, **state})
        if self.main:
            prune(self.root, self.cfg.keep_checkpoints)


class _TiedWeightsFilter(logging.Filter):
    """Drops accelerate's "Removed shared tensor ..." warning when every name it removed is a tied
    alias of another weight (``lm_head.weight`` with tied embeddings): that removal is the intended
    way to store them, and loading ties them again."""

    def __init__(self, aliases: set[str]):
        super().__init__()
        self.aliases = aliases

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()  # accelerate may prefix it with "[RANK n] "
        start = msg.find("Removed shared tensor {")
        if start < 0:
            return True
        names = set(re.findall(r"'([^']+)'", msg[start: msg.index("}", start) + 1]))
        return not (names and names <= self.aliases)


@contextmanager
def quiet_tied_weights(model):
    """Silence accelerate's warning about tied weights it leaves out of a save (see ``_TiedWeightsFilter``)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    aliases = set(named) - {n for n, _ in model.named_parameters()}  # the second name of a shared weight
    logger = logging.getLogger("accelerate.utils.other")
    f = _TiedWeightsFilter(aliases)
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)
