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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from weightsmith_server.jobs.checkpoints import load_checkpoint, save_checkpoint
from weightsmith_server.jobs.events import CheckpointSaved, EventPayload
from weightsmith_server.jobs.spec import (
    LearningRateSpec,
    OptimizerKind,
    OptimizerSpec,
    PreprocessingSpec,
    ScheduleKind,
    TrainingSpec,
)
from weightsmith_server.models import architecture
from weightsmith_server.selectors import select
from weightsmith_server.variables import model_variables


class JobStopped(Exception):
    """Training stopped before the end: cancelled, or the server is shutting down."""


class Reporter(Protocol):
    """What a run tells the outside world, and asks it."""

    def emit(self, payload: EventPayload) -> None: ...

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
    if spec.kind == ScheduleKind.CONSTANT:
        return spec.constant
    if spec.kind == ScheduleKind.EXPONENTIAL_DECAY:
        return schedules.ExponentialDecay(
            spec.initial, spec.decay_steps, spec.decay_rate, staircase=spec.staircase
        )
    if spec.kind == ScheduleKind.COSINE_DECAY:
        warmup_target = spec.initial if spec.warmup_steps else None
        return schedules.CosineDecay(
            spec.warmup_from if spec.warmup_steps else spec.initial,
            spec.decay_steps,
            alpha=spec.alpha,
            warmup_target=warmup_target,
            warmup_steps=spec.warmup_steps,
        )
    return schedules.PiecewiseConstantDecay(list(spec.boundaries), list(spec.values))


def optimizer(spec: OptimizerSpec, rate: Any) -> Any:
    """The Keras optimizer for the spec, with `rate` (a float or a schedule)."""
    import keras

    if spec.kind == OptimizerKind.ADAM:
        return keras.optimizers.Adam(learning_rate=rate)
    if spec.kind == OptimizerKind.ADAMW:
        decay = 0.004 if spec.weight_decay is None else spec.weight_decay
        return keras.optimizers.AdamW(learning_rate=rate, weight_decay=decay)
    if spec.kind == OptimizerKind.SGD:
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
        data = data.map(_augmentation(pre, seed), num_parallel_calls=tf.data.AUTOTUNE)
    return data.prefetch(tf.data.AUTOTUNE)


def _augmentation(pre: PreprocessingSpec, seed: int | None) -> Callable[[Any, Any], tuple[Any, Any]]:
    """A batch map applying the spec's random flip, rotation and zoom (training only)."""
    import keras

    augment = []
    if pre.random_flip:
        augment.append(keras.layers.RandomFlip(str(pre.random_flip), seed=seed))
    if pre.random_rotation:
        augment.append(keras.layers.RandomRotation(pre.random_rotation, seed=seed))
    if pre.random_zoom:
        augment.append(keras.layers.RandomZoom(pre.random_zoom, seed=seed))

    def augmented(x: Any, y: Any) -> tuple[Any, Any]:
        for layer in augment:
            x = layer(x, training=True)
        return x, y

    return augmented


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
    import tensorflow as tf

    from weightsmith_server.jobs.callbacks import JobProgress

    # Seeding happens in `architecture.rebuild`, under the build lock.
    strategy = tf.distribute.MirroredStrategy(list(gpus)) if len(gpus) > 1 else None
    placement = contextlib.nullcontext() if strategy is not None else tf.device(device)
    with placement, strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = working_model(config_json, values, spec, "" if strategy is not None else device)
        rate = learning_rate(spec.optimizer.learning_rate)
        model.compile(optimizer=optimizer(spec.optimizer, rate), loss=spec.loss, metrics=list(spec.metrics))
        train, validation, count = _inputs(spec, train_data, validation_data, str(model.inputs[0].dtype))
        checkpoints = job_dir / "checkpoint"
        checkpoints.mkdir(parents=True, exist_ok=True)
        initial_epoch, global_step = load_checkpoint(checkpoints, model) or (0, 0)

        def checkpoint(epoch: int, step: int) -> None:
            save_checkpoint(checkpoints, model, epoch, step)
            reporter.emit(CheckpointSaved(epoch=epoch, global_step=step))

        steps_per_epoch = math.ceil(count / spec.batch_size)
        progress = JobProgress(reporter, spec, steps_per_epoch, rate, global_step, checkpoint)
        if initial_epoch < spec.epochs:
            model.fit(
                train,
                validation_data=validation,
                epochs=spec.epochs,
                initial_epoch=initial_epoch,
                callbacks=[progress, *_keras_callbacks(spec, job_dir)],
                shuffle=False,  # the pipeline shuffles
                verbose=0,
            )
    trained = {entry.path: np.array(variable.numpy()) for entry, variable in model_variables(model)}
    return Outcome(trained, progress.last_logs, progress.epoch or initial_epoch, progress.global_step)


def _inputs(
    spec: TrainingSpec,
    train_data: tuple[Any, int],
    validation_data: tuple[Any, int] | None,
    input_dtype: str,
) -> tuple[Any, Any, int]:
    """The training batches, the validation batches (None without validation) and the training count.

    Without a validation dataset, `validation_split` holds out the last
    examples of the training data.
    """
    data, count = train_data
    validation = None
    if validation_data is not None:
        held, held_count = validation_data
        validation = pipeline(
            held, spec, training=False, input_dtype=input_dtype, seed=None, count=held_count
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
    return train, validation, count


def _keras_callbacks(spec: TrainingSpec, job_dir: Path) -> list[Any]:
    """TensorBoard logs in the job's folder, and early stopping when the spec asks for it."""
    import keras

    callbacks: list[Any] = [
        keras.callbacks.TensorBoard(
            log_dir=str(job_dir / "tensorboard"), write_graph=False, update_freq="epoch", profile_batch=0
        )
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
    return callbacks
