"""Manifests: where every variable's value of a revision is stored, and their compact encoding.

A revision's `revision.json` holds its manifest as JSON rows (`ROW_FIELDS`):
in full, or as a delta against its parent (the parent's number and the
changed rows, each with its index). `apply_delta` makes a delta whole again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightsmith_server.dtypes import numpy_dtype
from weightsmith_server.variables import VariableEntry

ROW_FIELDS = ("path", "dtype", "shape", "file", "layer", "layer_index", "trainable")
# Tensor files of layout 2; a location in one names the tensor after `#`.
SAFETENSORS_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class VariableRecord:
    """A manifest entry: one variable's identity and where its value is stored.

    `file` is the value's location under `revisions/`: `NNNNNN/<name>.safetensors#<tensor name>`,
    or `NNNNNN/tensors/<iiii>.npy` in layout-1 revisions. Two entries with the same `file`
    hold the same stored bytes.
    """

    path: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    layer: str
    layer_index: int
    trainable: bool

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * numpy_dtype(self.dtype).itemsize

    @property
    def entry(self) -> VariableEntry:
        return VariableEntry(self.path, self.layer, self.layer_index, self.trainable)


@dataclass(frozen=True)
class Manifest:
    """Every variable of one revision, in model order, and the layer count.

    `revision`, `chain_depth` and `chain_entries` say where a committed or
    resolved manifest stands in its delta chain (deltas since the last full
    manifest, and their entries); they decide when the next commit writes a
    full manifest and take no part in equality.
    """

    layer_count: int
    variables: tuple[VariableRecord, ...]
    revision: int = field(default=0, compare=False)
    chain_depth: int = field(default=0, compare=False)
    chain_entries: int = field(default=0, compare=False)

    def by_path(self) -> dict[str, VariableRecord]:
        return {v.path: v for v in self.variables}


def row(record: VariableRecord) -> list[Any]:
    """A manifest entry as a JSON row (`ROW_FIELDS`); a tensor named after its variable drops `#name`."""
    location = record.file.removesuffix(f"#{record.path}") if "#" in record.file else record.file
    return [
        record.path,
        record.dtype,
        list(record.shape),
        location,
        record.layer,
        record.layer_index,
        record.trainable,
    ]


def record_of(row: Sequence[Any]) -> VariableRecord:
    path, dtype, shape, location, layer, layer_index, trainable = row
    if location.endswith(SAFETENSORS_SUFFIX):
        location = f"{location}#{path}"
    return VariableRecord(
        path=path,
        dtype=dtype,
        shape=tuple(int(d) for d in shape),
        file=location,
        layer=layer,
        layer_index=int(layer_index),
        trainable=bool(trainable),
    )


def full_payload(layer_count: int, variables: Iterable[VariableRecord]) -> dict[str, Any]:
    return {
        "kind": "full",
        "layer_count": layer_count,
        "fields": list(ROW_FIELDS),
        "variables": [row(v) for v in variables],
    }


def delta_rows(parent: Manifest, variables: Sequence[VariableRecord]) -> list[list[Any]] | None:
    """`[index, *row]` for each entry that differs from the parent's; None when the variables differ."""
    if len(parent.variables) != len(variables):
        return None
    rows = []
    for index, (old, new) in enumerate(zip(parent.variables, variables, strict=True)):
        if old is new:
            continue
        if old.path != new.path:
            return None
        if old != new:
            rows.append([index, *row(new)])
    return rows


def apply_delta(parent: Manifest, payload: dict[str, Any], number: int) -> Manifest:
    """The manifest of revision `number`: its parent's with the delta's entries replaced."""
    variables = list(parent.variables)
    if payload["count"] != len(variables) or payload["parent"] != parent.revision:
        raise ValueError(f"revision {number}: its delta manifest does not fit revision {parent.revision}")
    for index, *row in payload["changed"]:
        record = record_of(row)
        if variables[index].path != record.path:
            raise ValueError(f"revision {number}: delta entry {index} names {record.path!r}")
        variables[index] = record
    return Manifest(
        layer_count=payload["layer_count"],
        variables=tuple(variables),
        revision=number,
        chain_depth=parent.chain_depth + 1,
        chain_entries=parent.chain_entries + len(payload["changed"]),
    )
