"""Models, Predict, exports, server info and evaluations as protos, and back."""

from __future__ import annotations

import numpy as np

from weightsmith.v1 import model_pb2, model_service_pb2, tensor_pb2
from weightsmith_server.api.codecs.common import EnumTable, timestamp
from weightsmith_server.api.codecs.tensors import decode_tensor, encode_tensor, tensor_spec, wire_dtype
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.jobs.evaluation import Evaluation
from weightsmith_server.models import architecture
from weightsmith_server.models.batching import BatchingPolicy
from weightsmith_server.models.creation import ModelSource
from weightsmith_server.models.description import ModelInfo
from weightsmith_server.models.export import ExportFormat
from weightsmith_server.models.serving import BatchingOverrides
from weightsmith_server.operations.models import Prediction, SecurityInfo, ServerInfo

MODEL_SOURCES = EnumTable(
    model_pb2.ModelSource,
    {
        model_pb2.MODEL_SOURCE_CATALOG: ModelSource.CATALOG,
        model_pb2.MODEL_SOURCE_CONFIG: ModelSource.CONFIG,
        model_pb2.MODEL_SOURCE_UPLOAD: ModelSource.UPLOAD,
        model_pb2.MODEL_SOURCE_JOB: ModelSource.JOB,
    },
)
POOLING = EnumTable(
    model_service_pb2.Pooling,
    {
        model_service_pb2.POOLING_UNSPECIFIED: None,
        model_service_pb2.POOLING_AVG: "avg",
        model_service_pb2.POOLING_MAX: "max",
    },
)
EXPORT_FORMATS = EnumTable(
    model_service_pb2.ExportFormat,
    {
        model_service_pb2.EXPORT_FORMAT_UNSPECIFIED: ExportFormat.KERAS,
        model_service_pb2.EXPORT_FORMAT_KERAS: ExportFormat.KERAS,
        model_service_pb2.EXPORT_FORMAT_SAVED_MODEL: ExportFormat.SAVED_MODEL,
    },
)
DEVICE_KINDS = EnumTable(
    model_service_pb2.DeviceKind,
    {model_service_pb2.DEVICE_KIND_CPU: "CPU", model_service_pb2.DEVICE_KIND_GPU: "GPU"},
)


def model(info: ModelInfo) -> model_pb2.Model:
    return model_pb2.Model(
        model_id=info.model_id,
        revision=info.revision,
        architecture=info.architecture,
        source=MODEL_SOURCES.encode(ModelSource(info.source)),
        device=info.device,
        parameter_count=info.parameter_count,
        weight_bytes=info.weight_bytes,
        inputs=[tensor_spec(s) for s in info.inputs],
        outputs=[tensor_spec(s) for s in info.outputs],
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
        resident=info.resident,
        batching=batching_policy(info.batching) if info.batching is not None else None,
    )


def batching_policy(policy: BatchingPolicy) -> model_pb2.BatchingPolicy:
    """A policy in effect: both fields set."""
    return model_pb2.BatchingPolicy(
        max_batch_size=policy.max_batch_size, max_wait_seconds=policy.max_wait_ms / 1000
    )


def batching_overrides(message: model_pb2.BatchingPolicy) -> BatchingOverrides:
    """A request's policy: the fields it sets (checked by the operation, which names the field)."""
    return BatchingOverrides(
        message.max_batch_size if message.HasField("max_batch_size") else None,
        message.max_wait_seconds * 1000 if message.HasField("max_wait_seconds") else None,
    )


def architecture_source(request: model_service_pb2.CreateModelRequest) -> architecture.CatalogSpec | str:
    """What CreateModel builds: a catalog architecture, or a Keras config JSON."""
    which = request.WhichOneof("architecture")
    if which == "catalog":
        return catalog_spec(request.catalog)
    if which == "keras_config_json":
        return request.keras_config_json
    raise InvalidArgument(
        "Received no architecture; set `catalog` or `keras_config_json`.",
        reason="MISSING_ARCHITECTURE",
        field="architecture",
    )


def catalog_spec(message: model_service_pb2.CatalogArchitecture) -> architecture.CatalogSpec:
    return architecture.CatalogSpec(
        name=message.name,
        include_top=message.include_top if message.HasField("include_top") else True,
        input_shape=tuple(message.input_shape) or None,
        classes=message.classes or 1000,
        pooling=POOLING.decode(message.pooling, field="catalog.pooling"),
        weights_file=message.weights_file,
        classifier_activation=message.classifier_activation or None,
    )


def predict_inputs(request: model_service_pb2.PredictRequest) -> list[tuple[str, np.ndarray]]:
    return [
        (named.name, decode_tensor(named.tensor, field=f"inputs[{i}].tensor"))
        for i, named in enumerate(request.inputs)
    ]


def _named(name: str, array: np.ndarray) -> tensor_pb2.NamedTensor:
    return tensor_pb2.NamedTensor(name=name, tensor=encode_tensor(array))


def prediction(result: Prediction) -> model_service_pb2.PredictResponse:
    return model_service_pb2.PredictResponse(
        outputs=[_named(n, a) for n, a in result.outputs],
        layer_outputs=[_named(n, a) for n, a in result.layer_outputs],
        revision=result.revision,
    )


def server_info(info: ServerInfo) -> model_service_pb2.GetServerInfoResponse:
    return model_service_pb2.GetServerInfoResponse(
        version=info.version,
        tensorflow_version=info.tensorflow_version,
        keras_version=info.keras_version,
        devices=[
            model_service_pb2.Device(
                name=usage.device.name,
                kind=DEVICE_KINDS.encode(usage.device.kind),
                description=usage.device.description,
                memory_used_bytes=usage.memory_used_bytes,
                memory_total_bytes=usage.memory_total_bytes,
                model_ids=usage.model_ids,
                memory_growth=usage.device.memory_growth,
                memory_budget_bytes=usage.memory_budget_bytes,
                resident_bytes=usage.resident_bytes,
            )
            for usage in info.devices
        ],
        limits=model_service_pb2.ServerLimits(
            max_message_bytes=info.limits.max_message_bytes,
            max_upload_bytes=info.limits.max_upload_bytes,
            chunk_size_bytes=info.limits.chunk_bytes,
            max_decompressed_bytes=info.limits.max_decompressed_bytes,
            max_member_bytes=info.limits.max_member_bytes,
            max_config_bytes=info.limits.max_config_bytes,
            max_image_pixels=info.limits.max_image_pixels,
            max_string_bytes=info.limits.max_string_bytes,
            stream_idle_seconds=info.limits.stream_idle_seconds,
            stream_deadline_seconds=info.limits.stream_deadline_seconds,
            max_write_streams=info.limits.max_write_streams,
            max_staging_bytes=info.limits.max_staging_bytes,
            max_error_bytes=info.limits.max_error_bytes,
            predict_batching=batching_policy(
                BatchingPolicy(info.limits.batch_max_size, info.limits.batch_wait_ms)
            ),
        ),
        catalog_architectures=info.catalog_architectures,
        security=_security(info.security),
    )


def _security(security: SecurityInfo | None) -> model_service_pb2.SecurityInfo | None:
    if security is None:
        return None
    return model_service_pb2.SecurityInfo(
        authentication=security.settings.authentication,
        tls=security.settings.tls,
        client_certificates=security.settings.client_certificates,
        principal=security.principal,
        scopes=security.scopes,
        model_patterns=security.model_patterns,
    )


def evaluation(result: Evaluation) -> model_service_pb2.EvaluateResponse:
    return model_service_pb2.EvaluateResponse(
        loss=result.loss, metrics=result.metrics, example_count=result.example_count, revision=result.revision
    )
