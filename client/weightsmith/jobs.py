"""Typed builders of fine-tuning job messages, for `create_job`.

`spec` builds the `job_pb2.JobSpec` a job runs; the optimizer
builders (`adam`, `adamw`, `sgd`, `rmsprop`) take a constant learning rate or
a schedule (`exponential_decay`, `cosine_decay`, `piecewise_constant`);
`early_stopping` and `preprocessing` build the optional parts. Selectors for
`freeze`/`unfreeze` take the same forms as `read_weights`: a
`weightsmith.Selector`, a glob over variable paths, a list of globs, or a
`VariableSelector` message. Obvious mistakes raise `ValueError` or
`TypeError` here; the server validates the whole spec at `create_job`.

Example:

```python
import numpy as np
import weightsmith
from weightsmith import jobs

with weightsmith.Client("127.0.0.1:50051") as client:
    x = np.random.rand(256, 64, 64, 3).astype(np.float32)
    y = np.random.randint(0, 5, 256).astype(np.int64)
    client.upload_dataset({"x": x, "y": y}, "toy")
    job = client.create_job(
        jobs.spec(
            "tiny",
            "toy",
            epochs=3,
            batch_size=32,
            optimizer=jobs.adam(jobs.cosine_decay(1e-3, decay_steps=24, warmup_steps=4)),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            validation_split=0.1,
            train_last_layers=2,
            early_stopping=jobs.early_stopping(patience=1, restore_best_weights=True),
            seed=0,
        )
    )
    result = weightsmith.progress_bar(client.watch_job(job.job_id), total_epochs=3)
    print(result.revision if result is not None else client.get_job(job.job_id).error)
```
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from weightsmith import _checks
from weightsmith._checks import INT32_MAX, INT64_MAX, INT64_MIN
from weightsmith._types import SelectorLike, selector_to_proto
from weightsmith.v1 import job_pb2

__all__ = [
    "adam",
    "adamw",
    "cosine_decay",
    "early_stopping",
    "exponential_decay",
    "piecewise_constant",
    "preprocessing",
    "rmsprop",
    "sgd",
    "spec",
]

_RANDOM_FLIPS = {
    "": job_pb2.RANDOM_FLIP_UNSPECIFIED,
    "horizontal": job_pb2.RANDOM_FLIP_HORIZONTAL,
    "vertical": job_pb2.RANDOM_FLIP_VERTICAL,
    "horizontal_and_vertical": job_pb2.RANDOM_FLIP_HORIZONTAL_AND_VERTICAL,
}

LearningRateLike = float | job_pb2.LearningRate


# --- helpers ----------------------------------------------------------------


def _learning_rate(learning_rate: LearningRateLike) -> job_pb2.LearningRate:
    if isinstance(learning_rate, job_pb2.LearningRate):
        if learning_rate.WhichOneof("rate") is None:
            raise ValueError(
                "Received an empty `LearningRate`, expected a constant or a schedule such as "
                "`jobs.cosine_decay(1e-3, decay_steps=1000)`."
            )
        return learning_rate
    if isinstance(learning_rate, (bool, np.bool_)) or not isinstance(
        learning_rate, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            f"Received an invalid `learning_rate`, expected a float or a `LearningRate` built with "
            f"`jobs.exponential_decay`, `jobs.cosine_decay` or `jobs.piecewise_constant`. "
            f"Received: {learning_rate!r}"
        )
    return job_pb2.LearningRate(constant=_checks.positive("learning_rate", learning_rate))


# --- learning rates -------------------------------------------------------------


def exponential_decay(
    initial_learning_rate: float, decay_steps: int, decay_rate: float, *, staircase: bool = False
) -> job_pb2.LearningRate:
    """An exponentially decaying rate: `initial * decay_rate ^ (step / decay_steps)`.

    Args:
        initial_learning_rate: Rate at step 0, above 0.
        decay_steps: Steps per decay period, at least 1.
        decay_rate: Factor per period, above 0.
        staircase: Decay in whole periods (`step // decay_steps`).

    Returns:
        The `LearningRate`, with `exponential_decay` set.

    Example:

    ```python
    optimizer = jobs.sgd(jobs.exponential_decay(0.1, decay_steps=1000, decay_rate=0.5), momentum=0.9)
    ```
    """
    return job_pb2.LearningRate(
        exponential_decay=job_pb2.ExponentialDecay(
            initial_learning_rate=_checks.positive("initial_learning_rate", initial_learning_rate),
            decay_steps=_checks.integer("decay_steps", decay_steps, 1, INT64_MAX),
            decay_rate=_checks.positive("decay_rate", decay_rate),
            staircase=bool(staircase),
        )
    )


def cosine_decay(
    initial_learning_rate: float,
    decay_steps: int,
    *,
    alpha: float = 0.0,
    warmup_steps: int = 0,
    warmup_from: float = 0.0,
) -> job_pb2.LearningRate:
    """A cosine decay with an optional linear warmup.

    Args:
        initial_learning_rate: Rate at the end of the warmup (or at step 0),
            above 0.
        decay_steps: Steps of the cosine decay (after the warmup), at least 1.
        alpha: Floor of the decay as a fraction of the initial rate, 0 to 1.
        warmup_steps: Steps of linear warmup; 0 for none.
        warmup_from: Rate the warmup starts from, at least 0.

    Returns:
        The `LearningRate`, with `cosine_decay` set.

    Example:

    ```python
    optimizer = jobs.adamw(jobs.cosine_decay(3e-4, decay_steps=5000, warmup_steps=200))
    ```
    """
    warmup_from = _checks.number("warmup_from", warmup_from)
    if warmup_from < 0:
        raise ValueError(
            f"Received a negative `warmup_from`, expected at least 0. Received: warmup_from={warmup_from}"
        )
    return job_pb2.LearningRate(
        cosine_decay=job_pb2.CosineDecay(
            initial_learning_rate=_checks.positive("initial_learning_rate", initial_learning_rate),
            decay_steps=_checks.integer("decay_steps", decay_steps, 1, INT64_MAX),
            alpha=_checks.between("alpha", alpha, 0.0, 1.0),
            warmup_steps=_checks.integer("warmup_steps", warmup_steps, 0, INT64_MAX),
            warmup_from=warmup_from,
        )
    )


def piecewise_constant(boundaries: Sequence[int], values: Sequence[float]) -> job_pb2.LearningRate:
    """Constant rates between step boundaries: `values[i]` until `boundaries[i]`.

    Args:
        boundaries: Strictly increasing step numbers.
        values: One more rate than `boundaries`, each above 0.

    Returns:
        The `LearningRate`, with `piecewise_constant` set.

    Example:

    ```python
    rate = jobs.piecewise_constant([1000, 2000], [1e-3, 1e-4, 1e-5])
    ```
    """
    steps = [_checks.integer(f"boundaries[{i}]", b, 0, INT64_MAX) for i, b in enumerate(boundaries)]
    rates = [_checks.positive(f"values[{i}]", v) for i, v in enumerate(values)]
    if any(a >= b for a, b in itertools.pairwise(steps)):
        raise ValueError(
            f"Received `boundaries` that do not increase, expected strictly increasing steps. "
            f"Received: boundaries={steps}"
        )
    if len(rates) != len(steps) + 1:
        raise ValueError(
            f"Received {len(rates)} `values` for {len(steps)} `boundaries`, expected "
            f"{len(steps) + 1} (one more value than boundaries)."
        )
    return job_pb2.LearningRate(piecewise_constant=job_pb2.PiecewiseConstant(boundaries=steps, values=rates))


# --- optimizers -----------------------------------------------------------------


def adam(learning_rate: LearningRateLike) -> job_pb2.Optimizer:
    """Adam.

    Args:
        learning_rate: A constant rate above 0, or a schedule.

    Returns:
        The `Optimizer`.

    Example:

    ```python
    optimizer = jobs.adam(1e-3)
    ```
    """
    return job_pb2.Optimizer(kind=job_pb2.OPTIMIZER_KIND_ADAM, learning_rate=_learning_rate(learning_rate))


def adamw(learning_rate: LearningRateLike, *, weight_decay: float | None = None) -> job_pb2.Optimizer:
    """AdamW: Adam with decoupled weight decay.

    Args:
        learning_rate: A constant rate above 0, or a schedule.
        weight_decay: The decay, at least 0; the server's 0.004 when None.

    Returns:
        The `Optimizer`.

    Example:

    ```python
    optimizer = jobs.adamw(jobs.cosine_decay(3e-4, decay_steps=5000), weight_decay=0.01)
    ```
    """
    optimizer = job_pb2.Optimizer(
        kind=job_pb2.OPTIMIZER_KIND_ADAMW, learning_rate=_learning_rate(learning_rate)
    )
    if weight_decay is not None:
        decay = _checks.number("weight_decay", weight_decay)
        if decay < 0:
            raise ValueError(
                f"Received a negative `weight_decay`, expected at least 0. Received: weight_decay={decay}"
            )
        optimizer.weight_decay = decay
    return optimizer


def sgd(
    learning_rate: LearningRateLike, *, momentum: float = 0.0, nesterov: bool = False
) -> job_pb2.Optimizer:
    """Stochastic gradient descent, optionally with (Nesterov) momentum.

    Args:
        learning_rate: A constant rate above 0, or a schedule.
        momentum: Momentum, 0 to 1.
        nesterov: Use Nesterov momentum.

    Returns:
        The `Optimizer`.

    Example:

    ```python
    optimizer = jobs.sgd(0.01, momentum=0.9, nesterov=True)
    ```
    """
    return job_pb2.Optimizer(
        kind=job_pb2.OPTIMIZER_KIND_SGD,
        learning_rate=_learning_rate(learning_rate),
        momentum=_checks.between("momentum", momentum, 0.0, 1.0),
        nesterov=bool(nesterov),
    )


def rmsprop(learning_rate: LearningRateLike) -> job_pb2.Optimizer:
    """RMSprop.

    Args:
        learning_rate: A constant rate above 0, or a schedule.

    Returns:
        The `Optimizer`.

    Example:

    ```python
    optimizer = jobs.rmsprop(1e-4)
    ```
    """
    return job_pb2.Optimizer(kind=job_pb2.OPTIMIZER_KIND_RMSPROP, learning_rate=_learning_rate(learning_rate))


# --- optional parts -------------------------------------------------------------


def early_stopping(
    monitor: str = "val_loss",
    *,
    patience: int = 0,
    min_delta: float = 0.0,
    restore_best_weights: bool = False,
) -> job_pb2.EarlyStopping:
    """Stop a job when a monitored metric stops improving.

    Args:
        monitor: The metric, for example `"val_loss"` or `"val_accuracy"`;
            `val_*` needs validation data.
        patience: Epochs without improvement before stopping, at least 0.
        min_delta: Smallest change that counts as an improvement, at least 0.
        restore_best_weights: Restore the best epoch's weights at the end.

    Returns:
        The `EarlyStopping`.

    Example:

    ```python
    stop = jobs.early_stopping("val_accuracy", patience=2, restore_best_weights=True)
    ```
    """
    if not isinstance(monitor, str) or not monitor:
        raise ValueError(
            f"Received an invalid `monitor`, expected a metric name such as 'val_loss'. "
            f"Received: monitor={monitor!r}"
        )
    delta = _checks.number("min_delta", min_delta)
    if delta < 0:
        raise ValueError(f"Received a negative `min_delta`, expected at least 0. Received: min_delta={delta}")
    return job_pb2.EarlyStopping(
        monitor=monitor,
        patience=_checks.integer("patience", patience, 0, INT32_MAX),
        min_delta=delta,
        restore_best_weights=bool(restore_best_weights),
    )


def preprocessing(
    *,
    resize: Sequence[int] | None = None,
    rescale: float | None = None,
    random_flip: str = "",
    random_rotation: float = 0.0,
    random_zoom: float = 0.0,
) -> job_pb2.Preprocessing:
    """Input preprocessing and augmentation, applied in the job's input pipeline.

    Augmentation (`random_*`) applies to training data only.

    Args:
        resize: Resize images to `(height, width)`; None to keep their size.
        rescale: Multiply inputs by this factor, for example `1 / 255`; None
            to leave them as they are.
        random_flip: `"horizontal"`, `"vertical"` or
            `"horizontal_and_vertical"`; `""` for none.
        random_rotation: Random rotation as a fraction of 2π, 0 to 1 (for
            example 0.1); 0 for none.
        random_zoom: Random zoom factor, 0 to 1 (for example 0.1 for ±10 %);
            0 for none.

    Returns:
        The `Preprocessing`.

    Example:

    ```python
    prep = jobs.preprocessing(resize=(96, 96), rescale=1 / 255, random_flip="horizontal")
    ```
    """
    proto = job_pb2.Preprocessing(
        random_flip=_checks.choice("random_flip", random_flip, _RANDOM_FLIPS),
        random_rotation=_checks.between("random_rotation", random_rotation, 0.0, 1.0),
        random_zoom=_checks.between("random_zoom", random_zoom, 0.0, 1.0),
    )
    if resize is not None:
        if isinstance(resize, (str, bytes)) or len(resize) != 2:
            raise ValueError(
                f"Received an invalid `resize`, expected (height, width). Received: resize={resize!r}"
            )
        proto.resize.extend(_checks.integer(f"resize[{i}]", d, 1, INT32_MAX) for i, d in enumerate(resize))
    if rescale is not None:
        proto.rescale = _checks.number("rescale", rescale)
    return proto


# --- the spec -------------------------------------------------------------------


def _trainable_selection(
    freeze: SelectorLike | None, unfreeze: SelectorLike | None, train_last_layers: int | None
) -> job_pb2.TrainableSelection | None:
    # None when nothing is asked, so that `trainable` stays unset: the model's own settings apply.
    if freeze is None and unfreeze is None and train_last_layers is None:
        return None
    selection = job_pb2.TrainableSelection()
    if freeze is not None:
        selection.freeze.CopyFrom(selector_to_proto(freeze))
    if unfreeze is not None:
        selection.unfreeze.CopyFrom(selector_to_proto(unfreeze))
    if train_last_layers is not None:
        selection.train_last_layers = _checks.integer("train_last_layers", train_last_layers, 1, INT32_MAX)
    return selection


def spec(
    model_id: str,
    train_dataset_id: str,
    *,
    epochs: int,
    batch_size: int,
    optimizer: job_pb2.Optimizer,
    loss: str,
    metrics: Sequence[str] = (),
    output_model_id: str = "",
    validation_dataset_id: str = "",
    validation_split: float = 0.0,
    freeze: SelectorLike | None = None,
    unfreeze: SelectorLike | None = None,
    train_last_layers: int | None = None,
    early_stopping: job_pb2.EarlyStopping | None = None,
    checkpoint_every_epochs: int = 0,
    progress_every_steps: int = 0,
    checkpoint_every_steps: int = 0,
    seed: int | None = None,
    preprocessing: job_pb2.Preprocessing | None = None,
    mixed_precision: bool = False,
    shuffle: bool | None = None,
) -> job_pb2.JobSpec:
    """Build the spec of a fine-tuning job, for `create_job`.

    The job trains a working copy of `model_id`; on success it commits the
    result as one new revision of `model_id`, or as revision 1 of
    `output_model_id`. Which layers train: the model's own settings, then
    `freeze`, then `unfreeze`, then `train_last_layers` (each applied to the
    result of the previous one).

    Args:
        model_id: The model to train.
        train_dataset_id: The training dataset.
        epochs: Number of epochs, at least 1.
        batch_size: Batch size, at least 1.
        optimizer: Built with `jobs.adam`, `jobs.adamw`, `jobs.sgd` or
            `jobs.rmsprop`.
        loss: A Keras loss name, for example
            `"sparse_categorical_crossentropy"` or `"mse"`.
        metrics: Keras metric names, for example `["accuracy"]`.
        output_model_id: Write the result to this new model instead of
            committing it into `model_id`; "" for in place.
        validation_dataset_id: A validation dataset; "" for none.
        validation_split: Fraction of the training data held out for
            validation, 0 to 0.5; ignored when there is other validation data.
        freeze: Variables whose layers are frozen.
        unfreeze: Variables whose layers are unfrozen after `freeze`.
        train_last_layers: Train only the last K layers (K at least 1),
            applied last; None to leave the selection as it is.
        early_stopping: Built with `jobs.early_stopping`.
        checkpoint_every_epochs: Checkpoint every N epochs; 0 for every epoch.
        progress_every_steps: A progress event every N steps; 0 for 10.
        checkpoint_every_steps: Also checkpoint inside epochs every N steps;
            0 for only when the last checkpoint is over 10 minutes old.
        seed: Seed of shuffling, augmentation and dropout.
        preprocessing: Built with `jobs.preprocessing`.
        mixed_precision: Train in mixed float16 precision (GPU only).
        shuffle: Shuffle the training data every epoch; None for the
            server's default (True).

    Returns:
        The `JobSpec`.

    Example:

    ```python
    job_spec = jobs.spec(
        "resnet", "flowers", epochs=5, batch_size=64,
        optimizer=jobs.sgd(0.01, momentum=0.9), loss="sparse_categorical_crossentropy",
        metrics=["accuracy"], output_model_id="resnet-flowers",
        train_last_layers=3, preprocessing=jobs.preprocessing(rescale=1 / 255),
    )
    ```
    """
    _checks.instance("optimizer", optimizer, job_pb2.Optimizer, "jobs.adam")
    if not optimizer.HasField("learning_rate"):
        raise ValueError("Received an `optimizer` without a learning rate, expected one built with `jobs`.")
    proto = job_pb2.JobSpec(
        model_id=_checks.resource_id("model_id", model_id, required=True),
        output_model_id=_checks.resource_id("output_model_id", output_model_id, required=False),
        train_dataset_id=_checks.resource_id("train_dataset_id", train_dataset_id, required=True),
        validation_dataset_id=_checks.resource_id(
            "validation_dataset_id", validation_dataset_id, required=False
        ),
        validation_split=_checks.between("validation_split", validation_split, 0.0, 0.5),
        epochs=_checks.integer("epochs", epochs, 1, INT32_MAX),
        batch_size=_checks.integer("batch_size", batch_size, 1, INT32_MAX),
        optimizer=optimizer,
        loss=_checks.loss(loss),
        metrics=_checks.strings("metrics", metrics),
        checkpoint_every_epochs=_checks.integer(
            "checkpoint_every_epochs", checkpoint_every_epochs, 0, INT32_MAX
        ),
        progress_every_steps=_checks.integer("progress_every_steps", progress_every_steps, 0, INT32_MAX),
        checkpoint_every_steps=_checks.integer(
            "checkpoint_every_steps", checkpoint_every_steps, 0, INT32_MAX
        ),
        mixed_precision=bool(mixed_precision),
    )
    trainable = _trainable_selection(freeze, unfreeze, train_last_layers)
    if trainable is not None:
        proto.trainable.CopyFrom(trainable)
    if early_stopping is not None:
        _checks.instance("early_stopping", early_stopping, job_pb2.EarlyStopping, "jobs.early_stopping")
        proto.early_stopping.CopyFrom(early_stopping)
    if preprocessing is not None:
        _checks.instance("preprocessing", preprocessing, job_pb2.Preprocessing, "jobs.preprocessing")
        proto.preprocessing.CopyFrom(preprocessing)
    if seed is not None:
        proto.seed = _checks.integer("seed", seed, INT64_MIN, INT64_MAX)
    if shuffle is not None:
        proto.shuffle = bool(shuffle)
    return proto
