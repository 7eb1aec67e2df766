"""How a trained model folder was made: ``provenance.json`` beside its weights.

Every model folder the trainer writes (the final ``OUT`` and each ``OUT/checkpoints/step-*``) records
the stage, the optimizer steps done, the resolved :class:`~vist2.training.config.TrainConfig`, the data
(every file: path, bytes, sha256), the seed, the code (vist2 version and git commit; ``None`` when
the package is not a git checkout), the library versions, the parent model folder (its weights'
sha256 and its own provenance, so a PT-3 model shows its PT-2 parent, and that its PT-1 parent),
and when the run started and this folder was written. Nothing here may fail a run: what cannot be
found is recorded as ``None``.

    >>> from vist2.training.provenance import read
    >>> rec = read("runs/olm")                                          # doctest: +SKIP
    >>> rec["stage"], rec["steps"], rec["parent"]["provenance"]["stage"]  # doctest: +SKIP
    ('olm', 2000, 'ocr')
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from ..runtime import write_json

FILE = "provenance.json"
FORMAT = 1


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def shown(path: str | Path) -> str:
    """A path as a record shows it: relative to the working directory when it lies under it (a model
    folder shipped in a repository then names ``runs/...``, not the machine it was trained on), else
    absolute."""
    path = Path(path).resolve()
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def describe_files(path: str | Path) -> list[dict] | None:
    """``[{path, bytes, sha256}]`` for a file, or for every file under a folder (sorted; hidden
    files skipped); None for a path that does not exist."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    else:
        return None
    return [{"path": shown(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files]


def _git(root: Path, *args: str) -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def code_version() -> dict:
    """The vist2 version and, when the package is imported from a git checkout (``<repo>/src/vist2``),
    its commit and whether the package's files differ from it; ``None`` for both otherwise."""
    import vist2

    package = Path(vist2.__file__).resolve().parent
    commit = dirty = None
    top = _git(package, "rev-parse", "--show-toplevel")
    # only the repository vist2 itself lives in: an installed copy under some other checkout is not it
    if top is not None and Path(top).resolve() == package.parents[1]:
        commit = _git(package, "rev-parse", "HEAD")
        status = _git(package, "status", "--porcelain", "--untracked-files=no", "--", ".")
        dirty = None if status is None else bool(status)
    return {"vist2": vist2.__version__, "git_commit": commit, "git_dirty": dirty}


def library_versions() -> dict:
    import accelerate
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__}


def read(folder: str | Path) -> dict | None:
    """A model folder's provenance record; None when it has none (or it cannot be read)."""
    try:
        return json.loads((Path(folder) / FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class Provenance:
    """The record of one training run, written into each model folder it saves (main process only).

        prov = Provenance(cfg, "runs/pt2", "data/text_en.jsonl", total_steps=2000, world_size=8)
        prov.write("runs/pt3/checkpoints/step-00000100", steps=100, final=False)

    What does not change during the run (data and parent digests, code and library versions) is
    gathered once. The digests are computed on a background thread: a large corpus takes minutes
    to hash, and the other ranks must not wait for it at their first collective; the first folder
    written waits for them instead (hashlib releases the GIL, so training goes on meanwhile).
    """

    def __init__(self, cfg, model_dir: str | Path, data: str | Path, eval_data: str | Path | None = None,
                 total_steps: int | None = None, world_size: int = 1, device: str | None = None,
                 distributed: str | None = None, resumed_from: int | None = None):
        model_dir = Path(model_dir)
        self.base = {
            "format": FORMAT,
            "written_by": "vist2 trainer",
            "stage": cfg.stage,
            "total_steps": total_steps,
            "seed": cfg.seed,
            "config": cfg.to_dict(),
            "data": {"path": shown(data), "files": None},
            "eval_data": None if eval_data is None else {"path": shown(eval_data), "files": None},
            "code": code_version(),
            "libraries": library_versions(),
            "world_size": world_size,
            "device": device,
            "distributed": distributed,  # accelerate's distributed type (NO, MULTI_GPU, FSDP, DEEPSPEED, ...)
            "parent": {"path": shown(model_dir), "weights": None, "provenance": read(model_dir)},
            "resumed_from_step": resumed_from,
            "started": now(),
        }
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vist2-provenance")
        self._digests = self._pool.submit(_digests, Path(data), eval_data and Path(eval_data), model_dir)
        self._pool.shutdown(wait=False)  # the thread ends with its one task

    def record(self, steps: int, final: bool) -> dict:
        """The record for a folder written after ``steps`` optimizer steps (``final``: the run's output)."""
        data, eval_data, weights = self._digests.result()
        rec = {**self.base, "steps": steps, "final": final, "written": now()}
        rec["data"] = {**rec["data"], "files": data}
        if rec["eval_data"] is not None:
            rec["eval_data"] = {**rec["eval_data"], "files": eval_data}
        rec["parent"] = {**rec["parent"], "weights": weights}
        return rec

    def write(self, folder: str | Path, steps: int, final: bool) -> None:
        write_json(Path(folder) / FILE, self.record(steps, final))


def _digests(data: Path, eval_data: Path | None, model_dir: Path):
    """(data files, eval data files, the parent's weight files), each None where it cannot be read."""

    def files(path: Path | None, pattern: str | None = None):
        try:
            if pattern is not None:
                return [f for p in sorted(path.glob(pattern)) for f in describe_files(p) or []]
            return None if path is None else describe_files(path)
        except OSError:  # unreadable or gone: recorded as unknown, the save goes on
            return None

    return files(data), files(eval_data), files(model_dir, "*.safetensors")
