"""Moving tensors between numpy and TensorFlow without copying them.

TensorFlow's resource variables are copy-on-write: a tensor read from a
variable keeps its buffer even when the variable is assigned later, and
assigning a tensor that wraps a numpy buffer (through DLPack) adopts that
buffer instead of copying it. On the CPU this makes a consistent snapshot of
a variable, and the install of newly written values, O(1) in their size.
TensorFlow requires 64-byte aligned buffers (it aborts the process on
misaligned ones); `aligned_empty` gives 4096-byte alignment, which also
suits `O_DIRECT` file writes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ALIGNMENT = 4096


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on a 4096-byte boundary."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


class _Capsule:
    """Adapts TensorFlow's DLPack capsule to numpy's `from_dlpack` protocol."""

    def __init__(self, capsule: object) -> None:
        self._capsule = capsule

    def __dlpack__(self, **_: object) -> object:
        return self._capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU


def _on_cpu(variable: Any) -> bool:
    return "CPU" in str(getattr(variable.value, "device", "CPU")).upper()


def snapshot(variable: Any) -> np.ndarray:
    """The variable's current value as a read-only array that later writes never change."""
    import tensorflow as tf

    tensor = variable.value.read_value()
    if _on_cpu(variable):
        try:
            return np.from_dlpack(_Capsule(tf.experimental.dlpack.to_dlpack(tensor)))
        except (TypeError, ValueError, BufferError, tf.errors.InvalidArgumentError):
            pass  # dtypes numpy cannot import (bfloat16): fall back to a copy
    return tensor.numpy()


def adopt(variable: Any, array: np.ndarray) -> None:
    """Assign `array` to `variable`; on the CPU the variable takes over its buffer.

    The caller must not modify `array` afterwards.
    """
    import tensorflow as tf

    if _on_cpu(variable) and array.ctypes.data % 64 == 0 and array.flags.c_contiguous:
        try:
            variable.assign(tf.experimental.dlpack.from_dlpack(array.__dlpack__()))
            return
        except (TypeError, ValueError, BufferError, tf.errors.InvalidArgumentError):
            pass
    variable.assign(array)
