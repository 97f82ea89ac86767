"""ApplyEdits latency vs the same edit done in-process with numpy and Keras, in the same run.

The weightsmith server runs as its own process on loopback (on this
machine's CPU); the client and the in-process baseline run in this process.
A and B alternate for several rounds after a warm-up; the table gives the
median time of each side, the median ratio weightsmith/in-process with its
spread (min-max), and the absolute per-call overhead (median weightsmith
time minus median in-process time). Results go to bench/results/edits.json.

Rows:

1. "scale one 3x3x256x256 kernel" (2.36 MB of float32), on a model that is
   `Input((8, 8, 256)) -> Conv2D(256, 3, name="conv")`.

   - weightsmith: `client.apply_edits(model_id, [edits.scale("conv/kernel",
     1.0001)])`. One unary RPC; the server resolves the selector, computes
     `W * 1.0001` from a zero-copy snapshot of the committed value,
     validates the result (shape, dtype, all finite) and accounts the change
     (float64 delta L2, count of changed elements), then durably commits a
     new revision: it writes the changed tensor to a `.npy` file in a
     staging folder and fsyncs it, writes and fsyncs `manifest.json` and
     `revision.json`, fsyncs the folders, renames the staging folder into
     place and fsyncs the parent; finally it assigns the new value to the
     resident Keras variable (zero-copy via DLPack on the CPU) under the
     model's write lock and returns the revision and the edit's report.
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
     then the 6 changed tensors are written and fsync'd, the revision is
     committed and the values assigned to the resident variables).
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

Both sides of rows 1 and 2 apply the same number of committed edits to the
same starting values, and the run ends by checking that the server's weights
and the in-process variables are bit-identical.

For context, each round also times a gRPC health check on loopback (the
floor of any unary RPC), row 1 with `dry_run=True` (RPC + compute +
checks, no disk) and, in the store's own folder, the file work of a
one-tensor commit done by hand (write a 2.36 MB `.npy` and two small JSON
files with an fsync each, fsync both folders, rename, fsync the parent).

    python bench/edits.py [--rounds 15] [--warmup 3]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from harness import timed, weightsmith_server

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
    """The file work of a one-tensor revision: files + fsyncs in staging, rename, fsync parent."""
    staging = root / f".staging-{number}"
    (staging / "tensors").mkdir(parents=True)
    with open(staging / "tensors" / "0000.npy", "wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())
    for name in ("manifest.json", "revision.json"):
        with open(staging / name, "w", encoding="utf-8") as handle:
            json.dump({"number": number, "padding": "x" * 600}, handle)
            handle.flush()
            os.fsync(handle.fileno())
    _fsync(staging / "tensors")
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
    parser.add_argument("--output", type=Path, default=HERE / "results" / "edits.json")
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before this process imports TensorFlow
    with weightsmith_server() as (address, store):
        rows = _measure(address, store, args.rounds, args.warmup)
    _report(rows, args)


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

    with (
        weightsmith.Client(address, timeout=600) as client,
        grpc.insecure_channel(address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        one = client.create_model("scale-one", keras_config=one_config, seed=0)
        batch = client.create_model("batch", keras_config=batch_config, seed=0)
        order = [v.path for v in batch.variables]
        scale_edit = [edits.scale("conv/kernel", FACTOR)]
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
        assert client.get_model("scale-one").revision == 1 + applied, "scale revisions missing"
        assert client.get_model("batch").revision == 1 + applied, "batch revisions missing"
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
        "applied_each": applied,
        "samples_s": samples,
    }


def _report(rows: dict, args: argparse.Namespace) -> None:
    samples = rows["samples_s"]
    result: dict[str, Any] = {
        "rounds": args.rounds,
        "warmup": args.warmup,
        "scale_bytes": rows["scale_bytes"],
        "batch_bytes": rows["batch_bytes"],
        "batch_ops": [[op, pattern, kw] for op, pattern, kw in BATCH],
        "batch_values_touched": rows["batch_values_touched"],
        "samples_s": samples,
        "rows": {},
        "context_ms": {},
    }
    print(
        f"\nApplyEdits vs in-process (numpy + Keras assign), loopback, CPU, "
        f"{args.rounds} alternating rounds after {args.warmup} warm-up; identical results checked\n"
    )
    header = (
        f"{'case':<30} {'in-process ms':>13} {'weightsmith ms':>15} {'ratio (median)':>15} "
        f"{'spread':>15} {'overhead ms':>12}"
    )
    print(header)
    for case, base_key, ws_key in (
        ("scale one 3x3x256x256 kernel", "inproc_scale", "ws_scale"),
        ("10-op batch", "inproc_batch", "ws_batch"),
        ("10-op batch (dry_run)", "inproc_batch", "ws_batch_dry"),
    ):
        base, ws = samples[base_key], samples[ws_key]
        ratios = [w / b for w, b in zip(ws, base, strict=True)]
        median_base, median_ws = statistics.median(base) * 1e3, statistics.median(ws) * 1e3
        median = statistics.median(ratios)
        result["rows"][case] = {
            "inprocess_ms": median_base,
            "weightsmith_ms": median_ws,
            "ratio": {"median": median, "min": min(ratios), "max": max(ratios)},
            "overhead_ms": median_ws - median_base,
        }
        print(
            f"{case:<30} {median_base:>13.2f} {median_ws:>15.2f} {median:>15.2f} "
            f"{min(ratios):>7.2f}-{max(ratios):<7.2f} {median_ws - median_base:>12.2f}"
        )
    print("\ncontext (median, min-max ms)")
    for key, label in (
        ("rpc_floor", "gRPC health check on loopback"),
        ("ws_scale_dry", "scale one 3x3x256x256 kernel, dry_run=True (RPC + compute + checks)"),
        ("file_floor", "one-tensor commit file work by hand (2.36 MB + 2 JSON, 5 fsyncs, rename)"),
    ):
        times = [t * 1e3 for t in samples[key]]
        result["context_ms"][key] = {"median": statistics.median(times), "min": min(times), "max": max(times)}
        print(f"  {label:<78} {statistics.median(times):>7.2f}  {min(times):.2f}-{max(times):.2f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
