"""Exact resume after kill -9, and a job's output model id that nobody else can take.

A job with dropout, shuffling, augmentation, validation and early stopping
is killed right after a checkpoint inside an epoch; the restarted server
resumes it there and the job's model ends bit-identical (ReadWeights bytes)
to the same job run without interruption, with the same epochs and steps.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import weightsmith
from tests.conftest import ServerHandle, SpawnedServer, spawn_server
from tests.jobs_support import digits, digits_spec
from weightsmith import jobs
from weightsmith.v1 import job_pb2

EPOCHS = 3
BASE, DATASET = "resume-base", "resume-digits"
CHECKPOINT_STEPS = 4


def _dropout_cnn() -> str:
    """A small CNN for 8x8x1 digits with dropout: its random state must survive the kill too."""
    import keras

    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(0.3, name="drop")(x)
    x = keras.layers.Dense(32, activation="relu", name="dense")(x)
    outputs = keras.layers.Dense(5, activation="softmax", name="out")(x)
    return keras.Model(inputs, outputs, name="resume_cnn").to_json()


def _spec(output_model_id: str, **overrides: Any) -> job_pb2.JobSpec:
    options: dict[str, Any] = {
        "epochs": EPOCHS,
        "output_model_id": output_model_id,
        "validation_split": 0.2,
        "early_stopping": jobs.early_stopping("val_loss", patience=2, restore_best_weights=True),
        "checkpoint_every_steps": CHECKPOINT_STEPS,
        "progress_every_steps": 5,
        "seed": 11,
        "preprocessing": jobs.preprocessing(
            rescale=1 / 16, random_flip="horizontal", random_rotation=0.05, random_zoom=0.1
        ),
    }
    return digits_spec(BASE, DATASET, **(options | overrides))


def _prepare(client: weightsmith.Client) -> None:
    client.create_model(BASE, keras_config=_dropout_cnn(), seed=0)
    client.upload_dataset(digits(0, 4, part="train"), DATASET)


def _result(client: weightsmith.Client, job_id: str) -> job_pb2.JobResult:
    return next(e.result for e in client.watch_job(job_id) if e.HasField("result"))


def _kill(server: SpawnedServer) -> None:
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(30)


def _stop(server: SpawnedServer) -> None:
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(60)


@pytest.mark.slow
def test_a_job_killed_inside_an_epoch_resumes_there_and_ends_bit_identical(
    server: ServerHandle, tmp_path: Path
) -> None:
    # A: uninterrupted, on the session server.
    with weightsmith.Client(server.address) as client:
        _prepare(client)
        client.create_job(_spec("exact-a"), "exact-a")
        done = client.wait_job("exact-a", timeout=300)
        assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
        expected = client.read_weights("exact-a")
        expected_result = _result(client, "exact-a")

    # B: the same job in a server killed right after a checkpoint inside epoch 2.
    store = tmp_path / "store"
    first = spawn_server(store)
    try:
        with weightsmith.Client(first.address) as client:
            _prepare(client)
            client.create_job(_spec("exact-b"), "exact-b")
            steps_per_epoch = 0
            for event in client.watch_job("exact-b"):
                if event.HasField("progress"):
                    steps_per_epoch = event.progress.steps_per_epoch
                saved = event.checkpoint_saved
                if (
                    event.HasField("checkpoint_saved")
                    and saved.epoch == 1
                    and saved.global_step % steps_per_epoch
                ):
                    break
            killed_at = saved.global_step
    finally:
        _kill(first)
    assert steps_per_epoch and killed_at % CHECKPOINT_STEPS == 0

    second = spawn_server(store)
    try:
        with weightsmith.Client(second.address) as client:
            done = client.wait_job("exact-b", timeout=300)
            assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
            events = list(client.watch_job("exact-b"))
            resumed = [e.state_changed.detail for e in events if "resumed" in e.state_changed.detail]
            inside = killed_at - steps_per_epoch
            assert resumed == [
                f"resumed from the checkpoint of epoch 1, step {inside} of the next (global step {killed_at})"
            ]
            actual = client.read_weights("exact-b")
            result = _result(client, "exact-b")
            revision = client.list_revisions("exact-b").revisions[0]
            assert revision.author == "job:exact-b"
    finally:
        _stop(second)

    assert list(actual) == list(expected)
    for path, value in expected.items():
        assert value.dtype == actual[path].dtype and value.tobytes() == actual[path].tobytes(), path
    assert (result.epochs_completed, result.steps_completed) == (
        expected_result.epochs_completed,
        expected_result.steps_completed,
    )
    assert dict(result.metrics) == dict(expected_result.metrics)


@pytest.mark.slow
def test_a_running_jobs_output_model_cannot_be_taken_before_or_after_a_kill(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = spawn_server(store)
    try:
        with weightsmith.Client(first.address, author="mallory") as client:
            _prepare(client)
            client.create_model("decoy", keras_config=_dropout_cnn(), seed=5)
            client.create_job(_spec("tuned", epochs=50, checkpoint_every_steps=0), "job1")
            for event in client.watch_job("job1"):
                if event.HasField("checkpoint_saved"):
                    break
            # While the job runs, its output id is held: no creation can take it, whatever the author.
            with pytest.raises(weightsmith.errors.AlreadyExistsError) as caught:
                client.create_model("tuned", keras_config=_dropout_cnn(), seed=1)
            assert caught.value.reason == "MODEL_EXISTS"
            refused = (weightsmith.errors.AlreadyExistsError, weightsmith.errors.InvalidArgumentError)
            with weightsmith.Client(first.address, author="job:job1") as forger, pytest.raises(refused):
                forger.create_model("tuned", keras_config=_dropout_cnn(), seed=1)
            with pytest.raises(weightsmith.errors.AlreadyExistsError):  # nor another job
                client.create_job(_spec("tuned"), "job2")
    finally:
        _kill(first)

    # The forged model appears while the server is down (as it could in the instant before the
    # restarted server holds the id again): a model by someone else, not by the job.
    models = store / "models"
    shutil.copytree(models / "decoy", models / "tuned")
    record = json.loads((models / "tuned" / "model.json").read_text())
    (models / "tuned" / "model.json").write_text(json.dumps(record | {"model_id": "tuned"}))

    second = spawn_server(store)
    try:
        with weightsmith.Client(second.address) as client:
            decoy = client.read_weights("decoy")
            done = client.wait_job("job1", timeout=120)
            assert done.state == job_pb2.JOB_STATE_FAILED
            assert "'tuned' was created while the job waited" in done.error
            assert done.result_revision == 0
            # The job never claimed the forged model, and left it as it was.
            assert client.get_model("tuned").revision == 1
            forged = client.read_weights("tuned")
            assert all(np.array_equal(forged[p], decoy[p]) for p in decoy)
            assert client.list_revisions("tuned").revisions[0].author == "mallory"
    finally:
        _stop(second)


@pytest.mark.slow
def test_a_job_killed_and_resumed_commits_its_own_output_model_which_nobody_took(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = spawn_server(store)
    try:
        with weightsmith.Client(first.address) as client:
            _prepare(client)
            client.create_job(_spec("own", epochs=2, checkpoint_every_steps=0), "job3")
            for event in client.watch_job("job3"):
                if event.HasField("checkpoint_saved"):
                    break
    finally:
        _kill(first)

    second = spawn_server(store)
    try:
        with weightsmith.Client(second.address, author="mallory") as client:
            # The restarted server holds the id again before the job runs on.
            with pytest.raises(weightsmith.errors.AlreadyExistsError):
                client.create_model("own", keras_config=_dropout_cnn(), seed=1)
            done = client.wait_job("job3", timeout=300)
            assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
            revisions = client.list_revisions("own").revisions
            assert [(r.revision, r.author) for r in revisions] == [(1, "job:job3")]
            assert done.result_revision == 1
            trained = client.read_weights("own")
            base = client.read_weights(BASE)
            assert any(not np.array_equal(trained[p], base[p]) for p in base)
    finally:
        _stop(second)
