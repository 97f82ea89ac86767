"""Selector resolution, without gRPC."""

from __future__ import annotations

import pytest

from weightsmith_server.errors import InvalidArgument
from weightsmith_server.selectors import Selector, select
from weightsmith_server.variables import VariableEntry

VARIABLES = [
    VariableEntry("conv1/kernel", "conv1", 1, True),
    VariableEntry("conv1/bias", "conv1", 1, True),
    VariableEntry("bn1/gamma", "bn1", 2, True),
    VariableEntry("bn1/moving_mean", "bn1", 2, False),
    VariableEntry("conv2/kernel", "conv2", 4, False),
    VariableEntry("head/kernel", "head", 6, True),
    VariableEntry("head/bias", "head", 6, True),
]
LAYERS = 7


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (Selector(), [v.path for v in VARIABLES]),
        (Selector(paths=("head/bias",)), ["head/bias"]),
        (Selector(patterns=("conv*/kernel",)), ["conv1/kernel", "conv2/kernel"]),
        (Selector(layers=("bn1",)), ["bn1/gamma", "bn1/moving_mean"]),
        (Selector(layer_range=(-3, None)), ["conv2/kernel", "head/kernel", "head/bias"]),
        (Selector(layer_range=(None, 2)), ["conv1/kernel", "conv1/bias"]),
        (Selector(kinds=("kernel",)), ["conv1/kernel", "conv2/kernel", "head/kernel"]),
        (Selector(trainable_only=True, kinds=("kernel",)), ["conv1/kernel", "head/kernel"]),
        (Selector(paths=("head/bias",), layers=("conv1",)), ["conv1/kernel", "conv1/bias", "head/bias"]),
    ],
)
def test_select_picks_then_filters_in_model_order(selector: Selector, expected: list[str]) -> None:
    assert select(selector, VARIABLES, LAYERS, field="selector") == expected


@pytest.mark.parametrize(
    ("selector", "field", "reason"),
    [
        (Selector(paths=("head/bias", "nope/kernel")), "selector.paths[1]", "UNKNOWN_VARIABLE"),
        (Selector(layers=("missing",)), "selector.layers[0]", "UNKNOWN_LAYER"),
        (Selector(patterns=("zzz*",)), "selector", "EMPTY_SELECTION"),
        (Selector(kinds=("embeddings",)), "selector", "EMPTY_SELECTION"),
        (Selector(layer_range=(10, None)), "selector", "EMPTY_SELECTION"),
    ],
)
def test_select_rejects_what_matches_nothing(selector: Selector, field: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        select(selector, VARIABLES, LAYERS, field="selector")
    assert caught.value.reason == reason
    assert caught.value.violations[0][0] == field
