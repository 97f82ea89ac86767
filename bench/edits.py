"""ApplyEdits latency vs the same edit done in-process with numpy and Keras, in the same run.

The weightsmith server runs as its own process on loopback (on this
machine's CPU); the client and the in-process baseline run in this process.
A and B alternate for several rounds after a warm-up; the table gives the
median time of each side, the median ratio weightsmith/in-process with its
spread (min-max), and the absolute per-call overhead (median weightsmith
time minus median in-process time). Figures go to bench/results/edits.json
(`harness.write_results`), raw samples with them.

Rows:

1. "scale one 3x3x256x256 kernel" (2.36 MB of float32), on a model that is
   `Input((8, 8, 256)) -> Conv2D(256, 3, name="conv")`.

   - weightsmith: `client.apply_edits(model_id, [edits.scale("conv/kernel",
     1.0001)])`. One unary RPC; the server resolves the selector, computes
     `W * 1.0001` from a zero-copy snapshot of the committed value into a
     page-aligned array, validates the result (shape, dtype, all finite),
     then durably commits a new revision: a writer thread writes the changed
     tensor into a staging folder and fsyncs it while the worker accounts
     the change (exact count of changed elements; delta L2 from float32
     differences, summed pairwise), then the store writes and fsyncs the
     revision's metadata, fsyncs the folder, renames it into place and
     fsyncs the parent; finally the new value is assigned to the resident Keras variable (zero-copy via
     DLPack on the CPU) under the model's write lock and the revision and
     the edit's report are returned.
   - in-process: a `keras.Variable` of the same shape and starting values,
     on the CPU: `variable.assign(variable.numpy() * 1.0001)`, i.e. the same
     numpy op plus the TF read and assign. No validation, no disk.

2. "10-op batch", on `Input((8, 8, 256)) -> Conv2D(256, 3, name="conv") ->
   GlobalAveragePooling2D -> Dense(512, name="hidden") -> Dense(10,
   name="logits")` (6 variables, 2.9 MB), the batch in `BATCH` below
   (scale, add, clip, add_noise with a seed, per-tensor element prune at 0.5,
   8-bit per-output-channel quantize; 10 ops touching 28 variable values).

   - weightsmith: one `apply_edits` call with the 10 edits, committed as one
     revision (as above: each op computes and validates on the working copy,
     then the 6 changed tensors are written and fsync'd while the 28
     changes are counted, the revision is committed and the values assigned
     to the resident variables).
   - in-process: `variable.numpy()` of the 6 Keras variables (CPU), the same
     10 numpy computations with the same formulas as the server (scale
     `W * f`; add `W + c`; clip `np.clip`; add_noise `W.astype(float64) +
     rng.normal(mean, std, shape)` cast back, one `default_rng(seed)` per op
     drawn in model order; prune per tensor element-wise: zero the
     `floor(s * n)` smallest `|W|` via `argpartition`; quantize per output
     channel: `s = max|W[..., c]| / 127`, `round(W / s) * s`), then
     `variable.assign` of the 6 results.

3. "10-op batch (dry_run)": the same batch with `dry_run=True`: the server
   computes, validates and reports, but writes nothing, commits nothing and
   leaves the resident variables as they were. Against the same in-process
   samples as row 2; the difference to row 2 is the durability + install
   part.

4. "single-kernel edit, VGG16 / MobileNetV2": the edit of row 1 on a large
   and on a small model, both created in the server from a Keras config:
   `keras.applications.VGG16(weights=None)` (224x224x3, with its top:
   138 M parameters, 553 MB, 32 variables) and
   `keras.applications.MobileNetV2(weights=None)` (3.5 M parameters, 14 MB,
   262 variables), each with a second, independent input
   `Input((8, 8, 256)) -> Conv2D(256, 3, name="probe")` added, so that both
   have the same 3x3x256x256 kernel to edit. Each round scales
   `probe/kernel` by 1.0001 on one, then on the other; the figure is the
   median ratio VGG16/MobileNetV2 of those times. VGG16 is 40x larger in
   bytes, MobileNetV2 has 8x more variables: the goal (cost independent of
   the model's size) holds either way, so it is met when the ratio lies in
   [1/1.2, 1.2].

Both sides of rows 1 and 2 apply the same number of committed edits to the
same starting values, and the run ends by checking that the server's weights
and the in-process variables are bit-identical.

For context, each round also times a gRPC health check on loopback (the
floor of any unary RPC), row 1 with `dry_run=True` (RPC + compute +
checks, no disk) and, in the store's own folder, the file work of a
one-tensor commit done by hand (write a 2.36 MB tensor file and one small
JSON file with an fsync each, fsync the folder, rename, fsync the parent: the
4 fsyncs a durable one-tensor commit needs).

    python bench/edits.py [--rounds 15] [--warmup 3]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from harness import figure, ratios, spread, timed, weightsmith_server, write_results

import weightsmith
from weightsmith import edits

HERE = Path(__file__).resolve().parent
FACTOR = 1.0001

# (op, glob over variable paths, arguments): the edits and the in-process formulas both come from here.
BATCH: list[tuple[str, str, dict[str, Any]]] = [
    ("scale", "*/kernel", {"factor": 0.999}),
    ("add", "*/bias", {"value": 1e-3}),
    ("clip", "*/kernel", {"min": -0.05, "max": 0.05}),
    ("add_noise", "*/kernel", {"mean": 0.0, "stddev": 1e-3, "seed": 1}),
    ("prune", "*/kernel", {"sparsity": 0.5}),
    ("scale", "hidden/*", {"factor": 1.01}),
    ("add", "logits/*", {"value": -1e-3}),
    ("clip", "*/bias", {"min": -0.05, "max": 0.05}),
    ("add_noise", "*/bias", {"mean": 0.0, "stddev": 1e-4, "seed": 2}),
    ("quantize", "*/kernel", {"bits": 8}),
]


def _edit(op: str, pattern: str, kwargs: dict[str, Any]):
    if op == "scale":
        return edits.scale(pattern, kwargs["factor"])
    if op == "add":
        return edits.add(pattern, kwargs["value"])
    if op == "clip":
        return edits.clip(pattern, min=kwargs["min"], max=kwargs["max"])
    if op == "add_noise":
        return edits.add_noise(pattern, mean=kwargs["mean"], stddev=kwargs["stddev"], seed=kwargs["seed"])
    if op == "prune":
        return edits.prune(pattern, kwargs["sparsity"])
    if op == "quantize":
        return edits.quantize(pattern, bits=kwargs["bits"])
    raise ValueError(op)


def _prune(w: np.ndarray, sparsity: float) -> np.ndarray:
    scores = np.abs(w.astype(np.float64)).ravel()
    count = math.floor(sparsity * scores.size)
    out = np.array(w)
    if count:
        out.reshape(-1)[np.argpartition(scores, count - 1)[:count]] = 0
    return out


def _quantize(w: np.ndarray, bits: int) -> np.ndarray:
    levels = 2 ** (bits - 1) - 1
    s = np.abs(w).max(axis=tuple(range(w.ndim - 1)), keepdims=True) / levels
    safe = np.where(s == 0, 1, s).astype(w.dtype)
    return np.where(s == 0, 0, np.round(w / safe) * safe).astype(w.dtype)


def _apply_numpy(values: dict[str, np.ndarray], order: list[str]) -> None:
    """The 10 ops of `BATCH` on `values` (path -> array, replaced in place), selections in model order."""
    for op, pattern, kw in BATCH:
        paths = [p for p in order if fnmatch.fnmatchcase(p, pattern)]
        rng = np.random.default_rng(kw["seed"]) if op == "add_noise" else None
        for path in paths:
            w = values[path]
            if op == "scale":
                new = w * kw["factor"]
            elif op == "add":
                new = w + kw["value"]
            elif op == "clip":
                new = np.clip(w, kw["min"], kw["max"])
            elif op == "add_noise":
                assert rng is not None
                new = (w.astype(np.float64) + rng.normal(kw["mean"], kw["stddev"], w.shape)).astype(w.dtype)
            elif op == "prune":
                new = _prune(w, kw["sparsity"])
            else:
                new = _quantize(w, kw["bits"])
            values[path] = new


# --- context: the floors under an ApplyEdits call ------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit_by_hand(root: Path, array: np.ndarray, number: int) -> None:
    """The file work of a one-tensor revision: 2 files + fsyncs in staging, fsync it, rename, fsync parent."""
    staging = root / f".staging-{number}"
    staging.mkdir()
    with open(staging / "0000.npy", "wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())
    with open(staging / "revision.json", "w", encoding="utf-8") as handle:
        json.dump({"number": number, "padding": "x" * 600}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync(staging)
    os.rename(staging, root / f"{number:06d}")
    _fsync(root)


# --- the run --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before this process imports TensorFlow
    started = time.perf_counter()
    with weightsmith_server() as (address, store):
        rows = _measure(address, store, args.rounds, args.warmup)
    _report(rows, args, time.perf_counter() - started)


def _probe_config(keras: Any, application: str) -> str:
    """A `keras.applications` network plus an independent `Input -> Conv2D(256, 3, name="probe")`."""
    base = getattr(keras.applications, application)(weights=None)
    probe_input = keras.Input((8, 8, 256), name="probe_input")
    probe = keras.layers.Conv2D(256, 3, name="probe")(probe_input)
    config = keras.Model([base.input, probe_input], [base.output, probe], name=application).to_json()
    del base
    keras.backend.clear_session()
    return config


def _measure(address: str, store: Path, rounds: int, warmup: int) -> dict:
    import keras
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    conv = [keras.Input((8, 8, 256)), keras.layers.Conv2D(256, 3, name="conv")]
    head = [
        keras.layers.GlobalAveragePooling2D(name="pool"),
        keras.layers.Dense(512, name="hidden"),
        keras.layers.Dense(10, name="logits"),
    ]
    one_config = keras.Sequential(conv).to_json()
    batch_config = keras.Sequential([*conv, *head]).to_json()
    probe_configs = {name: _probe_config(keras, name) for name in ("VGG16", "MobileNetV2")}

    with (
        weightsmith.Client(address, timeout=600) as client,
        grpc.insecure_channel(address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        one = client.create_model("scale-one", keras_config=one_config, seed=0)
        batch = client.create_model("batch", keras_config=batch_config, seed=0)
        probes = {
            name: client.create_model(name.lower(), keras_config=config, seed=0)
            for name, config in probe_configs.items()
        }
        order = [v.path for v in batch.variables]
        scale_edit = [edits.scale("conv/kernel", FACTOR)]
        probe_edit = [edits.scale("probe/kernel", FACTOR)]
        batch_edits = [_edit(op, pattern, kw) for op, pattern, kw in BATCH]

        # The in-process side: Keras variables on the CPU holding the server's starting values.
        with keras.device("cpu:0"):
            kernel = keras.Variable(client.read_weights("scale-one", "conv/kernel")["conv/kernel"])
            local = {path: keras.Variable(value) for path, value in client.read_weights("batch").items()}

        def local_scale() -> None:
            kernel.assign(kernel.numpy() * FACTOR)

        def local_batch() -> None:
            values = {path: variable.numpy() for path, variable in local.items()}
            _apply_numpy(values, order)
            for path, variable in local.items():
                variable.assign(values[path])

        def ws_scale():
            return client.apply_edits("scale-one", scale_edit)

        def ws_scale_dry():
            return client.apply_edits("scale-one", scale_edit, dry_run=True)

        def ws_batch():
            return client.apply_edits("batch", batch_edits)

        def ws_batch_dry():
            return client.apply_edits("batch", batch_edits, dry_run=True)

        def ws_vgg16():
            return client.apply_edits("vgg16", probe_edit)

        def ws_mobilenetv2():
            return client.apply_edits("mobilenetv2", probe_edit)

        def rpc_floor():
            return health.Check(health_pb2.HealthCheckRequest(), timeout=10)

        manual = store / "bench-manual-commits"
        manual.mkdir()
        sample_kernel = kernel.numpy()
        counter = iter(range(1_000_000))

        def file_floor() -> None:
            _commit_by_hand(manual, sample_kernel, next(counter))

        steps: dict[str, Callable[[], Any]] = {
            "inproc_scale": local_scale,
            "ws_scale": ws_scale,
            "ws_scale_dry": ws_scale_dry,
            "inproc_batch": local_batch,
            "ws_batch": ws_batch,
            "ws_batch_dry": ws_batch_dry,
            "ws_vgg16": ws_vgg16,
            "ws_mobilenetv2": ws_mobilenetv2,
            "rpc_floor": rpc_floor,
            "file_floor": file_floor,
        }
        for _ in range(warmup):
            for step in steps.values():
                step()
        samples: dict[str, list[float]] = {key: [] for key in steps}
        for _ in range(rounds):
            for key, step in steps.items():
                samples[key].append(timed(step))

        # Both sides applied the same committed edits to the same values: they must agree exactly.
        applied = warmup + rounds
        for model_id in ("scale-one", "batch", "vgg16", "mobilenetv2"):
            assert client.get_model(model_id).revision == 1 + applied, f"{model_id}: revisions missing"
        remote = client.read_weights("scale-one", "conv/kernel")["conv/kernel"]
        assert remote.tobytes() == kernel.numpy().tobytes(), "scale: server and in-process differ"
        remote_batch = client.read_weights("batch")
        for path, variable in local.items():
            assert remote_batch[path].tobytes() == variable.numpy().tobytes(), f"batch: {path} differs"
        report = client.apply_edits("batch", batch_edits, dry_run=True)
        touched = sum(len(result.variables) for result in report.results)
    return {
        "scale_bytes": one.weight_bytes - 256 * 4,
        "batch_bytes": batch.weight_bytes,
        "batch_values_touched": touched,
        "probe_models": {
            name: {"weight_bytes": model.weight_bytes, "variables": len(model.variables)}
            for name, model in probes.items()
        },
        "applied_each": applied,
        "samples_s": samples,
    }


def _ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _report(rows: dict, args: argparse.Namespace, seconds: float) -> None:
    samples = rows["samples_s"]
    raw: dict[str, Any] = {
        "rounds": args.rounds,
        "warmup": args.warmup,
        "scale_bytes": rows["scale_bytes"],
        "batch_bytes": rows["batch_bytes"],
        "batch_ops": [[op, pattern, kw] for op, pattern, kw in BATCH],
        "batch_values_touched": rows["batch_values_touched"],
        "probe_models": rows["probe_models"],
        "samples_s": samples,
        "rows": {},
        "context_ms": {},
    }
    figures = []
    print(
        f"\nApplyEdits vs in-process (numpy + Keras assign), loopback, CPU, "
        f"{args.rounds} alternating rounds after {args.warmup} warm-up; identical results checked\n"
    )
    print(
        f"{'case':<36} {'baseline ms':>11} {'weightsmith ms':>15} {'ratio (median)':>15} "
        f"{'spread':>15} {'overhead ms':>12}"
    )
    for case, base_key, ws_key, figure_name, budget_ms in (
        (
            "scale one 3x3x256x256 kernel",
            "inproc_scale",
            "ws_scale",
            "ApplyEdits, scale one 3×3×256×256 kernel / in-process",
            2.0,
        ),
        ("10-op batch", "inproc_batch", "ws_batch", "ApplyEdits, 10-op batch / in-process", 5.0),
        ("10-op batch (dry_run)", "inproc_batch", "ws_batch_dry", None, None),
        ("probe kernel, VGG16 / MobileNetV2", "ws_mobilenetv2", "ws_vgg16", None, None),
    ):
        base, ws = samples[base_key], samples[ws_key]
        per_round = ratios(ws, base)
        median_base, median_ws = _ms(base), _ms(ws)
        overhead = median_ws - median_base
        raw["rows"][case] = {
            "baseline_ms": median_base,
            "weightsmith_ms": median_ws,
            "ratio": spread(per_round),
            "overhead_ms": overhead,
        }
        print(
            f"{case:<36} {median_base:>11.2f} {median_ws:>15.2f} {statistics.median(per_round):>15.2f} "
            f"{min(per_round):>7.2f}-{max(per_round):<7.2f} {overhead:>12.2f}"
        )
        if figure_name is not None:
            figures.append(
                figure(
                    figure_name,
                    spread(per_round),
                    unit="ratio",
                    goal=f"≤ {budget_ms:g} ms over in-process",
                    met=overhead <= budget_ms,
                    detail=f"{median_ws:.2f} ms vs {median_base:.2f} ms, {overhead:+.2f} ms",
                )
            )
    size_ratios = spread(ratios(samples["ws_vgg16"], samples["ws_mobilenetv2"]))
    figures.append(
        figure(
            "single-kernel edit, VGG16 / MobileNetV2",
            size_ratios,
            unit="ratio",
            goal="≤ 1.2 (either way)",
            met=1 / 1.2 <= size_ratios["median"] <= 1.2,
            detail=(
                f"{_ms(samples['ws_vgg16']):.2f} ms vs {_ms(samples['ws_mobilenetv2']):.2f} ms; "
                "3×3×256×256 `probe/kernel` on each"
            ),
        )
    )
    print("\ncontext (median, min-max ms)")
    for key, label in (
        ("rpc_floor", "gRPC health check on loopback"),
        ("ws_scale_dry", "scale one 3x3x256x256 kernel, dry_run=True (RPC + compute + checks)"),
        ("file_floor", "one-tensor commit file work by hand (2.36 MB + 1 JSON, 4 fsyncs, rename)"),
    ):
        times = [t * 1e3 for t in samples[key]]
        raw["context_ms"][key] = spread(times)
        print(f"  {label:<78} {statistics.median(times):>7.2f}  {min(times):.2f}-{max(times):.2f}")
    print()
    note = ""
    floor = raw["context_ms"]["file_floor"]["median"] + raw["context_ms"]["rpc_floor"]["median"]
    if not figures[0]["met"]:
        note = (
            "A one-kernel ApplyEdits is bound by its durability: the file work of a one-tensor commit "
            f"done by hand (2.36 MB + 1 metadata file, 4 fsyncs, rename) plus a loopback RPC take "
            f"{floor:.1f} ms here (median), which the in-process side does not pay."
        )
    write_results("edits", figures, raw, seconds, note)


if __name__ == "__main__":
    main()
