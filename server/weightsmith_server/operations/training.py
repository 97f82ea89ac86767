"""TrainingService operations: datasets and fine-tuning jobs, and how they depend on each other.

Datasets and jobs are separate domain packages; this is the one place that
knows a queued or running job holds its datasets: it reports them as a
dataset's users and refuses to delete a dataset while they need it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from weightsmith_server import access
from weightsmith_server.datasets import DatasetInfo, DatasetSource, DatasetStore
from weightsmith_server.jobs.events import JobEvent
from weightsmith_server.jobs.manager import JobManager
from weightsmith_server.jobs.record import JobRecord
from weightsmith_server.jobs.spec import TrainingSpec


@dataclass(frozen=True)
class DatasetView:
    """A dataset and the ids of the queued or running jobs that read it."""

    info: DatasetInfo
    used_by: list[str]


@dataclass(frozen=True)
class JobView:
    """A job and the sequence number of its last event."""

    record: JobRecord
    last_sequence: int


class TrainingOperations:
    """One method per TrainingService RPC, over the dataset store and the job manager."""

    def __init__(self, datasets: DatasetStore, jobs: JobManager) -> None:
        self._datasets = datasets
        self._jobs = jobs

    def _dataset_view(self, info: DatasetInfo) -> DatasetView:
        return DatasetView(info, self._jobs.dataset_users(info.dataset_id))

    def _job_view(self, record: JobRecord) -> JobView:
        return JobView(record, self._jobs.last_sequence(record.job_id))

    def _own_dataset(self, dataset_id: str, field: str = "dataset_id") -> DatasetInfo:
        """The caller's dataset; NOT_FOUND, as for a missing one, if another principal's."""
        info = self._datasets.get(dataset_id, field)
        access.require_dataset_owner(dataset_id, info.owner, field)
        return info

    def _own_job(self, job_id: str) -> JobRecord:
        """The caller's job; NOT_FOUND, as for a missing one, if another principal's."""
        record = self._jobs.get(job_id)
        access.require_job_owner(job_id, record.owner)
        return record

    # --- datasets ------------------------------------------------------------

    async def upload_dataset(
        self, dataset_id: str, source: DatasetSource, size_bytes: int, chunks: AsyncIterator[bytes]
    ) -> DatasetView:
        """Receive a dataset file (an empty id gets a fresh one), check it completely and store it."""
        owner = access.current().owner
        return self._dataset_view(await self._datasets.upload(dataset_id, source, size_bytes, chunks, owner))

    async def create_dataset(self, dataset_id: str, source: DatasetSource, uri: str) -> DatasetView:
        """Copy a dataset from a path the server may read, check it completely and store it."""
        owner = access.current().owner
        return self._dataset_view(await self._datasets.create(dataset_id, source, uri, owner))

    async def get_dataset(self, dataset_id: str) -> DatasetView:
        return self._dataset_view(self._own_dataset(dataset_id))

    async def list_datasets(self, page_size: int, page_token: str) -> tuple[list[DatasetView], str]:
        """One page of the caller's datasets by id, and the next page's token."""
        caller = access.current()
        infos, token = self._datasets.list(page_size, page_token, lambda info: caller.owns(info.owner))
        return [self._dataset_view(info) for info in infos], token

    async def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset; FAILED_PRECONDITION while a queued or running job reads it."""
        self._own_dataset(dataset_id)
        await self._datasets.delete(dataset_id, self._jobs.dataset_users)

    # --- jobs ----------------------------------------------------------------

    async def create_job(self, job_id: str, spec: TrainingSpec) -> JobView:
        """Validate the spec against the server, persist the job and queue it.

        The job may use only models in its owner's patterns and datasets its owner made.
        """
        caller = access.current()
        access.require_model(spec.model_id, "spec.model_id", caller)
        if spec.output_model_id:
            access.require_creatable(spec.output_model_id, "spec.output_model_id", caller)
        for field, dataset_id in (
            ("spec.train_dataset_id", spec.train_dataset_id),
            ("spec.validation_dataset_id", spec.validation_dataset_id),
        ):
            if dataset_id and caller.authenticated:
                self._own_dataset(dataset_id, field)
        return self._job_view(await self._jobs.create(job_id, spec, caller.owner))

    async def get_job(self, job_id: str) -> JobView:
        return self._job_view(self._own_job(job_id))

    async def list_jobs(self, page_size: int, page_token: str) -> tuple[list[JobView], str]:
        """One page of the caller's jobs, newest first, and the next page's token."""
        caller = access.current()
        records, token = self._jobs.list(page_size, page_token, lambda record: caller.owns(record.owner))
        return [self._job_view(record) for record in records], token

    async def cancel_job(self, job_id: str) -> JobView:
        """Cancel a job; a running one is waited for (briefly) until it has stopped."""
        self._own_job(job_id)
        return self._job_view(await self._jobs.cancel(job_id))

    def watch_job(self, job_id: str, after_sequence: int) -> AsyncIterator[JobEvent]:
        """The job's events after `after_sequence`, then live ones until it ends."""
        self._own_job(job_id)
        return self._jobs.watch(job_id, after_sequence)

    async def list_job_events(
        self, job_id: str, after_sequence: int, page_size: int, page_token: str
    ) -> tuple[list[JobEvent], str]:
        """One page of events; the token stays non-empty while the job can add more."""
        self._own_job(job_id)
        return self._jobs.events_page(job_id, after_sequence, page_size, page_token)
