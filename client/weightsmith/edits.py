"""Typed builders of `weightsmith.v1.Edit` messages, for `apply_edits`.

One function per edit operation, each returning an `edits_pb2.Edit` (or, for
`layer`, an `edits_pb2.LayerSpec`). A batch of edits applies in order, each
seeing the result of the ones before, and commits as one revision; if any
edit is invalid nothing changes. Selectors take the same forms as
`read_weights`: a `weightsmith.Selector`, a glob over variable paths, a list
of globs, or a `VariableSelector` message. Obvious mistakes raise
`ValueError` or `TypeError` here; the server checks everything else.

Example:

```python
import weightsmith
from weightsmith import edits

with weightsmith.Client("127.0.0.1:50051") as client:
    client.create_model("tiny", architecture="MobileNetV3Small",
                        input_shape=[64, 64, 3], classes=5, seed=0)
    response = client.apply_edits(
        "tiny",
        [
            edits.freeze(weightsmith.Selector(layer_range=(None, -1))),
            edits.prune("*/kernel", 0.5, granularity="output_channel"),
            edits.quantize("*/kernel", bits=8),
        ],
        message="prune and quantize",
    )
    print(response.revision.revision, [result.op for result in response.results])
```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf import struct_pb2

from weightsmith import _checks, wire
from weightsmith._checks import INT64_MAX
from weightsmith._types import SelectorLike, required_selector, selector_to_proto
from weightsmith.v1 import edits_pb2

__all__ = [
    "add",
    "add_noise",
    "assign",
    "clip",
    "copy_from",
    "freeze",
    "interpolate",
    "layer",
    "prune",
    "quantize",
    "reinitialize",
    "replace_head",
    "scale",
    "set_trainable",
    "task_vector",
    "unfreeze",
]

# --- helpers ----------------------------------------------------------------


def _json_value(value: Any, where: str) -> Any:
    """Turn numpy scalars/arrays and tuples into what `Struct.update` takes."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"Received a non-string key {key!r} in {where}, expected string keys.")
        return {key: _json_value(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"Received an unsupported value in {where}, expected JSON-like values (None, bool, "
        f"numbers, strings, lists and dicts of them). Received: {type(value).__name__}"
    )


def _struct(config: Mapping[str, Any], what: str) -> struct_pb2.Struct | None:
    if not config:
        return None
    struct = struct_pb2.Struct()
    struct.update(_json_value(config, what))
    return struct


# --- value edits --------------------------------------------------------------


def assign(variable: str, value: np.ndarray, *, begin: Sequence[int] | None = None) -> edits_pb2.Edit:
    """Overwrite one variable, whole or a slice of it.

    Args:
        variable: The variable path, for example `"dense/kernel"`.
        value: The values, in the variable's dtype (mind that `np.asarray` of
            Python floats gives float64). Without `begin`, the variable's
            exact shape; with `begin`, the shape of the slice.
        begin: Start offsets of the slice, one per dimension; the slice spans
            `value.shape` from there and must fit in the variable.

    Returns:
        The `Edit`, with `assign` set.

    Example:

    ```python
    edit = edits.assign("predictions/bias", np.zeros(5, np.float32))
    row = edits.assign("predictions/kernel", np.ones((1, 5), np.float32), begin=[0, 0])
    ```
    """
    array = np.asarray(value)
    try:
        tensor = wire.tensor_to_proto(array)
    except ValueError as exc:
        raise ValueError(f"Received an unsupported array for `value`: {exc}") from None
    op = edits_pb2.AssignOp(variable=_checks.name("variable", variable, "dense/kernel"), value=tensor)
    if begin is not None:
        offsets = [_checks.integer(f"begin[{i}]", b, 0, INT64_MAX) for i, b in enumerate(begin)]
        if len(offsets) != array.ndim:
            raise ValueError(
                f"Received {len(offsets)} offsets in `begin`, expected one per dimension of "
                f"`value` ({array.ndim}). Received: begin={list(begin)}, value.shape={array.shape}"
            )
        op.begin.extend(offsets)
    return edits_pb2.Edit(assign=op)


def scale(selector: SelectorLike, factor: float) -> edits_pb2.Edit:
    """Multiply the selected variables by `factor`: `W = factor * W`.

    Args:
        selector: Which variables.
        factor: The factor; finite.

    Returns:
        The `Edit`, with `scale` set.

    Example:

    ```python
    edit = edits.scale("predictions/*", 0.5)
    ```
    """
    return edits_pb2.Edit(
        scale=edits_pb2.ScaleOp(selector=required_selector(selector), factor=_checks.number("factor", factor))
    )


def add(selector: SelectorLike, value: float) -> edits_pb2.Edit:
    """Add a constant to the selected variables: `W = W + value`.

    Args:
        selector: Which variables.
        value: The constant; finite.

    Returns:
        The `Edit`, with `add` set.

    Example:

    ```python
    edit = edits.add(weightsmith.Selector(kinds="bias"), 0.01)
    ```
    """
    return edits_pb2.Edit(
        add=edits_pb2.AddOp(selector=required_selector(selector), value=_checks.number("value", value))
    )


def add_noise(
    selector: SelectorLike, *, stddev: float, mean: float = 0.0, seed: int | None = None
) -> edits_pb2.Edit:
    """Add Gaussian noise element-wise: `W = W + N(mean, stddev^2)`.

    Args:
        selector: Which variables.
        stddev: Standard deviation of the noise, at least 0.
        mean: Mean of the noise.
        seed: The same seed, selection and shapes give the same noise; the
            server draws one when None and reports it in the `EditResult`.

    Returns:
        The `Edit`, with `add_noise` set.

    Example:

    ```python
    edit = edits.add_noise("*/kernel", stddev=1e-3, seed=0)
    ```
    """
    stddev = _checks.number("stddev", stddev)
    if stddev < 0:
        raise ValueError(f"Received a negative `stddev`, expected at least 0. Received: stddev={stddev}")
    op = edits_pb2.AddNoiseOp(
        selector=required_selector(selector), mean=_checks.number("mean", mean), stddev=stddev
    )
    if seed is not None:
        op.seed = _checks.seed(seed)
    return edits_pb2.Edit(add_noise=op)


def clip(selector: SelectorLike, *, min: float | None = None, max: float | None = None) -> edits_pb2.Edit:
    """Clip the selected variables to `[min, max]`.

    Args:
        selector: Which variables.
        min: Lower bound; unbounded when None.
        max: Upper bound; unbounded when None. At least `min`.

    Returns:
        The `Edit`, with `clip` set (only the given bounds are present).

    Example:

    ```python
    edit = edits.clip("*/kernel", min=-0.5, max=0.5)
    ```
    """
    if min is None and max is None:
        raise ValueError("Received neither `min` nor `max`, expected at least one bound to clip to.")
    op = edits_pb2.ClipOp(selector=required_selector(selector))
    if min is not None:
        op.min = _checks.number("min", min)
    if max is not None:
        op.max = _checks.number("max", max)
    if min is not None and max is not None and op.min > op.max:
        raise ValueError(f"Received `min` above `max`, expected min <= max. Received: min={min}, max={max}")
    return edits_pb2.Edit(clip=op)


def reinitialize(
    selector: SelectorLike, initializer: str, *, seed: int | None = None, **config: Any
) -> edits_pb2.Edit:
    """Replace the selected variables with a fresh draw of a Keras initializer.

    Args:
        selector: Which variables.
        initializer: A builtin Keras initializer name, for example
            `"glorot_uniform"`, `"he_normal"`, `"RandomNormal"`, `"zeros"`.
        seed: Each selected variable draws with `seed + i` for its position
            `i` in the selection, so results are reproducible.
        **config: The initializer's arguments, for example `stddev=0.01`;
            JSON-like values (they travel as a `google.protobuf.Struct`, so
            numbers arrive as floats).

    Returns:
        The `Edit`, with `reinitialize` set.

    Example:

    ```python
    edit = edits.reinitialize("predictions/kernel", "random_normal", seed=0, stddev=0.01)
    ```
    """
    op = edits_pb2.ReinitializeOp(
        selector=required_selector(selector),
        initializer=_checks.name("initializer", initializer, "glorot_uniform"),
        config=_struct(config, "the initializer config"),
    )
    if seed is not None:
        op.seed = _checks.seed(seed)
    return edits_pb2.Edit(reinitialize=op)


def set_trainable(selector: SelectorLike, trainable: bool) -> edits_pb2.Edit:
    """Set whether the layers owning the selected variables train.

    Args:
        selector: Which variables; their layers are changed.
        trainable: True to unfreeze, False to freeze.

    Returns:
        The `Edit`, with `set_trainable` set.

    Example:

    ```python
    edit = edits.set_trainable(weightsmith.Selector(layers=["predictions"]), True)
    ```
    """
    if not isinstance(trainable, (bool, np.bool_)):
        raise TypeError(f"Received a non-bool `trainable`, expected True or False. Received: {trainable!r}")
    return edits_pb2.Edit(
        set_trainable=edits_pb2.SetTrainableOp(
            selector=required_selector(selector), trainable=bool(trainable)
        )
    )


def freeze(selector: SelectorLike) -> edits_pb2.Edit:
    """Freeze the layers owning the selected variables: `set_trainable(selector, False)`.

    Args:
        selector: Which variables; their layers are frozen.

    Returns:
        The `Edit`, with `set_trainable` set.

    Example:

    ```python
    edit = edits.freeze(weightsmith.Selector(layer_range=(None, -1)))
    ```
    """
    return set_trainable(selector, False)


def unfreeze(selector: SelectorLike) -> edits_pb2.Edit:
    """Unfreeze the layers owning the selected variables: `set_trainable(selector, True)`.

    Args:
        selector: Which variables; their layers are unfrozen.

    Returns:
        The `Edit`, with `set_trainable` set.

    Example:

    ```python
    edit = edits.unfreeze(weightsmith.Selector(layer_range=(-3, None)))
    ```
    """
    return set_trainable(selector, True)


# --- compression --------------------------------------------------------------


def prune(
    selector: SelectorLike,
    sparsity: float,
    *,
    scope: str = "per_tensor",
    granularity: str = "element",
    norm: str = "l1",
) -> edits_pb2.Edit:
    """Magnitude pruning: zero the smallest weights until `sparsity` of them are zero.

    Args:
        selector: Which variables.
        sparsity: Target fraction of zeroed elements (or channels), in [0, 1).
        scope: `"per_tensor"` (each tensor reaches the target on its own) or
            `"global"` (the smallest magnitudes across all selected tensors).
        granularity: `"element"` or `"output_channel"` (whole channels of the
            last axis, ranked by `norm`).
        norm: `"l1"` or `"l2"`, ranking output channels.

    Returns:
        The `Edit`, with `prune` set.

    Example:

    ```python
    edit = edits.prune("*/kernel", 0.5, scope="global")
    ```
    """
    sparsity = _checks.number("sparsity", sparsity)
    if not 0 <= sparsity < 1:
        raise ValueError(
            f"Received an invalid `sparsity`, expected a fraction in [0, 1). Received: sparsity={sparsity}"
        )
    return edits_pb2.Edit(
        prune=edits_pb2.PruneOp(
            selector=required_selector(selector),
            sparsity=sparsity,
            scope=_checks.enum_choice("scope", scope, edits_pb2.PruneScope),
            granularity=_checks.enum_choice("granularity", granularity, edits_pb2.PruneGranularity),
            norm=_checks.enum_choice("norm", norm, edits_pb2.PruneNorm),
        )
    )


def quantize(selector: SelectorLike, *, bits: int = 8, per_channel: bool = True) -> edits_pb2.Edit:
    """Symmetric fake quantization; the weights stay float.

    `W = round(W / s) * s` with `s = max|W| / (2^(bits-1) - 1)`, per output
    channel (the last axis) or per tensor.

    Args:
        selector: Which variables.
        bits: Bits, 2 to 16.
        per_channel: One scale per output channel; False for one per tensor.

    Returns:
        The `Edit`, with `quantize` set.

    Example:

    ```python
    edit = edits.quantize("*/kernel", bits=4, per_channel=False)
    ```
    """
    granularity = (
        edits_pb2.QUANTIZE_GRANULARITY_PER_OUTPUT_CHANNEL
        if per_channel
        else edits_pb2.QUANTIZE_GRANULARITY_PER_TENSOR
    )
    return edits_pb2.Edit(
        quantize=edits_pb2.QuantizeOp(
            selector=required_selector(selector),
            bits=_checks.integer("bits", bits, 2, 16),
            granularity=granularity,
        )
    )


# --- merging ------------------------------------------------------------------


def interpolate(
    other_model_id: str,
    alpha: float,
    *,
    selector: SelectorLike | None = None,
    other_revision: int = 0,
) -> edits_pb2.Edit:
    """Blend with another model of the same architecture: `W = (1 - alpha) * W + alpha * W_other`.

    Args:
        other_model_id: The other resident model's id.
        alpha: The blend factor; 0 keeps this model, 1 takes the other's.
        selector: Which variables; all when None.
        other_revision: The other model's revision; 0 for its current one.

    Returns:
        The `Edit`, with `interpolate` set.

    Example:

    ```python
    edit = edits.interpolate("tiny-finetuned", 0.5)
    ```
    """
    return edits_pb2.Edit(
        interpolate=edits_pb2.InterpolateOp(
            selector=selector_to_proto(selector),
            other_model_id=_checks.name("other_model_id", other_model_id, "tiny-finetuned"),
            alpha=_checks.number("alpha", alpha),
            other_revision=_checks.integer("other_revision", other_revision, 0, INT64_MAX),
        )
    )


def task_vector(
    base_model_id: str,
    tuned_model_id: str,
    scale: float,
    *,
    selector: SelectorLike | None = None,
) -> edits_pb2.Edit:
    """Add a scaled task vector (task arithmetic): `W = W + scale * (W_tuned - W_base)`.

    Args:
        base_model_id: The model the task was tuned from.
        tuned_model_id: The tuned model.
        scale: The factor lambda; negative values remove a task.
        selector: Which variables; all when None.

    Returns:
        The `Edit`, with `task_vector` set.

    Example:

    ```python
    edit = edits.task_vector("base", "base-task-a", 0.8)
    ```
    """
    return edits_pb2.Edit(
        task_vector=edits_pb2.TaskVectorOp(
            selector=selector_to_proto(selector),
            base_model_id=_checks.name("base_model_id", base_model_id, "base"),
            tuned_model_id=_checks.name("tuned_model_id", tuned_model_id, "base-task-a"),
            scale=_checks.number("scale", scale),
        )
    )


def copy_from(
    source_model_id: str, *, selector: SelectorLike | None = None, source_revision: int = 0
) -> edits_pb2.Edit:
    """Copy variables from another model with variables of the same path, shape and dtype.

    Args:
        source_model_id: The source model's id.
        selector: Which variables of this model; all that the source also has
            when None.
        source_revision: The source's revision; 0 for its current one.

    Returns:
        The `Edit`, with `copy_from` set.

    Example:

    ```python
    edit = edits.copy_from("teacher", selector="block1_*", source_revision=3)
    ```
    """
    return edits_pb2.Edit(
        copy_from=edits_pb2.CopyFromOp(
            selector=selector_to_proto(selector),
            source_model_id=_checks.name("source_model_id", source_model_id, "teacher"),
            source_revision=_checks.integer("source_revision", source_revision, 0, INT64_MAX),
        )
    )


# --- surgery ------------------------------------------------------------------


def layer(class_name: str, **config: Any) -> edits_pb2.LayerSpec:
    """Describe a builtin Keras layer to append with `replace_head`.

    Args:
        class_name: The class name in `keras.layers`, for example `"Dense"`,
            `"GlobalAveragePooling2D"`, `"Dropout"`.
        **config: The constructor arguments, for example `units=10`; JSON-like
            values (they travel as a `google.protobuf.Struct`, so numbers
            arrive as floats).

    Returns:
        The `LayerSpec`.

    Example:

    ```python
    spec = edits.layer("Dense", units=10, activation="softmax")
    ```
    """
    return edits_pb2.LayerSpec(
        class_name=_checks.name("class_name", class_name, "Dense"),
        config=_struct(config, f"the {class_name} config"),
    )


def replace_head(
    cut_at_layer: str, layers: Sequence[edits_pb2.LayerSpec], *, seed: int | None = None
) -> edits_pb2.Edit:
    """Keep the model up to a layer and append new, freshly initialized layers.

    The layers kept keep their weights; the new layers' variables are new
    paths. The model is rebuilt, so this changes the architecture.

    Args:
        cut_at_layer: Name of the last layer to keep.
        layers: Layers to append, in order, built with `layer`; at least one.
        seed: Seed for the new layers' initialization.

    Returns:
        The `Edit`, with `replace_head` set.

    Example:

    ```python
    edit = edits.replace_head(
        "global_average_pooling2d",
        [edits.layer("Dropout", rate=0.2), edits.layer("Dense", units=3, activation="softmax")],
        seed=0,
    )
    ```
    """
    if isinstance(layers, edits_pb2.LayerSpec):
        layers = [layers]
    specs = list(layers)
    if not specs:
        raise ValueError("Received no `layers`, expected at least one `edits.layer(...)` to append.")
    for i, spec in enumerate(specs):
        if not isinstance(spec, edits_pb2.LayerSpec):
            raise TypeError(
                f"Received an invalid `layers[{i}]`, expected a LayerSpec built with `edits.layer(...)`. "
                f"Received: {spec!r}"
            )
    op = edits_pb2.ReplaceHeadOp(
        cut_at_layer=_checks.name("cut_at_layer", cut_at_layer, "avg_pool"), layers=specs
    )
    if seed is not None:
        op.seed = _checks.seed(seed)
    return edits_pb2.Edit(replace_head=op)
