"""Numeric checks shared by weight writes and edits."""

from __future__ import annotations

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
