"""What the job tests of every tier share: the digits data, a small CNN, job specs."""

from __future__ import annotations

import numpy as np

from weightsmith import jobs
from weightsmith.v1 import job_pb2
from weightsmith_server.jobs.spec import (
    EarlyStoppingSpec,
    LearningRateSpec,
    OptimizerKind,
    OptimizerSpec,
    PreprocessingSpec,
    RandomFlip,
    ScheduleKind,
    TrainingSpec,
)
from weightsmith_server.selectors import Selector


def digits(low: int, high: int, *, part: str) -> dict[str, np.ndarray]:
    """scikit-learn's bundled 8x8 digits in [low, high], labels shifted to 0.., split 80/20."""
    from sklearn.datasets import load_digits

    loaded = load_digits()
    keep = (loaded.target >= low) & (loaded.target <= high)
    x = loaded.images[keep].astype(np.float32)[..., None]
    y = (loaded.target[keep] - low).astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    cut = int(len(y) * 0.8)
    return {"x": x[:cut], "y": y[:cut]} if part == "train" else {"x": x[cut:], "y": y[cut:]}


def cnn_config(classes: int = 5) -> str:
    """Keras config JSON of a small functional CNN for 8x8x1 digits."""
    import keras

    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(16, 3, activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(32, 3, activation="relu", name="conv2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(64, activation="relu", name="dense")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="out")(x)
    return keras.Model(inputs, outputs, name="digits_cnn").to_json()


def digits_spec(model_id: str, dataset_id: str, **overrides: object) -> job_pb2.JobSpec:
    """A job spec that trains the CNN on digits (2 epochs of Adam unless overridden)."""
    options: dict[str, object] = {
        "epochs": 2,
        "batch_size": 32,
        "optimizer": jobs.adam(0.01),
        "loss": "sparse_categorical_crossentropy",
        "metrics": ["accuracy"],
        "preprocessing": jobs.preprocessing(rescale=1 / 16),
        "seed": 0,
    }
    options.update(overrides)
    return jobs.spec(model_id, dataset_id, **options)  # type: ignore[arg-type]


def full_training_spec(**overrides: object) -> TrainingSpec:
    """A domain spec with every field away from its default (a schedule, selectors, early stopping)."""
    values: dict[str, object] = {
        "model_id": "base",
        "train_dataset_id": "train",
        "epochs": 3,
        "batch_size": 16,
        "optimizer": OptimizerSpec(
            OptimizerKind.SGD,
            LearningRateSpec(
                ScheduleKind.COSINE_DECAY, initial=0.1, decay_steps=100, alpha=0.1, warmup_steps=5
            ),
            momentum=0.9,
            nesterov=True,
            weight_decay=0.01,
        ),
        "loss": "sparse_categorical_crossentropy",
        "metrics": ("accuracy", "mae"),
        "output_model_id": "tuned",
        "validation_dataset_id": "held-out",
        "validation_split": 0.1,
        "freeze": Selector(layers=("conv1",), layer_range=(None, -2), kinds=("kernel",)),
        "unfreeze": Selector(patterns=("dense*",), trainable_only=True),
        "train_last_layers": 2,
        "early_stopping": EarlyStoppingSpec(
            "val_accuracy", patience=2, min_delta=0.01, restore_best_weights=True
        ),
        "checkpoint_every_epochs": 2,
        "checkpoint_every_steps": 25,
        "progress_every_steps": 5,
        "seed": 7,
        "preprocessing": PreprocessingSpec(
            resize=(16, 16),
            rescale=1 / 255,
            random_flip=RandomFlip.HORIZONTAL,
            random_rotation=0.1,
            random_zoom=0.2,
        ),
        "mixed_precision": True,
        "shuffle": False,
    }
    return TrainingSpec(**(values | overrides))  # type: ignore[arg-type]
