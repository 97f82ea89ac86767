"""One fine-tuning run: working copy, input pipeline, optimizer, callbacks, checkpoints.

The job trains a copy of the model built from the base revision's config and
values, so serving never sees a half-trained model. Checkpoints hold every
piece of state the run depends on (see `jobs.checkpoints`) and are written
at epoch ends and inside epochs; the data order and augmentation of every
epoch are a pure function of the seed and the epoch. A restarted server
resumes a job at the exact step its last checkpoint reached, and the job
ends bit-identical (on the CPU) to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from weightsmith_server.jobs.checkpoints import TrainingState, load_checkpoint, read_state, save_checkpoint
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
# Examples the shuffle buffer holds.
SHUFFLE_BUFFER = 16384
# Tags that keep the shuffle's and the augmentation's random streams apart.
_SHUFFLE, _AUGMENT = 1, 2


def _cached_bytes(data: Any, count: int) -> int | None:
    """Bytes `data` would take cached in memory, or None when its shape is not static."""
    import tensorflow as tf

    features = data.element_spec[0]
    if not isinstance(features, tf.TensorSpec) or not features.shape.is_fully_defined():
        return None
    return count * features.shape.num_elements() * features.dtype.size


def examples(data: Any, spec: TrainingSpec, *, input_dtype: str, count: int = 0) -> Any:
    """(input, label) examples, cast, resized and rescaled for the model.

    They are cached in memory after the cast and resize when those fit
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
        return prepared.cache()
    if count and raw_bytes is not None and raw_bytes <= CACHE_BUDGET_BYTES:
        return data.cache().map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return prepared


def pipeline(data: Any, spec: TrainingSpec, *, input_dtype: str, count: int = 0) -> Any:
    """Batches of (inputs, labels) for evaluation and validation: in order, no augmentation."""
    import tensorflow as tf

    batches = examples(data, spec, input_dtype=input_dtype, count=count).batch(spec.batch_size)
    return batches.prefetch(tf.data.AUTOTUNE)


def _root_seed(seed: int) -> Any:
    """A stateless-RNG seed (shape [2]) for any 64-bit `seed`."""
    import tensorflow as tf

    return tf.constant([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF], tf.int64)


def training_batches(
    prepared: Any, spec: TrainingSpec, *, seed: int, epochs: tuple[int, int], skip: int = 0
) -> Any:
    """The training batches of epochs `epochs[0]` to `epochs[1] - 1`, one epoch after the other.

    Every epoch's batches are a pure function of (`seed`, epoch): its order
    comes from a shuffle seeded by both (not from how many epochs this
    dataset has produced before), and each batch's augmentation from
    stateless random numbers seeded by (`seed`, epoch, batch index). So a
    resumed run sees exactly the batches an uninterrupted one does; `skip`
    drops the first batches of the first epoch (done before the checkpoint)
    before they are augmented.
    """
    import tensorflow as tf

    root = _root_seed(seed)
    augment = _augmentation(spec.preprocessing) if spec.preprocessing.augments else None
    first = epochs[0]

    def skipped(epoch: Any) -> Any:
        return tf.where(epoch == first, tf.constant(skip, tf.int64), 0)

    def epoch_batches(epoch: Any) -> Any:
        # This function's graph only: keeps the process-wide TensorFlow seed out of the shuffle
        # (any constant but 0, which TensorFlow would compare with the seed tensor).
        tf.compat.v1.set_random_seed(1)
        epoch_seed = tf.random.experimental.stateless_fold_in(root, epoch)
        data = prepared
        if spec.shuffle:
            shuffle_seed = tf.random.stateless_uniform(
                [],
                tf.random.experimental.stateless_fold_in(epoch_seed, _SHUFFLE),
                minval=None,
                maxval=None,
                dtype=tf.int64,
            )
            data = data.shuffle(SHUFFLE_BUFFER, seed=shuffle_seed, reshuffle_each_iteration=False)
        batches = data.batch(spec.batch_size)
        if augment is None:  # no batch index needed: no enumerate and no map to drop it again
            return batches.skip(skipped(epoch)) if skip else batches
        batches = batches.enumerate()
        if skip:
            batches = batches.skip(skipped(epoch))
        augment_seed = tf.random.experimental.stateless_fold_in(epoch_seed, _AUGMENT)

        def augmented(index: Any, batch: tuple[Any, Any]) -> tuple[Any, Any]:
            batch_seed = tf.random.experimental.stateless_fold_in(augment_seed, index)
            return augment(batch[0], batch_seed), batch[1]

        return batches.map(augmented, num_parallel_calls=tf.data.AUTOTUNE)

    epoch_range = tf.data.Dataset.range(epochs[0], epochs[1])
    # No autotuning model: fed by a new inner pipeline every epoch, its optimization thread took
    # seconds to stop when the iterator went away at the end of a job. AUTOTUNE then means one
    # call per core for the maps, and prefetch buffers still grow while the consumer waits.
    options = tf.data.Options()
    options.autotune.enabled = False
    return epoch_range.flat_map(epoch_batches).prefetch(tf.data.AUTOTUNE).with_options(options)


def _augmentation(pre: PreprocessingSpec) -> Callable[[Any, Any], Any]:
    """A batch transform applying the spec's random flip, rotation and zoom, given a stateless seed.

    The Keras layers draw their random numbers from that seed (never from
    their own seed state, which a parallel map would advance in a
    nondeterministic order).
    """
    import keras
    import tensorflow as tf

    class BatchSeed(keras.random.SeedGenerator):
        """Successive stateless seeds derived from one seed tensor; no state variable."""

        def __init__(self, seed: Any) -> None:  # no super().__init__: that creates a variable
            self._seed, self._draws = seed, 0

        def next(self, ordered: bool = True) -> Any:
            self._draws += 1
            return tf.random.experimental.stateless_fold_in(self._seed, self._draws)

    layers = []
    if pre.random_flip:
        layers.append(keras.layers.RandomFlip(str(pre.random_flip), seed=0))
    if pre.random_rotation:
        layers.append(keras.layers.RandomRotation(pre.random_rotation, seed=0))
    if pre.random_zoom:
        layers.append(keras.layers.RandomZoom(pre.random_zoom, seed=0))

    def augmented(x: Any, seed: Any) -> Any:
        draws = BatchSeed(seed)
        for layer in layers:
            change = layer.get_random_transformation(x, training=True, seed=draws)
            x = layer.transform_images(x, change, training=True)
        return x

    return augmented


# --- the run ---------------------------------------------------------------------

# Without `checkpoint_every_steps`, a checkpoint is also written inside an epoch when the last
# one is older than this.
CHECKPOINT_SECONDS = 600.0


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

    A run with a checkpoint in `job_dir` resumes from it exactly: at its
    step, with its variables, optimizer, metric and early-stopping state
    and data order. With more than one GPU in `gpus` the job trains under
    a `MirroredStrategy` over them; otherwise on `device`.
    """
    import tensorflow as tf

    from weightsmith_server.jobs.callbacks import JobProgress, ResumableEarlyStopping

    checkpoints = job_dir / "checkpoint"
    checkpoints.mkdir(parents=True, exist_ok=True)
    state = read_state(checkpoints) or TrainingState()
    if state.seed is None:
        state.seed = spec.seed if spec.seed is not None else secrets.randbits(63)
    # Seeding of the model's own random state happens in `architecture.rebuild`, under the build lock.
    strategy = tf.distribute.MirroredStrategy(list(gpus)) if len(gpus) > 1 else None
    placement = contextlib.nullcontext() if strategy is not None else tf.device(device)
    with placement, strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = working_model(config_json, values, spec, "" if strategy is not None else device)
        rate = learning_rate(spec.optimizer.learning_rate)
        model.compile(optimizer=optimizer(spec.optimizer, rate), loss=spec.loss, metrics=list(spec.metrics))
        prepared, validation, count = _inputs(spec, train_data, validation_data, str(model.inputs[0].dtype))
        loaded = load_checkpoint(checkpoints, model)
        if loaded is not None and state.step:
            _build_metrics(model, prepared, spec.batch_size)
        stopping = ResumableEarlyStopping(spec.early_stopping) if spec.early_stopping else None
        if stopping is not None and loaded is not None:
            stopping.resume(loaded.state.early_stopping, loaded.best_weights)

        def checkpoint(reached: TrainingState, best_weights: list[np.ndarray] | None) -> None:
            save_checkpoint(checkpoints, model, reached, best_weights)
            reporter.emit(CheckpointSaved(epoch=reached.epoch, global_step=reached.global_step))

        steps_per_epoch = math.ceil(count / spec.batch_size)
        progress = JobProgress(
            reporter,
            spec,
            steps_per_epoch,
            rate,
            state,
            checkpoint,
            stopping=stopping,
            metrics=loaded.metrics if loaded is not None and state.step else None,
            checkpoint_seconds=CHECKPOINT_SECONDS,
        )
        callbacks = [_tensorboard(job_dir), *([stopping] if stopping else []), progress]

        def fit(first: int, last: int, skip: int) -> None:
            model.fit(
                training_batches(prepared, spec, seed=state.seed, epochs=(first, last), skip=skip),
                validation_data=validation,
                epochs=last,
                initial_epoch=first,
                steps_per_epoch=steps_per_epoch - skip,
                callbacks=callbacks,
                shuffle=False,  # the pipeline shuffles
                verbose=0,
            )

        epoch = state.epoch
        if state.step and not state.stopped:  # the rest of the epoch the checkpoint is inside
            fit(epoch, epoch + 1, state.step)
            epoch += 1
        if epoch < spec.epochs and not state.stopped and not getattr(model, "stop_training", False):
            fit(epoch, spec.epochs, 0)
        if stopping is not None:
            stopping.finish(model)
    trained = {entry.path: np.array(variable.numpy()) for entry, variable in model_variables(model)}
    return Outcome(trained, progress.last_logs, progress.epochs_done, progress.global_step)


def _build_metrics(model: Any, prepared: Any, batch_size: int) -> None:
    """Create the compiled loss's and metrics' variables (Keras does on the first step), left at zero.

    A run resumed inside an epoch puts that epoch's accumulators back before its first step.
    """
    x, y = next(iter(prepared.batch(batch_size).take(1)))
    predicted = model(x, training=False)
    model.compute_loss(x, y, predicted)
    model.compute_metrics(x, y, predicted, None)
    model.reset_metrics()


def _inputs(
    spec: TrainingSpec,
    train_data: tuple[Any, int],
    validation_data: tuple[Any, int] | None,
    input_dtype: str,
) -> tuple[Any, Any, int]:
    """The prepared training examples, the validation batches (None without validation), the count.

    Without a validation dataset, `validation_split` holds out the last
    examples of the training data.
    """
    data, count = train_data
    validation = None
    if validation_data is not None:
        held, held_count = validation_data
        validation = pipeline(held, spec, input_dtype=input_dtype, count=held_count)
    elif spec.validation_split > 0:
        held_out = max(1, int(count * spec.validation_split))
        validation = pipeline(data.skip(count - held_out), spec, input_dtype=input_dtype, count=held_out)
        data, count = data.take(count - held_out), count - held_out
    return examples(data, spec, input_dtype=input_dtype, count=count), validation, count


def _tensorboard(job_dir: Path) -> Any:
    """TensorBoard logs in the job's folder: one set of scalars per epoch, nothing per step."""
    import keras

    class EpochTensorBoard(keras.callbacks.TensorBoard):
        """`TensorBoard(update_freq="epoch")` without its per-step work.

        With `update_freq="epoch"` Keras still calls `tf.summary.scalar` for
        every log of every step, each a no-op without a default writer; on
        this server's small models that cost a few percent of training speed
        (the runner thread's profile: ~6% of its samples in
        `TensorBoard.on_train_batch_end`). The epoch logs are unchanged.
        """

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            pass

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            pass

    return EpochTensorBoard(
        log_dir=str(job_dir / "tensorboard"), write_graph=False, update_freq="epoch", profile_batch=0
    )
