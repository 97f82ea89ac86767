"""Numeric checks shared by weight writes and edits."""

from __future__ import annotations

import math

import numpy as np


def all_finite(values: np.ndarray) -> bool:
    """Whether no element is NaN or infinite.

    A NaN or infinity anywhere makes the sum non-finite, so a finite sum (one
    pass, no temporary array) proves it; a non-finite sum may only be an
    overflow of large finite values, which the exact check then settles.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(values.sum()):
            return True
    return bool(np.isfinite(values).all())


def change_stats(new: np.ndarray, old: np.ndarray) -> tuple[int, float]:
    """(elements that differ, Σ (new − old)²) of two same-shaped floating-point arrays.

    The count is exact. For float32 the differences and their squares are
    float32 and summed pairwise (numpy's `sum`): 4 passes over float32 data
    and no float64 copy of the tensor, whose allocation alone (page faults)
    cost more than the sums. Each difference is exact when the two values
    are within a factor of 2 (every small edit) and otherwise within 2⁻²⁴
    of it, each square within 2⁻²⁴, and pairwise summation adds O(log n)
    roundings: the L2 is within 1e-6 relative of the exact one (measured:
    1e-9 to 1e-7). Other dtypes, and sums that overflow float32, take the
    exact float64 route. A NaN or infinity in either array gives NaN or inf.
    """
    changed = int(np.count_nonzero(new != old))
    if new.dtype == np.float32:
        with np.errstate(over="ignore", invalid="ignore"):
            difference = np.subtract(new, old).reshape(-1)
            np.square(difference, out=difference)
            squares = float(difference.sum())
        if math.isfinite(squares):
            return changed, squares
    difference = new.astype(np.float64).ravel()
    difference -= old.ravel()
    return changed, float(np.dot(difference, difference))
