"""ModelService: decode the request, await one model operation, encode the answer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from weightsmith.v1 import model_service_pb2 as pb
from weightsmith_server.api.codecs import datasets as dataset_codecs
from weightsmith_server.api.codecs import models as codecs
from weightsmith_server.api.codecs import streams
from weightsmith_server.api.identity import author
from weightsmith_server.models.serving import mask_fields
from weightsmith_server.operations.models import ModelOperations

SERVICE = pb.DESCRIPTOR.services_by_name["ModelService"]


class ModelServicer:
    """Create, upload, inspect, export, delete, run and evaluate models."""

    def __init__(self, operations: ModelOperations) -> None:
        self._models = operations

    async def CreateModel(
        self, request: pb.CreateModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateModelResponse:
        info = await self._models.create(
            request.model_id,
            codecs.architecture_source(request),
            seed=request.seed if request.HasField("seed") else None,
            message=request.message,
            author=author(context),
            batching=codecs.batching_overrides(request.batching) if request.HasField("batching") else None,
        )
        return pb.CreateModelResponse(model=codecs.model(info))

    async def UploadModel(
        self, request_iterator: AsyncIterator[pb.UploadModelRequest], context: grpc.aio.ServicerContext
    ) -> pb.UploadModelResponse:
        header = await streams.header(request_iterator, "an upload")
        info = await self._models.upload(
            header.model_id,
            header.size_bytes,
            streams.upload_chunks(request_iterator),
            message=header.message,
            author=author(context),
            batching=codecs.batching_overrides(header.batching) if header.HasField("batching") else None,
        )
        return pb.UploadModelResponse(model=codecs.model(info))

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=codecs.model(await self._models.get(request.model_id)))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        infos, token = await self._models.list(request.page_size, request.page_token)
        return pb.ListModelsResponse(models=[codecs.model(i) for i in infos], next_page_token=token)

    async def UpdateModel(
        self, request: pb.UpdateModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateModelResponse:
        info = await self._models.update(
            request.model_id,
            codecs.batching_overrides(request.batching),
            mask_fields(list(request.update_mask.paths)),
        )
        return pb.UpdateModelResponse(model=codecs.model(info))

    async def DeleteModel(
        self, request: pb.DeleteModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteModelResponse:
        await self._models.delete(request.model_id)
        return pb.DeleteModelResponse()

    async def ExportModel(
        self, request: pb.ExportModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExportModelResponse]:
        file_format = codecs.EXPORT_FORMATS.decode(request.format, field="format")
        async for chunk, size, revision in self._models.export(
            request.model_id, request.revision, file_format
        ):
            yield pb.ExportModelResponse(chunk=chunk, size_bytes=size, revision=revision)

    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        inputs = codecs.predict_inputs(request)
        result = await self._models.predict(request.model_id, inputs, list(request.output_layers))
        return codecs.prediction(result)

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        return codecs.server_info(await self._models.server_info())

    async def Evaluate(
        self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> pb.EvaluateResponse:
        result = await self._models.evaluate(
            request.model_id,
            request.dataset_id,
            revision=request.revision,
            loss=request.loss,
            metrics=tuple(request.metrics),
            batch_size=request.batch_size,
            split=dataset_codecs.dataset_split(request.split, field="split"),
            rescale=request.rescale if request.HasField("rescale") else None,
        )
        return codecs.evaluation(result)
