"""Value types of the public API: what picks variables and what Predict returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np

from weightsmith import _checks
from weightsmith.v1 import selector_pb2


def _optional_index(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"Received an invalid bound in `layer_range`, expected an int or None. Received: {name}={value!r}"
        )
    return int(value)


@dataclass(frozen=True)
class Selector:
    """Picks variables of a model, for `read_weights` and edits.

    The picks (`paths`, `patterns`, `layers`, `layer_range`) are combined as a
    union, and select every variable when none is given; the filters (`kinds`,
    `trainable_only`) then narrow that down. A selector matching no variable is
    rejected by the server with `InvalidArgumentError`.

    Args:
        paths: Exact variable paths such as `"dense_1/kernel"`; each must exist.
        patterns: Shell-style globs over paths (`*`, `?`, `[seq]`), such as
            `"block5_*/kernel"`.
        layers: Layer names; picks every variable of those layers.
        layer_range: A Python-style `(start, stop)` slice over the model's
            layers (either bound may be None, negatives count from the end), or
            a `slice` without a step. The last 5 layers are `(-5, None)`.
        kinds: Variable kinds, the last path component: `"kernel"`, `"bias"`,
            `"gamma"`, `"moving_mean"`, ...
        trainable_only: Keep only trainable variables.

    A single string is accepted wherever a sequence of strings is expected.

    Example:

    ```python
    head = Selector(layer_range=(-2, None), kinds=["kernel"])
    weights = client.read_weights("resnet", head)
    ```
    """

    paths: Sequence[str] = ()
    patterns: Sequence[str] = ()
    layers: Sequence[str] = ()
    layer_range: tuple[int | None, int | None] | slice | None = None
    kinds: Sequence[str] = ()
    trainable_only: bool = False

    def __post_init__(self) -> None:
        for name in ("paths", "patterns", "layers", "kinds"):
            object.__setattr__(self, name, _checks.strings(name, getattr(self, name)))
        layer_range = self.layer_range
        if isinstance(layer_range, slice):
            if layer_range.step is not None:
                raise ValueError(
                    f"Received a `layer_range` slice with a step, expected a step of None. "
                    f"Received: layer_range={layer_range!r}"
                )
            layer_range = (layer_range.start, layer_range.stop)
        if layer_range is not None:
            if isinstance(layer_range, str) or len(tuple(layer_range)) != 2:
                raise ValueError(
                    f"Received an invalid `layer_range`, expected a (start, stop) pair or a "
                    f"slice. Received: layer_range={self.layer_range!r}"
                )
            start, stop = tuple(layer_range)
            layer_range = (_optional_index("start", start), _optional_index("stop", stop))
        object.__setattr__(self, "layer_range", layer_range)
        object.__setattr__(self, "trainable_only", bool(self.trainable_only))

    def to_proto(self) -> selector_pb2.VariableSelector:
        """Build the `weightsmith.v1.VariableSelector` message."""
        selector = selector_pb2.VariableSelector(
            paths=self.paths,
            patterns=self.patterns,
            layers=self.layers,
            kinds=self.kinds,
            trainable_only=self.trainable_only,
        )
        if self.layer_range is not None:
            start, stop = self.layer_range  # type: ignore[misc]
            # `start`/`stop` are proto3 `optional`: unset means "open", which
            # differs from 0, so only set the bounds that were given.
            selector.layer_range.SetInParent()
            if start is not None:
                selector.layer_range.start = start
            if stop is not None:
                selector.layer_range.stop = stop
        return selector


SelectorLike: TypeAlias = Selector | str | Sequence[str] | selector_pb2.VariableSelector


def selector_to_proto(selector: SelectorLike | None) -> selector_pb2.VariableSelector | None:
    """Build a `VariableSelector` from any form a selector argument accepts; None stays None."""
    if selector is None:
        return None
    if isinstance(selector, selector_pb2.VariableSelector):
        return selector
    if isinstance(selector, Selector):
        return selector.to_proto()
    if isinstance(selector, str) or (
        isinstance(selector, Sequence) and all(isinstance(p, str) for p in selector)
    ):
        return Selector(patterns=selector).to_proto()
    raise TypeError(
        f"Received an invalid `selector`, expected a Selector, a glob string or a list of "
        f"glob strings. Received: {selector!r}"
    )


def required_selector(selector: SelectorLike) -> selector_pb2.VariableSelector:
    """Like `selector_to_proto`, but refuse None where an edit needs a selector."""
    if selector is None:
        raise TypeError(
            "Received selector=None, expected a Selector, a glob string or a list of glob "
            "strings; pass `weightsmith.Selector()` to select every variable."
        )
    return selector_to_proto(selector)  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class PredictResult:
    """What `predict` returns.

    The arrays are read-only views of the received bytes; call `.copy()` on
    one to modify it.

    Attributes:
        outputs: The model's outputs in positional order, keyed by output name.
        layer_outputs: The requested intermediate layer outputs, in request
            order, keyed by layer name.
        revision: The model revision that answered.
    """

    outputs: dict[str, np.ndarray]
    layer_outputs: dict[str, np.ndarray] = field(default_factory=dict)
    revision: int = 0

    @property
    def output(self) -> np.ndarray:
        """The only output of a single-output model; `ValueError` otherwise."""
        if len(self.outputs) != 1:
            raise ValueError(
                f"Received {len(self.outputs)} outputs ({sorted(self.outputs)}), expected "
                f"exactly one for `output`; index `outputs` by name instead."
            )
        return next(iter(self.outputs.values()))
