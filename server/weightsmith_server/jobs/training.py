"""One fine-tuning run: working copy, input pipeline, optimizer, callbacks, checkpoints.

The job trains a copy of the model built from the base revision's config and
values, so serving never sees a half-trained model. Checkpoints (weights,
optimizer state and the epoch reached) are written at epoch ends, durably,
so that a restarted server resumes a job where its last checkpoint left it
and completes the same epochs and steps as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from weightsmith_server import architecture
from weightsmith_server.jobs.spec import LearningRateSpec, OptimizerSpec, TrainingSpec
from weightsmith_server.selectors import select
from weightsmith_server.store import fsync_path, read_json, write_json
from weightsmith_server.variables import model_variables

_NON_FINITE = "the loss became NaN or infinite; lower the learning rate or check the data"


class JobStopped(Exception):
    """Training stopped before the end: cancelled, or the server is shutting down."""


class Reporter(Protocol):
    """What a run tells the outside world, and asks it."""

    def emit(self, kind: str, payload: dict[str, Any]) -> None: ...

    def should_stop(self) -> bool: ...


@dataclass
class Outcome:
    """A finished run: the trained values by variable path, and its last metrics."""

    values: dict[str, np.ndarray]
    metrics: dict[str, float]
    epochs_completed: int
    steps_completed: int


# --- optimizer and schedule ----------------------------------------------------


def learning_rate(spec: LearningRateSpec) -> Any:
    """A float or a Keras `LearningRateSchedule` for the spec."""
    import keras

    schedules = keras.optimizers.schedules
    if spec.kind == "constant":
        return spec.constant
    if spec.kind == "exponential_decay":
        return schedules.ExponentialDecay(
            spec.initial, spec.decay_steps, spec.decay_rate, staircase=spec.staircase
        )
    if spec.kind == "cosine_decay":
        warmup_target = spec.initial if spec.warmup_steps else None
        return schedules.CosineDecay(
            spec.warmup_from if spec.warmup_steps else spec.initial,
            spec.decay_steps,
            alpha=spec.alpha,
            warmup_target=warmup_target,
            warmup_steps=spec.warmup_steps,
        )
    return schedules.PiecewiseConstantDecay(list(spec.boundaries), list(spec.values))


def rate_at(rate: Any, step: int) -> float:
    """The learning rate used by the optimizer step `step` (counted from 0)."""
    import keras

    return float(rate) if isinstance(rate, float) else float(keras.ops.convert_to_numpy(rate(step)))


def optimizer(spec: OptimizerSpec, rate: Any) -> Any:
    import keras

    if spec.kind == "adam":
        return keras.optimizers.Adam(learning_rate=rate)
    if spec.kind == "adamw":
        decay = 0.004 if spec.weight_decay is None else spec.weight_decay
        return keras.optimizers.AdamW(learning_rate=rate, weight_decay=decay)
    if spec.kind == "sgd":
        return keras.optimizers.SGD(learning_rate=rate, momentum=spec.momentum, nesterov=spec.nesterov)
    return keras.optimizers.RMSprop(learning_rate=rate)


# --- the working model -----------------------------------------------------------


def _mixed_precision(config: Any, output_layer: str) -> Any:
    """The config with every layer but the output one in `mixed_float16`."""
    if isinstance(config, list):
        return [_mixed_precision(item, output_layer) for item in config]
    if not isinstance(config, dict):
        return config
    if config.get("class_name") == "DTypePolicy":
        return config | {"config": config.get("config", {}) | {"name": "mixed_float16"}}
    result = {}
    for key, value in config.items():
        keep = isinstance(value, dict) and value.get("config", {}).get("name") == output_layer
        result[key] = value if keep else _mixed_precision(value, output_layer)
    return result


def working_model(config_json: str, values: dict[str, np.ndarray], spec: TrainingSpec, device: str) -> Any:
    """A trainable copy of the base revision, with the job's trainable selection applied."""
    if spec.mixed_precision:
        config = json.loads(config_json)
        output_layer = config["config"]["layers"][-1]["config"]["name"]
        config_json = json.dumps(_mixed_precision(config, output_layer))
    model = architecture.rebuild(config_json, device=device, seed=spec.seed)
    found = model_variables(model)
    for entry, variable in found:
        variable.assign(values[entry.path])
    entries = [entry for entry, _ in found]
    layer_count = len(model.layers)
    for selector, trainable in ((spec.freeze, False), (spec.unfreeze, True)):
        if selector is not None:
            names = {
                e.layer
                for e in entries
                if e.path in set(select(selector, entries, layer_count, field="spec"))
            }
            for layer in model.layers:
                if layer.name in names:
                    layer.trainable = trainable
    if spec.train_last_layers is not None:
        for index, layer in enumerate(model.layers):
            layer.trainable = index >= layer_count - spec.train_last_layers
    return model


# --- input pipeline --------------------------------------------------------------


# Datasets up to this size are cached in memory (as stored, before any cast).
CACHE_BUDGET_BYTES = 1 << 30


def _cached_bytes(data: Any, count: int) -> int | None:
    """Bytes `data` would take cached in memory, or None when its shape is not static."""
    import tensorflow as tf

    features = data.element_spec[0]
    if not isinstance(features, tf.TensorSpec) or not features.shape.is_fully_defined():
        return None
    return count * features.shape.num_elements() * features.dtype.size


def pipeline(
    data: Any, spec: TrainingSpec, *, training: bool, input_dtype: str, seed: int | None, count: int = 0
) -> Any:
    """Batches of (inputs, labels): cache, cast, resize, rescale, shuffle, augment, prefetch.

    Examples are cached in memory after the cast and resize when those fit
    `CACHE_BUDGET_BYTES` (then no epoch repeats that work), else as stored
    when those fit (uint8 images stay uint8), else not at all.
    """
    import keras
    import tensorflow as tf

    pre = spec.preprocessing
    shaping = []
    if pre.resize is not None:
        shaping.append(keras.layers.Resizing(*pre.resize))
    if pre.rescale is not None:
        shaping.append(keras.layers.Rescaling(pre.rescale))

    def prepare(x: Any, y: Any) -> tuple[Any, Any]:
        x = tf.cast(x, input_dtype)
        for layer in shaping:
            x = layer(x)
        return x, y

    prepared = data.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    prepared_bytes = _cached_bytes(prepared, count)
    raw_bytes = _cached_bytes(data, count)
    if count and prepared_bytes is not None and prepared_bytes <= CACHE_BUDGET_BYTES:
        data = prepared.cache()
    elif count and raw_bytes is not None and raw_bytes <= CACHE_BUDGET_BYTES:
        data = data.cache().map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        data = prepared
    if training and spec.shuffle:
        data = data.shuffle(16384, seed=seed, reshuffle_each_iteration=True)
    data = data.batch(spec.batch_size)
    if training and pre.augments:
        augment = []
        if pre.random_flip:
            augment.append(keras.layers.RandomFlip(pre.random_flip, seed=seed))
        if pre.random_rotation:
            augment.append(keras.layers.RandomRotation(pre.random_rotation, seed=seed))
        if pre.random_zoom:
            augment.append(keras.layers.RandomZoom(pre.random_zoom, seed=seed))

        def augmented(x: Any, y: Any) -> tuple[Any, Any]:
            for layer in augment:
                x = layer(x, training=True)
            return x, y

        data = data.map(augmented, num_parallel_calls=tf.data.AUTOTUNE)
    return data.prefetch(tf.data.AUTOTUNE)


# --- checkpoints -----------------------------------------------------------------


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


# --- progress --------------------------------------------------------------------


def _scalars(logs: dict[str, Any] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0}


class _Events:
    """A Keras callback that reports progress and honours stop requests at once.

    A stop request raises `JobStopped` out of `fit` at the next step (no
    validation pass or epoch end for the partial epoch); a non-finite loss
    raises `FloatingPointError` on the step that reports it.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        import keras

        class Callback(keras.callbacks.Callback):
            def __init__(
                self,
                reporter: Reporter,
                spec: TrainingSpec,
                steps_per_epoch: int,
                rate: Any,
                global_step: int,
                checkpoint: Callable[[int, int], None],
            ) -> None:
                super().__init__()
                self.reporter, self.spec, self.steps_per_epoch, self.rate = (
                    reporter,
                    spec,
                    steps_per_epoch,
                    rate,
                )
                self.global_step = global_step
                self.checkpoint = checkpoint
                self.epoch = 0
                self.last_logs: dict[str, float] = {}
                self._mark = (time.perf_counter(), global_step)
                self._started = self._mark

            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                self.epoch = epoch + 1

            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                self.global_step += 1
                step = batch + 1
                if self.reporter.should_stop():
                    raise JobStopped()
                if self.global_step % self.spec.progress_interval and step != self.steps_per_epoch:
                    return
                scalars = _scalars(logs)
                loss = scalars.pop("loss", float("nan"))
                if not math.isfinite(loss):
                    raise FloatingPointError(_NON_FINITE)
                now = time.perf_counter()
                then, steps_then = self._mark
                rate = (self.global_step - steps_then) * self.spec.batch_size / max(now - then, 1e-9)
                total = self.spec.epochs * self.steps_per_epoch
                per_step = (now - self._started[0]) / max(self.global_step - self._started[1], 1)
                self._mark = (now, self.global_step)
                self.reporter.emit(
                    "progress",
                    {
                        "epoch": self.epoch,
                        "step": step,
                        "steps_per_epoch": self.steps_per_epoch,
                        "global_step": self.global_step,
                        "loss": loss,
                        "metrics": scalars,
                        "learning_rate": rate_at(self.rate, self.global_step - 1),
                        "samples_per_second": rate,
                        "eta_seconds": per_step * max(total - self.global_step, 0),
                    },
                )

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                scalars = _scalars(logs)
                self.last_logs = scalars
                if not math.isfinite(scalars.get("loss", 0.0)):
                    raise FloatingPointError(_NON_FINITE)
                self.reporter.emit(
                    "epoch_ended",
                    {
                        "epoch": epoch + 1,
                        "train_metrics": {k: v for k, v in scalars.items() if not k.startswith("val_")},
                        "validation_metrics": {
                            k.removeprefix("val_"): v for k, v in scalars.items() if k.startswith("val_")
                        },
                    },
                )
                if (epoch + 1) % self.spec.checkpoint_interval == 0:
                    self.checkpoint(epoch + 1, self.global_step)

        return Callback(*args, **kwargs)


# --- the run ---------------------------------------------------------------------


def run(
    spec: TrainingSpec,
    *,
    config_json: str,
    values: dict[str, np.ndarray],
    train_data: tuple[Any, int],
    validation_data: tuple[Any, int] | None,
    device: str,
    job_dir: Path,
    reporter: Reporter,
    gpus: Sequence[str] = (),
) -> Outcome:
    """Train to the end (or raise `JobStopped`), returning the trained values.

    With more than one GPU in `gpus` the job trains under a
    `MirroredStrategy` over them; otherwise on `device`.
    """
    import keras
    import tensorflow as tf

    # Seeding happens in `architecture.rebuild`, under the build lock.
    strategy = tf.distribute.MirroredStrategy(list(gpus)) if len(gpus) > 1 else None
    placement = contextlib.nullcontext() if strategy is not None else tf.device(device)
    with placement, strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = working_model(config_json, values, spec, "" if strategy is not None else device)
        rate = learning_rate(spec.optimizer.learning_rate)
        model.compile(optimizer=optimizer(spec.optimizer, rate), loss=spec.loss, metrics=list(spec.metrics))
        input_dtype = str(model.inputs[0].dtype)
        data, count = train_data
        validation = None
        if validation_data is not None:
            validation = pipeline(
                validation_data[0],
                spec,
                training=False,
                input_dtype=input_dtype,
                seed=None,
                count=validation_data[1],
            )
        elif spec.validation_split > 0:
            held_out = max(1, int(count * spec.validation_split))
            validation = pipeline(
                data.skip(count - held_out),
                spec,
                training=False,
                input_dtype=input_dtype,
                seed=None,
                count=held_out,
            )
            data, count = data.take(count - held_out), count - held_out
        train = pipeline(data, spec, training=True, input_dtype=input_dtype, seed=spec.seed, count=count)
        steps_per_epoch = math.ceil(count / spec.batch_size)

        checkpoints = job_dir / "checkpoint"
        checkpoints.mkdir(parents=True, exist_ok=True)
        resumed = load_checkpoint(checkpoints, model)
        initial_epoch, global_step = resumed or (0, 0)

        def checkpoint(epoch: int, step: int) -> None:
            save_checkpoint(checkpoints, model, epoch, step)
            reporter.emit("checkpoint_saved", {"epoch": epoch, "global_step": step})

        events = _Events(reporter, spec, steps_per_epoch, rate, global_step, checkpoint)
        callbacks: list[Any] = [
            events,
            keras.callbacks.TensorBoard(
                log_dir=str(job_dir / "tensorboard"), write_graph=False, update_freq="epoch", profile_batch=0
            ),
        ]
        if spec.early_stopping is not None:
            stopping = spec.early_stopping
            callbacks.append(
                keras.callbacks.EarlyStopping(
                    monitor=stopping.monitor,
                    patience=stopping.patience,
                    min_delta=stopping.min_delta,
                    restore_best_weights=stopping.restore_best_weights,
                )
            )
        if initial_epoch < spec.epochs:
            model.fit(
                train,
                validation_data=validation,
                epochs=spec.epochs,
                initial_epoch=initial_epoch,
                callbacks=callbacks,
                shuffle=False,  # the pipeline shuffles
                verbose=0,
            )
    trained = {entry.path: np.array(variable.numpy()) for entry, variable in model_variables(model)}
    return Outcome(trained, events.last_logs, events.epoch or initial_epoch, events.global_step)
