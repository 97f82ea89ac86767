"""Resident memory per byte of weights: the server after creating 10 models and after a restart,
against a plain Keras process building the same 10 models, in the same run.

The models (`MODELS`): two `ResNet50` 64x64, four `MobileNetV2` (96 to
160 px), `weights=None`, 10 classes, seeded, and four small Dense
Sequential models: about 230 MB of float32 weights in all.

- server, after create: a `weightsmith_server` process on an empty store;
  its RSS (`VmRSS` of /proc/<pid>/status) once TensorFlow is up and idle
  (after a `GetServerInfo`, which waits for it) is the idle figure; then
  the client creates the 10 models and, 2 s later, the RSS is read again.
  Figure: (RSS after - idle RSS) / weight bytes.
- server, after restart: the server is stopped and started again on the
  same store; once health `weightsmith.models` is SERVING (every model
  resident again) and 2 s more, (RSS - idle RSS of the first process) /
  weight bytes.
- the same two figures for a server started with `--no-warm-up` (no
  background trace and 1-row run of each model's compiled Predict).
- plain Keras (detail): a fresh process imports Keras, reads its RSS,
  builds the same 10 models the same way (`keras.applications.*` and
  `Sequential`), and reads its RSS again: (after - before) / weight bytes;
  then it traces each model's compiled predict (`tf.function`, batch
  dimension open) and runs it once on a 1-row batch, as the server's
  warm-up does, and reads its RSS a third time.

Memory is not timing: one round by default (`--rounds` for more; the
figure is the median with its spread over rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import figure, spread, write_results
from restart import ENV, SMALL, start_server, stop_server, wait_serving

import weightsmith

MODELS: list[tuple[str, tuple[int, int, int] | None]] = [
    ("ResNet50", (64, 64, 3)),
    ("ResNet50", (64, 64, 3)),
    ("MobileNetV2", (96, 96, 3)),
    ("MobileNetV2", (128, 128, 3)),
    ("MobileNetV2", (160, 160, 3)),
    ("MobileNetV2", (96, 96, 3)),
    ("small", None),
    ("small", None),
    ("small", None),
    ("small", None),
]


COLD_KEYS = ("idle_rss", "created_rss", "restarted_rss", "weight_bytes")


def rss(pid: int) -> int:
    """Resident set size of a process in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def server_round(store: Path, *flags: str) -> tuple[int, int, int, int]:
    """(idle RSS, RSS after create, RSS after restart, weight bytes) of one server round."""
    process, address, _ = start_server(store, *flags)
    try:
        wait_serving(process, address, "weightsmith.models")
        with weightsmith.Client(address, timeout=600) as client:
            client.server_info()  # waits for TensorFlow
            time.sleep(2)
            idle = rss(process.pid)
            weight_bytes = 0
            for index, (name, shape) in enumerate(MODELS):
                model_id = f"m{index}"
                if shape is None:
                    created = client.create_model(model_id, keras_config=SMALL, seed=index)
                else:
                    created = client.create_model(
                        model_id, architecture=name, input_shape=shape, classes=10, seed=index
                    )
                weight_bytes += created.weight_bytes
        time.sleep(2)
        created_rss = rss(process.pid)
    finally:
        stop_server(process)
    process, address, _ = start_server(store, *flags)
    try:
        wait_serving(process, address, "weightsmith.models")
        time.sleep(2)
        restarted = rss(process.pid)
    finally:
        stop_server(process)
    return idle, created_rss, restarted, weight_bytes


KERAS = """
import json, os, sys, time
import keras

def rss():
    for line in open(f"/proc/{os.getpid()}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

models, small = json.loads(sys.argv[1]), sys.argv[2]
keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])  # TensorFlow initialized, as the server's
time.sleep(1)
before = rss()
held, total = [], 0
for index, (name, shape) in enumerate(models):
    keras.utils.set_random_seed(index)
    if shape is None:
        model = keras.models.model_from_json(small)
    else:
        model = getattr(keras.applications, name)(weights=None, input_shape=tuple(shape), classes=10)
    held.append(model)
    total += sum(int(v.numpy().nbytes) for v in model.weights)
time.sleep(2)
built = rss()
# The like-for-like process for a server that answers the first Predict without tracing: each model's
# compiled predict (a tf.function, batch dimension open) traced and run once on a 1-row batch.
import numpy as np, tensorflow as tf
warmed = []
for model in held:
    spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), model.inputs[0].dtype)
    function = tf.function(lambda x, model=model: model(x, training=False), input_signature=[spec])
    function(np.zeros((1, *model.inputs[0].shape[1:]), np.float32))
    warmed.append(function)
time.sleep(2)
print(json.dumps({"before": before, "after": built, "warmed": rss(), "weight_bytes": total}))
"""


def keras_round() -> tuple[int, int, int, int]:
    """A plain Keras process: RSS before, after building the models, after warming them; weight bytes."""
    done = subprocess.run(
        [sys.executable, "-c", KERAS, json.dumps(MODELS), json.dumps(SMALL)],
        env=ENV,
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["before"], result["after"], result["warmed"], result["weight_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    begun = time.perf_counter()
    created: list[float] = []
    restarted: list[float] = []
    created_cold: list[float] = []
    restarted_cold: list[float] = []
    plain: list[float] = []
    plain_warmed: list[float] = []
    raw: list[dict[str, int]] = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="weightsmith-memory-") as folder:
            idle, after_create, after_restart, weight_bytes = server_round(Path(folder))
        with tempfile.TemporaryDirectory(prefix="weightsmith-memory-") as folder:
            cold = server_round(Path(folder), "--no-warm-up")
        before, after, warmed, keras_bytes = keras_round()
        created.append((after_create - idle) / weight_bytes)
        restarted.append((after_restart - idle) / weight_bytes)
        created_cold.append((cold[1] - cold[0]) / cold[3])
        restarted_cold.append((cold[2] - cold[0]) / cold[3])
        plain.append((after - before) / keras_bytes)
        plain_warmed.append((warmed - before) / keras_bytes)
        raw.append(
            {
                "idle_rss": idle,
                "created_rss": after_create,
                "restarted_rss": after_restart,
                "weight_bytes": weight_bytes,
                "keras_before_rss": before,
                "keras_after_rss": after,
                "keras_warmed_rss": warmed,
                "keras_weight_bytes": keras_bytes,
                "no_warm_up": dict(zip(COLD_KEYS, cold, strict=True)),
            }
        )
        print(
            f"  after create {created[-1]:.2f}, after restart {restarted[-1]:.2f}, "
            f"--no-warm-up {created_cold[-1]:.2f} / {restarted_cold[-1]:.2f}, plain Keras {plain[-1]:.2f}, "
            f"warmed {plain_warmed[-1]:.2f} ({weight_bytes / 1e6:.0f} MB of weights)",
            flush=True,
        )
    seconds = time.perf_counter() - begun
    k, kw = statistics.median(plain), statistics.median(plain_warmed)
    figures: list[dict[str, Any]] = [
        figure(
            f"(server RSS − idle server) / weight bytes, 10 models, {when}",
            spread(samples),
            unit="ratio",
            goal="≤ 1.3",
            met=statistics.median(samples) <= 1.3,
            detail=(
                f"plain Keras process: {kw:.2f} with each model's compiled predict warmed, {k:.2f} built only"
                if warm
                else f"plain Keras process building the same: {k:.2f}"
            ),
        )
        for when, samples, warm in (
            ("after create", created, True),
            ("after restart", restarted, True),
            ("after create, --no-warm-up", created_cold, False),
            ("after restart, --no-warm-up", restarted_cold, False),
        )
    ]
    print("\n| figure | median (min–max) | goal | met |\n| --- | --- | --- | --- |")
    for row in figures:
        v = row["value"]
        value = f"{v['median']:.2f} ({v['min']:.2f}–{v['max']:.2f})"
        print(f"| {row['figure']} | {value} | {row['goal']} | {row['met']} |")
    note = (
        "With the background warm-up (the default) each resident model also holds its traced and "
        "instantiated compiled Predict: TensorFlow's function graph, about 10 MB per ResNet50 or "
        "MobileNetV2 whatever the weights' size, plus about 45 MB once per process for TensorFlow's "
        "function runtime; a plain Keras process that warms the same compiled predict holds as much. "
        "With --no-warm-up the server holds what a plain Keras process that only built the models holds."
    )
    write_results("memory", figures, {"rounds": raw}, seconds, note)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
