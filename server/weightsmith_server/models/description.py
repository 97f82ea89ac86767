"""What GetModel and ListModels report about a model, resident or not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from weightsmith_server.models.resident import ModelState, ResidentModel
from weightsmith_server.store import ModelRecord, VariableRecord
from weightsmith_server.tensor_spec import TensorSpecInfo


@dataclass(frozen=True)
class LayerInfo:
    """One layer: position, name, Keras class and whether it trains."""

    index: int
    name: str
    class_name: str
    trainable: bool


@dataclass(frozen=True)
class ModelInfo:
    """Everything GetModel reports."""

    model_id: str
    revision: int
    architecture: str
    source: str
    device: str
    parameter_count: int
    weight_bytes: int
    inputs: list[TensorSpecInfo]
    outputs: list[TensorSpecInfo]
    layers: list[LayerInfo]
    variables: tuple[VariableRecord, ...]
    create_time: str
    update_time: str
    # False for a model unloaded under the memory budget (its `device` is then empty).
    resident: bool = True


def _spec(tensor: Any, name: str) -> TensorSpecInfo:
    return TensorSpecInfo(
        name=name,
        dtype=str(tensor.dtype),
        shape=tuple(-1 if d is None else int(d) for d in tensor.shape),
    )


def output_names(model: Any) -> list[str]:
    """Functional models name outputs after their layers; a Sequential's is its last layer."""
    names = list(getattr(model, "output_names", None) or [model.layers[-1].name])
    return names if len(names) == len(model.outputs) else [f"output_{i}" for i in range(len(model.outputs))]


def describe(resident: ResidentModel) -> ModelInfo:
    """The resident model as it stands at its committed revision."""
    return describe_state(resident.record, resident.device, resident.state)


def describe_state(
    record: ModelRecord, device: str, state: ModelState, *, resident: bool = True
) -> ModelInfo:
    """A model's description from its record and a committed state (`device` "" when not resident)."""
    model = state.keras_model
    variables = state.manifest.variables
    return ModelInfo(
        model_id=record.model_id,
        revision=state.revision.revision,
        architecture=record.architecture,
        source=record.source,
        device=device,
        parameter_count=sum(int(np.prod(v.shape, dtype=np.int64)) for v in variables),
        weight_bytes=sum(v.nbytes for v in variables),
        inputs=[_spec(t, t.name) for t in model.inputs],
        outputs=[_spec(t, n) for t, n in zip(model.outputs, output_names(model), strict=True)],
        layers=[
            LayerInfo(i, layer.name, type(layer).__name__, bool(layer.trainable))
            for i, layer in enumerate(model.layers)
        ],
        variables=variables,
        create_time=record.create_time,
        update_time=state.revision.create_time,
        resident=resident,
    )
