"""Store growth per revision: what a small and a large edit add to the store, in the same run.

The weightsmith server runs as its own process on loopback with a
temporary store; this process creates `keras.applications.ResNet50(
weights=None)` in it from its Keras config (320 variables, 25.6 M
parameters) and then edits it with `client.apply_edits`, measuring the
files of the model's `revisions/` folder between edits. Sizes are apparent
file sizes (`st_size`); the blocks the files and folders take (`du`-style,
`st_blocks`, 4 KiB per small file on ext4) go to `raw`.

Rows (each round: `FULL_MANIFEST_EVERY` one-bias edits, then `KERNEL_EDITS`
kernel edits; the rounds alternate the two after a warm-up round):

1. "store growth per one-bias edit on ResNet50": `edits.scale(
   "conv1_conv/bias", 1.0001)`, 64 float32 = 256 B changed. The figure is,
   per round, the growth of the store over the round's one-bias edits
   divided by their number. A round spans exactly one full-manifest period,
   so the full manifest the store writes every `FULL_MANIFEST_EVERY`
   revisions is counted, amortized, in every round. The goal is absolute:
   4096 + 2 x 256 bytes.
2. "store growth per 3×3×256×256 kernel edit / bytes changed":
   `edits.scale("conv4_block1_2_conv/kernel", 1.0001)` (2,359,296 B); per
   round, the growth over the kernel edits divided by the bytes they changed.

For context, `raw` also holds what the same one-bias edit would have
written in layout 1 (computed from this run's manifest: a pretty
`manifest.json` of all 320 variables, a pretty `revision.json`, one `.npy`
with its 4096-byte header), the per-revision sizes by file kind and the
median latency of each edit.

    python bench/store.py [--rounds 3] [--warmup 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

from harness import figure, spread, timed, weightsmith_server, write_results

import weightsmith
from weightsmith import edits

FULL_MANIFEST_EVERY = 32  # as in weightsmith_server.store
KERNEL_EDITS = 2
BIAS = "conv1_conv/bias"
KERNEL = "conv4_block1_2_conv/kernel"
FACTOR = 1.0001


def _sizes(folder: Path) -> tuple[int, int]:
    """Apparent bytes of the files under `folder`, and the blocks of its files and folders in bytes."""
    apparent = blocks = 0
    for current, _folders, files in os.walk(folder):
        blocks += os.stat(current).st_blocks * 512
        for name in files:
            stat = os.stat(os.path.join(current, name))
            apparent += stat.st_size
            blocks += stat.st_blocks * 512
    return apparent, blocks


def _by_kind(folder: Path) -> dict[str, int]:
    """Bytes of one revision folder by file kind."""
    kinds: dict[str, int] = {}
    for path in folder.iterdir():
        kind = "revision.json" if path.name == "revision.json" else path.suffix or path.name
        kinds[kind] = kinds.get(kind, 0) + path.stat().st_size
    return kinds


def _layout_1_equivalent(revisions: Path, number: int, bias_bytes: int) -> int:
    """What layout 1 wrote for a one-tensor revision: pretty full manifest + pretty record + one `.npy`."""
    stored = json.loads((revisions / "000001" / "revision.json").read_text())
    manifest = stored["manifest"]
    names = manifest["fields"]
    variables = [dict(zip(names, row, strict=True)) for row in manifest["variables"]]
    for index, variable in enumerate(variables):
        variable["file"] = f"{number:06d}/tensors/{index:04d}.npy"
    record = json.loads((revisions / f"{number:06d}" / "revision.json").read_text())
    del record["manifest"]
    pretty = {"layer_count": manifest["layer_count"], "variables": variables}
    return len(json.dumps(pretty, indent=1)) + 1 + len(json.dumps(record, indent=1)) + 1 + 4096 + bias_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    started = time.perf_counter()

    import keras

    config = keras.applications.ResNet50(weights=None).to_json()
    keras.backend.clear_session()

    with weightsmith_server() as (address, store), weightsmith.Client(address, timeout=600) as client:
        info = client.create_model("resnet50", keras_config=config, seed=0)
        shapes = {v.path: (tuple(v.shape), v.dtype) for v in info.variables}
        bias_bytes = 4 * int(shapes[BIAS][0][0])
        kernel_bytes = 4 * math.prod(shapes[KERNEL][0])
        assert shapes[KERNEL][0] == (3, 3, 256, 256), shapes[KERNEL]
        revisions = store / "models" / "resnet50" / "revisions"
        bias_edit = [edits.scale(BIAS, FACTOR)]
        kernel_edit = [edits.scale(KERNEL, FACTOR)]

        growth: dict[str, list[float]] = {"bias": [], "kernel": []}
        blocks: dict[str, list[float]] = {"bias": [], "kernel": []}
        latency: dict[str, list[float]] = {"bias": [], "kernel": []}
        per_revision: list[dict[str, Any]] = []
        for round_index in range(args.warmup + args.rounds):
            for kind, edit, count in (
                ("bias", bias_edit, FULL_MANIFEST_EVERY),
                ("kernel", kernel_edit, KERNEL_EDITS),
            ):
                before, before_blocks = _sizes(revisions)
                times = [timed(client.apply_edits, "resnet50", edit) for _ in range(count)]
                after, after_blocks = _sizes(revisions)
                if round_index < args.warmup:
                    continue
                growth[kind].append((after - before) / count)
                blocks[kind].append((after_blocks - before_blocks) / count)
                latency[kind].extend(times)
        latest = client.get_model("resnet50").revision
        for number in range(max(2, latest - FULL_MANIFEST_EVERY - KERNEL_EDITS + 1), latest + 1):
            folder = revisions / f"{number:06d}"
            manifest = json.loads((folder / "revision.json").read_text())["manifest"]["kind"]
            per_revision.append({"revision": number, "manifest": manifest, "bytes": _by_kind(folder)})
        layout_1 = _layout_1_equivalent(revisions, 2, bias_bytes)

    seconds = time.perf_counter() - started
    bias = spread(growth["bias"])
    kernel_ratio = spread([g / kernel_bytes for g in growth["kernel"]])
    goal_bytes = 4096 + 2 * bias_bytes
    figures = [
        figure(
            "store growth per one-bias edit on ResNet50",
            bias,
            unit="bytes",
            goal="≤ 4 KiB + 2 × bytes changed",
            met=bias["max"] <= goal_bytes,
            detail=(
                f"{bias['median']:,.0f} B for {bias_bytes} B changed (layout 1: {layout_1:,} B); "
                f"a full manifest every {FULL_MANIFEST_EVERY} revisions included"
            ),
        ),
        figure(
            "store growth per 3×3×256×256 kernel edit / bytes changed",
            kernel_ratio,
            unit="ratio",
            goal="≤ 1.01",
            met=kernel_ratio["median"] <= 1.01,
            detail=f"{statistics.median(growth['kernel']):,.0f} B for {kernel_bytes:,} B changed",
        ),
    ]
    raw = {
        "rounds": args.rounds,
        "warmup": args.warmup,
        "edits_per_round": {"bias": FULL_MANIFEST_EVERY, "kernel": KERNEL_EDITS},
        "bytes_changed": {"bias": bias_bytes, "kernel": kernel_bytes},
        "growth_apparent_bytes_per_edit": growth,
        "growth_blocks_bytes_per_edit": blocks,
        "layout_1_equivalent_bias_edit_bytes": layout_1,
        "edit_latency_ms": {k: spread([t * 1e3 for t in v]) for k, v in latency.items()},
        "last_revisions": per_revision,
    }
    print(f"\nStore growth per edit, ResNet50, {args.rounds} rounds after {args.warmup} warm-up\n")
    print(f"{'edit':<36} {'apparent B/edit':>16} {'spread':>21} {'du B/edit':>10} {'changed B':>10}")
    for label, kind, changed in (
        ("one bias (conv1_conv/bias)", "bias", bias_bytes),
        ("one 3x3x256x256 kernel", "kernel", kernel_bytes),
    ):
        values = growth[kind]
        print(
            f"{label:<36} {statistics.median(values):>16,.0f} "
            f"{min(values):>10,.0f}-{max(values):<10,.0f} "
            f"{statistics.median(blocks[kind]):>10,.0f} {changed:>10,}"
        )
    print(f"\nlayout 1 wrote {layout_1:,} B for the same one-bias edit")
    print(
        "edit latency, median ms: "
        + ", ".join(f"{k} {statistics.median(v) * 1e3:.1f}" for k, v in latency.items())
        + "\n"
    )
    write_results("store", figures, raw, seconds)


if __name__ == "__main__":
    main()
