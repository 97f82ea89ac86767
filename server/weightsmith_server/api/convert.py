"""Domain objects to protos and back: the only translation the servicers need."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import grpc
from google.protobuf import timestamp_pb2

from weightsmith._wire import ChunkView
from weightsmith.v1 import model_pb2, model_service_pb2, selector_pb2, tensor_pb2, weight_service_pb2
from weightsmith_server import architecture
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.registry import ModelInfo, TensorSpecInfo
from weightsmith_server.selectors import Selector
from weightsmith_server.store import RevisionRecord
from weightsmith_server.tensors import MalformedMessage, wire_dtype

AUTHOR_METADATA_KEY = "weightsmith-author"

_SOURCES = {
    "catalog": model_pb2.MODEL_SOURCE_CATALOG,
    "config": model_pb2.MODEL_SOURCE_CONFIG,
    "upload": model_pb2.MODEL_SOURCE_UPLOAD,
}
_REVISION_KINDS = {
    "create": weight_service_pb2.REVISION_KIND_CREATE,
    "upload": weight_service_pb2.REVISION_KIND_UPLOAD,
    "write_weights": weight_service_pb2.REVISION_KIND_WRITE_WEIGHTS,
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
