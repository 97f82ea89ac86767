"""Building the unary requests from a method's arguments, and decoding `Predict`.

Pure functions: they check the arguments (`ValueError`/`TypeError` before
anything is sent) and return the request message. The streams' messages are
built in `_streams` and `_uploads`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np

from weightsmith import _checks, wire
from weightsmith._datasets import FeatureSpecLike, dataset_source
from weightsmith._streams import malformed, weight_chunk_size
from weightsmith._types import PredictResult, SelectorLike, selector_to_proto
from weightsmith.v1 import (
    edits_pb2,
    job_pb2,
    model_pb2,
    model_service_pb2,
    tensor_pb2,
    training_service_pb2,
    weight_service_pb2,
)

PredictInputs: TypeAlias = np.ndarray | Sequence[np.ndarray] | Mapping[str, np.ndarray]
# A Predict batching policy: the message, or a dict with `max_batch_size` and/or
# `max_wait_seconds` (a None value: the server's default).
BatchingLike: TypeAlias = model_pb2.BatchingPolicy | Mapping[str, float | None]
_BATCHING_FIELDS = ("max_batch_size", "max_wait_seconds")

_POOLING = {
    None: model_service_pb2.POOLING_UNSPECIFIED,
    "avg": model_service_pb2.POOLING_AVG,
    "max": model_service_pb2.POOLING_MAX,
}

# --- ModelService -------------------------------------------------------------------


def batching_policy(batching: BatchingLike) -> tuple[model_pb2.BatchingPolicy, list[str]]:
    """The policy message and the fields it names (a dict's keys; a message's set fields).

    Only types are checked here; the server checks the ranges (`max_batch_size`
    1 to 65536, `max_wait_seconds` 0 to 1) and names the field it refuses.
    """
    if isinstance(batching, model_pb2.BatchingPolicy):
        return batching, [f for f in _BATCHING_FIELDS if batching.HasField(f)]
    if not isinstance(batching, Mapping):
        raise TypeError(
            f"Received an invalid `batching`, expected a BatchingPolicy or a dict with "
            f"{' and/or '.join(_BATCHING_FIELDS)}. Received: {type(batching).__name__}"
        )
    unknown = sorted(set(batching) - set(_BATCHING_FIELDS))
    if unknown:
        raise ValueError(
            f"Received unknown `batching` keys {unknown}, expected {' and/or '.join(_BATCHING_FIELDS)}."
        )
    policy = model_pb2.BatchingPolicy()
    size, wait = batching.get("max_batch_size"), batching.get("max_wait_seconds")
    if size is not None:
        policy.max_batch_size = _checks.integer("batching['max_batch_size']", size, 1, _checks.INT32_MAX)
    if wait is not None:
        policy.max_wait_seconds = _checks.number("batching['max_wait_seconds']", wait)
    return policy, [f for f in _BATCHING_FIELDS if f in batching]


def update_model(model_id: str, batching: BatchingLike) -> model_service_pb2.UpdateModelRequest:
    """An UpdateModel request whose mask names exactly the fields given (None values: back to default)."""
    policy, fields = batching_policy(batching)
    if not fields:
        raise ValueError(
            "Received a `batching` with no field, expected max_batch_size and/or max_wait_seconds."
        )
    request = model_service_pb2.UpdateModelRequest(model_id=model_id, batching=policy)
    request.update_mask.paths.extend(f"batching.{f}" for f in fields)
    return request


def _keras_config_json(keras_config: str | Mapping[str, Any], catalog_options: Mapping[str, bool]) -> str:
    given = [name for name, is_set in catalog_options.items() if is_set]
    if given:
        raise ValueError(
            f"Received catalog options {given} with `keras_config`, expected them "
            f"only with `architecture`; put them in the Keras config instead."
        )
    if isinstance(keras_config, Mapping):
        return json.dumps(keras_config)
    if isinstance(keras_config, str) and keras_config:
        return keras_config
    raise TypeError(
        f"Received an invalid `keras_config`, expected a non-empty JSON string or "
        f"a dict. Received: {type(keras_config).__name__}"
    )


def create_model(
    model_id: str,
    *,
    architecture: str | None,
    include_top: bool | None,
    input_shape: Sequence[int] | None,
    classes: int,
    pooling: str | None,
    weights_file: str,
    classifier_activation: str,
    keras_config: str | Mapping[str, Any] | None,
    seed: int | None,
    message: str,
    batching: BatchingLike | None = None,
) -> model_service_pb2.CreateModelRequest:
    """Build a CreateModel request from exactly one of a catalog architecture or a Keras config."""
    if (architecture is None) == (keras_config is None):
        received = "both" if architecture is not None else "neither"
        raise ValueError(
            f"Received {received} of `architecture` and `keras_config`, expected exactly "
            f"one: a keras.applications name such as 'ResNet50', or a Keras model config "
            f"(`model.to_json()` or its dict)."
        )
    request = model_service_pb2.CreateModelRequest(model_id=model_id, message=message)
    if batching is not None:
        request.batching.CopyFrom(batching_policy(batching)[0])
    if seed is not None:
        request.seed = _checks.integer("seed", seed, _checks.INT64_MIN, _checks.INT64_MAX)
    if keras_config is not None:
        catalog_options = {
            "include_top": include_top is not None,
            "input_shape": input_shape is not None,
            "classes": classes != 0,
            "pooling": pooling is not None,
            "weights_file": bool(weights_file),
            "classifier_activation": bool(classifier_activation),
        }
        request.keras_config_json = _keras_config_json(keras_config, catalog_options)
        return request
    if not isinstance(architecture, str) or not architecture:
        raise ValueError(
            f"Received an invalid `architecture`, expected a keras.applications "
            f"constructor name such as 'ResNet50'. Received: architecture={architecture!r}"
        )
    if pooling not in _POOLING:
        raise ValueError(
            f"Received an invalid `pooling`, expected 'avg', 'max' or None. Received: pooling={pooling!r}"
        )
    catalog = request.catalog
    catalog.name = architecture
    if include_top is not None:
        catalog.include_top = bool(include_top)
    if input_shape is not None:
        catalog.input_shape.extend(
            _checks.integer(f"input_shape[{i}]", d, 1) for i, d in enumerate(input_shape)
        )
    catalog.classes = _checks.integer("classes", classes, 0, _checks.INT32_MAX)
    catalog.pooling = _POOLING[pooling]
    catalog.weights_file = weights_file
    catalog.classifier_activation = classifier_activation
    return request


def export_model(model_id: str, revision: int, format: str) -> model_service_pb2.ExportModelRequest:
    """Build an ExportModel request; `format` is `"keras"` or `"saved_model"`."""
    return model_service_pb2.ExportModelRequest(
        model_id=model_id,
        revision=_checks.integer("revision", revision, 0),
        format=_checks.enum_choice("format", format, model_service_pb2.ExportFormat),
    )


def predict(
    model_id: str, inputs: PredictInputs, output_layers: Sequence[str]
) -> model_service_pb2.PredictRequest:
    """Build a Predict request from one array, a positional list of them, or a dict by input name."""
    if isinstance(inputs, Mapping):
        named = [(str(name), value, f"inputs[{name!r}]") for name, value in inputs.items()]
    elif isinstance(inputs, (list, tuple)):
        named = [("", value, f"inputs[{i}]") for i, value in enumerate(inputs)]
    else:
        named = [("", inputs, "inputs")]
    if not named:
        raise ValueError(
            "Received no inputs, expected one array per model input (an array, a list "
            "of arrays in positional order, or a dict keyed by input name)."
        )
    request = model_service_pb2.PredictRequest(
        model_id=model_id,
        output_layers=(output_layers,) if isinstance(output_layers, str) else output_layers,
    )
    for name, value, label in named:
        try:
            tensor = wire.tensor_to_proto(np.asarray(value))
        except ValueError as exc:
            raise ValueError(f"Received an unsupported array for {label}: {exc}") from None
        request.inputs.append(tensor_pb2.NamedTensor(name=name, tensor=tensor))
    return request


def _decode_tensors(tensors: Sequence[tensor_pb2.NamedTensor], kind: str) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for i, named in enumerate(tensors):
        try:
            arrays[named.name or f"{kind}_{i}"] = wire.tensor_from_proto(named.tensor)
        except ValueError as exc:
            raise malformed(f"Predict {kind} {named.name or i!r}", exc) from exc
    return arrays


def predict_result(response: model_service_pb2.PredictResponse) -> PredictResult:
    """Decode a Predict response; unnamed outputs are keyed `output_0`, `output_1`, ..."""
    return PredictResult(
        outputs=_decode_tensors(response.outputs, "output"),
        layer_outputs=_decode_tensors(response.layer_outputs, "layer_output"),
        revision=response.revision,
    )


def evaluate(
    model_id: str,
    dataset_id: str,
    *,
    loss: str,
    metrics: Sequence[str],
    batch_size: int,
    revision: int,
    split: str,
    rescale: float | None,
) -> model_service_pb2.EvaluateRequest:
    """Build an Evaluate request; `split` is `"train"` or `"validation"`."""
    request = model_service_pb2.EvaluateRequest(
        model_id=model_id,
        dataset_id=dataset_id,
        batch_size=_checks.integer("batch_size", batch_size, 0, _checks.INT32_MAX),
        revision=_checks.integer("revision", revision, 0),
        loss=_checks.loss(loss),
        metrics=_checks.strings("metrics", metrics),
        split=_checks.enum_choice("split", split, model_service_pb2.DatasetSplit),
    )
    if rescale is not None:
        request.rescale = _checks.number("rescale", rescale)
    return request


# --- WeightService ------------------------------------------------------------------


def read_weights(
    model_id: str, selector: SelectorLike | None, revision: int, chunk_size_bytes: int
) -> weight_service_pb2.ReadWeightsRequest:
    """Build a ReadWeights request; every variable when `selector` is None."""
    return weight_service_pb2.ReadWeightsRequest(
        model_id=model_id,
        selector=selector_to_proto(selector),
        revision=_checks.integer("revision", revision, 0),
        chunk_size_bytes=weight_chunk_size(chunk_size_bytes),
    )


def _check_edits(edits: Sequence[edits_pb2.Edit]) -> None:
    if isinstance(edits, edits_pb2.Edit) or not isinstance(edits, Sequence):
        raise TypeError(
            f"Received an invalid `edits`, expected a list of `Edit`s built with "
            f"`weightsmith.edits`. Received: {type(edits).__name__}"
        )
    if not edits:
        raise ValueError("Received no edits, expected at least one `weightsmith.edits` operation.")
    for i, edit in enumerate(edits):
        if not isinstance(edit, edits_pb2.Edit):
            raise TypeError(
                f"Received an invalid `edits[{i}]`, expected an `Edit` built with "
                f"`weightsmith.edits`, such as `edits.scale('*/kernel', 0.5)`. Received: {edit!r}"
            )
        if edit.WhichOneof("op") is None:
            raise ValueError(f"Received an empty `edits[{i}]`, expected an `Edit` with its `op` set.")


def apply_edits(
    model_id: str,
    edits: Sequence[edits_pb2.Edit],
    *,
    expected_revision: int | None,
    message: str,
    dry_run: bool,
) -> weight_service_pb2.ApplyEditsRequest:
    """Build an ApplyEdits request from at least one `weightsmith.edits` operation."""
    _check_edits(edits)
    request = weight_service_pb2.ApplyEditsRequest(
        model_id=model_id, edits=edits, message=message, dry_run=bool(dry_run)
    )
    if expected_revision is not None:
        request.expected_revision = _checks.integer("expected_revision", expected_revision, 1)
    return request


def diff_revisions(
    model_id: str, from_revision: int, to_revision: int
) -> weight_service_pb2.DiffRevisionsRequest:
    """Build a DiffRevisions request; `to_revision` 0 is the current one."""
    return weight_service_pb2.DiffRevisionsRequest(
        model_id=model_id,
        from_revision=_checks.integer("from_revision", from_revision, 1),
        to_revision=_checks.integer("to_revision", to_revision, 0),
    )


def revert_model(
    model_id: str, to_revision: int, *, expected_revision: int | None, message: str
) -> weight_service_pb2.RevertModelRequest:
    """Build a RevertModel request."""
    request = weight_service_pb2.RevertModelRequest(
        model_id=model_id, to_revision=_checks.integer("to_revision", to_revision, 1), message=message
    )
    if expected_revision is not None:
        request.expected_revision = _checks.integer("expected_revision", expected_revision, 1)
    return request


# --- TrainingService ----------------------------------------------------------------


def create_dataset(
    uri: str,
    dataset_id: str,
    *,
    format: str,
    tfrecord_features: FeatureSpecLike | None,
    tfrecord_labels: FeatureSpecLike | None,
    image_size: Sequence[int] | None,
    channels: int,
) -> training_service_pb2.CreateDatasetRequest:
    """Build a CreateDataset request for a file the server reads itself."""
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str) or not uri:
        raise ValueError(
            f"Received an invalid `uri`, expected a path or file:// URI under one of the server's "
            f"dataset roots. Received: uri={uri!r}"
        )
    return training_service_pb2.CreateDatasetRequest(
        dataset_id=dataset_id,
        uri=uri,
        source=dataset_source(
            format,
            tfrecord_features=tfrecord_features,
            tfrecord_labels=tfrecord_labels,
            image_size=image_size,
            channels=channels,
        ),
    )


def create_job(spec: job_pb2.JobSpec, job_id: str) -> training_service_pb2.CreateJobRequest:
    """Build a CreateJob request from a `weightsmith.jobs.spec`."""
    _checks.instance("spec", spec, job_pb2.JobSpec, "weightsmith.jobs.spec")
    return training_service_pb2.CreateJobRequest(job_id=job_id, spec=spec)


def list_job_events(
    job_id: str, after_sequence: int, page_size: int, page_token: str
) -> training_service_pb2.ListJobEventsRequest:
    """Build a ListJobEvents request."""
    return training_service_pb2.ListJobEventsRequest(
        job_id=job_id,
        after_sequence=_checks.integer("after_sequence", after_sequence, 0),
        page_size=page_size,
        page_token=page_token,
    )
