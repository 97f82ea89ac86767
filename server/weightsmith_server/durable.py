"""Durable small files: JSON written and fsync'd, folders fsync'd, whole writes at an offset."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_path(path: Path) -> None:
    """fsync a file or a folder, so that its content or entries are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, payload: Any) -> None:
    """Write JSON and fsync it; callers fsync the folder once all files are in."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_compact_json(path: Path, payload: Any) -> None:
    """Write JSON without indentation (still one readable document) and fsync it."""
    data = json.dumps(payload, separators=(",", ":")).encode() + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_fully(fd, memoryview(data), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def write_fully(fd: int, view: memoryview, position: int) -> None:
    """`pwrite` all of `view` at `position` (a single call may write less)."""
    while len(view):
        written = os.pwrite(fd, view, position)
        view = view[written:]
        position += written
