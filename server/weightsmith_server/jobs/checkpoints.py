"""Checkpoints of a running job: every piece of state an exact resume needs.

A checkpoint holds the model's variables (weights and the random-seed state
of dropout and other random layers), the optimizer's variables (its
iteration count included), the metric accumulators of a partial epoch, the
early-stopping state (with its best weights), the last epoch's logs, the
position reached (epochs done, steps done inside the next epoch, global
step) and the seed the data order and augmentation derive from. A job
resumed from it ends bit-identical to an uninterrupted one (on the CPU).

It is written to a staging folder, fsync'd, renamed into place and then
named by `checkpoint.json` (replaced atomically), so a crash at any point
leaves the previous checkpoint usable.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from weightsmith_server.durable import fsync_path, read_json, write_json

POINTER = "checkpoint.json"


@dataclass
class TrainingState:
    """Where a run is, beyond its variables.

    Attributes:
        epoch: Epochs completed.
        step: Steps completed inside epoch `epoch + 1` (0 at an epoch end).
        global_step: Steps completed over all epochs.
        seed: The seed of the data order and augmentation; None in a
            checkpoint written before exact resume (the spec's seed then).
        stopped: Early stopping ended the training.
        early_stopping: `wait`, `best`, `best_epoch` and `stopped_epoch` of
            the early-stopping callback.
        logs: The last finished epoch's logs (the job's result metrics).
    """

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    seed: int | None = None
    stopped: bool = False
    early_stopping: dict[str, Any] = field(default_factory=dict)
    logs: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainingState:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass
class Checkpoint:
    """A loaded checkpoint: its state, and the arrays restored later in the run."""

    state: TrainingState
    metrics: list[np.ndarray]
    best_weights: list[np.ndarray] | None


def _write_arrays(path: Path, arrays: Sequence[np.ndarray]) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, *arrays)
        handle.flush()
        os.fsync(handle.fileno())


def _read_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path) as saved:
        return [saved[f"arr_{index}"] for index in range(len(saved.files))]


def _values(variables: Sequence[Any]) -> list[np.ndarray]:
    return [np.asarray(v.numpy()) for v in variables]


def _assign(variables: Sequence[Any], values: Sequence[np.ndarray], what: str) -> None:
    if len(values) != len(variables):
        raise RuntimeError(
            f"the checkpoint's {what} do not match the job's ({len(values)} vs {len(variables)})"
        )
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)


def _build_optimizer(model: Any) -> None:
    """Create the optimizer's variables (Keras does at the first step), so that every checkpoint has them."""
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def save_checkpoint(
    folder: Path, model: Any, state: TrainingState, best_weights: Sequence[np.ndarray] | None = None
) -> None:
    """The model's, optimizer's and metrics' variables and `state`, durably; replaces the previous one."""
    name = f"step-{state.global_step:012d}"
    target, staging = folder / name, folder / f".staging-{name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _build_optimizer(model)
    _write_arrays(staging / "variables.npz", _values(model.variables))
    _write_arrays(staging / "optimizer.npz", _values(model.optimizer.variables))
    _write_arrays(staging / "metrics.npz", _values(model.metrics_variables))
    if best_weights is not None:
        _write_arrays(staging / "best.npz", list(best_weights))
    fsync_path(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(staging, target)
    fsync_path(folder)
    pointer = folder / f".{POINTER}"
    write_json(pointer, {"folder": name, "state": asdict(state)})
    os.replace(pointer, folder / POINTER)
    fsync_path(folder)
    for old in [*folder.glob("step-*"), *folder.glob("epoch-*"), *folder.glob(".staging-*")]:
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


def read_state(folder: Path) -> TrainingState | None:
    """The state of the last checkpoint in `folder`, None when there is none."""
    pointer = folder / POINTER
    if not pointer.is_file():
        return None
    raw = read_json(pointer)
    if "state" not in raw:  # written before exact resume: epoch ends only, no seed
        return TrainingState(epoch=int(raw["epoch"]), global_step=int(raw["global_step"]))
    return TrainingState.from_dict(raw["state"])


def load_checkpoint(folder: Path, model: Any) -> Checkpoint | None:
    """Restore the last checkpoint's model and optimizer variables into a compiled model.

    The metric accumulators and best weights come back in the result: the
    run restores them when training starts (Keras resets metrics then).
    """
    state = read_state(folder)
    if state is None:
        return None
    source = folder / read_json(folder / POINTER)["folder"]
    _build_optimizer(model)
    if not (source / "variables.npz").is_file():  # written before exact resume
        _assign(model.weights, _read_arrays(source / "weights.npz"), "weights")
        _assign(model.optimizer.variables, _read_arrays(source / "optimizer.npz"), "optimizer state")
        return Checkpoint(state, [], None)
    _assign(model.variables, _read_arrays(source / "variables.npz"), "variables")
    _assign(model.optimizer.variables, _read_arrays(source / "optimizer.npz"), "optimizer state")
    best = _read_arrays(source / "best.npz") if (source / "best.npz").is_file() else None
    return Checkpoint(state, _read_arrays(source / "metrics.npz"), best)


def restore_metrics(model: Any, values: Sequence[np.ndarray]) -> None:
    """Put a partial epoch's metric accumulators back (after Keras reset them)."""
    _assign(model.metrics_variables, values, "metric accumulators")


def resume_detail(folder: Path) -> str:
    """Where a resumed job starts again, for its RUNNING event."""
    state = read_state(folder) or TrainingState()
    inside = f", step {state.step} of the next (global step {state.global_step})" if state.step else ""
    return f"resumed from the checkpoint of epoch {state.epoch}{inside}"
