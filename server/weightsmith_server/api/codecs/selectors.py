"""VariableSelector messages as domain selectors, and back."""

from __future__ import annotations

from weightsmith.v1 import selector_pb2
from weightsmith_server.selectors import Selector


def selector(message: selector_pb2.VariableSelector) -> Selector:
    layer_range = None
    if message.HasField("layer_range"):
        layer_range = (
            message.layer_range.start if message.layer_range.HasField("start") else None,
            message.layer_range.stop if message.layer_range.HasField("stop") else None,
        )
    return Selector(
        paths=tuple(message.paths),
        patterns=tuple(message.patterns),
        layers=tuple(message.layers),
        layer_range=layer_range,
        kinds=tuple(message.kinds),
        trainable_only=message.trainable_only,
    )


def selector_message(value: Selector) -> selector_pb2.VariableSelector:
    """A domain selector as a VariableSelector (`selector`'s inverse)."""
    message = selector_pb2.VariableSelector(
        paths=value.paths,
        patterns=value.patterns,
        layers=value.layers,
        kinds=value.kinds,
        trainable_only=value.trainable_only,
    )
    if value.layer_range is not None:
        start, stop = value.layer_range
        message.layer_range.SetInParent()  # present even when both ends are open
        if start is not None:
            message.layer_range.start = start
        if stop is not None:
            message.layer_range.stop = stop
    return message
