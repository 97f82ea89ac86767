"""TrainingService: datasets and jobs; decode, await the domain, encode."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from weightsmith.v1 import training_service_pb2 as pb
from weightsmith.v1 import training_service_pb2_grpc
from weightsmith_server.api import training_convert as convert
from weightsmith_server.api.convert import upload_chunks
from weightsmith_server.datasets import DatasetStore
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.jobs.manager import JobManager


class TrainingServicer(training_service_pb2_grpc.TrainingServiceServicer):
    """Upload and manage datasets; create, watch and cancel fine-tuning jobs."""

    def __init__(self, datasets: DatasetStore, jobs: JobManager) -> None:
        self._datasets = datasets
        self._jobs = jobs

    def _dataset(self, info: object) -> pb.Dataset:
        return convert.dataset(info, self._jobs.dataset_users(info.dataset_id))  # type: ignore[attr-defined]

    async def UploadDataset(
        self, request_iterator: AsyncIterator[pb.UploadDatasetRequest], context: grpc.aio.ServicerContext
    ) -> pb.UploadDatasetResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument(
                "The first message of an upload must be the header.", reason="MISSING_HEADER", field="header"
            )
        header = first.header
        info = await self._datasets.upload(
            header.dataset_id,
            convert.dataset_source(header.source, "header.source"),
            header.size_bytes,
            upload_chunks(request_iterator),
        )
        return pb.UploadDatasetResponse(dataset=self._dataset(info))

    async def CreateDataset(
        self, request: pb.CreateDatasetRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateDatasetResponse:
        source = convert.dataset_source(request.source, "source")
        info = await self._datasets.create(request.dataset_id, source, request.uri)
        return pb.CreateDatasetResponse(dataset=self._dataset(info))

    async def GetDataset(
        self, request: pb.GetDatasetRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDatasetResponse:
        return pb.GetDatasetResponse(dataset=self._dataset(self._datasets.get(request.dataset_id)))

    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDatasetsResponse:
        infos, token = self._datasets.list(request.page_size, request.page_token)
        return pb.ListDatasetsResponse(datasets=[self._dataset(i) for i in infos], next_page_token=token)

    async def DeleteDataset(
        self, request: pb.DeleteDatasetRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteDatasetResponse:
        await self._datasets.delete(request.dataset_id, self._jobs.dataset_users)
        return pb.DeleteDatasetResponse()

    def _job(self, record: object) -> pb.Job:
        return convert.job(record, self._jobs.last_sequence(record.job_id))  # type: ignore[arg-type, attr-defined]

    async def CreateJob(
        self, request: pb.CreateJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateJobResponse:
        record = await self._jobs.create(
            request.job_id, convert.training_spec(request.spec), convert.spec_document(request.spec)
        )
        return pb.CreateJobResponse(job=self._job(record))

    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.GetJobResponse:
        return pb.GetJobResponse(job=self._job(self._jobs.get(request.job_id)))

    async def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListJobsResponse:
        records, token = self._jobs.list(request.page_size, request.page_token)
        return pb.ListJobsResponse(jobs=[self._job(r) for r in records], next_page_token=token)

    async def CancelJob(
        self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelJobResponse:
        return pb.CancelJobResponse(job=self._job(await self._jobs.cancel(request.job_id)))

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchJobResponse]:
        async for raw in self._jobs.watch(request.job_id, request.after_sequence):
            yield pb.WatchJobResponse(event=convert.event(raw))

    async def ListJobEvents(
        self, request: pb.ListJobEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListJobEventsResponse:
        events, token = self._jobs.events_page(
            request.job_id, request.after_sequence, request.page_size, request.page_token
        )
        return pb.ListJobEventsResponse(events=[convert.event(e) for e in events], next_page_token=token)
