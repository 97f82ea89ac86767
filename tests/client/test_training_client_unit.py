"""The training side of the client without a weightsmith server.

The `weightsmith.jobs` builders, dataset upload preparation (format
detection, the in-memory `.npz`, zipped image folders), request building,
`watch_job` reconnection (unit and over real gRPC against an in-process fake
`TrainingService` built from the generated servicer), `wait_job`, the
progress bars, and the parity of both clients' new methods.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import weightsmith
from weightsmith import _datasets, _requests, _rpcs, _uploads, _watch, errors, jobs
from weightsmith.v1 import (
    dataset_pb2,
    job_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    selector_pb2,
    tensor_pb2,
    training_service_pb2,
    training_service_pb2_grpc,
)

ts = training_service_pb2


# --- package surface -------------------------------------------------------------


def test_jobs_and_progress_are_public() -> None:
    assert weightsmith.jobs is jobs
    for name in ("jobs", "progress_bar", "async_progress_bar"):
        assert name in weightsmith.__all__
    assert weightsmith.__all__ == sorted(weightsmith.__all__)
    assert jobs.__all__ == sorted(jobs.__all__)
    for name in jobs.__all__:
        assert callable(getattr(jobs, name)), name
        assert "Example:" in (getattr(jobs, name).__doc__ or ""), name
    assert jobs.__doc__ and "create_job" in jobs.__doc__


def test_importing_weightsmith_does_not_import_tqdm() -> None:
    import subprocess

    code = "import sys, weightsmith; assert 'tqdm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_retries_cover_reads_only() -> None:
    retried = set(_rpcs.RETRIED_METHODS)
    service = _rpcs.TRAINING_SERVICE
    for method in ("GetDataset", "ListDatasets", "GetJob", "ListJobs", "ListJobEvents"):
        assert (service, method) in retried
    assert (_rpcs.MODEL_SERVICE, "Evaluate") in retried
    for method in ("WatchJob", "UploadDataset", "CreateDataset", "DeleteDataset", "CreateJob", "CancelJob"):
        assert (service, method) not in retried


# --- builders --------------------------------------------------------------------


def test_learning_rates() -> None:
    assert jobs.adam(1e-3).learning_rate == job_pb2.LearningRate(constant=1e-3)
    assert jobs.exponential_decay(0.1, 100, 0.5, staircase=True) == job_pb2.LearningRate(
        exponential_decay=job_pb2.ExponentialDecay(
            initial_learning_rate=0.1, decay_steps=100, decay_rate=0.5, staircase=True
        )
    )
    assert jobs.cosine_decay(1e-3, 500, alpha=0.1, warmup_steps=50, warmup_from=1e-5) == job_pb2.LearningRate(
        cosine_decay=job_pb2.CosineDecay(
            initial_learning_rate=1e-3, decay_steps=500, alpha=0.1, warmup_steps=50, warmup_from=1e-5
        )
    )
    assert jobs.piecewise_constant([10, 20], [1.0, 0.5, 0.1]) == job_pb2.LearningRate(
        piecewise_constant=job_pb2.PiecewiseConstant(boundaries=[10, 20], values=[1.0, 0.5, 0.1])
    )


def test_optimizers() -> None:
    schedule = jobs.cosine_decay(1e-3, 100)
    assert jobs.adam(schedule) == job_pb2.Optimizer(kind=job_pb2.OPTIMIZER_KIND_ADAM, learning_rate=schedule)
    adamw = jobs.adamw(1e-3)
    assert adamw.kind == job_pb2.OPTIMIZER_KIND_ADAMW and not adamw.HasField("weight_decay")
    assert jobs.adamw(1e-3, weight_decay=0.0).HasField("weight_decay")
    assert jobs.adamw(1e-3, weight_decay=0.01).weight_decay == 0.01
    assert jobs.sgd(0.01, momentum=0.9, nesterov=True) == job_pb2.Optimizer(
        kind=job_pb2.OPTIMIZER_KIND_SGD,
        learning_rate=job_pb2.LearningRate(constant=0.01),
        momentum=0.9,
        nesterov=True,
    )
    assert jobs.rmsprop(np.float32(0.5)).kind == job_pb2.OPTIMIZER_KIND_RMSPROP


def test_early_stopping_and_preprocessing() -> None:
    assert jobs.early_stopping() == job_pb2.EarlyStopping(monitor="val_loss")
    assert jobs.early_stopping(
        "val_accuracy", patience=3, min_delta=0.01, restore_best_weights=True
    ) == job_pb2.EarlyStopping(monitor="val_accuracy", patience=3, min_delta=0.01, restore_best_weights=True)
    prep = jobs.preprocessing()
    assert prep == job_pb2.Preprocessing() and not prep.HasField("rescale")
    prep = jobs.preprocessing(
        resize=(96, 128), rescale=1 / 255, random_flip="horizontal", random_rotation=0.1, random_zoom=0.2
    )
    assert list(prep.resize) == [96, 128] and prep.rescale == pytest.approx(1 / 255)
    assert prep.random_flip == job_pb2.RANDOM_FLIP_HORIZONTAL
    assert (prep.random_rotation, prep.random_zoom) == (0.1, 0.2)


def test_spec_minimal_leaves_optionals_unset() -> None:
    spec = jobs.spec("m", "d", epochs=2, batch_size=8, optimizer=jobs.adam(1e-3), loss="mse")
    assert spec == job_pb2.JobSpec(
        model_id="m",
        train_dataset_id="d",
        epochs=2,
        batch_size=8,
        optimizer=jobs.adam(1e-3),
        loss="mse",
    )
    for field in ("trainable", "early_stopping", "preprocessing", "seed", "shuffle"):
        assert not spec.HasField(field), field


def test_spec_everything() -> None:
    spec = jobs.spec(
        "base",
        "train",
        epochs=5,
        batch_size=64,
        optimizer=jobs.sgd(jobs.exponential_decay(0.1, 10, 0.9), momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics="accuracy",
        output_model_id="tuned",
        validation_dataset_id="val",
        validation_split=0.2,
        freeze="*",
        unfreeze=weightsmith.Selector(layer_range=(-2, None)),
        train_last_layers=3,
        early_stopping=jobs.early_stopping(patience=2),
        checkpoint_every_epochs=2,
        progress_every_steps=5,
        seed=0,
        preprocessing=jobs.preprocessing(rescale=0.5),
        mixed_precision=True,
        shuffle=False,
    )
    assert (spec.model_id, spec.output_model_id, spec.train_dataset_id, spec.validation_dataset_id) == (
        "base",
        "tuned",
        "train",
        "val",
    )
    assert list(spec.metrics) == ["accuracy"] and spec.validation_split == pytest.approx(0.2)
    assert spec.trainable.freeze == selector_pb2.VariableSelector(patterns=["*"])
    assert spec.trainable.unfreeze.layer_range.start == -2
    assert not spec.trainable.unfreeze.layer_range.HasField("stop")
    assert spec.trainable.train_last_layers == 3
    assert spec.early_stopping.patience == 2
    assert (spec.checkpoint_every_epochs, spec.progress_every_steps) == (2, 5)
    assert spec.HasField("seed") and spec.seed == 0
    assert spec.preprocessing.rescale == 0.5 and spec.mixed_precision
    assert spec.HasField("shuffle") and spec.shuffle is False
    assert job_pb2.JobSpec.FromString(spec.SerializeToString()) == spec


_OPT = jobs.adam(1e-3)


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: jobs.adam(0.0), ValueError, "learning_rate"),
        (lambda: jobs.adam("fast"), TypeError, "learning_rate"),
        (lambda: jobs.adam(job_pb2.LearningRate()), ValueError, "empty `LearningRate`"),
        (lambda: jobs.adamw(1e-3, weight_decay=-1), ValueError, "weight_decay"),
        (lambda: jobs.sgd(0.1, momentum=1.5), ValueError, "momentum"),
        (lambda: jobs.exponential_decay(0.1, 0, 0.5), ValueError, "decay_steps"),
        (lambda: jobs.exponential_decay(0.1, 10, 0.0), ValueError, "decay_rate"),
        (lambda: jobs.cosine_decay(1e-3, 10, alpha=2.0), ValueError, "alpha"),
        (lambda: jobs.cosine_decay(1e-3, 10, warmup_steps=-1), ValueError, "warmup_steps"),
        (lambda: jobs.piecewise_constant([10, 5], [1.0, 0.5, 0.1]), ValueError, "increasing"),
        (lambda: jobs.piecewise_constant([10], [1.0]), ValueError, "one more value"),
        (lambda: jobs.early_stopping(""), ValueError, "monitor"),
        (lambda: jobs.early_stopping(patience=-1), ValueError, "patience"),
        (lambda: jobs.preprocessing(resize=(96,)), ValueError, "resize"),
        (lambda: jobs.preprocessing(random_flip="diagonal"), ValueError, "random_flip"),
        (lambda: jobs.preprocessing(random_zoom=-0.1), ValueError, "random_zoom"),
        (
            lambda: jobs.spec("m", "d", epochs=0, batch_size=1, optimizer=_OPT, loss="mse"),
            ValueError,
            "epochs",
        ),
        (
            lambda: jobs.spec("m", "d", epochs=1, batch_size=0, optimizer=_OPT, loss="mse"),
            ValueError,
            "batch",
        ),
        (
            lambda: jobs.spec("m", "d", epochs=1.5, batch_size=1, optimizer=_OPT, loss="mse"),
            TypeError,
            "epochs",
        ),
        (
            lambda: jobs.spec("", "d", epochs=1, batch_size=1, optimizer=_OPT, loss="mse"),
            ValueError,
            "model_id",
        ),
        (
            lambda: jobs.spec("m", "d", epochs=1, batch_size=1, optimizer="adam", loss="mse"),
            TypeError,
            "optim",
        ),
        (lambda: jobs.spec("m", "d", epochs=1, batch_size=1, optimizer=_OPT, loss=""), ValueError, "loss"),
        (
            lambda: jobs.spec(
                "m", "d", epochs=1, batch_size=1, optimizer=_OPT, loss="mse", validation_split=0.9
            ),
            ValueError,
            "validation_split",
        ),
        (
            lambda: jobs.spec(
                "m", "d", epochs=1, batch_size=1, optimizer=_OPT, loss="mse", train_last_layers=0
            ),
            ValueError,
            "train_last_layers",
        ),
        (
            lambda: jobs.spec("m", "d", epochs=1, batch_size=1, optimizer=_OPT, loss="mse", freeze=42),
            TypeError,
            "selector",
        ),
        (
            lambda: jobs.spec(
                "m", "d", epochs=1, batch_size=1, optimizer=_OPT, loss="mse", early_stopping="val_loss"
            ),
            TypeError,
            "early_stopping",
        ),
    ],
)
def test_builders_reject(build: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        build()


# --- dataset uploads -------------------------------------------------------------


def _upload(source: Any, **overrides: Any) -> _uploads.Upload:
    kwargs: dict[str, Any] = {
        "format": None,
        "tfrecord_features": None,
        "tfrecord_labels": None,
        "image_size": None,
        "channels": 3,
    }
    kwargs.update(overrides)
    return _uploads.dataset_upload(source, kwargs.pop("dataset_id", "ds"), **kwargs)


def _sent(upload: _uploads.Upload, chunk: int = 1000) -> tuple[ts.UploadDatasetHeader, bytes]:
    with upload.open() as file:
        messages = [upload.header, *(upload.chunk(block) for block in iter(lambda: file.read(chunk), b""))]
    assert messages[0].WhichOneof("payload") == "header"
    assert all(m.WhichOneof("payload") == "chunk" for m in messages[1:])
    assert all(len(m.chunk) <= chunk for m in messages[1:])
    data = b"".join(m.chunk for m in messages[1:])
    assert messages[0].header.size_bytes == len(data)
    return messages[0].header, data


def test_arrays_upload_as_npz_round_trip() -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.random((20, 4, 4, 3), dtype=np.float32),
        "y": rng.integers(0, 5, 20),
        "x_val": rng.random((6, 4, 4, 3), dtype=np.float32),
        "y_val": rng.integers(0, 5, 6),
    }
    upload = _upload(arrays)
    header, data = _sent(upload, chunk=777)
    assert header.dataset_id == "ds" and header.source.format == dataset_pb2.DATASET_FORMAT_NPZ
    assert not header.source.HasField("tfrecord") and not header.source.HasField("image_folder")
    with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
        assert sorted(loaded.files) == sorted(arrays)
        for key, array in arrays.items():
            assert loaded[key].dtype == array.dtype
            np.testing.assert_array_equal(loaded[key], array)
    upload.close()


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x": np.zeros((2, 1))}, "expected 'x' and 'y'"),
        ({"x": np.zeros(2), "y": np.zeros(2), "extra": np.zeros(2)}, "no other key"),
        ({"x": np.zeros(2), "y": np.zeros(2), "x_val": np.zeros(1)}, "both 'x_val'"),
        ({"x": np.zeros(3), "y": np.zeros(2)}, "as many labels"),
        ({"x": np.array([object(), object()]), "y": np.zeros(2)}, "numeric array"),
        ({"x": np.float32(1), "y": np.zeros(1)}, "batch dimension"),
    ],
)
def test_arrays_are_checked(arrays: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _upload(arrays)


def test_paths_detect_their_format(tmp_path: Path) -> None:
    npz = tmp_path / "data.npz"
    np.savez(npz, x=np.zeros((2, 2)), y=np.zeros(2))
    header, data = _sent(_upload(npz))
    assert header.source.format == dataset_pb2.DATASET_FORMAT_NPZ and data == npz.read_bytes()

    record = tmp_path / "data.tfrecord"
    record.write_bytes(b"records")
    header, data = _sent(
        _upload(
            str(record),
            tfrecord_features=("image", "uint8", [8, 8, 1]),
            tfrecord_labels=dataset_pb2.FeatureSpec(name="label", dtype=tensor_pb2.DATA_TYPE_INT64),
        )
    )
    assert header.source.format == dataset_pb2.DATASET_FORMAT_TFRECORD and data == b"records"
    assert header.source.tfrecord.features == dataset_pb2.FeatureSpec(
        name="image", dtype=tensor_pb2.DATA_TYPE_UINT8, shape=[8, 8, 1]
    )
    assert header.source.tfrecord.labels.name == "label"

    for name in ("images.zip", "images.tar", "images.tar.gz", "IMAGES.TGZ"):
        archive = tmp_path / name
        archive.write_bytes(b"archive " + name.encode())
        header, data = _sent(_upload(archive, image_size=(32, 48), channels=1))
        assert header.source.format == dataset_pb2.DATASET_FORMAT_IMAGE_FOLDER, name
        assert list(header.source.image_folder.image_size) == [32, 48]
        assert header.source.image_folder.channels == 1
        assert data == archive.read_bytes()

    odd = tmp_path / "data.bin"
    odd.write_bytes(b"npz bytes")
    with pytest.raises(ValueError, match="cannot be told"):
        _upload(odd)
    header, _ = _sent(_upload(odd, format="npz"))
    assert header.source.format == dataset_pb2.DATASET_FORMAT_NPZ
    # `format` overrides the suffix.
    header, _ = _sent(_upload(npz, format="image_folder", image_size=(8, 8)))
    assert header.source.format == dataset_pb2.DATASET_FORMAT_IMAGE_FOLDER

    assert _datasets.detect_dataset_format(tmp_path) == "image_folder"
    assert _datasets.detect_dataset_format(tmp_path / "x.TFRecords") == "tfrecord"
    assert _datasets.detect_dataset_format(tmp_path / "x.csv") is None


def test_upload_sources_are_checked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _upload(tmp_path / "missing.npz")
    with pytest.raises(TypeError, match="mapping of arrays"):
        _upload(42)
    with pytest.raises(ValueError, match="without `format`"):
        _upload(b"raw")
    header, data = _sent(
        _upload(
            b"raw",
            format="tfrecord",
            tfrecord_features=("f", np.float32, [2]),
            tfrecord_labels=("l", "int64", []),
        )
    )
    assert data == b"raw" and header.source.tfrecord.features.dtype == tensor_pb2.DATA_TYPE_FLOAT32
    arrays = {"x": np.zeros(2), "y": np.zeros(2)}
    with pytest.raises(ValueError, match="mapping of arrays"):
        _upload(arrays, format="tfrecord")
    with pytest.raises(ValueError, match="image_size"):
        _upload(arrays, image_size=(8, 8))
    with pytest.raises(ValueError, match="tfrecord_features"):
        _upload(b"raw", format="tfrecord", tfrecord_labels=("l", "int64", []))
    with pytest.raises(ValueError, match="dtype"):
        _upload(
            b"raw",
            format="tfrecord",
            tfrecord_features=("f", "float64", [2]),
            tfrecord_labels=("l", "int64", []),
        )
    with pytest.raises(TypeError, match="name, dtype, shape"):
        _upload(b"raw", format="tfrecord", tfrecord_features="f", tfrecord_labels=("l", "int64", []))
    with pytest.raises(ValueError, match="image_size"):
        _upload(b"raw", format="image_folder")
    with pytest.raises(ValueError, match="channels=2"):
        _upload(b"raw", format="image_folder", image_size=(8, 8), channels=2)
    with pytest.raises(ValueError, match="format"):
        _upload(b"raw", format="csv")
    with pytest.raises(ValueError, match="a directory"):
        _upload(tmp_path, format="npz")


def _image_folder(root: Path) -> Path:
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for i in range(2):
            (root / label / f"{label}{i}.png").write_bytes(f"{label}-{i}".encode())
    (root / "dogs" / "puppies").mkdir()
    (root / "dogs" / "puppies" / "p.jpg").write_bytes(b"pup")
    (root / "cats" / ".DS_Store").write_bytes(b"junk")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.png").write_bytes(b"junk")
    (root / "README.txt").write_bytes(b"not a class")
    return root


def test_directory_is_zipped_with_class_entries(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "flowers")
    upload = _upload(folder, image_size=(16, 16))
    assert upload.path is None and upload.buffer is not None
    header, data = _sent(upload)
    assert header.source.format == dataset_pb2.DATASET_FORMAT_IMAGE_FOLDER
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.namelist() == [
            "cats/cats0.png",
            "cats/cats1.png",
            "dogs/dogs0.png",
            "dogs/dogs1.png",
            "dogs/puppies/p.jpg",
        ]
        assert archive.read("dogs/dogs1.png") == b"dogs-1"
    upload.close()
    assert upload.buffer.closed

    with pytest.raises(ValueError, match="image_size"):
        _upload(folder)
    empty = tmp_path / "empty"
    (empty / "only-class").mkdir(parents=True)
    with pytest.raises(ValueError, match="hold no file"):
        _upload(empty, image_size=(8, 8))
    with pytest.raises(ValueError, match="class subfolders"):
        _datasets.zip_image_folder(tmp_path / "empty" / "only-class")


def test_zip_of_a_folder_matches_a_tar_of_it(tmp_path: Path) -> None:
    # The server reads zip and tar alike: the same class/filename entries.
    folder = _image_folder(tmp_path / "f")
    with _datasets.zip_image_folder(folder) as file, zipfile.ZipFile(file) as archive:
        zipped = sorted(archive.namelist())
    tar_path = tmp_path / "f.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name in zipped:
            tar.add(folder / name, arcname=name)
    with tarfile.open(tar_path) as tar:
        assert sorted(m.name for m in tar.getmembers()) == zipped


# --- other requests --------------------------------------------------------------


def test_create_dataset_request(tmp_path: Path) -> None:
    request = _requests.create_dataset(
        tmp_path / "data.npz",
        "d1",
        format="npz",
        tfrecord_features=None,
        tfrecord_labels=None,
        image_size=None,
        channels=3,
    )
    assert request == ts.CreateDatasetRequest(
        dataset_id="d1",
        uri=str(tmp_path / "data.npz"),
        source=dataset_pb2.DatasetSource(format=dataset_pb2.DATASET_FORMAT_NPZ),
    )
    with pytest.raises(ValueError, match="uri"):
        _requests.create_dataset(
            "", "", format="npz", tfrecord_features=None, tfrecord_labels=None, image_size=None, channels=3
        )


def test_evaluate_request() -> None:
    request = _requests.evaluate(
        "m",
        "d",
        loss="mse",
        metrics=["mae"],
        batch_size=16,
        revision=2,
        split="validation",
        rescale=1 / 255,
    )
    assert (request.model_id, request.dataset_id, request.loss, list(request.metrics)) == (
        "m",
        "d",
        "mse",
        ["mae"],
    )
    assert (request.batch_size, request.revision, request.split) == (
        16,
        2,
        model_service_pb2.DATASET_SPLIT_VALIDATION,
    )
    assert request.HasField("rescale")
    plain = _requests.evaluate(
        "m", "d", loss="mse", metrics=(), batch_size=0, revision=0, split="train", rescale=None
    )
    assert plain.split == model_service_pb2.DATASET_SPLIT_TRAIN and not plain.HasField("rescale")
    with pytest.raises(ValueError, match="split"):
        _requests.evaluate(
            "m", "d", loss="mse", metrics=(), batch_size=0, revision=0, split="test", rescale=None
        )
    with pytest.raises(ValueError, match="loss"):
        _requests.evaluate(
            "m", "d", loss="", metrics=(), batch_size=0, revision=0, split="train", rescale=None
        )


def test_job_requests() -> None:
    spec = jobs.spec("m", "d", epochs=1, batch_size=1, optimizer=_OPT, loss="mse")
    assert _requests.create_job(spec, "j") == ts.CreateJobRequest(job_id="j", spec=spec)
    with pytest.raises(TypeError, match=r"jobs\.spec"):
        _requests.create_job({"model_id": "m"}, "")  # type: ignore[arg-type]
    assert _requests.list_job_events("j", 4, 10, "") == ts.ListJobEventsRequest(
        job_id="j", after_sequence=4, page_size=10
    )
    with pytest.raises(ValueError, match="after_sequence"):
        _requests.list_job_events("j", -1, 0, "")


# --- watch_job reconnection, unit ------------------------------------------------


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _failure(code: grpc.StatusCode, details: str = "") -> errors.WeightsmithError:
    """What a WatchJob stream that failed with `code` raises."""
    return errors.from_rpc_error(_RpcError(code, details))


def _event(sequence: int) -> job_pb2.JobEvent:
    log = job_pb2.LogLine(level=job_pb2.LOG_LEVEL_INFO, message=f"event {sequence}")
    return job_pb2.JobEvent(sequence=sequence, log=log)


def test_job_watch_skips_replays_and_backs_off() -> None:
    watch = _watch.JobWatch("j", after_sequence=2, reconnect=True, max_reconnects=6, stream_timeout=None)
    assert watch.request() == ts.WatchJobRequest(job_id="j", after_sequence=2)
    assert watch.call_timeout() is None
    assert not watch.accept(_event(1)) and not watch.accept(_event(2))
    assert watch.accept(_event(3)) and watch.last_sequence == 3
    assert watch.request().after_sequence == 3
    unavailable = _failure(grpc.StatusCode.UNAVAILABLE)
    delays = [watch.reconnect_delay(unavailable) for _ in range(6)]
    assert delays == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert watch.reconnect_delay(unavailable) is None  # max_reconnects in a row
    assert watch.accept(_event(4))  # an event resets the count and the backoff
    assert watch.reconnect_delay(_failure(grpc.StatusCode.DEADLINE_EXCEEDED)) == 0.2


@pytest.mark.parametrize(
    ("code", "details", "reconnectable"),
    [
        (grpc.StatusCode.UNAVAILABLE, "", True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", True),
        (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2", True),
        (grpc.StatusCode.UNKNOWN, "Stream removed", True),
        (grpc.StatusCode.INTERNAL, "the server failed", False),
        (grpc.StatusCode.NOT_FOUND, "no job", False),
        (grpc.StatusCode.CANCELLED, "", False),
    ],
)
def test_reconnectable_errors(code: grpc.StatusCode, details: str, reconnectable: bool) -> None:
    assert _watch.is_reconnectable(_failure(code, details)) is reconnectable
    watch = _watch.JobWatch("j", after_sequence=0, reconnect=True, max_reconnects=3, stream_timeout=None)
    assert (watch.reconnect_delay(_failure(code, details)) is not None) is reconnectable
    off = _watch.JobWatch("j", after_sequence=0, reconnect=False, max_reconnects=3, stream_timeout=None)
    assert off.reconnect_delay(_failure(code, details)) is None


def test_job_watch_timeout() -> None:
    watch = _watch.JobWatch(
        "j", after_sequence=0, reconnect=True, max_reconnects=3, stream_timeout=5.0, timeout=0.05
    )
    timeout = watch.call_timeout()
    assert timeout is not None and 0 < timeout <= 0.05
    time.sleep(0.06)
    with pytest.raises(TimeoutError, match="did not finish"):
        watch.reconnect_delay(_failure(grpc.StatusCode.DEADLINE_EXCEEDED))
    with pytest.raises(TimeoutError):
        watch.call_timeout()
    capped = _watch.JobWatch("j", after_sequence=0, reconnect=True, max_reconnects=3, stream_timeout=5.0)
    assert capped.call_timeout() == 5.0
    with pytest.raises(ValueError, match="max_reconnects"):
        _watch.JobWatch("j", after_sequence=0, reconnect=True, max_reconnects=-1, stream_timeout=None)


# --- a fake TrainingService over real gRPC -----------------------------------------


class FakeTraining(training_service_pb2_grpc.TrainingServiceServicer):
    """Scripted WatchJob connections, and just enough of the other calls."""

    def __init__(self) -> None:
        # One entry per WatchJob connection: the sequences to send, then how it ends:
        # None (normally), a status code to abort with, or "hang" (until the deadline).
        self.script: list[tuple[list[int], Any]] = []
        self.watch_requests: list[tuple[str, int]] = []
        self.uploads: list[tuple[ts.UploadDatasetHeader, bytes]] = []
        self.jobs: dict[str, job_pb2.Job] = {}
        self.authors: list[str] = []
        self.lock = threading.Lock()

    def WatchJob(self, request: Any, context: Any) -> Iterator[Any]:
        with self.lock:
            self.watch_requests.append((request.job_id, request.after_sequence))
            sequences, end = self.script.pop(0) if self.script else ([], None)
        if request.job_id == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no job 'missing'")
        for sequence in sequences:
            yield ts.WatchJobResponse(event=_event(sequence))
        if end == "hang":
            while context.is_active():
                time.sleep(0.01)
        elif end == "finish":
            self.jobs[request.job_id].state = job_pb2.JOB_STATE_SUCCEEDED
        elif end is not None:
            context.abort(end, "connection lost")

    def UploadDataset(self, request_iterator: Any, context: Any) -> Any:
        header = next(request_iterator).header
        data = b"".join(request.chunk for request in request_iterator)
        self.uploads.append((header, data))
        return ts.UploadDatasetResponse(
            dataset=dataset_pb2.Dataset(
                dataset_id=header.dataset_id or "picked", format=header.source.format, size_bytes=len(data)
            )
        )

    def CreateDataset(self, request: Any, context: Any) -> Any:
        return ts.CreateDatasetResponse(
            dataset=dataset_pb2.Dataset(dataset_id=request.dataset_id, format=request.source.format)
        )

    def GetDataset(self, request: Any, context: Any) -> Any:
        return ts.GetDatasetResponse(dataset=dataset_pb2.Dataset(dataset_id=request.dataset_id))

    def ListDatasets(self, request: Any, context: Any) -> Any:
        ids = ["a", "b", "c"]
        start = int(request.page_token or 0)
        end = start + (request.page_size or 100)
        return ts.ListDatasetsResponse(
            datasets=[dataset_pb2.Dataset(dataset_id=i) for i in ids[start:end]],
            next_page_token=str(end) if end < len(ids) else "",
        )

    def DeleteDataset(self, request: Any, context: Any) -> Any:
        return ts.DeleteDatasetResponse()

    def CreateJob(self, request: Any, context: Any) -> Any:
        self.authors.append(dict(context.invocation_metadata())["weightsmith-author"])
        job = job_pb2.Job(job_id=request.job_id or "job-1", spec=request.spec, state=job_pb2.JOB_STATE_QUEUED)
        self.jobs[job.job_id] = job
        return ts.CreateJobResponse(job=job)

    def GetJob(self, request: Any, context: Any) -> Any:
        if request.job_id not in self.jobs:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no job {request.job_id!r}")
        return ts.GetJobResponse(job=self.jobs[request.job_id])

    def ListJobs(self, request: Any, context: Any) -> Any:
        jobs_ = list(self.jobs.values())
        start = int(request.page_token or 0)
        end = start + (request.page_size or 100)
        return ts.ListJobsResponse(
            jobs=jobs_[start:end], next_page_token=str(end) if end < len(jobs_) else ""
        )

    def CancelJob(self, request: Any, context: Any) -> Any:
        job = self.jobs[request.job_id]
        job.state = job_pb2.JOB_STATE_CANCELLED
        return ts.CancelJobResponse(job=job)

    def ListJobEvents(self, request: Any, context: Any) -> Any:
        return ts.ListJobEventsResponse(events=[_event(request.after_sequence + 1)], next_page_token="more")


class FakeModels(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self) -> None:
        self.requests: list[model_service_pb2.EvaluateRequest] = []

    def Evaluate(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        return model_service_pb2.EvaluateResponse(
            loss=0.5, metrics={"accuracy": 0.75}, example_count=10, revision=3
        )


class FakeServer:
    def __init__(self) -> None:
        self.training = FakeTraining()
        self.models = FakeModels()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        training_service_pb2_grpc.add_TrainingServiceServicer_to_server(self.training, self.server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(self.models, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.server.stop(None)


def _script_drop(fake: FakeServer) -> None:
    fake.training.script = [([1, 2, 3], grpc.StatusCode.UNAVAILABLE), ([4, 5, 6], None)]


def test_watch_job_reconnects_without_gaps(connect: Callable[..., Any], fake: FakeServer) -> None:
    _script_drop(fake)
    with connect(fake.address) as client:
        sequences = [event.sequence for event in client.watch_job("j")]
    assert sequences == [1, 2, 3, 4, 5, 6]
    assert fake.training.watch_requests == [("j", 0), ("j", 3)]


def test_watch_job_skips_replayed_events_and_starts_after(
    connect: Callable[..., Any], fake: FakeServer
) -> None:
    # A server that replays what the client has seen: the client drops it.
    fake.training.script = [([3, 4], grpc.StatusCode.UNAVAILABLE), ([2, 3, 4, 5], None)]
    with connect(fake.address) as client:
        assert [e.sequence for e in client.watch_job("j", after_sequence=2)] == [3, 4, 5]
    assert fake.training.watch_requests == [("j", 2), ("j", 4)]


def test_watch_job_raises_what_is_not_a_connection_failure(
    connect: Callable[..., Any], fake: FakeServer
) -> None:
    with connect(fake.address) as client:
        with pytest.raises(weightsmith.NotFoundError, match="no job"):
            list(client.watch_job("missing"))
        assert fake.training.watch_requests == [("missing", 0)]
        fake.training.script = [([1], grpc.StatusCode.UNAVAILABLE)]
        with pytest.raises(weightsmith.UnavailableError):
            list(client.watch_job("j", reconnect=False))
        fake.training.script = [([1], grpc.StatusCode.UNAVAILABLE), ([], grpc.StatusCode.UNAVAILABLE)]
        seen: list[int] = []
        with pytest.raises(weightsmith.UnavailableError):
            seen.extend(e.sequence for e in client.watch_job("j", max_reconnects=1))
        assert seen == [1]
        fake.training.script = [([1], grpc.StatusCode.PERMISSION_DENIED)]
        with pytest.raises(weightsmith.PermissionDeniedError):
            list(client.watch_job("j"))


def test_wait_job(connect: Callable[..., Any], fake: FakeServer) -> None:
    fake.training.jobs["j"] = job_pb2.Job(job_id="j", state=job_pb2.JOB_STATE_RUNNING, last_sequence=2)
    fake.training.script = [([3], grpc.StatusCode.UNAVAILABLE), ([4], "finish")]
    with connect(fake.address) as client:
        job = client.wait_job("j", timeout=30)
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED
        assert fake.training.watch_requests == [("j", 2), ("j", 3)]
        # An ended job returns at once, without watching.
        assert client.wait_job("j").state == job_pb2.JOB_STATE_SUCCEEDED
        assert len(fake.training.watch_requests) == 2

        fake.training.jobs["slow"] = job_pb2.Job(job_id="slow", state=job_pb2.JOB_STATE_RUNNING)
        fake.training.script = [([1], "hang")]
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="slow"):
            client.wait_job("slow", timeout=0.5)
        assert time.monotonic() - started < 5

        fake.training.jobs["k"] = job_pb2.Job(job_id="k", state=job_pb2.JOB_STATE_QUEUED, last_sequence=0)
        fake.training.script = [([1, 2], "finish")]
        assert client.wait_job("k").state == job_pb2.JOB_STATE_SUCCEEDED
        fake.training.script = [([], "hang")]
        with pytest.raises(TimeoutError):
            client.wait_job("slow", timeout=0.3)


def test_client_training_calls(connect: Callable[..., Any], fake: FakeServer, tmp_path: Path) -> None:
    arrays = {"x": np.arange(12, dtype=np.float32).reshape(6, 2), "y": np.arange(6)}
    with connect(fake.address, author="alice@test") as client:
        dataset = client.upload_dataset(arrays, "toy", chunk_size_bytes=100)
        assert (dataset.dataset_id, dataset.format) == ("toy", dataset_pb2.DATASET_FORMAT_NPZ)
        header, data = fake.training.uploads[-1]
        assert header.size_bytes == len(data) == dataset.size_bytes
        with np.load(io.BytesIO(data)) as loaded:
            np.testing.assert_array_equal(loaded["x"], arrays["x"])

        folder = _image_folder(tmp_path / "imgs")
        uploaded = client.upload_dataset(folder, image_size=(8, 8))
        assert uploaded.format == dataset_pb2.DATASET_FORMAT_IMAGE_FOLDER
        with zipfile.ZipFile(io.BytesIO(fake.training.uploads[-1][1])) as archive:
            assert "cats/cats0.png" in archive.namelist()

        created = client.create_dataset("/data/x.zip", "x", format="image_folder", image_size=(8, 8))
        assert created.format == dataset_pb2.DATASET_FORMAT_IMAGE_FOLDER
        assert client.get_dataset("a").dataset_id == "a"
        assert [d.dataset_id for d in client.iter_datasets(page_size=2)] == ["a", "b", "c"]
        assert client.list_datasets(page_size=2).next_page_token == "2"
        client.delete_dataset("a")

        spec = jobs.spec("m", "toy", epochs=1, batch_size=2, optimizer=jobs.adam(1e-3), loss="mse")
        job = client.create_job(spec, "j1")
        assert (job.job_id, job.spec) == ("j1", spec)
        assert fake.training.authors == ["alice@test"]
        assert client.get_job("j1").state == job_pb2.JOB_STATE_QUEUED
        assert [j.job_id for j in client.iter_jobs(page_size=1)] == ["j1"]
        assert client.list_job_events("j1", after_sequence=4).events[0].sequence == 5
        assert client.cancel_job("j1").state == job_pb2.JOB_STATE_CANCELLED

        result = client.evaluate("m", "toy", loss="mse", metrics=["mae"], split="validation")
        assert (result.loss, result.metrics["accuracy"], result.revision) == (0.5, 0.75, 3)
        assert fake.models.requests[-1].split == model_service_pb2.DATASET_SPLIT_VALIDATION


def test_client_training_calls_from_files(
    connect: Callable[..., Any], fake: FakeServer, tmp_path: Path
) -> None:
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.zeros((3, 2)), y=np.zeros(3))
    with connect(fake.address, author="bob@test") as client:
        dataset = client.upload_dataset(npz, chunk_size_bytes=64)
        assert dataset.dataset_id == "picked" and fake.training.uploads[-1][1] == npz.read_bytes()
        folder = _image_folder(tmp_path / "imgs")
        client.upload_dataset(folder, "imgs", image_size=(8, 8))
        with zipfile.ZipFile(io.BytesIO(fake.training.uploads[-1][1])) as archive:
            assert "dogs/puppies/p.jpg" in archive.namelist()
        created = client.create_dataset("/d.npz", format="npz")
        assert created.format == dataset_pb2.DATASET_FORMAT_NPZ
        assert client.get_dataset("b").dataset_id == "b"
        assert [d.dataset_id for d in client.iter_datasets(page_size=2)] == ["a", "b", "c"]
        assert client.list_datasets().next_page_token == ""
        client.delete_dataset("b")

        spec = jobs.spec("m", "d", epochs=1, batch_size=2, optimizer=jobs.sgd(0.1), loss="mse")
        job = client.create_job(spec)
        assert job.job_id == "job-1" and fake.training.authors == ["bob@test"]
        assert client.get_job("job-1").spec == spec
        assert [j.job_id for j in client.iter_jobs()] == ["job-1"]
        assert client.list_jobs(page_size=5).jobs[0].job_id == "job-1"
        events = client.list_job_events("job-1")
        assert events.events[0].sequence == 1 and events.next_page_token == "more"
        assert client.cancel_job("job-1").state == job_pb2.JOB_STATE_CANCELLED
        result = client.evaluate("m", "d", loss="mse", rescale=0.5)
        assert result.example_count == 10 and fake.models.requests[-1].rescale == 0.5


# --- progress bars -----------------------------------------------------------------


def _job_events() -> list[job_pb2.JobEvent]:
    events = [job_pb2.JobEvent(state_changed=job_pb2.StateChanged(state=job_pb2.JOB_STATE_RUNNING))]
    for epoch in (1, 2):
        for step in (2, 4):
            events.append(
                job_pb2.JobEvent(
                    progress=job_pb2.StepProgress(
                        epoch=epoch,
                        step=step,
                        steps_per_epoch=4,
                        global_step=(epoch - 1) * 4 + step,
                        loss=1.0 / epoch,
                        learning_rate=1e-3,
                        samples_per_second=123.0,
                    )
                )
            )
        events.append(
            job_pb2.JobEvent(
                epoch_ended=job_pb2.EpochEnded(
                    epoch=epoch,
                    train_metrics={"loss": 1.0 / epoch, "accuracy": 0.5},
                    validation_metrics={"loss": 2.0 / epoch},
                )
            )
        )
    warning = job_pb2.LogLine(level=job_pb2.LOG_LEVEL_WARNING, message="slow input pipeline")
    events.append(job_pb2.JobEvent(log=warning))
    events.append(job_pb2.JobEvent(checkpoint_saved=job_pb2.CheckpointSaved(epoch=2, global_step=8)))
    events.append(
        job_pb2.JobEvent(
            result=job_pb2.JobResult(
                model_id="m", revision=4, metrics={"loss": 0.5}, epochs_completed=2, steps_completed=8
            )
        )
    )
    events.append(job_pb2.JobEvent(state_changed=job_pb2.StateChanged(state=job_pb2.JOB_STATE_SUCCEEDED)))
    for sequence, event in enumerate(events, 1):
        event.sequence = sequence
    return events


def test_progress_bar_returns_the_result() -> None:
    pytest.importorskip("tqdm")
    out = io.StringIO()
    result = weightsmith.progress_bar(iter(_job_events()), total_epochs=2, file=out)
    assert result is not None and (result.model_id, result.revision) == ("m", 4)
    text = out.getvalue()
    assert "epoch 1/2: loss=1 accuracy=0.5 val_loss=2" in text
    assert "WARNING: slow input pipeline" in text
    assert "result: m revision 4 after 2 epochs" in text and "job succeeded" in text
    assert "8/8" in text and "samples/s=123.0" in text

    failed = [
        job_pb2.JobEvent(
            sequence=1,
            state_changed=job_pb2.StateChanged(state=job_pb2.JOB_STATE_FAILED, detail="out of memory"),
        )
    ]
    out = io.StringIO()
    assert weightsmith.progress_bar(failed, file=out) is None
    assert "job failed: out of memory" in out.getvalue()
    with pytest.raises(ValueError, match="total_epochs"):
        weightsmith.progress_bar([], total_epochs=0, file=io.StringIO())


def test_async_progress_bar_returns_the_result() -> None:
    pytest.importorskip("tqdm")

    async def events() -> Any:
        for event in _job_events():
            yield event

    out = io.StringIO()
    result = asyncio.run(weightsmith.async_progress_bar(events(), file=out))
    assert result is not None and result.revision == 4
    assert "epoch 2: loss=0.5" in out.getvalue()


def test_progress_bar_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match="pip install tqdm"):
        weightsmith.progress_bar([])


# --- both clients --------------------------------------------------------------------

NEW_METHODS = [
    "upload_dataset",
    "create_dataset",
    "get_dataset",
    "list_datasets",
    "iter_datasets",
    "delete_dataset",
    "create_job",
    "get_job",
    "list_jobs",
    "iter_jobs",
    "cancel_job",
    "list_job_events",
    "watch_job",
    "wait_job",
    "evaluate",
]
STREAMING = {"iter_datasets", "iter_jobs", "watch_job"}


@pytest.mark.parametrize("name", NEW_METHODS)
def test_new_methods_are_twins(name: str) -> None:
    sync_method = getattr(weightsmith.Client, name)
    async_method = getattr(weightsmith.AsyncClient, name)
    sync_signature, async_signature = inspect.signature(sync_method), inspect.signature(async_method)
    assert [(p.name, p.kind, p.default, p.annotation) for p in sync_signature.parameters.values()] == [
        (p.name, p.kind, p.default, p.annotation) for p in async_signature.parameters.values()
    ]
    # Options are keyword-only: only ids and the main argument are positional.
    positional = [p.name for p in sync_signature.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert len(positional) <= 3, positional
    returns = str(sync_signature.return_annotation)
    if name in STREAMING:
        assert returns.startswith("Iterator[")
        assert str(async_signature.return_annotation) == "Async" + returns
        assert inspect.isgeneratorfunction(sync_method)
        assert inspect.isasyncgenfunction(async_method)
    else:
        assert returns == str(async_signature.return_annotation)
        assert not inspect.iscoroutinefunction(sync_method)
        assert inspect.iscoroutinefunction(async_method)
    for method in (sync_method, async_method):
        assert method.__doc__ and "Args:" in method.__doc__, name
        if "Returns" not in method.__doc__:
            assert name == "delete_dataset"
