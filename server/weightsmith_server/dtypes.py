"""Dtype names as the store and the wire know them, as numpy dtypes."""

from __future__ import annotations

import numpy as np

from weightsmith import wire
from weightsmith_server.errors import InvalidArgument


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a stored dtype name (`float32`, `bfloat16`, ...)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def numpy_dtype_for(dtype: int, *, field: str) -> np.dtype:
    """The numpy dtype of a wire `DataType` number, or `InvalidArgument` on `field`."""
    try:
        return wire.numpy_dtype(dtype)
    except ValueError as exc:
        raise InvalidArgument(str(exc), reason="INVALID_DTYPE", field=field) from exc
