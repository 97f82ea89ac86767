"""What must hold when things go wrong: cancellation, failures after commit, crafted input."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

import weightsmith
from tests.conftest import ServerHandle, _start_in_thread, _stop_in_thread, tiny_config
from weightsmith import wire
from weightsmith.v1 import weight_service_pb2
from weightsmith_server.errors import NotFound
from weightsmith_server.models.resident import ResidentModel
from weightsmith_server.weights import WeightWrite

WRITE_METHOD = "/weightsmith.v1.WeightService/WriteWeights"


def _write_session(server: ServerHandle, model_id: str, bias: np.ndarray) -> WeightWrite:
    host = server.running.host  # type: ignore[attr-defined]
    write = WeightWrite(
        host, model_id, expected_revision=None, message="direct", allow_non_finite=False, author="tests"
    )
    for name, dtype, shape, offset, data in wire.iter_tensor_chunks("logits/bias", bias, 1 << 20):
        write.add(name, dtype, shape, offset, data)
    return write


def test_abort_after_commit_started_changes_nothing_committed(
    client, server: ServerHandle, model_id: str
) -> None:
    client.create_model(model_id, keras_config=tiny_config())
    bias = np.array([5.0, 6.0], np.float32)
    write = _write_session(server, model_id, bias)
    record = write.commit()
    write.abort()  # e.g. the client's deadline fired while the commit ran: must be a no-op
    assert record.revision == 2
    assert client.read_weights(model_id, "logits/bias")["logits/bias"].tolist() == [5.0, 6.0]
    assert client.read_weights(model_id, "logits/bias", revision=2)["logits/bias"].tolist() == [5.0, 6.0]
    assert (server.store / "models" / model_id / "revisions" / "000002" / "revision.json").is_file()


def test_commit_after_abort_is_refused(client, server: ServerHandle, model_id: str) -> None:
    client.create_model(model_id, keras_config=tiny_config())
    write = _write_session(server, model_id, np.ones(2, np.float32))
    write.abort()
    with pytest.raises(Exception, match="cancelled"):
        write.commit()
    assert client.get_model(model_id).revision == 1
    assert list((server.store / "models" / model_id / "revisions").iterdir()) == [
        server.store / "models" / model_id / "revisions" / "000001"
    ]


def test_write_to_a_model_deleted_and_recreated_meanwhile_is_not_found(
    client, server: ServerHandle, model_id: str
) -> None:
    client.create_model(model_id, keras_config=tiny_config(), seed=1)
    write = _write_session(server, model_id, np.array([5.0, 6.0], np.float32))
    client.delete_model(model_id)
    client.create_model(model_id, keras_config=tiny_config(), seed=2)
    with pytest.raises(NotFound) as caught:
        write.commit()
    assert caught.value.reason == "MODEL_NOT_FOUND"
    assert client.get_model(model_id).revision == 1
    assert sorted(p.name for p in (server.store / "models" / model_id / "revisions").iterdir()) == ["000001"]


def test_failed_install_after_commit_reloads_from_disk(
    client, model_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.create_model(model_id, keras_config=tiny_config(), seed=1)
    original_install = ResidentModel.install
    calls = {"n": 0}

    def failing_install(self: ResidentModel, *args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device out of memory")
        original_install(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(ResidentModel, "install", failing_install)
    revision = client.write_weights(model_id, {"logits/bias": np.array([7.0, 8.0], np.float32)})
    assert revision.revision == 2
    assert client.get_model(model_id).revision == 2
    assert client.read_weights(model_id, "logits/bias")["logits/bias"].tolist() == [7.0, 8.0]
    hidden = np.maximum(client.read_weights(model_id, "hidden/*")["hidden/bias"], 0)
    kernel = client.read_weights(model_id, "logits/kernel")["logits/kernel"]
    out = client.predict(model_id, np.zeros((1, 4), np.float32)).outputs["logits"]
    np.testing.assert_allclose(out[0], hidden @ kernel + [7.0, 8.0], rtol=1e-6)
    assert client.write_weights(model_id, {"logits/bias": np.zeros(2, np.float32)}).revision == 3


def _raw_write(address: str, messages: Iterator[bytes] | list[bytes]) -> None:
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_unary(
            WRITE_METHOD, request_serializer=lambda m: m, response_deserializer=lambda m: m
        )
        call(iter(messages), timeout=60)


def _header(model_id: str) -> bytes:
    return weight_service_pb2.WriteWeightsRequest(
        header=weight_service_pb2.WriteWeightsHeader(model_id=model_id)
    ).SerializeToString()


@pytest.mark.parametrize(
    "crafted",
    [
        # A 4 million-dimension shape, packed: parsing it must not stall the server.
        b"\x12" + wire._varint(4_000_008) + b"\x1a" + wire._varint(4_000_000) + b"\x01" * 4_000_000,
        # Tens of thousands of tiny unknown fields.
        b"\x12" + wire._varint(60_000) + b"\x30\x01" * 30_000,
        # A name far longer than any variable path.
        b"\x12" + wire._varint(5003) + b"\x0a" + wire._varint(5000) + b"a" * 5000,
    ],
    ids=["huge-rank", "field-flood", "long-name"],
)
def test_crafted_chunks_are_rejected_quickly(
    client, server: ServerHandle, model_id: str, crafted: bytes
) -> None:
    from weightsmith.errors import from_rpc_error

    client.create_model(model_id, keras_config=tiny_config())
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as caught:
        _raw_write(server.address, [_header(model_id), crafted])
    assert time.perf_counter() - started < 5
    error = from_rpc_error(caught.value)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "MALFORMED_CHUNK"
    assert error.field_violations[0][0] == "chunks[0]"
    assert len(caught.value.details()) < 1000
    assert client.get_model(model_id).revision == 1


def test_delete_during_a_write(client, server: ServerHandle, model_id: str) -> None:
    client.create_model(model_id, keras_config=tiny_config())
    started = threading.Event()
    release = threading.Event()
    bias = np.ones(2, np.float32)

    def messages() -> Iterator[bytes]:
        yield _header(model_id)
        started.set()
        release.wait(30)
        for name, dtype, shape, offset, data in wire.iter_tensor_chunks("logits/bias", bias, 1 << 20):
            yield wire.encode_chunk(2, name, dtype, shape, offset, data)

    outcome: dict[str, object] = {}

    def write() -> None:
        try:
            _raw_write(server.address, messages())
            outcome["result"] = "ok"
        except grpc.RpcError as exc:
            outcome["result"] = exc.code()

    thread = threading.Thread(target=write)
    thread.start()
    assert started.wait(30)
    time.sleep(0.3)  # the server has the header and has staged the write
    client.delete_model(model_id)
    release.set()
    thread.join(30)
    assert outcome["result"] == grpc.StatusCode.NOT_FOUND
    assert not (server.store / "models" / model_id).exists()
    client.create_model(model_id, keras_config=tiny_config())  # the id is free


def test_unrestorable_model_does_not_keep_the_server_down(tmp_path: Path) -> None:
    store = tmp_path / "store"
    handle, thread = _start_in_thread(store)
    try:
        with weightsmith.Client(handle.address) as client:
            client.create_model("good", keras_config=tiny_config())
            client.create_model("bad", keras_config=tiny_config())
    finally:
        _stop_in_thread(handle, thread)
    revision = store / "models" / "bad" / "revisions" / "000001" / "revision.json"
    stored = json.loads(revision.read_text())
    stored["manifest"] = {"kind": "full", "layer_count": 2, "variables": [["nonsense"]]}
    revision.write_text(json.dumps(stored))

    handle, thread = _start_in_thread(store)
    try:
        with weightsmith.Client(handle.address) as client:
            assert client.get_model("good").revision == 1
            with pytest.raises(weightsmith.FailedPreconditionError) as caught:
                client.get_model("bad")
            assert caught.value.reason == "MODEL_UNRESTORABLE"
    finally:
        _stop_in_thread(handle, thread)
