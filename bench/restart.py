"""Restart to SERVING with 100 stored models, against a fresh Keras process loading 10, in the same run.

Setup (not timed): one weightsmith server process creates, through the
client, `--models` models in a store that outlives it: `--big` mid-size
catalog models (`MobileNetV2` 96x96 and `ResNet50` 64x64, `weights=None`,
seeded; together about 150 MB) and small `Dense(256 -> 512 -> 10)`
Sequential models for the rest (0.55 MB each); ten of them (the big ones
first) are exported as `.keras` files for the baseline. Then the server is
stopped and A and B alternate for `--rounds` rounds after one warm-up round
of each (the server's only up to SERVING; both warm the page cache):

- weightsmith (A): `python -m weightsmith_server` started on that store; the
  clock runs from just before `Popen` until a gRPC health `Check("")`
  (polled every 10 ms over one channel) answers SERVING: the process has
  imported its modules, listed the stored models from their files, bound
  and started the server. TensorFlow and the models then load in the
  background; the second clock stops when `Check("weightsmith.models")`
  answers SERVING (every model that fits the memory budget is resident).
  The server is then stopped (SIGTERM).
- baseline (B): a fresh `python -c "import keras; 10 x
  keras.models.load_model(path)"` process on the ten exported files, timed
  from just before `Popen` until it exits: the issue's old baseline row
  ("restart to SERVING, 10 models / import keras + 10 x load_model").

Figures: "restart to SERVING, 100 stored models" in seconds (goal <= 3 s,
whatever the number of stored models), and as context the per-round ratio
A / B (the issue's old row), and seconds until `weightsmith.models` is
SERVING (background restore of all 100 models done).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import figure, free_port, ratios, spread, write_results

import weightsmith


def _layer(class_name: str, **config: Any) -> dict[str, Any]:
    return {"module": "keras.layers", "class_name": class_name, "config": config, "registered_name": None}


# A small Sequential model, Dense(256 -> 512 -> 10): 136,714 float32 parameters.
SMALL = {
    "module": "keras",
    "class_name": "Sequential",
    "config": {
        "name": "small",
        "layers": [
            _layer("InputLayer", batch_shape=[None, 256], name="features"),
            _layer("Dense", units=512, activation="relu", name="hidden"),
            _layer("Dense", units=10, name="logits"),
        ],
    },
    "registered_name": None,
}
BIG = (
    ("MobileNetV2", (96, 96, 3)),
    ("ResNet50", (64, 64, 3)),
    ("MobileNetV2", (128, 128, 3)),
    ("MobileNetV2", (160, 160, 3)),
)
SERVING = health_pb2.HealthCheckResponse.SERVING
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def start_server(store: Path, *flags: str) -> tuple[subprocess.Popen[bytes], str, float]:
    """A server process on `store`; returns it, its address and the `perf_counter` just before start."""
    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "weightsmith_server", "--address", address, "--store", str(store)]
    started = time.perf_counter()
    process = subprocess.Popen([*command, "--log-level", "WARNING", *flags], env=ENV)
    return process, address, started


def wait_serving(
    process: subprocess.Popen[bytes], address: str, service: str = "", limit: float = 300
) -> float:
    """`perf_counter` when health `Check(service)` first answers SERVING (polled every 10 ms)."""
    deadline = time.perf_counter() + limit
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.perf_counter() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"weightsmith server exited with {process.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status == SERVING:
                    return time.perf_counter()
            except grpc.RpcError:
                pass
            time.sleep(0.01)
    raise SystemExit(f"health {service!r} not SERVING within {limit:.0f} s")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def populate(store: Path, exports: Path, models: int, big: int) -> int:
    """Create the models through a server on `store`; export ten for the baseline. Returns weight bytes."""
    process, address, _ = start_server(store)
    try:
        wait_serving(process, address)
        total = 0
        with weightsmith.Client(address, timeout=600) as client:
            for index, (name, shape) in enumerate(BIG[:big]):
                created = client.create_model(
                    f"big-{index}", architecture=name, input_shape=shape, classes=10, seed=index
                )
                total += created.weight_bytes
            for index in range(models - big):
                total += client.create_model(
                    f"small-{index:03d}", keras_config=SMALL, seed=index
                ).weight_bytes
            ids = [f"big-{i}" for i in range(big)] + [f"small-{i:03d}" for i in range(10 - big)]
            for model_id in ids[:10]:
                client.export_model(model_id, path=exports / f"{model_id}.keras")
        return total
    finally:
        stop_server(process)


def restart_round(store: Path, *, restored: bool = True) -> tuple[float, float]:
    """Seconds from process start to SERVING, and to `weightsmith.models` SERVING (0 if not waited for)."""
    process, address, started = start_server(store)
    try:
        serving = wait_serving(process, address) - started
        if restored:
            return serving, wait_serving(process, address, "weightsmith.models") - started
    finally:
        stop_server(process)
    return serving, 0.0


BASELINE = "import sys, keras\nfor path in sys.argv[1:]:\n    keras.models.load_model(path)\n"


def baseline_round(exports: Path) -> float:
    """Seconds a fresh process takes to import Keras and load the ten exported models."""
    files = sorted(str(p) for p in exports.glob("*.keras"))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", BASELINE, *files], env=ENV, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--big", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    begun = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="weightsmith-restart-"))
    try:
        store, exports = folder / "store", folder / "exports"
        exports.mkdir()
        weight_bytes = populate(store, exports, args.models, args.big)
        print(f"created {args.models} models, {weight_bytes / 1e6:.1f} MB of weights", flush=True)
        restart_round(store, restored=False)  # warm-up (page cache, bytecode)
        baseline_round(exports)
        serving: list[float] = []
        restored: list[float] = []
        baseline: list[float] = []
        for _ in range(args.rounds):
            a, b = restart_round(store)
            serving.append(a)
            restored.append(b)
            baseline.append(baseline_round(exports))
            print(
                f"  SERVING {a:.2f} s, all restored {b:.2f} s; "
                f"import keras + 10 load_model {baseline[-1]:.2f} s"
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    seconds = time.perf_counter() - begun
    s, r, k = (statistics.median(x) for x in (serving, restored, baseline))
    figures: list[dict[str, Any]] = [
        figure(
            f"restart to SERVING, {args.models} stored models",
            spread(serving),
            unit="s",
            goal="≤ 3 s with 100 stored models",
            met=s <= 3.0,
            detail=f"{s:.2f} s; all {args.models} restored in the background after {r:.2f} s",
        ),
        figure(
            f"restart to SERVING, {args.models} stored models / `import keras` + 10 × `load_model`",
            spread(ratios(serving, baseline)),
            unit="ratio",
            goal="context (was 0.87 with 10 models)",
            met=True,
            detail=f"{s:.2f} s vs {k:.2f} s",
        ),
        figure(
            f"restart to `weightsmith.models` SERVING, {args.models} stored models (background restore)",
            spread(restored),
            unit="s",
            goal="context",
            met=True,
            detail=f"{weight_bytes / 1e6:.0f} MB of weights; import keras + 10 × load_model: {k:.2f} s",
        ),
    ]
    print("\n| figure | median (min–max) | goal | met |\n| --- | --- | --- | --- |")
    for row in figures:
        v = row["value"]
        print(
            f"| {row['figure']} | {v['median']:.2f} ({v['min']:.2f}–{v['max']:.2f}) {row['unit']} "
            f"| {row['goal']} | {row['met']} |"
        )
    write_results(
        "restart",
        figures,
        {"serving_s": serving, "restored_s": restored, "baseline_s": baseline, "weight_bytes": weight_bytes},
        seconds,
    )


if __name__ == "__main__":
    main()
