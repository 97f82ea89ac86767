"""What a run does besides training, kept cheap: TensorBoard logs per epoch only, lean input batches.

The job's per-step work must stay close to a plain `model.fit` (issue 9's
fine-tuning figure); these tests pin the behaviour those savings keep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tests.jobs_support import digits
from weightsmith_server.jobs import training
from weightsmith_server.jobs.events import EpochEnded, EventPayload, StepProgress
from weightsmith_server.jobs.spec import (
    LearningRateSpec,
    OptimizerKind,
    OptimizerSpec,
    PreprocessingSpec,
    ScheduleKind,
    TrainingSpec,
)


def _spec(**overrides: Any) -> TrainingSpec:
    values: dict[str, Any] = {
        "model_id": "m",
        "train_dataset_id": "d",
        "epochs": 2,
        "batch_size": 16,
        "optimizer": OptimizerSpec(
            OptimizerKind.ADAM, LearningRateSpec(ScheduleKind.CONSTANT, constant=0.01)
        ),
        "loss": "sparse_categorical_crossentropy",
        "metrics": ("accuracy",),
        "progress_every_steps": 2,
        "seed": 7,
        "preprocessing": PreprocessingSpec(rescale=1 / 16),
    }
    return TrainingSpec(**(values | overrides))


def _dataset(count: int) -> tuple[Any, int]:
    import tensorflow as tf

    data = digits(0, 4, part="train")
    return tf.data.Dataset.from_tensor_slices((data["x"][:count], data["y"][:count])), count


def _batches(dataset: Any) -> list[tuple[bytes, bytes]]:
    return [(x.numpy().tobytes(), y.numpy().tobytes()) for x, y in dataset]


class _Reporter:
    def __init__(self) -> None:
        self.events: list[EventPayload] = []

    def emit(self, payload: EventPayload) -> None:
        self.events.append(payload)

    def should_stop(self) -> bool:
        return False


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard log folder: tag -> [(step, value)]."""
    import tensorflow as tf

    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                number = (
                    float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
                )
                found.setdefault(value.tag, []).append((event.step, number))
    return found


def test_tensorboard_logs_every_epochs_metrics_and_no_per_step_scalars(tmp_path: Path) -> None:
    import keras

    from weightsmith_server.models import architecture
    from weightsmith_server.variables import model_variables

    config = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(5, activation="softmax", name="out"),
        ]
    ).to_json()
    base = architecture.rebuild(config, device="/CPU:0", seed=0)
    values = {entry.path: np.array(v.numpy()) for entry, v in model_variables(base)}
    reporter = _Reporter()
    outcome = training.run(
        _spec(),
        config_json=config,
        values=values,
        train_data=_dataset(64),  # 4 steps an epoch
        validation_data=None,
        device="/CPU:0",
        job_dir=tmp_path,
        reporter=reporter,
    )

    assert outcome.steps_completed == 8
    assert sum(isinstance(e, StepProgress) for e in reporter.events) == 4  # every 2 steps, epoch ends too
    ended = [e for e in reporter.events if isinstance(e, EpochEnded)]
    scalars = _scalars(tmp_path / "tensorboard")
    assert not [tag for tag in scalars if tag.startswith("batch_")]
    assert [step for step, _ in scalars["epoch_loss"]] == [0, 1]
    assert [value for _, value in scalars["epoch_loss"]] == [
        np.float32(e.train_metrics["loss"]) for e in ended
    ]
    assert [step for step, _ in scalars["epoch_accuracy"]] == [0, 1]


def test_unaugmented_shuffled_batches_skip_only_the_first_epochs_done_batches() -> None:
    data, count = _dataset(100)
    spec = _spec()
    assert not spec.preprocessing.augments
    prepared = training.examples(data, spec, input_dtype="float32", count=count)
    per_epoch = 7  # ceil(100 / 16)

    whole = _batches(training.training_batches(prepared, spec, seed=5, epochs=(0, 3)))
    assert len(whole) == 3 * per_epoch
    epochs = [whole[i * per_epoch : (i + 1) * per_epoch] for i in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]  # a new order every epoch
    resumed = _batches(training.training_batches(prepared, spec, seed=5, epochs=(1, 3), skip=3))
    assert resumed == epochs[1][3:] + epochs[2]
    examples = sorted(x for batch in epochs[1] for x in np.frombuffer(batch[1], np.int64).tolist())
    assert examples == sorted(int(y) for _, y in data)  # each example once
