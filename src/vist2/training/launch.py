"""The trainer's accelerator, and the check that the processes of a launch are one job.

    acc = make_accelerator(cfg, out, precision="no")   # refuses a launch that is not one job

A launcher (``accelerate launch``, ``torchrun``, ``mpirun``) tells each process how many
processes it started (``WORLD_SIZE`` and friends). When accelerate does not then join them into
one distributed job, each process trains alone, and all of them write the same ``--out``: on a
machine without a GPU, ``accelerate launch`` takes the torchrun path for an FSDP or multi-GPU
config (``use_cpu: true`` written by ``accelerate config`` included), and without
``ACCELERATE_USE_CPU=1`` accelerate finds no GPU backend and reports distributed type ``NO`` in
every process. :func:`check_one_job` refuses such a launch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

from .config import TrainConfig

log = logging.getLogger(__name__)

# what launchers set: torchrun (and accelerate launch through it), then the MPI implementations
WORLD_SIZE_VARS = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launcher_world(env: Mapping[str, str] | None = None) -> tuple[int, str | None]:
    """The number of processes the launcher says it started, and the variable that says so
    (``(1, None)`` when none does, as for a plain ``vist2 train``).

        >>> launcher_world({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
        (2, 'WORLD_SIZE')
        >>> launcher_world({})
        (1, None)
    """
    env = os.environ if env is None else env
    for var in WORLD_SIZE_VARS:
        value = env.get(var, "").strip()
        if value.isdigit() and int(value) > 1:
            return int(value), var
    return 1, None


def check_one_job(acc, out: str | Path, env: Mapping[str, str] | None = None) -> None:
    """Raise ``ValueError`` (one line, naming the fix) when the launcher started more processes than
    accelerate joined into this job: each would train alone and write ``out``."""
    n, var = launcher_world(env)
    if n <= acc.num_processes:
        return
    raise ValueError(
        f"the launcher started {n} processes ({var}={n}) but accelerate runs each alone (distributed type "
        f"{acc.distributed_type.value}, {acc.num_processes} process): they would train {n} separate models into "
        f"--out {out}. On a machine without GPUs set ACCELERATE_USE_CPU=1 (as configs/accelerate/fsdp-cpu-2proc.yaml "
        f"says), or launch one process (accelerate launch --num_processes 1)")


def _tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def make_accelerator(cfg: TrainConfig, out: str | Path, precision: str):
    """The run's ``Accelerator``: gradient accumulation, mixed precision, TensorBoard under ``out``
    (nothing written yet). Raises ``ValueError`` when the processes are not one job (:func:`check_one_job`)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # a batch without images leaves the vision tower and aligner idle; DDP must allow that
    unused = cfg.stage in ("olm", "sft") and (cfg.train_vision or cfg.train_aligner)
    acc = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum, mixed_precision=precision,
        log_with="tensorboard" if _tensorboard_available() else None, project_dir=str(out),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)],
    )
    check_one_job(acc, out)
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and acc.distributed_type != "FSDP":
        if acc.is_main_process:  # accelerate applies FSDP to GPU runs only (1.16: MULTI_CPU ignores it)
            log.warning("an FSDP config on %s: accelerate runs it as %s (every rank holds the whole model)",
                        acc.device.type, acc.distributed_type.value)
    return acc
