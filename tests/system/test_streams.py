"""Client streams are bounded: idle timeout, total deadline, caps on concurrent streams and staging memory.

Stalled streams are raw gRPC calls whose request iterator sends a header (and
maybe a chunk) and then waits: the server must close them itself, free what
they held (memory, partial files, staging folders) and release the ids they
reserved.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import weightsmith
from tests.conftest import ServerHandle, _start_in_thread, _stop_in_thread, spawn_server, tiny_config
from weightsmith.v1 import (
    dataset_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    tensor_pb2,
    training_service_pb2,
    training_service_pb2_grpc,
    weight_service_pb2,
    weight_service_pb2_grpc,
)

STRESS = os.environ.get("WEIGHTSMITH_STRESS") == "1"

# --- helpers -------------------------------------------------------------------


def reason_of(error: grpc.RpcError) -> str:
    """The `ErrorInfo.reason` of a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, error
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info.reason


def stalled(messages: list[Any], release: threading.Event) -> Iterator[Any]:
    """Send `messages`, then send nothing more until `release` is set (then end the stream)."""
    yield from messages
    release.wait()


def write_messages(model_id: str, name: str, array: np.ndarray, first_bytes: int | None = None) -> list[Any]:
    """A WriteWeights header and one chunk with the first `first_bytes` of `array` (all of it when None)."""
    data = array.tobytes()[:first_bytes]
    return [
        weight_service_pb2.WriteWeightsRequest(
            header=weight_service_pb2.WriteWeightsHeader(model_id=model_id)
        ),
        weight_service_pb2.WriteWeightsRequest(
            chunk=tensor_pb2.TensorChunk(
                name=name, dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=array.shape, offset=0, data=data
            )
        ),
    ]


def model_upload_messages(model_id: str, size: int, sent: int) -> list[Any]:
    return [
        model_service_pb2.UploadModelRequest(
            header=model_service_pb2.UploadModelHeader(model_id=model_id, size_bytes=size)
        ),
        model_service_pb2.UploadModelRequest(chunk=b"\0" * sent),
    ]


def dataset_upload_messages(dataset_id: str, size: int, sent: int) -> list[Any]:
    source = dataset_pb2.DatasetSource(format=dataset_pb2.DATASET_FORMAT_NPZ)
    return [
        training_service_pb2.UploadDatasetRequest(
            header=training_service_pb2.UploadDatasetHeader(
                dataset_id=dataset_id, source=source, size_bytes=size
            )
        ),
        training_service_pb2.UploadDatasetRequest(chunk=b"\0" * sent),
    ]


class Stubs:
    """Raw stubs on one channel: the streams here must not be the client's well-behaved ones."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.weights = weight_service_pb2_grpc.WeightServiceStub(self.channel)
        self.training = training_service_pb2_grpc.TrainingServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def scratch(store: Path) -> list[str]:
    """What the store holds in `tmp/` and in staging folders."""
    found = [p.name for p in (store / "tmp").iterdir()]
    found += [p.name for p in store.glob("models/*/revisions/.staging-*")]
    return found


def npz_bytes(seed: int) -> bytes:
    import io

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    np.savez(buffer, x=rng.normal(size=(8, 4)).astype(np.float32), y=rng.integers(0, 2, 8))
    return buffer.getvalue()


# --- stalled streams against a real process ---------------------------------------


@pytest.mark.slow
@pytest.mark.stress
def test_stalled_streams_are_closed_by_the_idle_timeout_and_release_everything(tmp_path: Path) -> None:
    count = 200 if STRESS else 50
    store = tmp_path / "store"
    server = spawn_server(
        store, "--stream-idle-seconds", "2", "--max-write-streams", str(count + 8), "--workers", "4"
    )
    release = threading.Event()
    stubs = Stubs(server.address)
    try:
        with weightsmith.Client(server.address) as client:
            client.create_model("big", keras_config=tiny_config(1024, inputs=1024), seed=1)
            kernel = np.ones((1024, 1024), np.float32)  # 4 MiB staged per write
            # Warm-up: one complete stream of each kind, so that allocators hold what they keep anyway.
            client.write_weights("big", {"hidden/kernel": kernel})
            client.upload_dataset({"x": np.zeros((4, 4), np.float32), "y": np.zeros(4, np.int64)}, "warm")
            stubs.models.UploadModel.future(
                iter(model_upload_messages("warm", 1 << 20, 1 << 16)), timeout=30
            ).exception()
            time.sleep(1)
            before = rss_bytes(server.process.pid)

            calls = []
            for index in range(count):
                kind = index % 3
                if kind == 0:
                    messages = write_messages("big", "hidden/kernel", kernel, first_bytes=1 << 20)
                    call = stubs.weights.WriteWeights.future(stalled(messages, release), timeout=60)
                elif kind == 1:
                    messages = model_upload_messages(f"stalled-m-{index}", 8 << 20, 1 << 20)
                    call = stubs.models.UploadModel.future(stalled(messages, release), timeout=60)
                else:
                    messages = dataset_upload_messages(f"stalled-d-{index}", 8 << 20, 1 << 20)
                    call = stubs.training.UploadDataset.future(stalled(messages, release), timeout=60)
                calls.append((kind, index, call))

            time.sleep(1)
            held = rss_bytes(server.process.pid)
            for _, _, call in calls:
                error = call.exception(timeout=60)
                assert isinstance(error, grpc.RpcError), error
                assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
                assert reason_of(error) == "STREAM_IDLE"
                assert "--stream-idle-seconds" in error.details()

            # Everything the streams held is gone: partial files, staging folders, memory.
            wait_for(lambda: not scratch(store), 30, f"scratch files to go: {scratch(store)}")
            settled = rss_bytes(server.process.pid)
            deadline = time.monotonic() + 30
            while settled > 1.1 * before and time.monotonic() < deadline:
                time.sleep(0.5)
                settled = rss_bytes(server.process.pid)
            print(f"server RSS: {before >> 20} MiB before, {held >> 20} stalled, {settled >> 20} after")
            assert settled <= 1.1 * before, (before, held, settled)

            # Nothing was written, and every reserved id is free again.
            assert client.get_model("big").revision == 2
            for kind, index, _ in calls:
                if kind == 1:
                    client.create_model(f"stalled-m-{index}", keras_config=tiny_config(), seed=index)
                elif kind == 2:
                    client.upload_dataset(npz_bytes(index), f"stalled-d-{index}", format="npz")
            assert {m.model_id for m in client.iter_models()} >= {
                f"stalled-m-{i}" for i in range(1, count, 3)
            }
    finally:
        release.set()
        stubs.close()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(60)


# --- deadline and caps, in process ------------------------------------------------


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """A server with short stream timeouts, two write/upload streams and 1 MiB of staging memory."""
    handle, thread = _start_in_thread(
        tmp_path_factory.mktemp("bounded") / "store",
        stream_idle_seconds=3.0,
        stream_deadline_seconds=5.0,
        max_write_streams=2,
        max_staging_mb=1,
    )
    yield handle
    _stop_in_thread(handle, thread)


def test_a_trickling_stream_is_closed_at_its_deadline_and_its_id_released(bounded: ServerHandle) -> None:
    stubs = Stubs(bounded.address)

    def trickle() -> Iterator[Any]:
        yield from model_upload_messages("trickled", 8 << 20, 1024)
        for _ in range(40):  # 20 s at most, each message well within the idle timeout
            time.sleep(0.5)
            yield model_service_pb2.UploadModelRequest(chunk=b"\0" * 1024)

    started = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as caught:
            stubs.models.UploadModel(trickle(), timeout=60)
    finally:
        stubs.close()
    took = time.monotonic() - started
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert reason_of(caught.value) == "STREAM_DEADLINE"
    assert "--stream-deadline-seconds" in caught.value.details()
    assert 4.5 < took < 20, took
    wait_for(lambda: not scratch(bounded.store), 10, "the partial upload to go")
    with weightsmith.Client(bounded.address) as client:
        assert client.create_model("trickled", keras_config=tiny_config(), seed=1).revision == 1


def test_a_stream_beyond_max_write_streams_is_refused_until_one_ends(bounded: ServerHandle) -> None:
    with weightsmith.Client(bounded.address) as client:
        client.create_model("capped", keras_config=tiny_config(), seed=1)
    stubs = Stubs(bounded.address)
    release = threading.Event()
    held = [
        stubs.models.UploadModel.future(
            stalled(model_upload_messages(f"held-{i}", 8 << 20, 1024), release), timeout=60
        )
        for i in range(2)
    ]
    try:
        # Both streams run on the server once their partial files exist.
        wait_for(lambda: len(list((bounded.store / "tmp").glob("upload-held-*"))) == 2, 10, "two uploads")
        with weightsmith.Client(bounded.address) as client:
            values = {"logits/bias": np.array([1.0, 2.0], np.float32)}
            with pytest.raises(weightsmith.errors.ResourceExhaustedError) as caught:
                client.write_weights("capped", values)
            assert caught.value.reason == "TOO_MANY_STREAMS"
            assert caught.value.metadata["limit"] == "2"
            assert client.get_model("capped").revision == 1  # nothing changed
            # A unary call is no stream: it still runs.
            assert client.get_model("capped").model_id == "capped"
            for call in held:
                call.cancel()
            wait_for(lambda: all(call.done() for call in held), 10, "the held streams to end")
            deadline = time.monotonic() + 10
            while True:  # the server notices the cancellations a moment later
                try:
                    revision = client.write_weights("capped", values)
                    break
                except weightsmith.errors.ResourceExhaustedError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            assert revision.revision == 2
            np.testing.assert_array_equal(client.read_weights("capped")["logits/bias"], values["logits/bias"])
            wait_for(lambda: not scratch(bounded.store), 10, "the cancelled uploads' files to go")
            for i in range(2):  # the cancelled uploads released their ids
                client.create_model(f"held-{i}", keras_config=tiny_config(), seed=i)
    finally:
        release.set()
        stubs.close()


def test_staging_memory_is_capped_across_writes_and_returned_when_a_stream_times_out(
    bounded: ServerHandle,
) -> None:
    # hidden/kernel: 512 x 384 float32 = 768 KiB; two of them do not fit in 1 MiB.
    config = tiny_config(384, inputs=512)
    kernel = np.full((512, 384), 0.5, np.float32)
    stubs = Stubs(bounded.address)
    release = threading.Event()
    with weightsmith.Client(bounded.address) as client:
        client.create_model("staged-a", keras_config=config, seed=1)
        client.create_model("staged-b", keras_config=config, seed=2)
        before_b = client.read_weights("staged-b")["hidden/kernel"]
        first = stubs.weights.WriteWeights.future(
            stalled(write_messages("staged-a", "hidden/kernel", kernel, first_bytes=1 << 16), release),
            timeout=60,
        )
        try:
            staging = bounded.store / "models" / "staged-a" / "revisions"
            wait_for(lambda: any(staging.glob(".staging-*/*.safetensors")), 10, "the first write to stage")
            with pytest.raises(weightsmith.errors.ResourceExhaustedError) as caught:
                client.write_weights("staged-b", {"hidden/kernel": kernel})
            assert caught.value.reason == "STAGING_MEMORY_EXHAUSTED"
            assert caught.value.metadata["limit"] == str(1 << 20)
            assert client.get_model("staged-b").revision == 1
            np.testing.assert_array_equal(client.read_weights("staged-b")["hidden/kernel"], before_b)

            # The stalled write times out and gives its bytes back: the same write now fits.
            error = first.exception(timeout=30)
            assert isinstance(error, grpc.RpcError)
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert reason_of(error) == "STREAM_IDLE"
            assert not any(staging.glob(".staging-*"))
            assert client.write_weights("staged-b", {"hidden/kernel": kernel}).revision == 2
            np.testing.assert_array_equal(client.read_weights("staged-b")["hidden/kernel"], kernel)
            assert client.get_model("staged-a").revision == 1

            # One write larger than the whole budget never fits.
            client.create_model("staged-big", keras_config=tiny_config(1024, inputs=512), seed=3)
            with pytest.raises(weightsmith.errors.ResourceExhaustedError) as caught:
                client.write_weights("staged-big", {"hidden/kernel": np.zeros((512, 1024), np.float32)})
            assert caught.value.reason == "STAGING_MEMORY_EXHAUSTED"
            assert client.get_model("staged-big").revision == 1
        finally:
            release.set()
            stubs.close()


def test_server_info_reports_the_stream_bounds(bounded: ServerHandle) -> None:
    with weightsmith.Client(bounded.address) as client:
        limits = client.server_info().limits
    assert limits.stream_idle_seconds == 3.0
    assert limits.stream_deadline_seconds == 5.0
    assert limits.max_write_streams == 2
    assert limits.max_staging_bytes == 1 << 20
