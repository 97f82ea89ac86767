"""Start-up without waiting for models or TensorFlow: stored models are listed from their files,
loaded in the background (health `weightsmith.models`) or on their first use, bit-exactly."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import weightsmith
from tests.conftest import ServerHandle, _start_in_thread, _stop_in_thread, tiny_config
from weightsmith_server.devices import Devices
from weightsmith_server.limits import InputLimits
from weightsmith_server.models import creation
from weightsmith_server.models.description import SIGNATURE_FILE
from weightsmith_server.models.local_host import LocalModelHost
from weightsmith_server.models.resident import ResidentModel
from weightsmith_server.store import Store

MODELS = ("m1", "m2", "m3")


def _new(seed: int) -> creation.NewModel:
    return creation.from_config(tiny_config(5), seed=seed, message="", author="tests", limits=InputLimits())


def _values(resident: ResidentModel) -> dict[str, bytes]:
    return {path: np.asarray(v.numpy()).tobytes() for path, v in resident.state.variables.items()}


def _bytes(weights: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {name: np.asarray(value).tobytes() for name, value in weights.items()}


def wait_restored(handle: ServerHandle, timeout: float = 90) -> None:
    """Wait for the in-process server's background restore to be over."""

    async def restored() -> None:
        await asyncio.shield(handle.running.restored)  # type: ignore[attr-defined]

    assert handle.loop is not None
    asyncio.run_coroutine_threadsafe(restored(), handle.loop).result(timeout)


def _health(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_a_host_lists_describes_and_loads_stored_models_before_tensorflow_is_up(tmp_path: Path) -> None:
    devices = Devices("cpu")
    first = LocalModelHost(Store(tmp_path), devices)
    first.index()
    described = {name: first.create(name, _new(index)) for index, name in enumerate(MODELS)}
    values = {name: first.run(name, _values) for name in MODELS}
    (tmp_path / "models" / "m3" / SIGNATURE_FILE).unlink()  # a store written before signatures

    pending: Future[Devices] = Future()
    host = LocalModelHost(Store(tmp_path), pending)
    host.index()  # no devices yet: nothing loads, nothing waits
    assert host.placements() == {}
    listed = {info.model_id: info for info in host.list(10, "")[0]}
    for name in ("m1", "m2"):
        expected = dataclasses.replace(described[name], device="", resident=False)
        assert listed[name] == expected
        assert host.describe(name) == expected
    # Without a cached signature, ListModels tells what the files say until TensorFlow is up.
    assert (listed["m3"].layers, listed["m3"].variables) == ([], described["m3"].variables)

    loads: list[str] = []
    load = host._load

    def counted(model_id: str, device: str) -> ResidentModel:
        loads.append(model_id)
        return load(model_id, device)

    host._load = counted  # type: ignore[method-assign]
    with ThreadPoolExecutor(4) as pool:
        # Calls on not-yet-resident models wait for TensorFlow, then load each model once.
        reads = [pool.submit(host.run, name, _values) for name in ("m2", "m2", "m2", "m1")]
        described_m3 = pool.submit(host.describe, "m3")
        time.sleep(0.2)
        assert not any(r.done() for r in reads) and not described_m3.done()
        pending.set_result(devices)
        assert [r.result(60) for r in reads] == [values["m2"]] * 3 + [values["m1"]]
        assert described_m3.result(60) == dataclasses.replace(described["m3"], device="", resident=False)
    assert sorted(loads) == ["m1", "m2"]
    assert (tmp_path / "models" / "m3" / SIGNATURE_FILE).is_file()  # cached again once built
    assert {m.model_id: m.resident for m in host.list(10, "")[0]} == {"m1": True, "m2": True, "m3": False}

    host.restore_stored()  # the background restore loads the rest, each once
    assert sorted(loads) == ["m1", "m2", "m3"]
    assert host.run("m3", _values) == values["m3"]


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Hold the background restore of in-process servers until the event is set."""
    opened = threading.Event()
    restore = LocalModelHost.restore_stored

    def held(self: LocalModelHost, stopping: threading.Event | None = None) -> None:
        opened.wait(60)
        restore(self, stopping)

    monkeypatch.setattr(LocalModelHost, "restore_stored", held)
    yield opened
    opened.set()


def test_a_restart_serves_before_models_are_resident_with_auth_and_health(
    tmp_path: Path, gate: threading.Event
) -> None:
    store = tmp_path / "store"
    tokens = {name: secrets.token_urlsafe(16) for name in ("ours", "theirs")}
    principals = {
        "principals": [
            {
                "name": name,
                "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
                "scopes": ["read", "edit", "admin"],
                "models": ["m*"] if name == "ours" else ["x*"],
            }
            for name, token in tokens.items()
        ]
    }
    path = tmp_path / "principals.json"
    path.write_text(json.dumps(principals))
    gate.set()
    handle, thread = _start_in_thread(store, auth_tokens=str(path))
    try:
        with weightsmith.Client(handle.address, token=tokens["ours"]) as client:
            for index, name in enumerate(MODELS):
                client.create_model(name, keras_config=tiny_config(5), seed=index)
            client.write_weights("m2", {"logits/bias": np.array([1.5, -2.5], np.float32)})
            before = {name: _bytes(client.read_weights(name)) for name in MODELS}
            described = {name: client.get_model(name) for name in MODELS}
    finally:
        _stop_in_thread(handle, thread)

    gate.clear()
    handle, thread = _start_in_thread(store, auth_tokens=str(path))
    try:
        with (
            grpc.insecure_channel(handle.address) as channel,
            weightsmith.Client(handle.address, token=tokens["ours"]) as client,
            weightsmith.Client(handle.address, token=tokens["theirs"]) as other,
            weightsmith.Client(handle.address) as anonymous,
        ):
            # Serving (health is open, no token) while no model is resident yet.
            assert _health(channel, "") == health_pb2.HealthCheckResponse.SERVING
            assert _health(channel, "weightsmith.models") == health_pb2.HealthCheckResponse.NOT_SERVING
            assert {m.model_id: m.resident for m in client.iter_models()} == dict.fromkeys(MODELS, False)
            for name in MODELS:
                got = client.get_model(name)
                assert not got.resident and got.device == ""
                expected = type(described[name])()
                expected.CopyFrom(described[name])
                expected.ClearField("resident")
                expected.ClearField("device")
                assert got == expected
            # Auth applies as before during the restore.
            with pytest.raises(weightsmith.UnauthenticatedError):
                anonymous.get_model("m1")
            with pytest.raises(weightsmith.NotFoundError):  # others' models stay hidden
                other.read_weights("m2")
            assert list(other.iter_models()) == []
            # A call on a model not yet restored loads it first, bit-exactly.
            assert _bytes(client.read_weights("m2")) == before["m2"]
            assert {m.model_id: m.resident for m in client.iter_models()} == {
                "m1": False,
                "m2": True,
                "m3": False,
            }
            assert client.get_model("m2").revision == 2
            gate.set()
            wait_restored(handle)
            assert _health(channel, "weightsmith.models") == health_pb2.HealthCheckResponse.SERVING
            assert {m.model_id: m.resident for m in client.iter_models()} == dict.fromkeys(MODELS, True)
            for name in MODELS:
                assert _bytes(client.read_weights(name)) == before[name]
    finally:
        _stop_in_thread(handle, thread)
