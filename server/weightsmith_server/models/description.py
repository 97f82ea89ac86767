"""What GetModel and ListModels report about a model, resident or not.

A model that is not resident is described without TensorFlow: its
variables, parameter count and bytes come from the manifest, and its
inputs, outputs and layers from a small signature file (`signature.json`
in the model's folder) written when the model was last built with that
architecture. The file is a cache, keyed by the revision that set the
architecture: when it is missing, stale or unreadable the host builds the
model on the CPU once to describe it, and writes the file again.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from weightsmith_server.manifests import Manifest, VariableRecord
from weightsmith_server.models.batching import BatchingPolicy
from weightsmith_server.models.resident import ModelState, ResidentModel
from weightsmith_server.revisions.record import RevisionRecord
from weightsmith_server.store import ModelRecord
from weightsmith_server.tensor_spec import TensorSpecInfo

log = logging.getLogger(__name__)

SIGNATURE_FILE = "signature.json"


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
    # The Predict batching policy in effect (models/serving.py); filled in by the operations layer.
    batching: BatchingPolicy | None = None


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


@dataclass(frozen=True)
class Signature:
    """What the architecture alone decides of a description: inputs, outputs and layers."""

    inputs: list[TensorSpecInfo]
    outputs: list[TensorSpecInfo]
    layers: list[LayerInfo]

    def to_json(self) -> dict[str, Any]:
        def specs(items: list[TensorSpecInfo]) -> list[dict[str, Any]]:
            return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in items]

        return {
            "inputs": specs(self.inputs),
            "outputs": specs(self.outputs),
            "layers": [[layer.name, layer.class_name, layer.trainable] for layer in self.layers],
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Signature:
        def specs(items: list[dict[str, Any]]) -> list[TensorSpecInfo]:
            return [
                TensorSpecInfo(str(t["name"]), str(t["dtype"]), tuple(int(d) for d in t["shape"]))
                for t in items
            ]

        return cls(
            specs(raw["inputs"]),
            specs(raw["outputs"]),
            [LayerInfo(i, str(n), str(c), bool(t)) for i, (n, c, t) in enumerate(raw["layers"])],
        )


def signature_of(model: Any) -> Signature:
    """A built Keras model's inputs, outputs and layers."""
    return Signature(
        inputs=[_spec(t, t.name) for t in model.inputs],
        outputs=[_spec(t, n) for t, n in zip(model.outputs, output_names(model), strict=True)],
        layers=[
            LayerInfo(i, layer.name, type(layer).__name__, bool(layer.trainable))
            for i, layer in enumerate(model.layers)
        ],
    )


def read_signature(model_dir: Path, architecture_revision: int) -> Signature | None:
    """The cached signature of the architecture set at `architecture_revision`; None when not cached."""
    try:
        with open(model_dir / SIGNATURE_FILE, encoding="utf-8") as handle:
            raw = json.load(handle).get(str(architecture_revision))
        return None if raw is None else Signature.from_json(raw)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_signature(model_dir: Path, architecture_revision: int, signature: Signature) -> None:
    """Cache a signature next to the model's revisions (best effort: a cache, rebuilt when lost).

    Written to a temporary file then renamed, so readers see the old file or the new one;
    not fsynced: a lost or torn file only costs one build on the CPU at the next start.
    """
    path = model_dir / SIGNATURE_FILE
    try:
        try:
            with open(path, encoding="utf-8") as handle:
                cached = json.load(handle)
            if not isinstance(cached, dict):
                cached = {}
        except (OSError, ValueError):
            cached = {}
        cached[str(architecture_revision)] = signature.to_json()
        temporary = model_dir / f".signature-{uuid.uuid4().hex}.json"  # a scratch name start-up removes
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(cached, handle, separators=(",", ":"))
        os.replace(temporary, path)
    except OSError:  # e.g. the model was deleted meanwhile
        log.debug("signature of %s not cached", model_dir.name, exc_info=True)


def describe_stored(
    record: ModelRecord, revision: RevisionRecord, manifest: Manifest, signature: Signature | None
) -> ModelInfo:
    """A stored model that is not resident, described without building it.

    Without a signature its inputs, outputs and layers are empty.
    """
    return _info(record, revision, "", manifest, signature or Signature([], [], []), resident=False)


def describe(resident: ResidentModel) -> ModelInfo:
    """The resident model as it stands at its committed revision."""
    return describe_state(resident.record, resident.device, resident.state)


def describe_state(
    record: ModelRecord, device: str, state: ModelState, *, resident: bool = True
) -> ModelInfo:
    """A model's description from its record and a committed state (`device` "" when not resident)."""
    return _info(
        record, state.revision, device, state.manifest, signature_of(state.keras_model), resident=resident
    )


def _info(
    record: ModelRecord,
    revision: RevisionRecord,
    device: str,
    manifest: Manifest,
    signature: Signature,
    *,
    resident: bool,
) -> ModelInfo:
    """The description both paths give: record, revision, manifest and signature."""
    variables = manifest.variables
    return ModelInfo(
        model_id=record.model_id,
        revision=revision.revision,
        architecture=record.architecture,
        source=record.source,
        device=device,
        parameter_count=sum(int(np.prod(v.shape, dtype=np.int64)) for v in variables),
        weight_bytes=sum(v.nbytes for v in variables),
        inputs=signature.inputs,
        outputs=signature.outputs,
        layers=signature.layers,
        variables=variables,
        create_time=record.create_time,
        update_time=revision.create_time,
        resident=resident,
    )
