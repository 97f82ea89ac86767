"""Variable selectors: which variables of a model a request means.

Picks (exact paths, glob patterns, layer names, a layer index range) are
combined as a union, all variables when none is given; filters (kinds,
trainable-only) then narrow that down. A selector that matches nothing, or an
exact path or layer name that does not exist, is an `InvalidArgument` naming
the field: silently doing nothing is never what the caller meant.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from weightsmith_server.errors import InvalidArgument
from weightsmith_server.variables import VariableEntry, variable_kind


@dataclass(frozen=True)
class Selector:
    """A request's variable selection, decoded from the wire."""

    paths: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    layer_range: tuple[int | None, int | None] | None = None
    kinds: tuple[str, ...] = ()
    trainable_only: bool = False

    @property
    def has_picks(self) -> bool:
        return bool(self.paths or self.patterns or self.layers or self.layer_range is not None)


def select(
    selector: Selector, variables: Sequence[VariableEntry], layer_count: int, *, field: str
) -> list[str]:
    """Return the selected paths in model order; raise `InvalidArgument` if none."""
    known_paths = {v.path for v in variables}
    for index, path in enumerate(selector.paths):
        if path not in known_paths:
            raise InvalidArgument(
                f"Received an unknown variable path {path!r}; GetModel lists the model's variables.",
                reason="UNKNOWN_VARIABLE",
                field=f"{field}.paths[{index}]",
            )
    known_layers = {v.layer for v in variables}
    for index, layer in enumerate(selector.layers):
        if layer not in known_layers:
            raise InvalidArgument(
                f"Received an unknown layer name {layer!r}, or a layer without variables; "
                "GetModel lists the model's layers.",
                reason="UNKNOWN_LAYER",
                field=f"{field}.layers[{index}]",
            )
    range_indices: set[int] = set()
    if selector.layer_range is not None:
        start, stop = selector.layer_range
        range_indices = set(range(layer_count)[slice(start, stop)])

    chosen: list[str] = []
    for variable in variables:
        picked = not selector.has_picks or (
            variable.path in selector.paths
            or any(fnmatch.fnmatchcase(variable.path, p) for p in selector.patterns)
            or variable.layer in selector.layers
            or variable.layer_index in range_indices
        )
        if not picked:
            continue
        if selector.kinds and variable_kind(variable.path) not in selector.kinds:
            continue
        if selector.trainable_only and not variable.trainable:
            continue
        chosen.append(variable.path)
    if not chosen:
        raise InvalidArgument(
            f"The selector matches no variable of the model: {describe(selector)}. "
            "GetModel lists the variable paths, layers and kinds.",
            reason="EMPTY_SELECTION",
            field=field,
        )
    return chosen


def describe(selector: Selector) -> str:
    """A compact readable form of a selector, for messages and summaries."""
    parts = [
        f"{name}={list(value)}"
        for name, value in (
            ("paths", selector.paths),
            ("patterns", selector.patterns),
            ("layers", selector.layers),
            ("kinds", selector.kinds),
        )
        if value
    ]
    if selector.layer_range is not None:
        start, stop = selector.layer_range
        parts.append(f"layers[{'' if start is None else start}:{'' if stop is None else stop}]")
    if selector.trainable_only:
        parts.append("trainable_only")
    return ", ".join(parts) or "all variables"
