"""Jobs: queue, runners, lifecycle, persistence and restart.

Layout under the store root::

    jobs/<job_id>/
        job.json          the domain spec and the current state (replaced atomically)
        events.jsonl      every event, one JSON object a line, fsync'd
        checkpoint/       the last epoch checkpoint of a running job
        tensorboard/      TensorBoard logs

States go QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED. A job that was
RUNNING when the server stopped is queued again at start-up and resumes
from its checkpoint. An in-place job locks its model against other
mutations while it runs; Predict and ReadWeights keep serving the last
committed revision throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from weightsmith_server.clock import utc_now
from weightsmith_server.datasets import DatasetStore
from weightsmith_server.durable import fsync_path, read_json, write_json
from weightsmith_server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from weightsmith_server.jobs import training
from weightsmith_server.jobs.checkpoints import resume_detail
from weightsmith_server.jobs.event_log import EventLog, EventWriter
from weightsmith_server.jobs.events import (
    EventPayload,
    JobEvent,
    JobResult,
    LogLevel,
    LogLine,
    StateChanged,
    StepProgress,
)
from weightsmith_server.jobs.record import JobRecord, JobState
from weightsmith_server.jobs.spec import TrainingSpec
from weightsmith_server.jobs.validation import validate
from weightsmith_server.models import creation
from weightsmith_server.models.host import ModelHost
from weightsmith_server.models.resident import ResidentModel
from weightsmith_server.naming import validate_id
from weightsmith_server.paging import decode_number_token, encode_page_token, page_after, page_size
from weightsmith_server.resources import ResourceTable
from weightsmith_server.revisions.commit import Change, stage_values
from weightsmith_server.revisions.record import RevisionDraft, RevisionKind
from weightsmith_server.zerocopy import snapshot

log = logging.getLogger(__name__)


@dataclass
class _Job:
    record: JobRecord
    events: EventLog
    folder: Path
    cancel: threading.Event = field(default_factory=threading.Event)
    # The job holds its `output_model_id` in the host: nobody else can create that model meanwhile.
    output_reserved: bool = False

    @property
    def active(self) -> bool:
        return self.record.state in (JobState.QUEUED, JobState.RUNNING)


class _Reporter:
    """Connects a run to its job: events out, stop requests in."""

    def __init__(self, manager: JobManager, job: _Job) -> None:
        self._manager, self._job = manager, job

    def emit(self, payload: EventPayload) -> None:
        if isinstance(payload, StepProgress):
            self._job.record.epoch, self._job.record.step = payload.epoch, payload.global_step
        self._manager.writer.append(self._job.events, payload)

    def should_stop(self) -> bool:
        return self._job.cancel.is_set() or self._manager.stopping.is_set()


class JobManager:
    """Every job of the server, and the threads that run them."""

    def __init__(self, root: Path, host: ModelHost, datasets: DatasetStore, *, runners: int = 1) -> None:
        self.root = root / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.datasets = datasets
        self.writer = EventWriter()
        self.stopping = threading.Event()
        self._table: ResourceTable[_Job] = ResourceTable(
            "job", "ListJobs", lambda i: (self.root / i).exists()
        )
        self._queue: deque[str] = deque()
        self._lock = threading.Condition()
        # Creation and cancellation fsync: their own threads, so they never wait behind model work.
        self._executor = ThreadPoolExecutor(2, thread_name_prefix="weightsmith-jobs")
        self._runners = [
            threading.Thread(target=self._run_forever, name=f"weightsmith-job-runner-{i}", daemon=True)
            for i in range(max(1, runners))
        ]

    # --- persistence -----------------------------------------------------------

    def _save(self, job: _Job) -> None:
        temporary = job.folder / ".job.json"
        write_json(temporary, job.record.to_dict())
        os.replace(temporary, job.folder / "job.json")
        fsync_path(job.folder)

    def restore(self) -> None:
        """Load every job; queue again those that were queued or running."""
        jobs: dict[str, _Job] = {}
        unrestorable: dict[str, str] = {}
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not (folder / "job.json").is_file():
                shutil.rmtree(folder, ignore_errors=True)  # creation never completed
                continue
            try:
                record = JobRecord.from_dict(read_json(folder / "job.json"))
                events = EventLog(folder / "events.jsonl")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.exception("job %s: job.json or events.jsonl could not be read", folder.name)
                unrestorable[folder.name] = f"{type(exc).__name__}: {exc}"
                continue
            jobs[record.job_id] = _Job(record, events, folder)
        self._table.replace_all(jobs, unrestorable)
        resumed = [job for job in jobs.values() if job.active]
        for job in jobs.values():
            if not job.active:
                job.events.close()
        for job in sorted(resumed, key=lambda j: (j.record.state != JobState.RUNNING, j.record.create_time)):
            self._queue.append(job.record.job_id)
            spec = job.record.spec
            if job.record.state == JobState.RUNNING and not spec.output_model_id:
                # Keep the model locked until the job runs again: edits meanwhile would void it.
                # Else (gone, unrestorable, no room in the memory budget now) it fails when it runs.
                with contextlib.suppress(NotFound, FailedPrecondition, ResourceExhausted):
                    self.host.reserve_for_job(spec.model_id, job.record.job_id)
            self._reserve_output(job)
        log.info("restored %d job(s), %d to run", len(jobs), len(resumed))

    def start(self) -> None:
        for runner in self._runners:
            runner.start()

    def stop(self) -> None:
        """Stop runners at the next step; running jobs stay RUNNING and resume on restart."""
        self.stopping.set()
        with self._lock:
            self._lock.notify_all()
        for runner in self._runners:
            runner.join(60)
        # Creations and cancellations in flight wait for their events to be written: the
        # writer stops after them.
        self._executor.shutdown(wait=True)
        self.writer.stop()

    # --- queries ---------------------------------------------------------------

    def get(self, job_id: str, field: str = "job_id") -> JobRecord:
        return self._table.get(job_id, field).record

    def last_sequence(self, job_id: str) -> int:
        return self._table.get(job_id, "job_id").events.last_sequence

    def list(
        self, size: int, token: str, where: Callable[[JobRecord], bool] | None = None
    ) -> tuple[list[JobRecord], str]:
        """One page of jobs (those `where` accepts), newest first, and the next page's token."""

        def key(job: _Job) -> str:
            return f"{job.record.create_time}|{job.record.job_id}"

        jobs = [j for j in self._table.values() if where is None or where(j.record)]
        newest_first = sorted(jobs, key=key, reverse=True)
        page, next_token = page_after(newest_first, key, size, token, descending=True)
        return [j.record for j in page], next_token

    def dataset_users(self, dataset_id: str) -> list[str]:
        """Queued or running jobs that read the dataset."""
        return [
            j.record.job_id
            for j in self._table.values()
            if j.active
            and dataset_id in (j.record.spec.train_dataset_id, j.record.spec.validation_dataset_id)
        ]

    def events_page(self, job_id: str, after: int, size: int, token: str) -> tuple[list[JobEvent], str]:
        """One page of events after `after` (or the token's position), and the next token.

        The token is not empty while the job can still add events, so a
        poller keeps it and asks again.
        """
        job = self._table.get(job_id, "job_id")
        if token:
            after = decode_number_token(token)
        size = page_size(size)
        events = job.events.events_after(after, size)
        last = events[-1].sequence if events else after
        more = len(events) == size or job.active
        return events, encode_page_token(str(last)) if more else ""

    async def watch(self, job_id: str, after: int) -> AsyncIterator[JobEvent]:
        """The job's events after `after`, then live ones until the job ends."""
        job = self._table.get(job_id, "job_id")
        if after < 0:
            raise InvalidArgument(
                f"Received after_sequence={after}, expected 0 or more.",
                reason="INVALID_SEQUENCE",
                field="after_sequence",
            )
        async for event in job.events.follow(after):
            yield event

    # --- lifecycle -------------------------------------------------------------

    async def create(self, job_id: str, spec: TrainingSpec, owner: str = "") -> JobRecord:
        """Validate the spec completely, persist the job, queue it (an empty id gets a fresh one).

        All of it runs on the manager's worker (validation reads models, creation fsyncs).
        `owner` is the principal creating it ("" without authentication).
        """
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._create, job_id, spec, owner
        )

    def _create(self, job_id: str, spec: TrainingSpec, owner: str = "") -> JobRecord:
        if job_id:
            validate_id(job_id, field="job_id", kind="job")
        validate(spec, self.host, self.datasets)
        with self._table.reservation(job_id, "job_id") as job_id:
            return self._queue_new(job_id, spec, owner)

    def _queue_new(self, job_id: str, spec: TrainingSpec, owner: str = "") -> JobRecord:
        with self._lock:
            output = spec.output_model_id
            if output and any(
                j.active and j.record.spec.output_model_id == output for j in self._table.values()
            ):
                raise AlreadyExists(
                    f"Another queued or running job writes model {output!r} already.",
                    reason="MODEL_EXISTS",
                    field="spec.output_model_id",
                )
            if output:  # from now until the job ends, only the job can create that model
                self.host.reserve(output, "spec.output_model_id")
            try:
                job = self._persist(JobRecord(job_id, spec, JobState.QUEUED, utc_now(), owner=owner))
            except BaseException:
                if output:
                    self.host.release(output)
                raise
            job.output_reserved = bool(output)
            self._table.put(job_id, job)
        self.writer.append(job.events, StateChanged(JobState.QUEUED), wait=True)
        with self._lock:
            self._queue.append(job_id)
            self._lock.notify_all()
        log.info("job %s queued (model %s)", job_id, spec.model_id)
        return job.record

    def _persist(self, record: JobRecord) -> _Job:
        """Write a new job's folder durably: staged, then renamed into place."""
        staging = self.root / f".staging-{record.job_id}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        write_json(staging / "job.json", record.to_dict())
        (staging / "events.jsonl").touch()
        fsync_path(staging)
        folder = self.root / record.job_id
        os.rename(staging, folder)
        fsync_path(self.root)
        return _Job(record, EventLog(folder / "events.jsonl"), folder)

    async def cancel(self, job_id: str, wait_seconds: float = 30.0) -> JobRecord:
        """Cancel a job; waits (up to `wait_seconds`) for a running one to stop."""
        job = self._table.get(job_id, "job_id")
        job.cancel.set()
        with self._lock:
            waiting = job_id in self._queue
            if waiting:
                self._queue.remove(job_id)
        if waiting:  # queued, or waiting to resume: it never starts
            await asyncio.get_running_loop().run_in_executor(self._executor, self._cancel_waiting, job)
            return job.record
        if job.record.state.finished:
            raise FailedPrecondition(
                f"Job {job_id!r} has already ended ({job.record.state}).",
                reason="JOB_FINISHED",
                field="job_id",
            )
        deadline = time.monotonic() + wait_seconds
        while not job.record.state.finished and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return job.record

    def _cancel_waiting(self, job: _Job) -> None:
        if job.record.state == JobState.RUNNING and not job.record.spec.output_model_id:
            self._release_model(job)
        self._finish(job, JobState.CANCELLED, "")

    def _release_model(self, job: _Job) -> None:
        with contextlib.suppress(NotFound, FailedPrecondition):
            self.host.release_job(job.record.spec.model_id, job.record.job_id)

    def _reserve_output(self, job: _Job) -> bool:
        """Hold the job's output model id, unless held already; False when a model has taken it."""
        output = job.record.spec.output_model_id
        if output and not job.output_reserved:
            try:
                self.host.reserve(output, "spec.output_model_id")
            except AlreadyExists:
                return False
            job.output_reserved = True
        return True

    def _release_output(self, job: _Job) -> None:
        if job.output_reserved:
            self.host.release(job.record.spec.output_model_id)
            job.output_reserved = False

    def _finish(self, job: _Job, state: JobState, detail: str) -> None:
        # Released before the end is visible: a client that saw it may edit the model at once.
        self._release_output(job)
        if not job.record.spec.output_model_id:
            self._release_model(job)
        job.record = replace(
            job.record, state=state, end_time=utc_now(), error=detail if state == JobState.FAILED else ""
        )
        self._save(job)
        self.writer.append(job.events, StateChanged(state, detail), wait=True)
        job.events.close()

    # --- running ---------------------------------------------------------------

    def _run_forever(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self.stopping.is_set():
                    self._lock.wait()
                if self.stopping.is_set():
                    return
                job = self._table.get(self._queue.popleft(), "job_id")
            try:
                self._run(job)
            except Exception:  # a bug must not kill the runner
                log.exception("job %s: runner failed", job.record.job_id)

    def _run(self, job: _Job) -> None:
        spec = job.record.spec
        resumed = job.record.state == JobState.RUNNING
        if job.cancel.is_set():
            self._finish(job, JobState.CANCELLED, "")
            return
        in_place = not spec.output_model_id
        try:
            # Reserved first: no other commit can move the base revision the job starts from.
            if in_place and not self.host.reserve_for_job(spec.model_id, job.record.job_id):
                with self._lock:  # another in-place job holds the model: run this one later
                    self._queue.append(job.record.job_id)
                time.sleep(0.5)
                return
        except (NotFound, FailedPrecondition, ResourceExhausted) as exc:
            self._finish(job, JobState.FAILED, exc.message)
            return
        try:
            try:
                device, revision = self.host.run(spec.model_id, lambda model: (model.device, model.revision))
            except (NotFound, FailedPrecondition, ResourceExhausted) as exc:
                self._finish(job, JobState.FAILED, exc.message)
                return
            self._train(job, spec, device, revision, resumed)
        finally:
            if in_place:
                self._release_model(job)

    def _train(self, job: _Job, spec: TrainingSpec, device: str, revision: int, resumed: bool) -> None:
        record = job.record
        base = record.base_revision if resumed and record.base_revision else revision
        store = self.host.store
        job.record = replace(record, state=JobState.RUNNING, start_time=utc_now(), base_revision=base)
        self._save(job)
        if resumed and self._already_committed(job, spec):
            return
        if not self._reserve_output(job):  # never overwritten, never taken for the job's own result
            self._finish(
                job,
                JobState.FAILED,
                f"Model {spec.output_model_id!r} was created while the job waited to run; nothing was "
                "committed. Create a new job with another output_model_id.",
            )
            return
        detail = resume_detail(job.folder / "checkpoint") if resumed else ""
        self.writer.append(job.events, StateChanged(JobState.RUNNING, detail))
        try:
            manifest = store.read_manifest(spec.model_id, base)
            values = {v.path: store.load_tensor(spec.model_id, v) for v in manifest.variables}
            config_json = store.read_architecture(spec.model_id, base)
            outcome = training.run(
                spec,
                config_json=config_json,
                values=values,
                train_data=self.datasets.load(spec.train_dataset_id, "train"),
                validation_data=self._validation(spec),
                device=device,
                job_dir=job.folder,
                reporter=_Reporter(self, job),
                gpus=[d.name for d in self.host.devices.devices if d.kind == "GPU"],
            )
        except training.JobStopped:
            self._stopped(job)
            return
        except Exception as exc:
            log.exception("job %s failed", record.job_id)
            self._finish(job, JobState.FAILED, f"{type(exc).__name__}: {exc}"[:1000])
            return
        try:
            model_id, revision = self._commit(job, spec, base, config_json, outcome)
        except Exception as exc:
            log.exception("job %s: committing the result failed", record.job_id)
            self._finish(job, JobState.FAILED, f"committing the result failed: {exc}"[:1000])
            return
        self._succeed(job, model_id, revision, outcome)

    def _stopped(self, job: _Job) -> None:
        """A run that stopped early: cancelled, or paused by shutdown (it resumes at the next start)."""
        if job.cancel.is_set():
            self._finish(job, JobState.CANCELLED, "")
        else:
            self.writer.append(job.events, LogLine(LogLevel.INFO, "paused by server shutdown"))
            self.writer.flush()

    def _succeed(self, job: _Job, model_id: str, revision: int, outcome: training.Outcome) -> None:
        job.record = replace(
            job.record,
            result_model_id=model_id,
            result_revision=revision,
            epoch=outcome.epochs_completed,
            step=outcome.steps_completed,
        )
        result = JobResult(
            model_id=model_id,
            revision=revision,
            metrics=outcome.metrics,
            epochs_completed=outcome.epochs_completed,
            steps_completed=outcome.steps_completed,
        )
        self.writer.append(job.events, result)
        self._finish(job, JobState.SUCCEEDED, "")
        shutil.rmtree(job.folder / "checkpoint", ignore_errors=True)

    def _validation(self, spec: TrainingSpec) -> tuple[Any, int] | None:
        if spec.validation_dataset_id:
            return self.datasets.load(spec.validation_dataset_id, "train")
        if self.datasets.get(spec.train_dataset_id).validation_example_count:
            return self.datasets.load(spec.train_dataset_id, "validation")
        return None

    def _already_committed(self, job: _Job, spec: TrainingSpec) -> bool:
        """A job killed between its commit and SUCCEEDED: finish it, don't train again."""
        model_id = spec.output_model_id or spec.model_id
        store = self.host.store
        try:
            numbers = store.revision_numbers(model_id)
        except FileNotFoundError:
            return False
        for number in numbers:
            if number > (0 if spec.output_model_id else job.record.base_revision):
                record = store.read_revision(model_id, number)
                if record.job_id == job.record.job_id:
                    job.record = replace(job.record, result_model_id=model_id, result_revision=number)
                    self.writer.append(
                        job.events, LogLine(LogLevel.INFO, "result was committed before the restart")
                    )
                    self._finish(job, JobState.SUCCEEDED, "")
                    return True
        return False

    def _commit(
        self, job: _Job, spec: TrainingSpec, base: int, config_json: str, outcome: training.Outcome
    ) -> tuple[str, int]:
        """Commit the trained values: a new revision of the model, or a new output model."""
        job_id = job.record.job_id
        message = f"job {job_id}: {outcome.epochs_completed} epoch(s), {outcome.steps_completed} steps"
        author = f"job:{job_id}"
        if spec.output_model_id:
            new = creation.from_values(
                config_json, outcome.values, message=message, author=author, job_id=job_id
            )
            reserved, job.output_reserved = job.output_reserved, False  # `create` releases it
            info = self.host.create(
                spec.output_model_id, new, field="spec.output_model_id", reserved=reserved
            )
            return info.model_id, info.revision
        staged = self.host.stage(spec.model_id)

        def prepare(resident: ResidentModel) -> Change:
            state = resident.state
            changed = {
                path: np.ascontiguousarray(value)
                for path, value in outcome.values.items()
                if value.tobytes() != snapshot(state.variables[path]).tobytes()
            }
            draft = RevisionDraft(
                kind=RevisionKind.JOB,
                author=author,
                message=message,
                summary=f"{message}: {len(changed)} variable(s) trained",
                changed_variables=[v.path for v in state.manifest.variables if v.path in changed],
                job_id=job_id,
            )
            return Change(draft, stage_values(staged, state.manifest, changed), changed)

        committed = self.host.commit(spec.model_id, staged, prepare, expected_revision=base, job_id=job_id)
        return spec.model_id, committed.revision
