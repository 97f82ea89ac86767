"""What the benchmarks share: a weightsmith server process on loopback, and timing.

Each benchmark starts its own server on a free loopback port with a
temporary store, waits until health says SERVING, and stops it at the end.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_health(address: str, process: subprocess.Popen[bytes]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(600):
            if process.poll() is not None:
                raise SystemExit("weightsmith server exited")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise SystemExit("weightsmith server did not start")


@contextmanager
def weightsmith_server(*flags: str) -> Iterator[tuple[str, Path]]:
    """A `weightsmith_server` process on a free loopback port; yields (address, store)."""
    address = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory() as store:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "weightsmith_server",
                "--address",
                address,
                "--store",
                store,
                "--log-level",
                "WARNING",
                *flags,
            ],
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        try:
            _wait_health(address, process)
            yield address, Path(store)
        finally:
            process.terminate()
            process.wait(60)


def timed(function: Callable[..., Any], *args: Any) -> float:
    """Seconds `function(*args)` takes; its result is released after the clock stops."""
    started = time.perf_counter()
    result = function(*args)
    elapsed = time.perf_counter() - started
    del result
    return elapsed
