"""What the benchmarks share: a weightsmith server process on loopback, and timing.

Each benchmark starts its own server on a free loopback port with a
temporary store, waits until health says SERVING, and stops it at the end.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
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


# --- figures: what every benchmark reports, and what `report.py` tabulates -----------------

# `WEIGHTSMITH_BENCH_RESULTS` sends a run elsewhere (bench/gpu.sh keeps GPU figures apart).
RESULTS = Path(os.environ.get("WEIGHTSMITH_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))


def spread(samples: list[float]) -> dict[str, float]:
    """Median, min and max of a list of samples (ratios, milliseconds, bytes)."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    """Per-round ratios of two sides measured in alternating rounds."""
    return [a / b for a, b in zip(numerators, denominators, strict=True)]


def figure(
    name: str,
    value: dict[str, float],
    *,
    unit: str,
    goal: str,
    met: bool,
    detail: str = "",
) -> dict[str, Any]:
    """One row of the report: a measured figure against its goal.

    `name` is the row's label in docs/benchmarks.md (the issue's wording);
    `value` is `spread(...)` of the per-round figure (a ratio, or an absolute
    unit where the goal is absolute); `unit` is "ratio", "ms", "s" or "bytes";
    `goal` the goal as text (e.g. "≥ 0.9", "≤ in-process + 1 ms");
    `detail` the medians behind a ratio (e.g. "93.1 ms vs 8.0 ms").
    """
    return {"figure": name, "value": value, "unit": unit, "goal": goal, "met": bool(met), "detail": detail}


def write_results(
    bench: str, figures: list[dict[str, Any]], raw: dict[str, Any], seconds: float, note: str = ""
) -> Path:
    """Write `bench/results/<bench>.json`: the figures for the report, raw samples, run time, a note.

    `note` (optional) is one sentence for the report's notes: a bound a
    profile showed, a fallback taken.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{bench}.json"
    path.write_text(
        json.dumps(
            {"bench": bench, "seconds": seconds, "note": note, "figures": figures, "raw": raw}, indent=1
        )
        + "\n"
    )
    print(f"wrote {path}")
    return path
