"""Edits that combine models: interpolate, task vectors, copy_from.

The other models are read at their current (or a given) revision through the
registry, so a model can even be combined with an earlier revision of itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from weightsmith_server.edits.base import EditOp, require_finite
from weightsmith_server.edits.context import EditContext, EditReport
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.selectors import Selector


def _other(
    ctx: EditContext, model_id: str, revision: int, paths: list[str], *, field: str
) -> list[np.ndarray]:
    """The values of `paths` in another model, which must match them in shape and dtype."""
    records, load = ctx.other_model(model_id, revision, field=field)
    values = []
    for path in paths:
        mine, theirs = ctx.records[path], records.get(path)
        if theirs is None or theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            found = "missing" if theirs is None else f"{theirs.dtype} {list(theirs.shape)}"
            raise InvalidArgument(
                f"Model {model_id!r} does not match this model's architecture: variable {path!r} is "
                f"{mine.dtype} {list(mine.shape)} here and {found} there.",
                reason="ARCHITECTURE_MISMATCH",
                field=field,
                metadata={"variable": path},
            )
        values.append(load(theirs))
    return values


@dataclass(frozen=True)
class Interpolate(EditOp):
    """`W = (1 - alpha) * W + alpha * W_other` (WiSE-FT, model soups)."""

    selector: Selector
    other_model_id: str
    alpha: float
    other_revision: int = 0
    name = "interpolate"

    def apply(self, ctx: EditContext) -> EditReport:
        alpha = require_finite(self.alpha, field="alpha")
        report = EditReport(self.name)
        paths = ctx.select(self.selector)
        mine = ctx.floating(paths)
        theirs = _other(ctx, self.other_model_id, self.other_revision, paths, field="other_model_id")
        for path, value, other in zip(paths, mine, theirs, strict=True):
            ctx.put(path, (1 - alpha) * value + alpha * other, report)
        return report


@dataclass(frozen=True)
class TaskVector(EditOp):
    """`W = W + scale * (W_tuned - W_base)`."""

    selector: Selector
    base_model_id: str
    tuned_model_id: str
    scale: float
    name = "task_vector"

    def apply(self, ctx: EditContext) -> EditReport:
        scale = require_finite(self.scale, field="scale")
        report = EditReport(self.name)
        paths = ctx.select(self.selector)
        mine = ctx.floating(paths)
        base = _other(ctx, self.base_model_id, 0, paths, field="base_model_id")
        tuned = _other(ctx, self.tuned_model_id, 0, paths, field="tuned_model_id")
        for path, value, b, t in zip(paths, mine, base, tuned, strict=True):
            ctx.put(path, value + scale * (t - b), report)
        return report


@dataclass(frozen=True)
class CopyFrom(EditOp):
    """Copy variables from another model with the same path, shape and dtype.

    Without a selector: every variable the source has in the same form.
    """

    selector: Selector | None
    source_model_id: str
    source_revision: int = 0
    name = "copy_from"

    def apply(self, ctx: EditContext) -> EditReport:
        report = EditReport(self.name)
        if self.selector is not None:
            paths = ctx.select(self.selector)
        else:
            records, _ = ctx.other_model(self.source_model_id, self.source_revision, field="source_model_id")
            paths = [
                p
                for p, mine in ctx.records.items()
                if p in records and (records[p].shape, records[p].dtype) == (mine.shape, mine.dtype)
            ]
            if not paths:
                raise InvalidArgument(
                    f"Model {self.source_model_id!r} has no variable of the same path, shape and dtype.",
                    reason="NOTHING_TO_COPY",
                    field="source_model_id",
                )
        values = _other(ctx, self.source_model_id, self.source_revision, paths, field="source_model_id")
        for path, value in zip(paths, values, strict=True):
            ctx.put(path, value, report)
        return report
