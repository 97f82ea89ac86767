"""Domain objects to protos and back: the only translation the servicers need."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from weightsmith._wire import ChunkView
from weightsmith.v1 import (
    edits_pb2,
    model_pb2,
    model_service_pb2,
    selector_pb2,
    tensor_pb2,
    weight_service_pb2,
)
from weightsmith_server import architecture
from weightsmith_server.edits.arithmetic import Add, AddNoise, Assign, Clip, Scale
from weightsmith_server.edits.base import EditOp
from weightsmith_server.edits.context import EditReport
from weightsmith_server.edits.initializers import Reinitialize
from weightsmith_server.edits.merging import CopyFrom, Interpolate, TaskVector
from weightsmith_server.edits.pruning import Prune
from weightsmith_server.edits.quantization import Quantize
from weightsmith_server.edits.surgery import LayerToAppend, ReplaceHead, SetTrainable
from weightsmith_server.errors import InvalidArgument, WeightsmithError
from weightsmith_server.registry import ModelInfo, TensorSpecInfo
from weightsmith_server.revisions import VariableDelta
from weightsmith_server.selectors import Selector
from weightsmith_server.store import RevisionRecord
from weightsmith_server.tensors import MalformedMessage, decode_tensor, wire_dtype

AUTHOR_METADATA_KEY = "weightsmith-author"

_SOURCES = {
    "catalog": model_pb2.MODEL_SOURCE_CATALOG,
    "config": model_pb2.MODEL_SOURCE_CONFIG,
    "upload": model_pb2.MODEL_SOURCE_UPLOAD,
    "job": model_pb2.MODEL_SOURCE_JOB,
}
_REVISION_KINDS = {
    "create": weight_service_pb2.REVISION_KIND_CREATE,
    "upload": weight_service_pb2.REVISION_KIND_UPLOAD,
    "write_weights": weight_service_pb2.REVISION_KIND_WRITE_WEIGHTS,
    "edit": weight_service_pb2.REVISION_KIND_EDIT,
    "revert": weight_service_pb2.REVISION_KIND_REVERT,
    "job": weight_service_pb2.REVISION_KIND_JOB,
}
_POOLING = {model_service_pb2.POOLING_AVG: "avg", model_service_pb2.POOLING_MAX: "max"}
EXPORT_FORMATS = {
    model_service_pb2.EXPORT_FORMAT_UNSPECIFIED: "keras",
    model_service_pb2.EXPORT_FORMAT_KERAS: "keras",
    model_service_pb2.EXPORT_FORMAT_SAVED_MODEL: "saved_model",
}


def author(context: grpc.aio.ServicerContext) -> str:
    """Who is calling: the `weightsmith-author` metadata, else the peer address."""
    for key, value in context.invocation_metadata() or ():
        if key == AUTHOR_METADATA_KEY and value:
            return str(value)[:200]
    return context.peer() or "unknown"


def timestamp(text: str) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(dt.datetime.fromisoformat(text.replace("Z", "+00:00")))
    return stamp


def _tensor_spec(spec: TensorSpecInfo) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(name=spec.name, dtype=wire_dtype(spec.dtype), shape=spec.shape)


def model(info: ModelInfo) -> model_pb2.Model:
    return model_pb2.Model(
        model_id=info.model_id,
        revision=info.revision,
        architecture=info.architecture,
        source=_SOURCES[info.source],
        device=info.device,
        parameter_count=info.parameter_count,
        weight_bytes=info.weight_bytes,
        inputs=[_tensor_spec(s) for s in info.inputs],
        outputs=[_tensor_spec(s) for s in info.outputs],
        layers=[
            model_pb2.Layer(
                index=layer.index, name=layer.name, class_name=layer.class_name, trainable=layer.trainable
            )
            for layer in info.layers
        ],
        variables=[
            model_pb2.Variable(
                path=v.path, dtype=wire_dtype(v.dtype), shape=v.shape, trainable=v.trainable, layer=v.layer
            )
            for v in info.variables
        ],
        create_time=timestamp(info.create_time),
        update_time=timestamp(info.update_time),
    )


def revision(record: RevisionRecord) -> weight_service_pb2.Revision:
    return weight_service_pb2.Revision(
        model_id=record.model_id,
        revision=record.revision,
        create_time=timestamp(record.create_time),
        author=record.author,
        message=record.message,
        kind=_REVISION_KINDS.get(record.kind, weight_service_pb2.REVISION_KIND_UNSPECIFIED),
        changed_variables=record.changed_variables,
        summary=record.summary,
        architecture_changed=record.architecture_changed,
        stored_bytes=record.stored_bytes,
        edits=[edit_result(e) for e in record.edits],
        reverted_to=record.reverted_to,
    )


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


def catalog_spec(message: model_service_pb2.CatalogArchitecture) -> architecture.CatalogSpec:
    return architecture.CatalogSpec(
        name=message.name,
        include_top=message.include_top if message.HasField("include_top") else True,
        input_shape=tuple(message.input_shape) or None,
        classes=message.classes or 1000,
        pooling=_POOLING.get(message.pooling),
        weights_file=message.weights_file,
        classifier_activation=message.classifier_activation or None,
    )


async def upload_chunks(
    requests: AsyncIterator[model_service_pb2.UploadModelRequest],
) -> AsyncIterator[bytes]:
    """The file bytes of an upload stream after its header."""
    async for request in requests:
        if request.WhichOneof("payload") != "chunk":
            raise InvalidArgument(
                "Received a second header; an upload has one header, then file chunks.",
                reason="UNEXPECTED_HEADER",
                field="header",
            )
        yield request.chunk


async def write_chunks(
    requests: AsyncIterator[ChunkView | weight_service_pb2.WriteWeightsRequest | MalformedMessage],
) -> AsyncIterator[ChunkView]:
    """The tensor chunks of a WriteWeights stream after its header."""
    index = 0
    async for request in requests:
        if isinstance(request, MalformedMessage):
            raise InvalidArgument(
                f"Received a malformed message: {request.problem}.",
                reason="MALFORMED_CHUNK",
                field=f"chunks[{index}]",
            )
        if not isinstance(request, ChunkView):
            raise InvalidArgument(
                "Received a message that is not a tensor chunk after the header (a second "
                "header, or a malformed message).",
                reason="UNEXPECTED_MESSAGE",
                field=f"chunks[{index}]",
            )
        index += 1
        yield request


def _plain(value: Any) -> Any:
    """Struct values to Python: whole-number floats become ints (Struct has only doubles)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def struct(message: struct_pb2.Struct) -> dict[str, Any]:
    return _plain(json_format.MessageToDict(message))


def _optional_selector(op: Any) -> Selector | None:
    return selector(op.selector) if op.HasField("selector") else None


def _optional(op: Any, name: str) -> Any:
    return getattr(op, name) if op.HasField(name) else None


_PRUNE_SCOPES = {
    edits_pb2.PRUNE_SCOPE_UNSPECIFIED: "per_tensor",
    edits_pb2.PRUNE_SCOPE_PER_TENSOR: "per_tensor",
    edits_pb2.PRUNE_SCOPE_GLOBAL: "global",
}
_PRUNE_GRANULARITIES = {
    edits_pb2.PRUNE_GRANULARITY_UNSPECIFIED: "element",
    edits_pb2.PRUNE_GRANULARITY_ELEMENT: "element",
    edits_pb2.PRUNE_GRANULARITY_OUTPUT_CHANNEL: "output_channel",
}
_PRUNE_NORMS = {
    edits_pb2.PRUNE_NORM_UNSPECIFIED: "l1",
    edits_pb2.PRUNE_NORM_L1: "l1",
    edits_pb2.PRUNE_NORM_L2: "l2",
}


def _edit(edit: edits_pb2.Edit) -> EditOp:
    kind = edit.WhichOneof("op")
    op = getattr(edit, kind) if kind else None
    if kind == "assign":
        return Assign(op.variable, decode_tensor(op.value, field="value"), tuple(op.begin))
    if kind == "scale":
        return Scale(selector(op.selector), op.factor)
    if kind == "add":
        return Add(selector(op.selector), op.value)
    if kind == "add_noise":
        return AddNoise(selector(op.selector), op.mean, op.stddev, _optional(op, "seed"))
    if kind == "clip":
        return Clip(selector(op.selector), _optional(op, "min"), _optional(op, "max"))
    if kind == "reinitialize":
        return Reinitialize(selector(op.selector), op.initializer, struct(op.config), _optional(op, "seed"))
    if kind == "set_trainable":
        return SetTrainable(selector(op.selector), op.trainable)
    if kind == "prune":
        return Prune(
            selector(op.selector),
            op.sparsity,
            scope=_PRUNE_SCOPES.get(op.scope, "per_tensor"),
            granularity=_PRUNE_GRANULARITIES.get(op.granularity, "element"),
            norm=_PRUNE_NORMS.get(op.norm, "l1"),
        )
    if kind == "quantize":
        return Quantize(
            selector(op.selector),
            op.bits or 8,
            per_channel=op.granularity != edits_pb2.QUANTIZE_GRANULARITY_PER_TENSOR,
        )
    if kind == "interpolate":
        return Interpolate(selector(op.selector), op.other_model_id, op.alpha, op.other_revision)
    if kind == "task_vector":
        return TaskVector(selector(op.selector), op.base_model_id, op.tuned_model_id, op.scale)
    if kind == "copy_from":
        return CopyFrom(_optional_selector(op), op.source_model_id, op.source_revision)
    if kind == "replace_head":
        layers = tuple(LayerToAppend(spec.class_name, struct(spec.config)) for spec in op.layers)
        return ReplaceHead(op.cut_at_layer, layers, _optional(op, "seed"))
    raise InvalidArgument(
        "Received an edit with no operation this server knows; set one of the `op` fields "
        "(a newer client may be sending an op this server does not have).",
        reason="UNKNOWN_EDIT",
        field="",
    )


def edit_ops(edits: Sequence[edits_pb2.Edit]) -> list[EditOp]:
    """Decode a batch of edits; errors name the edit (`edits[3].assign.value`)."""
    ops = []
    for index, edit in enumerate(edits):
        kind = edit.WhichOneof("op")
        try:
            ops.append(_edit(edit))
        except WeightsmithError as exc:
            raise exc.with_field_prefix(f"edits[{index}].{kind}" if kind else f"edits[{index}]") from None
    return ops


def edit_result(report: EditReport | dict[str, Any]) -> edits_pb2.EditResult:
    fields = report.as_dict() if isinstance(report, EditReport) else report
    return edits_pb2.EditResult(**fields)


def variable_diff(delta: VariableDelta) -> weight_service_pb2.VariableDiff:
    return weight_service_pb2.VariableDiff(
        path=delta.path,
        delta_l2=delta.delta_l2,
        max_abs_delta=delta.max_abs_delta,
        fraction_changed=delta.fraction_changed,
        shape_changed=delta.shape_changed,
    )
