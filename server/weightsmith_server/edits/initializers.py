"""Re-initialization with any builtin Keras initializer, seeded."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightsmith_server.dtypes import numpy_dtype
from weightsmith_server.edits.base import EditOp
from weightsmith_server.edits.context import EditContext, EditReport
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.limits import MAX_SEED, check_seed
from weightsmith_server.selectors import Selector


def make_initializer(name: str, config: dict[str, Any], seed: int) -> Any:
    """A fresh builtin Keras initializer; `InvalidArgument` for unknown names or arguments."""
    import keras

    from weightsmith_server.models.architecture import check_builtin_config

    serialized = {"class_name": name, "config": {**config, "seed": seed}}
    check_builtin_config(serialized, field="config")
    try:
        initializer = keras.initializers.get(serialized)
    except (ValueError, TypeError, KeyError) as exc:  # KeyError: `from_config` misses an argument
        message = str(exc)
        unknown_name = "Could not interpret" in message or "Unknown" in message
        raise InvalidArgument(
            f"Keras rejected initializer {name[:100]!r} with {config}: {message[:300]}",
            reason="UNKNOWN_INITIALIZER" if unknown_name else "INVALID_INITIALIZER_CONFIG",
            field="initializer" if unknown_name else "config",
        ) from exc
    if initializer is None:
        raise InvalidArgument(
            "Received an empty initializer name; use one like `glorot_uniform`, `he_normal`, `zeros`.",
            reason="UNKNOWN_INITIALIZER",
            field="initializer",
        )
    return initializer


@dataclass(frozen=True)
class Reinitialize(EditOp):
    """Fresh values from a Keras initializer; variable `i` of the selection uses `seed + i`.

    Equals `keras.initializers.get({"class_name": name, "config": {**config,
    "seed": seed + i}})(shape, dtype)` evaluated on the CPU.
    """

    selector: Selector
    initializer: str
    config: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    name = "reinitialize"

    def apply(self, ctx: EditContext) -> EditReport:
        import tensorflow as tf

        # Variable `i` draws with `seed + i`: room left below the int64 maximum.
        check_seed(self.seed, field="seed", maximum=MAX_SEED // 2)
        seed = self.seed if self.seed is not None else secrets.randbits(31)
        make_initializer(self.initializer, self.config, seed)  # fail fast on a bad name or config
        report = EditReport(self.name, seed=seed)
        paths = ctx.select(self.selector)
        ctx.floating(paths)
        for index, path in enumerate(paths):
            record = ctx.records[path]
            initializer = make_initializer(self.initializer, self.config, seed + index)
            try:
                with tf.device("/CPU:0"):
                    values = initializer(record.shape, dtype=numpy_dtype(record.dtype).name)
            except (ValueError, TypeError) as exc:
                raise InvalidArgument(
                    f"Initializer {self.initializer!r} cannot initialize {path!r} of shape "
                    f"{list(record.shape)}: {str(exc)[:300]}",
                    reason="INVALID_INITIALIZER_CONFIG",
                    field="initializer",
                ) from exc
            ctx.put(path, np.asarray(values), report)
        return report
