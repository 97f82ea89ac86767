"""Gather `bench/results/*.json` into one table in docs/benchmarks.md, with the machine it ran on.

Every benchmark writes its figures through `harness.write_results`; this
reads them in the order below (others after, by name), adds what the
machine is (CPU, cores, memory, GPU, versions) and rewrites the report.

    python bench/report.py [--results bench/results] [--output docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ORDER = ("predict", "edits", "store", "transfer", "finetune", "memory", "restart")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _gpus() -> list[str]:
    try:
        listed = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listed.stdout.splitlines() if line.strip()]


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "cpu": _cpu(),
        "cores": os.cpu_count() or 0,
        "memory_gib": round(_memory_gib(), 1),
        "gpus": _gpus(),
        "os": platform.platform(),
        "versions": {
            "python": platform.python_version(),
            **{name: _version(name) for name in ("weightsmith", "tensorflow", "keras", "grpcio", "numpy")},
        },
    }


def _load(results: Path) -> list[dict[str, Any]]:
    found = {path.stem: json.loads(path.read_text()) for path in sorted(results.glob("*.json"))}
    ordered = [name for name in ORDER if name in found] + sorted(set(found) - set(ORDER))
    return [found[name] for name in ordered]


def _number(value: float, unit: str) -> str:
    if unit == "ratio":
        return f"{value:.2f}"
    if unit == "bytes":
        return f"{value:,.0f} B"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    return f"{value:.3g} {unit}"


def render(runs: list[dict[str, Any]], host: dict[str, Any], note: str = "") -> str:
    """The markdown report; `note` (e.g. a fallback taken) goes first among the notes."""
    gpus = ", ".join(host["gpus"]) or "none (TensorFlow on the CPU)"
    versions = ", ".join(f"{name} {version}" for name, version in host["versions"].items())
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`bench/report.py`) from `bench/results/*.json`; do not edit by hand.",
        "Each figure is the median over alternating rounds of weightsmith and its baseline in one run,",
        "with the spread (min–max) over rounds; how each is measured is in the docstring of its",
        "`bench/<name>.py`.",
        "",
        f"- CPU: {host['cpu']}, {host['cores']} cores; memory {host['memory_gib']} GiB",
        f"- GPU: {gpus}",
        f"- OS: {host['os']}",
        f"- Versions: {versions}",
        "",
        "| figure | median (spread) | detail | goal | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    total = 0.0
    for run in runs:
        total += float(run.get("seconds", 0.0))
        for row in run["figures"]:
            value, unit = row["value"], row["unit"]
            measured = (
                f"{_number(value['median'], unit)} "
                f"({_number(value['min'], unit)}–{_number(value['max'], unit)})"
            )
            met = "yes" if row["met"] else "**no**"
            lines.append(f"| {row['figure']} | {measured} | {row['detail']} | {row['goal']} | {met} |")
    lines += ["", f"Benchmarks ran for {total / 60:.1f} minutes in all.", ""]
    notes = ([note] if note else []) + [run["note"] for run in runs if run.get("note")]
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--output", type=Path, default=HERE.parent / "docs" / "benchmarks.md")
    parser.add_argument("--note", default="", help="a sentence for the notes, e.g. the fallback taken")
    args = parser.parse_args()
    runs = _load(args.results)
    if not runs:
        sys.exit(f"no results in {args.results}; run the benchmarks first (make bench)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(runs, machine(), args.note))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
