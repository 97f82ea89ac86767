"""Magnitude pruning: element-wise or whole output channels, per tensor or global.

Exactly `floor(sparsity * n)` elements (or channels) with the smallest
magnitudes (or norms) become zero; among equal magnitudes at the threshold,
which ones is deterministic but unspecified. The rest keep their values.
Output channels are the last axis; their norm is taken over all other axes.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from weightsmith_server.edits.base import EditOp, require_finite
from weightsmith_server.edits.context import EditContext, EditReport
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.selectors import Selector


class PruneScope(enum.StrEnum):
    """Where the sparsity target applies: each tensor on its own, or all selected ones together."""

    PER_TENSOR = "per_tensor"
    GLOBAL = "global"


class PruneGranularity(enum.StrEnum):
    """What is pruned: single elements, or whole output channels."""

    ELEMENT = "element"
    OUTPUT_CHANNEL = "output_channel"


class PruneNorm(enum.StrEnum):
    """How an output channel's magnitude is measured."""

    L1 = "l1"
    L2 = "l2"


def _scores(value: np.ndarray, granularity: PruneGranularity, norm: PruneNorm) -> np.ndarray:
    """Per element |w|, or per output channel its L1 or L2 norm, as float64."""
    magnitude = np.abs(value.astype(np.float64))
    if granularity == PruneGranularity.ELEMENT:
        return magnitude.ravel()
    channels = magnitude.reshape(-1, value.shape[-1]) if value.ndim else magnitude.reshape(1, 1)
    return channels.sum(axis=0) if norm == PruneNorm.L1 else np.sqrt((channels**2).sum(axis=0))


def _smallest(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` smallest scores (a partition, not a full sort)."""
    if count == 0:
        return np.empty(0, dtype=np.int64)
    return np.argpartition(scores, count - 1)[:count]


def _zero(value: np.ndarray, indices: np.ndarray, granularity: PruneGranularity) -> np.ndarray:
    pruned = np.array(value)
    if granularity == PruneGranularity.ELEMENT:
        pruned.reshape(-1)[indices] = 0
    else:
        pruned[..., indices] = 0
    return pruned


@dataclass(frozen=True)
class Prune(EditOp):
    """Zero the smallest-magnitude weights until `sparsity` of them are zero."""

    selector: Selector
    sparsity: float
    scope: PruneScope = PruneScope.PER_TENSOR
    granularity: PruneGranularity = PruneGranularity.ELEMENT
    norm: PruneNorm = PruneNorm.L1
    name = "prune"

    def apply(self, ctx: EditContext) -> EditReport:
        sparsity = require_finite(self.sparsity, field="sparsity")
        if not 0 <= sparsity < 1:
            raise InvalidArgument(
                f"Received sparsity={sparsity}, expected a fraction in [0, 1).",
                reason="INVALID_SPARSITY",
                field="sparsity",
            )
        report = EditReport(self.name)
        paths = ctx.select(self.selector)
        values = ctx.floating(paths)
        scores = [_scores(v, self.granularity, self.norm) for v in values]
        if self.scope == PruneScope.PER_TENSOR:
            for path, value, score in zip(paths, values, scores, strict=True):
                chosen = _smallest(score, math.floor(sparsity * score.size))
                ctx.put(path, _zero(value, chosen, self.granularity), report)
            return report
        everything = np.concatenate(scores)
        chosen = _smallest(everything, math.floor(sparsity * everything.size))
        owners = np.searchsorted(np.cumsum([s.size for s in scores]), chosen, side="right")
        starts = np.concatenate([[0], np.cumsum([s.size for s in scores])[:-1]])
        for index, (path, value) in enumerate(zip(paths, values, strict=True)):
            mine = chosen[owners == index] - starts[index]
            ctx.put(path, _zero(value, mine, self.granularity), report)
        return report
