"""Epoch checkpoints of a running job: weights, optimizer state and the progress reached.

A checkpoint is written to a staging folder, fsync'd, renamed into place and
then named by `checkpoint.json` (replaced atomically), so a crash at any
point leaves the previous checkpoint usable and a restarted job resumes
with the same epochs and steps as an uninterrupted run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from weightsmith_server.store import fsync_path, read_json, write_json


def save_checkpoint(folder: Path, model: Any, epoch: int, global_step: int) -> None:
    """Weights, optimizer state and progress, written durably; replaces the previous one."""
    target = folder / f"epoch-{epoch:05d}"
    staging = folder / f".staging-{epoch:05d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, variables in (("weights", model.weights), ("optimizer", model.optimizer.variables)):
        with open(staging / f"{name}.npz", "wb") as handle:
            np.savez(handle, *[np.asarray(v.numpy()) for v in variables])
            handle.flush()
            os.fsync(handle.fileno())
    fsync_path(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(staging, target)
    fsync_path(folder)
    pointer = folder / ".checkpoint.json"
    write_json(pointer, {"epoch": epoch, "global_step": global_step, "folder": target.name})
    os.replace(pointer, folder / "checkpoint.json")
    fsync_path(folder)
    for old in folder.glob("epoch-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, model: Any) -> tuple[int, int] | None:
    """Restore the last checkpoint into a compiled model; (epoch, global_step) or None."""
    pointer = folder / "checkpoint.json"
    if not pointer.is_file():
        return None
    state = read_json(pointer)
    source = folder / state["folder"]
    with np.load(source / "weights.npz") as weights:
        for index, variable in enumerate(model.weights):
            variable.assign(weights[f"arr_{index}"])
    model.optimizer.build(model.trainable_variables)
    with np.load(source / "optimizer.npz") as saved:
        if len(saved.files) != len(model.optimizer.variables):
            raise RuntimeError("the checkpoint's optimizer state does not match the job's optimizer")
        for index, variable in enumerate(model.optimizer.variables):
            variable.assign(saved[f"arr_{index}"])
    return int(state["epoch"]), int(state["global_step"])


def checkpoint_epoch(folder: Path) -> int:
    """The epoch of the last checkpoint in `folder`, 0 when there is none."""
    pointer = folder / "checkpoint.json"
    return int(read_json(pointer)["epoch"]) if pointer.is_file() else 0
