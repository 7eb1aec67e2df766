"""Checkpoints written atomically: a finished checkpoint is there whole, or not at all.

A checkpoint is written into ``OUT/checkpoints/.tmp-step-00000100/``; only when
every file is on disk — the model as an ordinary model folder (``config.json``
with the render settings, safetensors weights, tokenizer: ``vist2 generate``,
``eval`` and ``serve`` load it as it is), the training state under
``training_state/`` (weights, optimizer, scheduler, RNG states), and
``trainer_state.json`` last — is the folder renamed to ``step-00000100``. A rename within one file system is atomic, so a process
killed mid-save leaves a ``.tmp-*`` folder, which :func:`latest_checkpoint`
never returns and :func:`clean_partial` deletes on the next start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

STATE_FILE = "trainer_state.json"
TRAINING_STATE_DIR = "training_state"  # accelerate's save_state, beside the model files of the same step
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final: Path, is_main: bool = True, barrier=lambda: None):
    """Yield a temporary folder; on a clean exit it becomes ``final`` (an existing ``final`` is kept).

    In a multi-process run every process writes its share into the same temporary
    folder; ``barrier`` waits for all of them before the main process renames it.
    If the body raises, the temporary folder is left for :func:`clean_partial`.
    """
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    yield tmp
    barrier()
    if is_main:
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            # the same step saved before (a resumed run that saves again): with exact resume its
            # content is the same, and replacing it could not be atomic, so the old one stays
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    barrier()


def is_complete(path: Path) -> bool:
    """A checkpoint folder that finished writing (its name and its state file say so)."""
    path = Path(path)
    if not _NAME.match(path.name) or not (path / STATE_FILE).is_file():
        return False
    try:
        return bool(json.loads((path / STATE_FILE).read_text(encoding="utf-8")).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


def list_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def clean_partial(root: Path) -> list[Path]:
    """Delete what interrupted saves left behind (``.tmp-*`` folders); returns what went."""
    root = Path(root)
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                gone.append(p)
    return gone


def prune(root: Path, keep: int) -> None:
    for p in list_checkpoints(root)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
