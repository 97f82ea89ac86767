"""Shared fixtures: an in-process server on a loopback port, clients, tiny models.

The session server runs `create_server` on its own event loop in a thread, so
sync tests call it through a real channel exactly like a remote service would.
Tests that need a process to kill start `weightsmith_server` as a subprocess
with `spawn_server`.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parent.parent


@dataclass
class ServerHandle:
    """A server the tests talk to: its address, store and (in-process) registry."""

    address: str
    store: Path
    running: object | None = None
    loop: asyncio.AbstractEventLoop | None = None


def _start_in_thread(store: Path, **overrides: object) -> tuple[ServerHandle, threading.Thread]:
    from weightsmith_server.app import create_server
    from weightsmith_server.config import Config

    config = Config(address="127.0.0.1:0", store=store, workers=4, **overrides)  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    started: dict[str, object] = {}
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started["running"] = loop.run_until_complete(create_server(config))
        except BaseException as exc:  # surfaced to the fixture below
            started["error"] = exc
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="weightsmith-test-server", daemon=True)
    thread.start()
    ready.wait(120)
    if "error" in started:
        raise started["error"]  # type: ignore[misc]
    running = started["running"]
    handle = ServerHandle(f"127.0.0.1:{running.port}", store, running, loop)  # type: ignore[attr-defined]
    return handle, thread


def _stop_in_thread(handle: ServerHandle, thread: threading.Thread) -> None:
    assert handle.loop is not None
    future = asyncio.run_coroutine_threadsafe(handle.running.stop(1), handle.loop)  # type: ignore[attr-defined]
    future.result(60)
    handle.loop.call_soon_threadsafe(handle.loop.stop)
    thread.join(30)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """One in-process server for the session (64 MiB messages, default chunks)."""
    handle, thread = _start_in_thread(tmp_path_factory.mktemp("store"))
    yield handle
    _stop_in_thread(handle, thread)


@pytest.fixture
def small_message_server(tmp_path: Path) -> Iterator[ServerHandle]:
    """A server whose message limit is 5 MiB, for the size-limit tests."""
    handle, thread = _start_in_thread(tmp_path / "store", max_message_mb=5, max_upload_mb=1)
    yield handle
    _stop_in_thread(handle, thread)


@pytest.fixture
def client(server: ServerHandle) -> Iterator[object]:
    import weightsmith

    with weightsmith.Client(server.address, author="tests") as connected:
        yield connected


_counter = iter(range(1_000_000))


@pytest.fixture
def model_id(request: pytest.FixtureRequest) -> str:
    """A fresh, valid model id per test."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    return f"{base}-{next(_counter)}"


def tiny_config(units: int = 3, *, inputs: int = 4, outputs: int = 2) -> str:
    """Keras config JSON of a two-Dense-layer Sequential model."""
    import keras

    model = keras.Sequential(
        [
            keras.Input((inputs,), name="features"),
            keras.layers.Dense(units, activation="relu", name="hidden"),
            keras.layers.Dense(outputs, name="logits"),
        ],
        name="tiny",
    )
    return model.to_json()


def tiny_cnn_config() -> str:
    """A small functional CNN with BatchNorm, for selectors and exports."""
    import keras

    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(8, 3, name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(10, name="head")(x)
    return keras.Model(inputs, outputs, name="tiny_cnn").to_json()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class SpawnedServer:
    process: subprocess.Popen[bytes]
    address: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def spawn_server(
    store: Path,
    *extra: str,
    port: int | None = None,
    timeout: float = 120,
    service: str = "weightsmith.models",
) -> SpawnedServer:
    """Start `python -m weightsmith_server` and wait until health says `service` is SERVING.

    By default `weightsmith.models`: TensorFlow imported and the stored models
    restored (the server accepts calls earlier, at `""` SERVING).
    """
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = port or free_port()
    address = f"127.0.0.1:{port}"
    log_path = store.parent / f"server-{port}-{time.time_ns()}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "weightsmith_server", "--address", address, "--store", str(store), *extra],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "WEIGHTSMITH_METRICS_ADDRESS": ""},
        )
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return SpawnedServer(process, address, log_path)
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"server did not become SERVING in {timeout}s:\n{log_path.read_text()}")


def config_dict(config_json: str) -> dict[str, object]:
    return json.loads(config_json)
