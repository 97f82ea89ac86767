"""Element-wise edits: assign (whole or a slice), scale, add, add_noise, clip."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

from weightsmith_server.dtypes import numpy_dtype
from weightsmith_server.edits.base import EditOp, require_finite
from weightsmith_server.edits.context import EditContext, EditReport
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.limits import check_seed
from weightsmith_server.selectors import Selector


def _out(ctx: EditContext, path: str, value: np.ndarray) -> np.ndarray | None:
    """Where an element-wise op with a Python scalar writes its result.

    For numpy's float dtypes the result has the value's dtype, so it goes
    straight into an aligned array the variable adopts (no copy in `put`);
    None (a fresh array) for other dtypes, whose promotion rules may differ.
    """
    return ctx.new_value(path) if value.dtype.kind == "f" else None


@dataclass(frozen=True)
class Assign(EditOp):
    """Overwrite a variable, or the slice starting at `begin`, with `value`."""

    variable: str
    value: np.ndarray
    begin: tuple[int, ...] = ()
    name = "assign"

    def apply(self, ctx: EditContext) -> EditReport:
        record = ctx.records.get(self.variable)
        if record is None:
            raise InvalidArgument(
                f"Received an unknown variable {self.variable[:200]!r}; GetModel lists the variables.",
                reason="UNKNOWN_VARIABLE",
                field="variable",
            )
        dtype = numpy_dtype(record.dtype)
        if self.value.dtype != dtype:
            raise InvalidArgument(
                f"Received dtype {self.value.dtype.name} for {self.variable!r}, expected {dtype.name}.",
                reason="WRONG_DTYPE",
                field="value.dtype",
            )
        report = EditReport(self.name)
        if not self.begin:
            if self.value.shape != record.shape:
                raise InvalidArgument(
                    f"Received shape {list(self.value.shape)} for {self.variable!r}, expected "
                    f"{list(record.shape)} (or give `begin` to assign a slice).",
                    reason="WRONG_SHAPE",
                    field="value.shape",
                )
            ctx.put(self.variable, self.value, report, field="value")
            return report
        if len(self.begin) != len(record.shape) or len(self.value.shape) != len(record.shape):
            raise InvalidArgument(
                f"Received begin={list(self.begin)} and a value of shape {list(self.value.shape)}; "
                f"both need one entry per dimension of {self.variable!r} {list(record.shape)}.",
                reason="WRONG_SLICE",
                field="begin",
            )
        if any(
            b < 0 or b + n > d for b, n, d in zip(self.begin, self.value.shape, record.shape, strict=True)
        ):
            raise InvalidArgument(
                f"The slice at {list(self.begin)} of shape {list(self.value.shape)} does not fit in "
                f"{self.variable!r} of shape {list(record.shape)}.",
                reason="SLICE_OUT_OF_BOUNDS",
                field="begin",
            )
        new = ctx.new_value(self.variable)
        new[...] = ctx.value(self.variable)
        new[tuple(slice(b, b + n) for b, n in zip(self.begin, self.value.shape, strict=True))] = self.value
        ctx.put(self.variable, new, report, field="value")
        return report


@dataclass(frozen=True)
class Scale(EditOp):
    """`W = factor * W`."""

    selector: Selector
    factor: float
    name = "scale"

    def apply(self, ctx: EditContext) -> EditReport:
        factor = require_finite(self.factor, field="factor")
        report = EditReport(self.name)
        paths = ctx.select(self.selector)
        for path, value in zip(paths, ctx.floating(paths), strict=True):
            ctx.put(path, np.multiply(value, factor, out=_out(ctx, path, value)), report)
        return report


@dataclass(frozen=True)
class Add(EditOp):
    """`W = W + value`."""

    selector: Selector
    value: float
    name = "add"

    def apply(self, ctx: EditContext) -> EditReport:
        constant = require_finite(self.value, field="value")
        report = EditReport(self.name)
        paths = ctx.select(self.selector)
        for path, value in zip(paths, ctx.floating(paths), strict=True):
            ctx.put(path, np.add(value, constant, out=_out(ctx, path, value)), report)
        return report


@dataclass(frozen=True)
class AddNoise(EditOp):
    """`W = W + N(mean, stddev²)`, drawn in selection order from one seeded generator.

    Equals `rng = numpy.random.default_rng(seed)` then, per selected variable,
    `W + rng.normal(mean, stddev, W.shape)` computed in float64.
    """

    selector: Selector
    mean: float
    stddev: float
    seed: int | None = None
    name = "add_noise"

    def apply(self, ctx: EditContext) -> EditReport:
        mean = require_finite(self.mean, field="mean")
        stddev = require_finite(self.stddev, field="stddev")
        if stddev < 0:
            raise InvalidArgument(
                f"Received stddev={stddev}, expected a value of at least 0.",
                reason="INVALID_STDDEV",
                field="stddev",
            )
        stddev = abs(stddev)  # -0.0 passes the check above, but numpy refuses it ("scale < 0")
        check_seed(self.seed, field="seed")
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        report = EditReport(self.name, seed=seed)
        rng = np.random.default_rng(seed)
        paths = ctx.select(self.selector)
        for path, value in zip(paths, ctx.floating(paths), strict=True):
            ctx.put(path, value.astype(np.float64) + rng.normal(mean, stddev, value.shape), report)
        return report


@dataclass(frozen=True)
class Clip(EditOp):
    """`W = clip(W, minimum, maximum)`; an unset bound is unbounded."""

    selector: Selector
    minimum: float | None
    maximum: float | None
    name = "clip"

    def apply(self, ctx: EditContext) -> EditReport:
        if self.minimum is None and self.maximum is None:
            raise InvalidArgument(
                "Received neither `min` nor `max`; set at least one bound.", reason="NO_BOUNDS", field="min"
            )
        for bound, field in ((self.minimum, "min"), (self.maximum, "max")):
            if bound is not None:
                require_finite(bound, field=field)
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise InvalidArgument(
                f"Received min={self.minimum} greater than max={self.maximum}.",
                reason="INVALID_BOUNDS",
                field="max",
            )
        report = EditReport(self.name)
        paths = ctx.select(self.selector)
        for path, value in zip(paths, ctx.floating(paths), strict=True):
            ctx.put(path, np.clip(value, self.minimum, self.maximum, out=_out(ctx, path, value)), report)
        return report
