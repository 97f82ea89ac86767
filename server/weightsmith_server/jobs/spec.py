"""What a fine-tuning job runs: the domain job spec, its enums and its `job.json` form.

The spec types refuse unknown enum values when they are built (from the
wire codec, from `job.json`, or in-process), naming the field; the checks
against the server's models and datasets live in `jobs.validation`.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from weightsmith_server.enums import member
from weightsmith_server.selectors import Selector


class OptimizerKind(enum.StrEnum):
    """The Keras optimizer a job trains with."""

    ADAM = "adam"
    ADAMW = "adamw"
    SGD = "sgd"
    RMSPROP = "rmsprop"


class ScheduleKind(enum.StrEnum):
    """A constant learning rate or one of the Keras learning-rate schedules."""

    CONSTANT = "constant"
    EXPONENTIAL_DECAY = "exponential_decay"
    COSINE_DECAY = "cosine_decay"
    PIECEWISE_CONSTANT = "piecewise_constant"


class RandomFlip(enum.StrEnum):
    """The `keras.layers.RandomFlip` mode of the augmentation; NONE adds no flip."""

    NONE = ""
    HORIZONTAL = "horizontal"
    VERTICAL = "vertical"
    HORIZONTAL_AND_VERTICAL = "horizontal_and_vertical"


@dataclass(frozen=True)
class LearningRateSpec:
    """A constant rate or one of the Keras schedules, by kind and arguments; no kind means unset."""

    kind: ScheduleKind | None
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

    def __post_init__(self) -> None:
        if self.kind is not None:
            kind = member(
                ScheduleKind,
                self.kind,
                field="spec.optimizer.learning_rate",
                reason="MISSING_LEARNING_RATE",
            )
            object.__setattr__(self, "kind", kind)


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer and its arguments; `weight_decay` None means AdamW's default."""

    kind: OptimizerKind
    learning_rate: LearningRateSpec
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        kind = member(OptimizerKind, self.kind, field="spec.optimizer.kind", reason="UNKNOWN_OPTIMIZER")
        object.__setattr__(self, "kind", kind)


@dataclass(frozen=True)
class EarlyStoppingSpec:
    """`keras.callbacks.EarlyStopping` arguments."""

    monitor: str = "val_loss"
    patience: int = 0
    min_delta: float = 0.0
    restore_best_weights: bool = False


@dataclass(frozen=True)
class PreprocessingSpec:
    """What the input pipeline does to each example before the model sees it."""

    resize: tuple[int, int] | None = None
    rescale: float | None = None
    random_flip: RandomFlip = RandomFlip.NONE
    random_rotation: float = 0.0
    random_zoom: float = 0.0

    def __post_init__(self) -> None:
        flip = member(
            RandomFlip, self.random_flip, field="spec.preprocessing.random_flip", reason="INVALID_FLIP"
        )
        object.__setattr__(self, "random_flip", flip)

    @property
    def augments(self) -> bool:
        return bool(self.random_flip or self.random_rotation or self.random_zoom)


@dataclass(frozen=True)
class TrainingSpec:
    """A job spec as the domain sees it; `jobs.validation.validate` checks it against the server."""

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
    checkpoint_every_steps: int = 0
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
        """The spec as JSON values (enums as their strings), as `job.json` stores it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainingSpec:
        """Inverse of `to_dict` (job files are read back at start-up)."""
        optimizer = raw["optimizer"]
        rate = optimizer["learning_rate"]
        learning_rate = LearningRateSpec(
            **(
                rate
                | {
                    "kind": rate["kind"] or None,
                    "boundaries": tuple(rate["boundaries"]),
                    "values": tuple(rate["values"]),
                }
            )
        )
        stopping = raw.get("early_stopping")
        pre = raw["preprocessing"]
        return cls(
            **(
                raw
                | {
                    "optimizer": OptimizerSpec(**(optimizer | {"learning_rate": learning_rate})),
                    "metrics": tuple(raw["metrics"]),
                    "freeze": _selector(raw.get("freeze")),
                    "unfreeze": _selector(raw.get("unfreeze")),
                    "early_stopping": EarlyStoppingSpec(**stopping) if stopping else None,
                    "preprocessing": PreprocessingSpec(
                        **(pre | {"resize": tuple(pre["resize"]) if pre["resize"] else None})
                    ),
                }
            )
        )


def _selector(value: dict[str, Any] | None) -> Selector | None:
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
