"""The checks that make a bad job spec fail at CreateJob, each naming its field.

Every problem that can be known before training is reported here, so that a
job never fails on its spec an hour in.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from weightsmith_server.errors import AlreadyExists, InvalidArgument
from weightsmith_server.jobs.spec import LearningRateSpec, PreprocessingSpec, ScheduleKind, TrainingSpec
from weightsmith_server.limits import MAX_GLOBAL_SEED, check_seed
from weightsmith_server.naming import validate_id
from weightsmith_server.selectors import select

if TYPE_CHECKING:
    from weightsmith_server.datasets import DatasetInfo, DatasetStore
    from weightsmith_server.models.host import ModelHost
    from weightsmith_server.models.resident import ResidentModel

_SPARSE_LOSSES = ("sparse_categorical_crossentropy", "SparseCategoricalCrossentropy")


def _invalid(message: str, reason: str, field: str, prefix: str = "spec.") -> InvalidArgument:
    return InvalidArgument(message, reason=reason, field=f"{prefix}{field}")


def _positive(value: float, name: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise _invalid(f"Received {name}={value}, expected a number greater than 0.", "INVALID_NUMBER", name)


def _check_learning_rate(rate: LearningRateSpec) -> None:
    where = "optimizer.learning_rate"
    if rate.kind is None:
        raise _invalid(
            "Received no learning rate; set a constant or a schedule.", "MISSING_LEARNING_RATE", where
        )
    if rate.kind == ScheduleKind.CONSTANT:
        _positive(rate.constant, f"{where}.constant")
    elif rate.kind == ScheduleKind.EXPONENTIAL_DECAY:
        _positive(rate.initial, f"{where}.exponential_decay.initial_learning_rate")
        _positive(rate.decay_rate, f"{where}.exponential_decay.decay_rate")
        if rate.decay_steps < 1:
            raise _invalid(
                "decay_steps must be at least 1.", "INVALID_NUMBER", f"{where}.exponential_decay.decay_steps"
            )
    elif rate.kind == ScheduleKind.COSINE_DECAY:
        _positive(rate.initial, f"{where}.cosine_decay.initial_learning_rate")
        if rate.decay_steps < 1:
            raise _invalid(
                "decay_steps must be at least 1.", "INVALID_NUMBER", f"{where}.cosine_decay.decay_steps"
            )
        if not 0 <= rate.alpha <= 1:
            raise _invalid("alpha must be in [0, 1].", "INVALID_NUMBER", f"{where}.cosine_decay.alpha")
        if rate.warmup_steps < 0 or rate.warmup_from < 0:
            raise _invalid(
                "warmup must not be negative.", "INVALID_NUMBER", f"{where}.cosine_decay.warmup_steps"
            )
    else:
        if len(rate.values) != len(rate.boundaries) + 1:
            raise _invalid(
                f"Received {len(rate.boundaries)} boundaries and {len(rate.values)} values; piecewise "
                "constant needs exactly one more value than boundaries.",
                "INVALID_SCHEDULE",
                f"{where}.piecewise_constant.values",
            )
        if list(rate.boundaries) != sorted(set(rate.boundaries)) or any(b < 0 for b in rate.boundaries):
            raise _invalid(
                "Boundaries must be increasing and not negative.",
                "INVALID_SCHEDULE",
                f"{where}.piecewise_constant.boundaries",
            )
        for value in rate.values:
            _positive(value, f"{where}.piecewise_constant.values")


def _check_keras_name(kind: str, name: str, where: str, prefix: str = "spec.") -> None:
    import keras

    getter = keras.losses.get if kind == "loss" else keras.metrics.get
    try:
        found = getter(name) if name else None
    except (ValueError, TypeError):
        found = None
    if found is None:
        raise _invalid(
            f"Received an unknown {kind} {name[:100]!r}; use a Keras {kind} name such as "
            f"{'`sparse_categorical_crossentropy` or `mse`' if kind == 'loss' else '`accuracy` or `mae`'}.",
            f"UNKNOWN_{kind.upper()}",
            where,
            prefix,
        )


def validate(spec: TrainingSpec, host: ModelHost, datasets: DatasetStore) -> None:
    """Raise a field-naming error for anything that would keep the job from running."""
    host.run(spec.model_id, lambda resident: _validate(spec, resident, host, datasets), field="spec.model_id")


def _validate(spec: TrainingSpec, resident: ResidentModel, host: ModelHost, datasets: DatasetStore) -> None:
    if spec.output_model_id:
        validate_id(spec.output_model_id, field="spec.output_model_id")
        if host.exists(spec.output_model_id):
            raise AlreadyExists(
                f"A model with id {spec.output_model_id!r} exists already; pick another output id.",
                reason="MODEL_EXISTS",
                field="spec.output_model_id",
            )
    train = datasets.get(spec.train_dataset_id, field="spec.train_dataset_id")
    validation = (
        datasets.get(spec.validation_dataset_id, field="spec.validation_dataset_id")
        if spec.validation_dataset_id
        else None
    )
    if spec.epochs < 1:
        raise _invalid(f"Received epochs={spec.epochs}, expected at least 1.", "INVALID_EPOCHS", "epochs")
    if spec.batch_size < 1:
        raise _invalid(
            f"Received batch_size={spec.batch_size}, expected at least 1.", "INVALID_BATCH_SIZE", "batch_size"
        )
    check_seed(spec.seed, field="spec.seed", maximum=MAX_GLOBAL_SEED)
    if not 0 <= spec.validation_split <= 0.5:
        raise _invalid(
            f"Received validation_split={spec.validation_split}, expected 0 to 0.5.",
            "INVALID_VALIDATION_SPLIT",
            "validation_split",
        )
    _check_learning_rate(spec.optimizer.learning_rate)
    if not 0 <= spec.optimizer.momentum < 1:
        raise _invalid("momentum must be in [0, 1).", "INVALID_NUMBER", "optimizer.momentum")
    if spec.optimizer.weight_decay is not None and not spec.optimizer.weight_decay >= 0:
        raise _invalid("weight_decay must be at least 0.", "INVALID_NUMBER", "optimizer.weight_decay")
    check_loss_and_metrics(spec)
    for field in ("checkpoint_every_epochs", "checkpoint_every_steps", "progress_every_steps"):
        if getattr(spec, field) < 0:
            raise _invalid(f"{field} must not be negative.", "INVALID_NUMBER", field)
    _check_trainable(spec, resident)
    _check_preprocessing(spec.preprocessing)
    _check_early_stopping(spec, train, validation)
    check_data_fits_model(spec, resident, train, "train_dataset_id")
    if validation is not None:
        check_data_fits_model(spec, resident, validation, "validation_dataset_id")
    if spec.mixed_precision and not resident.device.upper().startswith("/DEVICE:GPU"):
        raise _invalid(
            f"Mixed precision needs a GPU; model {spec.model_id!r} is on {resident.device}.",
            "MIXED_PRECISION_NEEDS_GPU",
            "mixed_precision",
        )


# Each metric is compiled into every training and evaluation step: a thousand
# of them keep a job compiling for minutes, past any cancellation.
MAX_METRICS = 16


def check_loss_and_metrics(spec: TrainingSpec, prefix: str = "spec.") -> None:
    """Unknown Keras loss or metric names, or too many metrics, are INVALID_ARGUMENT on their field."""
    _check_keras_name("loss", spec.loss, "loss", prefix)
    if len(spec.metrics) > MAX_METRICS:
        raise InvalidArgument(
            f"Received {len(spec.metrics)} metrics, expected at most {MAX_METRICS}.",
            reason="TOO_MANY_METRICS",
            field=f"{prefix}metrics",
            metadata={"count": str(len(spec.metrics)), "limit": str(MAX_METRICS)},
        )
    for index, metric in enumerate(spec.metrics):
        _check_keras_name("metric", metric, f"metrics[{index}]", prefix)


def _check_trainable(spec: TrainingSpec, resident: Any) -> None:
    manifest = resident.state.manifest
    entries = [v.entry for v in manifest.variables]
    for name in ("freeze", "unfreeze"):
        selector = getattr(spec, name)
        if selector is not None:
            select(selector, entries, manifest.layer_count, field=f"spec.trainable.{name}")
    if spec.train_last_layers is not None and not 1 <= spec.train_last_layers <= manifest.layer_count:
        raise _invalid(
            f"Received train_last_layers={spec.train_last_layers}; the model has "
            f"{manifest.layer_count} layers.",
            "INVALID_LAYER_COUNT",
            "trainable.train_last_layers",
        )


def _check_preprocessing(pre: PreprocessingSpec) -> None:
    if pre.resize is not None and (len(pre.resize) != 2 or not all(0 < d <= 4096 for d in pre.resize)):
        raise _invalid(
            f"Received resize={list(pre.resize)}, expected [height, width] of 1 to 4096.",
            "INVALID_RESIZE",
            "preprocessing.resize",
        )
    if pre.rescale is not None and not math.isfinite(pre.rescale):
        raise _invalid("rescale must be finite.", "INVALID_NUMBER", "preprocessing.rescale")
    for name in ("random_rotation", "random_zoom"):
        value = getattr(pre, name)
        if not (math.isfinite(value) and 0 <= value < 1):
            raise _invalid(f"{name} must be in [0, 1).", "INVALID_NUMBER", f"preprocessing.{name}")


def _check_early_stopping(spec: TrainingSpec, train: DatasetInfo, validation: DatasetInfo | None) -> None:
    stopping = spec.early_stopping
    if stopping is None:
        return
    has_validation = validation is not None or train.validation_example_count > 0 or spec.validation_split > 0
    known = {"loss", *spec.metrics, *(_metric_key(m) for m in spec.metrics)}
    monitored = stopping.monitor.removeprefix("val_")
    if monitored not in known:
        raise _invalid(
            f"Received monitor={stopping.monitor!r}; it must be `loss` or one of the job's metrics, "
            "optionally prefixed by `val_`.",
            "UNKNOWN_MONITOR",
            "early_stopping.monitor",
        )
    if stopping.monitor.startswith("val_") and not has_validation:
        raise _invalid(
            f"monitor={stopping.monitor!r} needs validation data; set validation_dataset_id or "
            "validation_split.",
            "NO_VALIDATION_DATA",
            "early_stopping.monitor",
        )
    if stopping.patience < 0:
        raise _invalid("patience must not be negative.", "INVALID_NUMBER", "early_stopping.patience")


def _metric_key(name: str) -> str:
    return "accuracy" if name in ("acc", "accuracy") else name


def check_data_fits_model(
    spec: TrainingSpec, resident: Any, data: DatasetInfo, field: str, prefix: str = "spec."
) -> None:
    """The dataset's inputs and labels fit the model's input and output (after preprocessing)."""
    model = resident.state.keras_model
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise _invalid(
            "Jobs train models with exactly one input and one output.",
            "UNSUPPORTED_MODEL",
            "model_id",
            prefix,
        )
    expected = tuple(model.inputs[0].shape[1:])
    features = tuple(data.features.shape)
    if spec.preprocessing.resize is not None and len(features) == 3:
        features = (*spec.preprocessing.resize, features[2])
    if len(features) != len(expected) or any(
        want is not None and want != got for want, got in zip(expected, features, strict=True)
    ):
        shown = ["None" if d is None else d for d in expected]
        raise _invalid(
            f"Dataset {data.dataset_id!r} has inputs of shape {list(features)} (after preprocessing); "
            f"model {spec.model_id!r} expects [{', '.join(map(str, shown))}].",
            "INPUT_SHAPE_MISMATCH",
            field,
            prefix,
        )
    outputs = tuple(model.outputs[0].shape[1:])
    if spec.loss in _SPARSE_LOSSES:
        units = outputs[-1] if outputs else 1
        if data.labels.dtype.startswith("float") or data.class_count == 0:
            raise _invalid(
                f"{spec.loss} needs integer class labels; dataset {data.dataset_id!r} has "
                f"{data.labels.dtype} labels.",
                "LABELS_NOT_CLASSES",
                field,
                prefix,
            )
        if units is not None and data.class_count > units:
            raise _invalid(
                f"Dataset {data.dataset_id!r} has labels up to {data.class_count - 1}, but model "
                f"{spec.model_id!r} outputs {units} classes. Replace the head (replace_head) or use "
                "another dataset.",
                "LABELS_OUT_OF_RANGE",
                field,
                prefix,
            )
    elif tuple(data.labels.shape) != outputs and not (not data.labels.shape and outputs == (1,)):
        raise _invalid(
            f"Dataset {data.dataset_id!r} has labels of shape {list(data.labels.shape)}; model "
            f"{spec.model_id!r} outputs {list(outputs)} per example.",
            "LABEL_SHAPE_MISMATCH",
            field,
            prefix,
        )
