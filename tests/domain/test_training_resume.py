"""The pieces of exact resume: checkpoints keep every state, data order is a function of (seed, epoch).

And a run stopped right after a mid-epoch checkpoint and run again from it
ends with bit-identical values, metrics, epochs and steps.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.jobs_support import digits
from weightsmith_server.jobs import training
from weightsmith_server.jobs.callbacks import ResumableEarlyStopping
from weightsmith_server.jobs.checkpoints import (
    TrainingState,
    load_checkpoint,
    read_state,
    restore_metrics,
    resume_detail,
    save_checkpoint,
)
from weightsmith_server.jobs.events import CheckpointSaved, EpochEnded, EventPayload
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


def _config() -> str:
    """A small CNN for 8x8x1 digits with dropout (seed-generator state) and batch norm."""
    import keras

    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(0.3, name="drop")(x)
    x = keras.layers.Dense(16, activation="relu", name="dense")(x)
    outputs = keras.layers.Dense(5, activation="softmax", name="out")(x)
    return keras.Model(inputs, outputs, name="resume_cnn").to_json()


_ADAM = OptimizerSpec(OptimizerKind.ADAM, LearningRateSpec(ScheduleKind.CONSTANT, constant=0.01))


def _spec(**overrides: Any) -> TrainingSpec:
    values: dict[str, Any] = {
        "model_id": "m",
        "train_dataset_id": "d",
        "epochs": 3,
        "batch_size": 32,
        "optimizer": OptimizerSpec(
            OptimizerKind.ADAM, LearningRateSpec(ScheduleKind.CONSTANT, constant=0.01)
        ),
        "loss": "sparse_categorical_crossentropy",
        "metrics": ("accuracy",),
        "validation_split": 0.2,
        "early_stopping": EarlyStoppingSpec("loss", patience=1, restore_best_weights=True),
        "checkpoint_every_steps": 5,
        "seed": 3,
        "preprocessing": PreprocessingSpec(
            rescale=1 / 16, random_flip=RandomFlip.HORIZONTAL, random_rotation=0.1, random_zoom=0.1
        ),
    }
    return TrainingSpec(**(values | overrides))


def _dataset(count: int = 0) -> tuple[Any, int]:
    import tensorflow as tf

    data = digits(0, 4, part="train")
    x, y = (data["x"][:count], data["y"][:count]) if count else (data["x"], data["y"])
    return tf.data.Dataset.from_tensor_slices((x, y)), len(y)


def _batches(dataset: Any) -> list[tuple[bytes, bytes]]:
    return [(x.numpy().tobytes(), y.numpy().tobytes()) for x, y in dataset]


def _compiled(seed: int) -> Any:
    from weightsmith_server.models import architecture

    model = architecture.rebuild(_config(), device="/CPU:0", seed=seed)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


# --- data order ----------------------------------------------------------------


def test_each_epochs_batches_are_a_function_of_seed_and_epoch_and_skip_drops_done_ones() -> None:
    import tensorflow as tf

    data, count = _dataset(100)
    spec = _spec(batch_size=16)
    prepared = training.examples(data, spec, input_dtype="float32", count=count)
    per_epoch = 7  # ceil(100 / 16)

    whole = _batches(training.training_batches(prepared, spec, seed=5, epochs=(0, 3)))
    assert len(whole) == 3 * per_epoch
    epochs = [whole[i * per_epoch : (i + 1) * per_epoch] for i in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled and augmented anew every epoch

    tf.random.set_seed(1234)  # the process-wide seed (another job's) must not matter
    later = _batches(training.training_batches(prepared, spec, seed=5, epochs=(1, 3)))
    assert later == epochs[1] + epochs[2]
    skipped = _batches(training.training_batches(prepared, spec, seed=5, epochs=(1, 3), skip=3))
    assert skipped == epochs[1][3:] + epochs[2]
    again = _batches(training.training_batches(prepared, spec, seed=5, epochs=(0, 1)))
    assert again == epochs[0]

    other_seed = _batches(training.training_batches(prepared, spec, seed=6, epochs=(0, 1)))
    assert other_seed != epochs[0]
    labels = sorted(np.frombuffer(b"".join(b[1] for b in other_seed), np.int64).tolist())
    assert labels == sorted(np.frombuffer(b"".join(b[1] for b in epochs[0]), np.int64).tolist())


def test_without_shuffle_and_augmentation_batches_keep_the_stored_order() -> None:
    data, count = _dataset(40)
    spec = _spec(batch_size=16, shuffle=False, preprocessing=PreprocessingSpec(rescale=1 / 16))
    prepared = training.examples(data, spec, input_dtype="float32", count=count)
    batches = _batches(training.training_batches(prepared, spec, seed=5, epochs=(0, 2), skip=1))
    in_order = _batches(training.pipeline(data, spec, input_dtype="float32", count=count))
    assert batches == in_order[1:] + in_order


# --- checkpoints ---------------------------------------------------------------


def _train_a_little(model: Any) -> None:
    data, _ = _dataset(64)
    model.fit(data.map(lambda x, y: (x / 16, y)).batch(16), epochs=1, verbose=0)


def test_a_checkpoint_restores_variables_seed_state_optimizer_metrics_and_early_stopping(
    tmp_path: Path,
) -> None:
    model = _compiled(seed=0)
    _train_a_little(model)
    stopping = ResumableEarlyStopping(EarlyStoppingSpec("loss", patience=2, restore_best_weights=True))
    stopping.set_model(model)
    stopping.on_epoch_end(0, {"loss": 0.75})
    state = TrainingState(
        epoch=1,
        step=3,
        global_step=7,
        seed=-(2**62),
        early_stopping=stopping.snapshot(),
        logs={"loss": 0.75, "accuracy": 0.5},
    )
    save_checkpoint(tmp_path, model, state, stopping.best_weights)

    fresh = _compiled(seed=99)
    assert any(
        not np.array_equal(a.numpy(), b.numpy())
        for a, b in zip(model.variables, fresh.variables, strict=True)
    )
    loaded = load_checkpoint(tmp_path, fresh)
    assert loaded is not None and loaded.state == state == read_state(tmp_path)
    seed_states = [v for v in model.variables if "seed_generator" in v.path]
    assert seed_states and len(model.variables) > len(model.weights)  # the dropout's RNG state is kept
    for saved, restored in zip(model.variables, fresh.variables, strict=True):
        assert saved.numpy().tobytes() == restored.numpy().tobytes(), saved.path
    for saved, restored in zip(model.optimizer.variables, fresh.optimizer.variables, strict=True):
        assert saved.numpy().tobytes() == restored.numpy().tobytes(), saved.path
    assert int(fresh.optimizer.iterations.numpy()) == 4

    _train_a_little(fresh)  # builds the metrics (Keras does at the first step), then put them back
    restore_metrics(fresh, loaded.metrics)
    for saved, restored in zip(model.metrics_variables, fresh.metrics_variables, strict=True):
        assert saved.numpy().tobytes() == restored.numpy().tobytes()

    resumed = ResumableEarlyStopping(EarlyStoppingSpec("loss", patience=2, restore_best_weights=True))
    resumed.resume(loaded.state.early_stopping, loaded.best_weights)
    resumed.on_train_begin()  # a later `fit` does not reset it
    assert (resumed.wait, resumed.best, resumed.best_epoch) == (0, 0.75, 0)
    assert [w.tobytes() for w in resumed.best_weights] == [w.tobytes() for w in stopping.best_weights]
    assert (
        resume_detail(tmp_path)
        == "resumed from the checkpoint of epoch 1, step 3 of the next (global step 7)"
    )


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_usable(tmp_path: Path) -> None:
    model = _compiled(seed=0)
    first = TrainingState(epoch=1, global_step=4, seed=1)
    save_checkpoint(tmp_path, model, first)
    before = [v.numpy().tobytes() for v in model.variables]
    _train_a_little(model)
    # A kill inside the next write: its staging folder half written, its pointer not yet renamed.
    staging = tmp_path / ".staging-step-000000000008"
    staging.mkdir()
    (staging / "variables.npz").write_bytes(b"PK\x03\x04 torn")
    (tmp_path / ".checkpoint.json").write_text('{"folder": "step-0000000')

    fresh = _compiled(seed=5)
    loaded = load_checkpoint(tmp_path, fresh)
    assert loaded is not None and loaded.state == first
    assert [v.numpy().tobytes() for v in fresh.variables] == before

    second = TrainingState(epoch=2, global_step=8, seed=1)
    save_checkpoint(tmp_path, model, second)
    assert read_state(tmp_path) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "step-000000000008"]


def test_a_checkpoint_from_before_exact_resume_still_loads(tmp_path: Path) -> None:
    model = _compiled(seed=0)
    folder = tmp_path / "epoch-00002"
    folder.mkdir()
    np.savez(folder / "weights.npz", *[np.asarray(v.numpy()) for v in model.weights])
    model.optimizer.build(model.trainable_variables)
    np.savez(folder / "optimizer.npz", *[np.asarray(v.numpy()) for v in model.optimizer.variables])
    (tmp_path / "checkpoint.json").write_text(
        json.dumps({"epoch": 2, "global_step": 10, "folder": "epoch-00002"})
    )
    loaded = load_checkpoint(tmp_path, _compiled(seed=1))
    assert loaded is not None
    assert loaded.state == TrainingState(epoch=2, global_step=10)  # no seed: the spec's is used


# --- a whole run, stopped and resumed --------------------------------------------


class _Reporter:
    """Collects events; asks the run to stop right after the checkpoint of `stop_after` steps."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.events: list[EventPayload] = []
        self.stop_after = stop_after
        self.stop = False

    def emit(self, payload: EventPayload) -> None:
        self.events.append(payload)
        if isinstance(payload, CheckpointSaved) and payload.global_step == self.stop_after:
            self.stop = True

    def should_stop(self) -> bool:
        return self.stop


def _run(spec: TrainingSpec, job_dir: Path, reporter: _Reporter, values: dict[str, np.ndarray]) -> Any:
    return training.run(
        spec,
        config_json=_config(),
        values=values,
        train_data=_dataset(320),  # 8 steps an epoch, 64 examples held out
        validation_data=None,
        device="/CPU:0",
        job_dir=job_dir,
        reporter=reporter,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "stop_after"),
    [
        ({}, 10),  # inside epoch 2, after a mid-epoch checkpoint
        # Early stopping ends the run at epoch 3's end: resumed from that checkpoint (a kill before the
        # commit), the run trains no more and restores the best weights.
        (
            {
                "epochs": 8,
                "early_stopping": EarlyStoppingSpec("val_loss", min_delta=0.05, restore_best_weights=True),
            },
            24,
        ),
    ],
    ids=["mid-epoch", "early-stopping-at-an-epoch-end"],
)
def test_a_run_resumed_from_a_checkpoint_ends_bit_identical(
    tmp_path: Path, overrides: dict[str, Any], stop_after: int
) -> None:
    from weightsmith_server.models import architecture
    from weightsmith_server.variables import model_variables

    spec = replace(_spec(), **overrides)
    base = architecture.rebuild(_config(), device="/CPU:0", seed=0)
    values = {entry.path: np.array(v.numpy()) for entry, v in model_variables(base)}

    straight = _run(spec, tmp_path / "a", _Reporter(), values)
    with contextlib.suppress(training.JobStopped):
        _run(spec, tmp_path / "b", _Reporter(stop_after), values)
    assert read_state(tmp_path / "b" / "checkpoint").global_step == stop_after  # type: ignore[union-attr]
    resumed_reporter = _Reporter()
    resumed = _run(spec, tmp_path / "b", resumed_reporter, values)

    assert straight.values.keys() == resumed.values.keys()
    for path, value in straight.values.items():
        assert value.tobytes() == resumed.values[path].tobytes(), path
    assert (resumed.epochs_completed, resumed.steps_completed) == (
        straight.epochs_completed,
        straight.steps_completed,
    )
    assert resumed.metrics == straight.metrics
    if "epochs" in overrides:
        assert straight.epochs_completed == 3  # early stopping did stop it
        assert read_state(tmp_path / "b" / "checkpoint").stopped  # type: ignore[union-attr]
    else:
        first_epoch = next(e for e in resumed_reporter.events if isinstance(e, EpochEnded))
        assert first_epoch.epoch == 2  # the resumed run finished the epoch it was inside
    shutil.rmtree(tmp_path, ignore_errors=True)
