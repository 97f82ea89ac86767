"""A model's variables: stable paths, owning layers, and what selection needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from weightsmith_server.errors import InvalidArgument


@dataclass(frozen=True)
class VariableEntry:
    """One variable as selection and the manifest see it."""

    path: str
    layer: str
    layer_index: int
    trainable: bool


def variable_path(raw_path: str, model_name: str) -> str:
    """Strip the model's own name so paths survive clones, rebuilds and renames.

    Keras 3 prefixes the variables of Sequential models with the model's name
    (`sequential/dense/kernel`) but not those of functional ones.
    """
    return raw_path.removeprefix(f"{model_name}/")


def variable_kind(path: str) -> str:
    """The last component of a path: `kernel`, `bias`, `gamma`, ..."""
    return path.rsplit("/", 1)[-1]


def model_variables(model: Any) -> list[tuple[VariableEntry, Any]]:
    """Every weight of a Keras model with its entry, in layer order.

    Uses `layer.weights`, which leaves out random-generator state: that is
    not a weight, and its path is not stable across rebuilds.
    """
    found: list[tuple[VariableEntry, Any]] = []
    seen: set[int] = set()
    paths: set[str] = set()
    for index, layer in enumerate(model.layers):
        for variable in layer.weights:
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            path = variable_path(variable.path, model.name)
            if path in paths:
                raise InvalidArgument(
                    f"Two variables of the model share the path {path!r}; give the layers unique names.",
                    reason="DUPLICATE_VARIABLE_PATH",
                )
            paths.add(path)
            found.append((VariableEntry(path, layer.name, index, bool(variable.trainable)), variable))
    return found
