"""TrainingService: datasets and jobs; decode, await one training operation, encode."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator

import grpc

from weightsmith.v1 import dataset_pb2, job_pb2
from weightsmith.v1 import training_service_pb2 as pb
from weightsmith_server.api.codecs import datasets as dataset_codec
from weightsmith_server.api.codecs import jobs as job_codec
from weightsmith_server.api.codecs import streams
from weightsmith_server.jobs.events import JobEvent
from weightsmith_server.operations.training import DatasetView, JobView, TrainingOperations

SERVICE = pb.DESCRIPTOR.services_by_name["TrainingService"]
# Replies kept for the watchers of running jobs: each event is encoded once, not once per watcher.
_ENCODED_EVENTS = 256


def _dataset(view: DatasetView) -> dataset_pb2.Dataset:
    return dataset_codec.dataset(view.info, view.used_by)


def _job(view: JobView) -> job_pb2.Job:
    return job_codec.job(view.record, view.last_sequence)


class TrainingServicer:
    """Upload and manage datasets; create, watch and cancel fine-tuning jobs."""

    def __init__(self, operations: TrainingOperations) -> None:
        self._operations = operations
        self._replies: OrderedDict[int, tuple[JobEvent, pb.WatchJobResponse]] = OrderedDict()

    async def UploadDataset(
        self, request_iterator: AsyncIterator[pb.UploadDatasetRequest], context: grpc.aio.ServicerContext
    ) -> pb.UploadDatasetResponse:
        header = await streams.header(request_iterator, "an upload")
        view = await self._operations.upload_dataset(
            header.dataset_id,
            dataset_codec.dataset_source(header.source, "header.source"),
            header.size_bytes,
            streams.upload_chunks(request_iterator),
        )
        return pb.UploadDatasetResponse(dataset=_dataset(view))

    async def CreateDataset(
        self, request: pb.CreateDatasetRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateDatasetResponse:
        source = dataset_codec.dataset_source(request.source, "source")
        view = await self._operations.create_dataset(request.dataset_id, source, request.uri)
        return pb.CreateDatasetResponse(dataset=_dataset(view))

    async def GetDataset(
        self, request: pb.GetDatasetRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDatasetResponse:
        return pb.GetDatasetResponse(dataset=_dataset(await self._operations.get_dataset(request.dataset_id)))

    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDatasetsResponse:
        views, token = await self._operations.list_datasets(request.page_size, request.page_token)
        return pb.ListDatasetsResponse(datasets=[_dataset(v) for v in views], next_page_token=token)

    async def DeleteDataset(
        self, request: pb.DeleteDatasetRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteDatasetResponse:
        await self._operations.delete_dataset(request.dataset_id)
        return pb.DeleteDatasetResponse()

    async def CreateJob(
        self, request: pb.CreateJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateJobResponse:
        view = await self._operations.create_job(request.job_id, job_codec.training_spec(request.spec))
        return pb.CreateJobResponse(job=_job(view))

    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.GetJobResponse:
        return pb.GetJobResponse(job=_job(await self._operations.get_job(request.job_id)))

    async def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListJobsResponse:
        views, token = await self._operations.list_jobs(request.page_size, request.page_token)
        return pb.ListJobsResponse(jobs=[_job(v) for v in views], next_page_token=token)

    async def CancelJob(
        self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelJobResponse:
        return pb.CancelJobResponse(job=_job(await self._operations.cancel_job(request.job_id)))

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchJobResponse]:
        async for event in self._operations.watch_job(request.job_id, request.after_sequence):
            yield self._encoded(event)

    def _encoded(self, event: JobEvent) -> pb.WatchJobResponse:
        """The event's reply, built once for all the watchers of a job (they get the same events).

        Runs on the event loop only, so the cache needs no lock; it holds the
        last `_ENCODED_EVENTS` events, keyed by identity (a log's events are
        never copied), and the replies are never modified after they are built.
        """
        key = id(event)
        cached = self._replies.get(key)
        if cached is not None and cached[0] is event:
            return cached[1]
        reply = pb.WatchJobResponse(event=job_codec.job_event(event))
        self._replies[key] = (event, reply)
        if len(self._replies) > _ENCODED_EVENTS:
            self._replies.popitem(last=False)
        return reply

    async def ListJobEvents(
        self, request: pb.ListJobEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListJobEventsResponse:
        events, token = await self._operations.list_job_events(
            request.job_id, request.after_sequence, request.page_size, request.page_token
        )
        return pb.ListJobEventsResponse(
            events=[job_codec.job_event(e) for e in events], next_page_token=token
        )
