"""The description of a tensor a model or dataset takes: name, dtype and shape."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpecInfo:
    """A model input or output, or a dataset feature: name, dtype name and shape (-1 for any size)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
