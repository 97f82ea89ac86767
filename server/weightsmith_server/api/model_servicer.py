"""ModelService: decode the request, await the registry, encode the answer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import keras
import tensorflow as tf

from weightsmith.v1 import model_service_pb2, model_service_pb2_grpc, tensor_pb2
from weightsmith_server import __version__, architecture
from weightsmith_server.api import convert
from weightsmith_server.config import Config
from weightsmith_server.datasets import DatasetStore
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.jobs.evaluation import evaluate
from weightsmith_server.registry import Registry
from weightsmith_server.tensors import decode_tensor, encode_tensor

_DEVICE_KINDS = {"CPU": model_service_pb2.DEVICE_KIND_CPU, "GPU": model_service_pb2.DEVICE_KIND_GPU}


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """Create, upload, inspect, export, delete and run models."""

    def __init__(self, registry: Registry, config: Config, datasets: DatasetStore) -> None:
        self._registry = registry
        self._config = config
        self._datasets = datasets

    async def CreateModel(
        self, request: model_service_pb2.CreateModelRequest, context: grpc.aio.ServicerContext
    ) -> model_service_pb2.CreateModelResponse:
        seed = request.seed if request.HasField("seed") else None
        author = convert.author(context)
        which = request.WhichOneof("architecture")
        if which == "catalog":
            info = await self._registry.create_from_catalog(
                request.model_id, convert.catalog_spec(request.catalog), seed, request.message, author
            )
        elif which == "keras_config_json":
            info = await self._registry.create_from_config(
                request.model_id, request.keras_config_json, seed, request.message, author
            )
        else:
            raise InvalidArgument(
                "Received no architecture; set `catalog` or `keras_config_json`.",
                reason="MISSING_ARCHITECTURE",
                field="architecture",
            )
        return model_service_pb2.CreateModelResponse(model=convert.model(info))

    async def UploadModel(
        self,
        request_iterator: AsyncIterator[model_service_pb2.UploadModelRequest],
        context: grpc.aio.ServicerContext,
    ) -> model_service_pb2.UploadModelResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument(
                "The first message of an upload must be the header.",
                reason="MISSING_HEADER",
                field="header",
            )
        header = first.header
        info = await self._registry.upload(
            header.model_id,
            header.size_bytes,
            header.message,
            convert.author(context),
            convert.upload_chunks(request_iterator),
        )
        return model_service_pb2.UploadModelResponse(model=convert.model(info))

    async def GetModel(
        self, request: model_service_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> model_service_pb2.GetModelResponse:
        info = self._registry.get(request.model_id).describe()
        return model_service_pb2.GetModelResponse(model=convert.model(info))

    async def ListModels(
        self, request: model_service_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> model_service_pb2.ListModelsResponse:
        infos, token = self._registry.list_models(request.page_size, request.page_token)
        return model_service_pb2.ListModelsResponse(
            models=[convert.model(i) for i in infos], next_page_token=token
        )

    async def DeleteModel(
        self, request: model_service_pb2.DeleteModelRequest, context: grpc.aio.ServicerContext
    ) -> model_service_pb2.DeleteModelResponse:
        await self._registry.delete(request.model_id)
        return model_service_pb2.DeleteModelResponse()

    async def ExportModel(
        self, request: model_service_pb2.ExportModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[model_service_pb2.ExportModelResponse]:
        chunks = self._registry.export_chunks(
            request.model_id,
            request.revision,
            convert.EXPORT_FORMATS.get(request.format, "keras"),
            self._config.chunk_bytes,
        )
        async for chunk, size, revision in chunks:
            yield model_service_pb2.ExportModelResponse(chunk=chunk, size_bytes=size, revision=revision)

    async def Predict(
        self, request: model_service_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> model_service_pb2.PredictResponse:
        inputs = [
            (named.name, decode_tensor(named.tensor, field=f"inputs[{i}].tensor"))
            for i, named in enumerate(request.inputs)
        ]
        outputs, layer_outputs, revision = await self._registry.predict(
            request.model_id, inputs, list(request.output_layers)
        )
        return model_service_pb2.PredictResponse(
            outputs=[tensor_pb2.NamedTensor(name=n, tensor=encode_tensor(a)) for n, a in outputs],
            layer_outputs=[tensor_pb2.NamedTensor(name=n, tensor=encode_tensor(a)) for n, a in layer_outputs],
            revision=revision,
        )

    async def GetServerInfo(
        self, request: model_service_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> model_service_pb2.GetServerInfoResponse:
        devices = self._registry.devices
        placed: dict[str, list[str]] = {}
        for resident in self._registry.models():
            placed.setdefault(resident.device, []).append(resident.model_id)
        described = []
        for device in devices.devices:
            used, total = devices.memory(device)
            described.append(
                model_service_pb2.Device(
                    name=device.name,
                    kind=_DEVICE_KINDS[device.kind],
                    description=device.description,
                    memory_used_bytes=used,
                    memory_total_bytes=total,
                    model_ids=placed.get(device.name, []),
                    memory_growth=device.memory_growth,
                )
            )
        return model_service_pb2.GetServerInfoResponse(
            version=__version__,
            tensorflow_version=tf.__version__,
            keras_version=keras.__version__,
            devices=described,
            limits=model_service_pb2.ServerLimits(
                max_message_bytes=self._config.max_message_bytes,
                max_upload_bytes=self._config.max_upload_bytes,
                chunk_size_bytes=self._config.chunk_bytes,
            ),
            catalog_architectures=architecture.catalog_names(),
        )

    async def Evaluate(
        self, request: model_service_pb2.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> model_service_pb2.EvaluateResponse:
        result = await evaluate(
            self._registry,
            self._datasets,
            request.model_id,
            request.dataset_id,
            revision=request.revision,
            loss=request.loss,
            metrics=tuple(request.metrics),
            batch_size=request.batch_size,
            split="validation" if request.split == model_service_pb2.DATASET_SPLIT_VALIDATION else "train",
            rescale=request.rescale if request.HasField("rescale") else None,
        )
        return model_service_pb2.EvaluateResponse(
            loss=result.loss,
            metrics=result.metrics,
            example_count=result.example_count,
            revision=result.revision,
        )
