"""Predict: run a model's committed revision on a batch, optionally with layer outputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from weightsmith_server.errors import InvalidArgument
from weightsmith_server.limits import excerpt
from weightsmith_server.models.description import output_names
from weightsmith_server.models.resident import ModelState, ResidentModel

# Distinct `output_layers` combinations kept built per model (clients choose them).
_FEATURE_MODEL_CACHE = 8


def _pack_inputs(model: Any, arrays: list[np.ndarray]) -> Any:
    """Arrange inputs the way the model was built: one tensor, a list or a dict."""
    import keras

    structure = getattr(model, "_inputs_struct", None)
    if structure is not None:
        return keras.tree.pack_sequence_as(structure, arrays)
    return arrays[0] if len(arrays) == 1 else arrays


def predict(
    resident: ResidentModel, inputs: Sequence[tuple[str, np.ndarray]], output_layers: Sequence[str]
) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]], int]:
    """Run the model on a batch; returns outputs, layer outputs and the revision."""
    import keras
    import tensorflow as tf

    with resident.lock.read():
        state = resident.state
        model = state.keras_model
        arrays = _order_inputs(model, inputs)
        runner = model
        if output_layers:
            runner = _feature_model(state, tuple(output_layers))
        with tf.device(resident.device):
            result = runner(_pack_inputs(runner, arrays), training=False)
        flat = [np.asarray(t) for t in keras.tree.flatten(result)]
        revision = state.revision.revision
    count = len(model.outputs)
    outputs = list(zip(output_names(model), flat[:count], strict=True))
    layer_outputs = list(zip(output_layers, flat[count:], strict=True))
    return outputs, layer_outputs, revision


def _feature_model(state: ModelState, names: tuple[str, ...]) -> Any:
    import keras

    cached = state.feature_models.get(names)
    if cached is not None:
        return cached
    if len(state.feature_models) >= _FEATURE_MODEL_CACHE:
        state.feature_models.pop(next(iter(state.feature_models)))
    model = state.keras_model
    tensors = []
    for index, name in enumerate(names):
        try:
            tensors.append(model.get_layer(name).output)
        except (ValueError, AttributeError) as exc:
            raise InvalidArgument(
                f"Cannot return the output of layer {excerpt(name)!r}: {excerpt(exc, 300)}. GetModel "
                "lists the layers.",
                reason="UNKNOWN_LAYER",
                field=f"output_layers[{index}]",
            ) from exc
    runner = keras.Model(model.inputs, [*model.outputs, *tensors])
    state.feature_models[names] = runner
    return runner


def _order_inputs(model: Any, inputs: Sequence[tuple[str, np.ndarray]]) -> list[np.ndarray]:
    """Map named or positional inputs onto the model's inputs, checking each."""
    specs = model.inputs
    names = [t.name for t in specs]
    named = [name for name, _ in inputs if name]
    if named and len(named) != len(inputs):
        raise InvalidArgument(
            "Received a mix of named and unnamed inputs; name all of them or none.",
            reason="MIXED_INPUT_NAMING",
            field="inputs",
        )
    if len(inputs) != len(specs):
        raise InvalidArgument(
            f"Received {len(inputs)} input tensor(s), expected {len(specs)}: {names}.",
            reason="WRONG_INPUT_COUNT",
            field="inputs",
        )
    ordered: list[np.ndarray | None] = [None] * len(specs)
    for index, (name, array) in enumerate(inputs):
        position = index
        if name:
            if name not in names:
                raise InvalidArgument(
                    f"Received an unknown input name {name!r}, expected one of {names}.",
                    reason="UNKNOWN_INPUT",
                    field=f"inputs[{index}].name",
                )
            position = names.index(name)
            if ordered[position] is not None:
                raise InvalidArgument(
                    f"Input {name!r} was given twice.",
                    reason="DUPLICATE_INPUT",
                    field=f"inputs[{index}].name",
                )
        spec = specs[position]
        expected_shape = tuple(spec.shape)
        if array.dtype.name != str(spec.dtype):
            raise InvalidArgument(
                f"Received dtype {array.dtype.name} for input {names[position]!r}, expected {spec.dtype}.",
                reason="WRONG_DTYPE",
                field=f"inputs[{index}].tensor.dtype",
            )
        if len(array.shape) != len(expected_shape) or any(
            want is not None and want != got for want, got in zip(expected_shape, array.shape, strict=True)
        ):
            shown = ["None" if d is None else d for d in expected_shape]
            raise InvalidArgument(
                f"Received shape {list(array.shape)} for input {names[position]!r}, expected "
                f"[{', '.join(map(str, shown))}] (None: any size).",
                reason="WRONG_SHAPE",
                field=f"inputs[{index}].tensor.shape",
            )
        ordered[position] = array
    return [a for a in ordered if a is not None]
