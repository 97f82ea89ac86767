"""Symmetric n-bit fake quantization; the weights stay floating point.

With `q = 2^(bits-1) - 1` and `s = max|W| / q` per output channel (the last
axis) or per tensor: `W = clip(round(W / s), -q, q) * s`, computed in the
variable's dtype with numpy's round-half-to-even; channels whose maximum is
0 stay 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from weightsmith_server.edits.base import EditOp
from weightsmith_server.edits.context import EditContext, EditReport
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.selectors import Selector


def fake_quantize(value: np.ndarray, bits: int, per_channel: bool) -> np.ndarray:
    levels = 2 ** (bits - 1) - 1
    axes = tuple(range(value.ndim - 1)) if per_channel and value.ndim > 0 else None
    scale = np.abs(value).max(axis=axes, keepdims=axes is not None) / levels
    safe = np.where(scale == 0, 1, scale).astype(value.dtype)
    return np.where(scale == 0, 0, np.clip(np.round(value / safe), -levels, levels) * safe).astype(
        value.dtype
    )


@dataclass(frozen=True)
class Quantize(EditOp):
    """Round weights to a symmetric `bits`-bit grid per output channel or tensor."""

    selector: Selector
    bits: int = 8
    per_channel: bool = True
    name = "quantize"

    def apply(self, ctx: EditContext) -> EditReport:
        if not 2 <= self.bits <= 16:
            raise InvalidArgument(
                f"Received bits={self.bits}, expected 2 to 16.", reason="INVALID_BITS", field="bits"
            )
        report = EditReport(self.name)
        paths = ctx.select(self.selector)
        for path, value in zip(paths, ctx.floating(paths), strict=True):
            ctx.put(path, fake_quantize(value, self.bits, self.per_channel), report)
        return report
