"""The interface every edit operation implements."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

from weightsmith_server.edits.context import EditContext, EditReport
from weightsmith_server.errors import InvalidArgument


class EditOp(ABC):
    """One typed edit. `apply` validates its arguments, then changes `ctx`.

    Errors name fields relative to the op (`selector`, `factor`); the batch
    prefixes them with the op's position (`edits[2].scale.selector`).
    """

    name: ClassVar[str]

    @abstractmethod
    def apply(self, ctx: EditContext) -> EditReport:
        """Apply the edit to the batch's working state and report what changed."""


def require_finite(value: float, *, field: str) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(
            f"Received {field}={value}, expected a finite number.", reason="NOT_FINITE", field=field
        )
    return value
