"""SIGTERM stops the server cleanly (exit code 0) during and after the background restore and warm-ups."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import weightsmith
from tests.conftest import SpawnedServer, spawn_server, tiny_cnn_config, tiny_config

pytestmark = pytest.mark.slow


def _terminate(server: SpawnedServer) -> int:
    server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(60)
    except Exception:
        server.process.kill()
        raise


def _wait_models_serving(address: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            request = health_pb2.HealthCheckRequest(service="weightsmith.models")
            if stub.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.02)
    raise AssertionError("the background restore did not finish")


def test_sigterm_during_and_right_after_the_restore_exits_cleanly(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = spawn_server(store, service="")
    with weightsmith.Client(first.address) as client:
        for index in range(3):
            client.create_model(f"cnn{index}", keras_config=tiny_cnn_config(), seed=index)
            client.create_model(f"mlp{index}", keras_config=tiny_config(), seed=index)
    # Right after the creates: their warm-ups are queued or running.
    assert _terminate(first) == 0, first.log()

    during = spawn_server(store, service="")  # SERVING: the restore and the warm-ups start now
    assert _terminate(during) == 0, during.log()

    after = spawn_server(store, service="")
    _wait_models_serving(after.address)  # restored: warm-ups of the restored models still run
    assert _terminate(after) == 0, after.log()
    assert "terminate called" not in after.log()
