"""What a fine-tuning job runs, and the checks that make a bad spec fail at CreateJob.

Every problem that can be known before training is reported here, with the
field that causes it, so that a job never fails on its spec an hour in.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from weightsmith_server.errors import AlreadyExists, InvalidArgument
from weightsmith_server.naming import validate_id
from weightsmith_server.selectors import Selector, select

if TYPE_CHECKING:
    from weightsmith_server.datasets import DatasetInfo, DatasetStore
    from weightsmith_server.registry import Registry

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "exponential_decay", "cosine_decay", "piecewise_constant")
FLIPS = ("", "horizontal", "vertical", "horizontal_and_vertical")
_SPARSE_LOSSES = ("sparse_categorical_crossentropy", "SparseCategoricalCrossentropy")


@dataclass(frozen=True)
class LearningRateSpec:
    """A constant rate or one of the Keras schedules, by name and arguments."""

    kind: str
    constant: float = 0.0
    initial: float = 0.0
    decay_steps: int = 0
    decay_rate: float = 0.0
    staircase: bool = False
    alpha: float = 0.0
    warmup_steps: int = 0
    warmup_from: float = 0.0
    boundaries: tuple[int, ...] = ()
    values: tuple[float, ...] = ()


@dataclass(frozen=True)
class OptimizerSpec:
    kind: str
    learning_rate: LearningRateSpec
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float | None = None


@dataclass(frozen=True)
class EarlyStoppingSpec:
    monitor: str = "val_loss"
    patience: int = 0
    min_delta: float = 0.0
    restore_best_weights: bool = False


@dataclass(frozen=True)
class PreprocessingSpec:
    resize: tuple[int, int] | None = None
    rescale: float | None = None
    random_flip: str = ""
    random_rotation: float = 0.0
    random_zoom: float = 0.0

    @property
    def augments(self) -> bool:
        return bool(self.random_flip or self.random_rotation or self.random_zoom)


@dataclass(frozen=True)
class TrainingSpec:
    """A job spec, decoded from the wire; `validate` checks it against the server."""

    model_id: str
    train_dataset_id: str
    epochs: int
    batch_size: int
    optimizer: OptimizerSpec
    loss: str
    metrics: tuple[str, ...] = ()
    output_model_id: str = ""
    validation_dataset_id: str = ""
    validation_split: float = 0.0
    freeze: Selector | None = None
    unfreeze: Selector | None = None
    train_last_layers: int | None = None
    early_stopping: EarlyStoppingSpec | None = None
    checkpoint_every_epochs: int = 0
    progress_every_steps: int = 0
    seed: int | None = None
    preprocessing: PreprocessingSpec = field(default_factory=PreprocessingSpec)
    mixed_precision: bool = False
    shuffle: bool = True

    @property
    def progress_interval(self) -> int:
        return self.progress_every_steps or 10

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every_epochs or 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainingSpec:
        """Inverse of `to_dict` (job files are read back at start-up)."""

        def selector(value: dict[str, Any] | None) -> Selector | None:
            if value is None:
                return None
            layer_range = value.get("layer_range")
            return Selector(
                paths=tuple(value["paths"]),
                patterns=tuple(value["patterns"]),
                layers=tuple(value["layers"]),
                layer_range=tuple(layer_range) if layer_range is not None else None,  # type: ignore[arg-type]
                kinds=tuple(value["kinds"]),
                trainable_only=value["trainable_only"],
            )

        rate = raw["optimizer"]["learning_rate"]
        optimizer = OptimizerSpec(
            **(
                raw["optimizer"]
                | {
                    "learning_rate": LearningRateSpec(
                        **(rate | {"boundaries": tuple(rate["boundaries"]), "values": tuple(rate["values"])})
                    )
                }
            )
        )
        stopping = raw.get("early_stopping")
        pre = raw["preprocessing"]
        return cls(
            **(
                raw
                | {
                    "optimizer": optimizer,
                    "metrics": tuple(raw["metrics"]),
                    "freeze": selector(raw.get("freeze")),
                    "unfreeze": selector(raw.get("unfreeze")),
                    "early_stopping": EarlyStoppingSpec(**stopping) if stopping else None,
                    "preprocessing": PreprocessingSpec(
                        **(pre | {"resize": tuple(pre["resize"]) if pre["resize"] else None})
                    ),
                }
            )
        )


def _invalid(message: str, reason: str, field: str, prefix: str = "spec.") -> InvalidArgument:
    return InvalidArgument(message, reason=reason, field=f"{prefix}{field}")


def _positive(value: float, name: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise _invalid(f"Received {name}={value}, expected a number greater than 0.", "INVALID_NUMBER", name)


def _check_learning_rate(rate: LearningRateSpec) -> None:
    where = "optimizer.learning_rate"
    if rate.kind not in SCHEDULES:
        raise _invalid(
            "Received no learning rate; set a constant or a schedule.", "MISSING_LEARNING_RATE", where
        )
    if rate.kind == "constant":
        _positive(rate.constant, f"{where}.constant")
    elif rate.kind == "exponential_decay":
        _positive(rate.initial, f"{where}.exponential_decay.initial_learning_rate")
        _positive(rate.decay_rate, f"{where}.exponential_decay.decay_rate")
        if rate.decay_steps < 1:
            raise _invalid(
                "decay_steps must be at least 1.", "INVALID_NUMBER", f"{where}.exponential_decay.decay_steps"
            )
    elif rate.kind == "cosine_decay":
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


def validate(spec: TrainingSpec, registry: Registry, datasets: DatasetStore) -> None:
    """Raise a field-naming error for anything that would keep the job from running."""
    resident = registry.get(spec.model_id, field="spec.model_id")
    if spec.output_model_id:
        validate_id(spec.output_model_id, field="spec.output_model_id")
        if spec.output_model_id in {m.model_id for m in registry.models()}:
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
    if not 0 <= spec.validation_split <= 0.5:
        raise _invalid(
            f"Received validation_split={spec.validation_split}, expected 0 to 0.5.",
            "INVALID_VALIDATION_SPLIT",
            "validation_split",
        )
    if spec.optimizer.kind not in OPTIMIZERS:
        raise _invalid(f"Unknown optimizer {spec.optimizer.kind!r}.", "UNKNOWN_OPTIMIZER", "optimizer.kind")
    _check_learning_rate(spec.optimizer.learning_rate)
    if not 0 <= spec.optimizer.momentum < 1:
        raise _invalid("momentum must be in [0, 1).", "INVALID_NUMBER", "optimizer.momentum")
    if spec.optimizer.weight_decay is not None and not spec.optimizer.weight_decay >= 0:
        raise _invalid("weight_decay must be at least 0.", "INVALID_NUMBER", "optimizer.weight_decay")
    check_loss_and_metrics(spec)
    if spec.checkpoint_every_epochs < 0 or spec.progress_every_steps < 0:
        field = "checkpoint_every_epochs" if spec.checkpoint_every_epochs < 0 else "progress_every_steps"
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


def check_loss_and_metrics(spec: TrainingSpec, prefix: str = "spec.") -> None:
    """Unknown Keras loss or metric names are INVALID_ARGUMENT on their field."""
    _check_keras_name("loss", spec.loss, "loss", prefix)
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
    if pre.random_flip not in FLIPS:
        raise _invalid(
            f"Received random_flip={pre.random_flip!r}, expected one of {list(FLIPS[1:])}.",
            "INVALID_FLIP",
            "preprocessing.random_flip",
        )
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
