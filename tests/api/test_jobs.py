"""TrainingService over a real grpc.aio server: datasets, jobs, live events, cancel, bad specs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

import weightsmith
from tests.conftest import ServerHandle
from tests.jobs_support import cnn_config, digits, digits_spec
from weightsmith import edits, jobs
from weightsmith.v1 import job_pb2
from weightsmith.v1 import training_service_pb2 as pb


@pytest.fixture
def digits_model(client, model_id: str) -> tuple[str, str]:
    client.create_model(model_id, keras_config=cnn_config(), seed=0)
    client.upload_dataset(digits(0, 4, part="train"), f"{model_id}-data")
    return model_id, f"{model_id}-data"


@pytest.mark.slow
def test_digits_transfer_learning_end_to_end(client, model_id: str) -> None:
    client.create_model(model_id, keras_config=cnn_config(), seed=0)
    low_train = client.upload_dataset(digits(0, 4, part="train"), f"{model_id}-low")
    assert low_train.example_count > 600 and low_train.class_count == 5
    assert list(low_train.features.shape) == [8, 8, 1]
    high_train = client.upload_dataset(digits(5, 9, part="train"), f"{model_id}-high")
    high_test = client.upload_dataset(digits(5, 9, part="test"), f"{model_id}-high-test")

    first = client.create_job(digits_spec(model_id, low_train.dataset_id, epochs=8), f"{model_id}-base")
    base = client.wait_job(first.job_id, timeout=300)
    assert base.state == job_pb2.JOB_STATE_SUCCEEDED, base.error
    assert client.get_model(model_id).revision == 2

    client.apply_edits(
        model_id,
        [
            edits.replace_head(
                "flatten",
                [
                    edits.layer("Dense", units=64, activation="relu"),
                    edits.layer("Dense", units=5, activation="softmax"),
                ],
                seed=1,
            ),
            edits.freeze(weightsmith.Selector(layers=("conv1", "conv2"))),
        ],
        message="new head for 5-9",
    )
    conv_before = client.read_weights(model_id, "conv*")

    spec = digits_spec(
        model_id, high_train.dataset_id, epochs=12, validation_split=0.1, optimizer=jobs.adam(0.005)
    )
    job = client.create_job(spec, f"{model_id}-transfer")
    events = list(client.watch_job(job.job_id))
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    epoch_losses = [e.epoch_ended.train_metrics["loss"] for e in events if e.HasField("epoch_ended")]
    assert len(epoch_losses) == 12
    assert epoch_losses[-1] < epoch_losses[0] * 0.5
    assert events[-1].state_changed.state == job_pb2.JOB_STATE_SUCCEEDED
    result = next(e.result for e in events if e.HasField("result"))
    assert result.epochs_completed == 12 and result.model_id == model_id

    conv_after = client.read_weights(model_id, "conv*")
    assert all(conv_after[k].tobytes() == v.tobytes() for k, v in conv_before.items())  # frozen
    assert job.job_id in client.get_revision(model_id, result.revision).message

    evaluation = client.evaluate(
        model_id,
        high_test.dataset_id,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        rescale=1 / 16,
    )
    assert evaluation.example_count == high_test.example_count
    assert evaluation.metrics["accuracy"] >= 0.9, evaluation


def test_schedule_learning_rate_is_reported_per_step(client, digits_model) -> None:
    import keras

    model_id, dataset_id = digits_model
    schedule = jobs.exponential_decay(0.01, 5, 0.5)
    job = client.create_job(
        digits_spec(model_id, dataset_id, epochs=1, optimizer=jobs.sgd(schedule), progress_every_steps=1)
    )
    events = list(client.watch_job(job.job_id))
    progress = [e.progress for e in events if e.HasField("progress")]
    steps = int(np.ceil(client.get_dataset(dataset_id).example_count / 32))
    assert [p.global_step for p in progress] == list(range(1, steps + 1))
    expected = keras.optimizers.schedules.ExponentialDecay(0.01, 5, 0.5)
    for p in progress:
        assert p.learning_rate == pytest.approx(float(expected(p.global_step - 1)), rel=1e-6)
        assert p.steps_per_epoch == steps and p.samples_per_second > 0


def test_three_watchers_get_identical_gap_free_events(client, server: ServerHandle, digits_model) -> None:
    model_id, dataset_id = digits_model
    job = client.create_job(digits_spec(model_id, dataset_id, epochs=3, progress_every_steps=2))
    received: dict[str, list[int]] = {"steady": [], "slow": [], "reconnecting": []}

    def steady() -> None:
        with weightsmith.Client(server.address) as own:
            received["steady"] = [e.sequence for e in own.watch_job(job.job_id)]

    def slow() -> None:
        with weightsmith.Client(server.address) as own:
            for event in own.watch_job(job.job_id):
                received["slow"].append(event.sequence)
                if len(received["slow"]) < 5:
                    time.sleep(0.5)  # stops reading for a while

    def reconnecting() -> None:
        with weightsmith.Client(server.address) as own:
            seen = []
            for event in own.watch_job(job.job_id):
                seen.append(event.sequence)
                if len(seen) == 4:
                    break  # the connection drops
        time.sleep(0.3)
        with weightsmith.Client(server.address) as own:
            seen += [e.sequence for e in own.watch_job(job.job_id, after_sequence=seen[-1])]
        received["reconnecting"] = seen

    threads = [threading.Thread(target=f) for f in (steady, slow, reconnecting)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    final = client.get_job(job.job_id)
    assert final.state == job_pb2.JOB_STATE_SUCCEEDED
    expected = list(range(1, final.last_sequence + 1))
    assert received["steady"] == expected
    assert received["slow"] == expected
    assert received["reconnecting"] == expected
    page = client.list_job_events(job.job_id, page_size=5)
    assert [e.sequence for e in page.events] == [1, 2, 3, 4, 5] and page.next_page_token
    rest = client.list_job_events(job.job_id, page_size=1000, page_token=page.next_page_token)
    assert [e.sequence for e in rest.events] == expected[5:]


def test_cancel_commits_nothing(client, digits_model) -> None:
    model_id, dataset_id = digits_model
    before = client.read_weights(model_id)
    job = client.create_job(digits_spec(model_id, dataset_id, epochs=200, progress_every_steps=1))
    for event in client.watch_job(job.job_id):
        if event.HasField("progress"):
            break
    cancelled = client.cancel_job(job.job_id)
    assert cancelled.state == job_pb2.JOB_STATE_CANCELLED
    assert client.get_model(model_id).revision == 1
    after = client.read_weights(model_id)
    assert all(after[k].tobytes() == v.tobytes() for k, v in before.items())
    events = list(client.watch_job(job.job_id))
    assert events[-1].state_changed.state == job_pb2.JOB_STATE_CANCELLED
    with pytest.raises(weightsmith.FailedPreconditionError):
        client.cancel_job(job.job_id)


def test_serving_continues_from_the_last_revision_during_a_job(client, digits_model) -> None:
    model_id, dataset_id = digits_model
    probe = digits(0, 4, part="test")["x"][:4] / 16
    expected = client.predict(model_id, probe).output
    weights = client.read_weights(model_id)
    job = client.create_job(digits_spec(model_id, dataset_id, epochs=200, progress_every_steps=1))
    progress_seen = 0
    for event in client.watch_job(job.job_id):
        if event.HasField("progress"):
            progress_seen += 1
            answer = client.predict(model_id, probe)
            assert answer.revision == 1
            np.testing.assert_array_equal(answer.output, expected)
            assert (
                client.read_weights(model_id, "out/kernel")["out/kernel"].tobytes()
                == weights["out/kernel"].tobytes()
            )
            with pytest.raises(weightsmith.FailedPreconditionError) as busy:
                client.apply_edits(model_id, [edits.scale("out/kernel", 2.0)])
            assert busy.value.reason == "MODEL_BUSY"
            if progress_seen == 3:
                break
    with pytest.raises(weightsmith.FailedPreconditionError) as in_use:
        client.delete_dataset(dataset_id)
    assert in_use.value.reason == "DATASET_IN_USE"
    client.cancel_job(job.job_id)


def test_job_writing_a_new_model(client, digits_model) -> None:
    model_id, dataset_id = digits_model
    job = client.create_job(digits_spec(model_id, dataset_id, epochs=1, output_model_id=f"{model_id}-tuned"))
    done = client.wait_job(job.job_id, timeout=120)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED
    assert client.get_model(model_id).revision == 1
    tuned = client.get_model(f"{model_id}-tuned")
    assert tuned.revision == 1 and done.result_revision == 1
    assert client.read_weights(model_id, "out/kernel")["out/kernel"].tobytes() != (
        client.read_weights(tuned.model_id, "out/kernel")["out/kernel"].tobytes()
    )


BAD_SPECS = [
    ("unknown model", {"model_id": "no-such-model"}, "spec.model_id", "MODEL_NOT_FOUND"),
    ("unknown dataset", {"train_dataset_id": "no-such-data"}, "spec.train_dataset_id", "DATASET_NOT_FOUND"),
    ("negative epochs", {"epochs": -1}, "spec.epochs", "INVALID_EPOCHS"),
    ("batch size 0", {"batch_size": 0}, "spec.batch_size", "INVALID_BATCH_SIZE"),
    (
        "negative checkpoint steps",
        {"checkpoint_every_steps": -1},
        "spec.checkpoint_every_steps",
        "INVALID_NUMBER",
    ),
    ("unknown loss", {"loss": "nope"}, "spec.loss", "UNKNOWN_LOSS"),
    ("unknown metric", {"metrics": ["accuracy", "nope"]}, "spec.metrics[1]", "UNKNOWN_METRIC"),
    (
        "unknown optimizer",
        {"optimizer": job_pb2.Optimizer(kind=99, learning_rate=job_pb2.LearningRate(constant=0.1))},
        "spec.optimizer.kind",
        "INVALID_ENUM_VALUE",
    ),
    (
        "no learning rate",
        {"optimizer": job_pb2.Optimizer()},
        "spec.optimizer.learning_rate",
        "MISSING_LEARNING_RATE",
    ),
    ("labels out of range", {"model_id": "THREE"}, "spec.train_dataset_id", "LABELS_OUT_OF_RANGE"),
    (
        "input shape mismatch",
        {"preprocessing": job_pb2.Preprocessing(resize=[10, 10])},
        "spec.train_dataset_id",
        "INPUT_SHAPE_MISMATCH",
    ),
    (
        "monitor without validation",
        {"early_stopping": jobs.early_stopping("val_loss")},
        "spec.early_stopping.monitor",
        "NO_VALIDATION_DATA",
    ),
]


@pytest.mark.parametrize("case", BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_job_specs_are_rejected_up_front(client, server: ServerHandle, digits_model, case) -> None:
    import grpc

    from weightsmith.errors import from_rpc_error
    from weightsmith.v1 import training_service_pb2_grpc

    model_id, dataset_id = digits_model
    name, overrides, field, reason = case
    spec = digits_spec(model_id, dataset_id)
    if overrides.get("model_id") == "THREE":
        client.create_model(f"{model_id}-three", keras_config=cnn_config(classes=3))
        overrides = {"model_id": f"{model_id}-three"}
    for key, value in overrides.items():
        if isinstance(value, list):
            del getattr(spec, key)[:]
            getattr(spec, key).extend(value)
        elif hasattr(value, "SerializeToString"):
            getattr(spec, key).CopyFrom(value)
        else:
            setattr(spec, key, value)
    jobs_before = len(list(client.iter_jobs()))
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as caught:
        training_service_pb2_grpc.TrainingServiceStub(channel).CreateJob(pb.CreateJobRequest(spec=spec))
    error = from_rpc_error(caught.value)
    assert error.reason == reason, name
    assert error.field_violations[0][0] == field, name
    assert len(list(client.iter_jobs())) == jobs_before, name


def test_bad_datasets_are_rejected(client, model_id: str, tmp_path: Path) -> None:
    import io
    import tarfile

    with pytest.raises(weightsmith.InvalidArgumentError) as corrupt:
        path = tmp_path / "corrupt.npz"
        path.write_bytes(b"PK\x03\x04 this is not really a zip file" * 10)
        client.upload_dataset(path, f"{model_id}-corrupt")
    assert corrupt.value.reason == "CORRUPT_DATASET"
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        payload = b"\x89PNG not really"
        info = tarfile.TarInfo("../escape/evil.png")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    evil = tmp_path / "evil.tar"
    evil.write_bytes(archive.getvalue())
    with pytest.raises(weightsmith.InvalidArgumentError) as escaping:
        client.upload_dataset(evil, f"{model_id}-evil", image_size=(8, 8))
    assert escaping.value.reason == "UNSAFE_ARCHIVE_ENTRY"
    with pytest.raises(weightsmith.NotFoundError):
        client.get_dataset(f"{model_id}-evil")


def test_a_diverging_job_fails_and_leaves_the_model_untouched(client, digits_model) -> None:
    model_id, dataset_id = digits_model
    before = client.read_weights(model_id)
    job = client.create_job(
        digits_spec(model_id, dataset_id, epochs=3, optimizer=jobs.sgd(1e12), progress_every_steps=1)
    )
    done = client.wait_job(job.job_id, timeout=120)
    assert done.state == job_pb2.JOB_STATE_FAILED
    assert "NaN" in done.error
    assert client.get_model(model_id).revision == 1
    after = client.read_weights(model_id)
    assert all(after[k].tobytes() == v.tobytes() for k, v in before.items())
    events = list(client.watch_job(job.job_id))
    assert events[-1].state_changed.state == job_pb2.JOB_STATE_FAILED
