"""Jobs: queue, runners, lifecycle, persistence and restart.

Layout under the store root::

    jobs/<job_id>/
        job.json          the spec and the current state (replaced atomically)
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
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from weightsmith_server.datasets import DatasetStore
from weightsmith_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from weightsmith_server.jobs import spec as job_spec
from weightsmith_server.jobs import training
from weightsmith_server.jobs.events import EventLog, EventWriter
from weightsmith_server.naming import new_id, validate_id
from weightsmith_server.registry import (
    ModelState,
    Prepared,
    Registry,
    decode_number_token,
    decode_page_token,
    encode_page_token,
    page_size,
    utc_now,
)
from weightsmith_server.store import Manifest, RevisionRecord, fsync_path, read_json, write_json
from weightsmith_server.zerocopy import snapshot

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)


@dataclass
class JobRecord:
    """What `job.json` holds."""

    job_id: str
    spec: dict[str, Any]
    document: dict[str, Any]
    state: str
    create_time: str
    start_time: str = ""
    end_time: str = ""
    error: str = ""
    result_model_id: str = ""
    result_revision: int = 0
    epoch: int = 0
    step: int = 0
    base_revision: int = 0

    @property
    def training(self) -> job_spec.TrainingSpec:
        return job_spec.TrainingSpec.from_dict(self.spec)


@dataclass
class _Job:
    record: JobRecord
    events: EventLog
    folder: Path
    cancel: threading.Event = field(default_factory=threading.Event)


class _Reporter:
    """Connects a run to its job: events out, stop requests in."""

    def __init__(self, manager: JobManager, job: _Job) -> None:
        self._manager, self._job = manager, job

    def emit(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "progress":
            self._job.record.epoch, self._job.record.step = payload["epoch"], payload["global_step"]
        self._manager.writer.append(self._job.events, kind, payload)

    def should_stop(self) -> bool:
        return self._job.cancel.is_set() or self._manager.stopping.is_set()


class JobManager:
    """Every job of the server, and the threads that run them."""

    def __init__(self, root: Path, registry: Registry, datasets: DatasetStore, *, runners: int = 1) -> None:
        self.root = root / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.registry = registry
        self.datasets = datasets
        self.writer = EventWriter()
        self.stopping = threading.Event()
        self._jobs: dict[str, _Job] = {}
        self._queue: deque[str] = deque()
        self._lock = threading.Condition()
        self._runners = [
            threading.Thread(target=self._run_forever, name=f"weightsmith-job-runner-{i}", daemon=True)
            for i in range(max(1, runners))
        ]

    # --- persistence -----------------------------------------------------------

    def _save(self, job: _Job) -> None:
        temporary = job.folder / ".job.json"
        write_json(temporary, asdict(job.record))
        os.replace(temporary, job.folder / "job.json")
        fsync_path(job.folder)

    def restore(self) -> None:
        """Load every job; queue again those that were queued or running."""
        resumed = []
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not (folder / "job.json").is_file():
                shutil.rmtree(folder, ignore_errors=True)  # creation never completed
                continue
            record = JobRecord(**read_json(folder / "job.json"))
            job = _Job(record, EventLog(folder / "events.jsonl"), folder)
            self._jobs[record.job_id] = job
            if record.state in (QUEUED, RUNNING):
                resumed.append(job)
            else:
                job.events.close()
        for job in sorted(resumed, key=lambda j: (j.record.state != RUNNING, j.record.create_time)):
            self._queue.append(job.record.job_id)
            spec = job.record.spec
            if job.record.state == RUNNING and not spec["output_model_id"]:
                # Keep the model locked until the job runs again: edits meanwhile would void it.
                with contextlib.suppress(NotFound, FailedPrecondition):  # else it fails when it runs
                    self.registry.get(spec["model_id"]).reserve_for_job(job.record.job_id)
        log.info("restored %d job(s), %d to run", len(self._jobs), len(resumed))

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
        self.writer.stop()

    # --- queries ---------------------------------------------------------------

    def get(self, job_id: str, field: str = "job_id") -> JobRecord:
        return self._job(job_id, field).record

    def _job(self, job_id: str, field: str = "job_id") -> _Job:
        validate_id(job_id, field=field, kind="job")
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NotFound(
                f"No job with id {job_id!r}; ListJobs shows the jobs.",
                reason="JOB_NOT_FOUND",
                field=field,
                metadata={"job_id": job_id},
            ) from None

    def last_sequence(self, job_id: str) -> int:
        return self._jobs[job_id].events.last_sequence

    def list(self, size: int, token: str) -> tuple[list[JobRecord], str]:
        size = page_size(size)
        ordered = sorted(
            self._jobs.values(), key=lambda j: (j.record.create_time, j.record.job_id), reverse=True
        )
        keys = [f"{j.record.create_time}|{j.record.job_id}" for j in ordered]
        start = 0
        if token:
            after = decode_page_token(token)
            start = next((i + 1 for i, key in enumerate(keys) if key == after), len(keys))
        page = ordered[start : start + size]
        more = start + size < len(ordered)
        next_token = encode_page_token(keys[start + size - 1]) if more else ""
        return [j.record for j in page], next_token

    def dataset_users(self, dataset_id: str) -> list[str]:
        """Queued or running jobs that read the dataset."""
        return [
            j.record.job_id
            for j in self._jobs.values()
            if j.record.state in (QUEUED, RUNNING)
            and dataset_id in (j.record.spec["train_dataset_id"], j.record.spec["validation_dataset_id"])
        ]

    def events_page(self, job_id: str, after: int, size: int, token: str) -> tuple[list[dict[str, Any]], str]:
        """One page of events after `after` (or the token's position), and the next token.

        The token is not empty while the job can still add events, so a
        poller keeps it and asks again.
        """
        job = self._job(job_id)
        if token:
            after = decode_number_token(token)
        size = page_size(size)
        events = job.events.events_after(after, size)
        last = events[-1]["sequence"] if events else after
        more = len(events) == size or job.record.state in (QUEUED, RUNNING)
        return events, encode_page_token(str(last)) if more else ""

    async def watch(self, job_id: str, after: int) -> AsyncIterator[dict[str, Any]]:
        job = self._job(job_id)
        if after < 0:
            raise InvalidArgument(
                f"Received after_sequence={after}, expected 0 or more.",
                reason="INVALID_SEQUENCE",
                field="after_sequence",
            )
        async for event in job.events.follow(after):
            yield event

    # --- lifecycle -------------------------------------------------------------

    async def create(
        self, job_id: str, training_spec: job_spec.TrainingSpec, document: dict[str, Any]
    ) -> JobRecord:
        """Validate the spec completely, persist the job, queue it."""
        job_id = validate_id(job_id, field="job_id", kind="job") if job_id else new_id("job")
        job_spec.validate(training_spec, self.registry, self.datasets)
        with self._lock:
            output = training_spec.output_model_id
            if output and any(
                j.record.state in (QUEUED, RUNNING) and j.record.spec["output_model_id"] == output
                for j in self._jobs.values()
            ):
                raise AlreadyExists(
                    f"Another queued or running job writes model {output!r} already.",
                    reason="MODEL_EXISTS",
                    field="spec.output_model_id",
                )
            if job_id in self._jobs:
                raise AlreadyExists(
                    f"A job with id {job_id!r} exists already.", reason="JOB_EXISTS", field="job_id"
                )
            staging = self.root / f".staging-{job_id}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            record = JobRecord(job_id, training_spec.to_dict(), document, QUEUED, utc_now())
            write_json(staging / "job.json", asdict(record))
            (staging / "events.jsonl").touch()
            fsync_path(staging)
            os.rename(staging, self.root / job_id)
            fsync_path(self.root)
            job = _Job(record, EventLog(self.root / job_id / "events.jsonl"), self.root / job_id)
            self._jobs[job_id] = job
        await asyncio.get_running_loop().run_in_executor(
            None,
            lambda: self.writer.append(
                job.events, "state_changed", {"state": QUEUED, "detail": ""}, wait=True
            ),
        )
        with self._lock:
            self._queue.append(job_id)
            self._lock.notify_all()
        log.info("job %s queued (model %s)", job_id, training_spec.model_id)
        return record

    async def cancel(self, job_id: str, wait_seconds: float = 30.0) -> JobRecord:
        """Cancel a job; waits (up to `wait_seconds`) for a running one to stop."""
        job = self._job(job_id)
        job.cancel.set()
        with self._lock:
            waiting = job_id in self._queue
            if waiting:
                self._queue.remove(job_id)
        if waiting:  # queued, or waiting to resume: it never starts
            await asyncio.get_running_loop().run_in_executor(None, self._cancel_waiting, job)
            return job.record
        if job.record.state in FINISHED:
            raise FailedPrecondition(
                f"Job {job_id!r} has already ended ({job.record.state}).",
                reason="JOB_FINISHED",
                field="job_id",
            )
        deadline = time.monotonic() + wait_seconds
        while job.record.state not in FINISHED and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return job.record

    def _cancel_waiting(self, job: _Job) -> None:
        if job.record.state == RUNNING and not job.record.spec["output_model_id"]:
            self._release_model(job)
        self._finish(job, CANCELLED, "")

    def _release_model(self, job: _Job) -> None:
        with contextlib.suppress(NotFound, FailedPrecondition):
            self.registry.get(job.record.spec["model_id"]).release_job(job.record.job_id)

    def _finish(self, job: _Job, state: str, detail: str) -> None:
        job.record = replace(
            job.record, state=state, end_time=utc_now(), error=detail if state == FAILED else ""
        )
        self._save(job)
        self.writer.append(job.events, "state_changed", {"state": state, "detail": detail}, wait=True)
        job.events.close()

    # --- running ---------------------------------------------------------------

    def _run_forever(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self.stopping.is_set():
                    self._lock.wait()
                if self.stopping.is_set():
                    return
                job = self._jobs[self._queue.popleft()]
            try:
                self._run(job)
            except Exception:  # a bug must not kill the runner
                log.exception("job %s: runner failed", job.record.job_id)

    def _run(self, job: _Job) -> None:
        spec = job.record.training
        resumed = job.record.state == RUNNING
        if job.cancel.is_set():
            self._finish(job, CANCELLED, "")
            return
        try:
            resident = self.registry.get(spec.model_id)
        except (NotFound, FailedPrecondition) as exc:
            self._finish(job, FAILED, exc.message)
            return
        in_place = not spec.output_model_id
        if in_place and not resident.reserve_for_job(job.record.job_id):
            with self._lock:  # another in-place job holds the model: run this one later
                self._queue.append(job.record.job_id)
            time.sleep(0.5)
            return
        try:
            self._train(job, spec, resident, resumed)
        finally:
            if in_place:
                resident.release_job(job.record.job_id)

    def _train(self, job: _Job, spec: job_spec.TrainingSpec, resident: Any, resumed: bool) -> None:
        record = job.record
        base = record.base_revision if resumed and record.base_revision else resident.revision
        store = self.registry.store
        job.record = replace(record, state=RUNNING, start_time=utc_now(), base_revision=base)
        self._save(job)
        if resumed and self._already_committed(job, spec):
            return
        detail = f"resumed from the checkpoint of epoch {self._checkpoint_epoch(job)}" if resumed else ""
        self.writer.append(job.events, "state_changed", {"state": RUNNING, "detail": detail})
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
                device=resident.device,
                job_dir=job.folder,
                reporter=_Reporter(self, job),
                gpus=[d.name for d in self.registry.devices.devices if d.kind == "GPU"],
            )
        except training.JobStopped:
            if job.cancel.is_set():
                self._finish(job, CANCELLED, "")
            else:
                self.writer.append(
                    job.events, "log", {"level": "INFO", "message": "paused by server shutdown"}
                )
                self.writer.flush()
            return
        except Exception as exc:
            log.exception("job %s failed", record.job_id)
            self._finish(job, FAILED, f"{type(exc).__name__}: {exc}"[:1000])
            return
        try:
            model_id, revision = self._commit(job, spec, resident, base, config_json, outcome)
        except Exception as exc:
            log.exception("job %s: committing the result failed", record.job_id)
            self._finish(job, FAILED, f"committing the result failed: {exc}"[:1000])
            return
        job.record = replace(
            job.record,
            result_model_id=model_id,
            result_revision=revision,
            epoch=outcome.epochs_completed,
            step=outcome.steps_completed,
        )
        self.writer.append(
            job.events,
            "result",
            {
                "model_id": model_id,
                "revision": revision,
                "metrics": outcome.metrics,
                "epochs_completed": outcome.epochs_completed,
                "steps_completed": outcome.steps_completed,
            },
        )
        self._finish(job, SUCCEEDED, "")
        shutil.rmtree(job.folder / "checkpoint", ignore_errors=True)

    def _checkpoint_epoch(self, job: _Job) -> int:
        pointer = job.folder / "checkpoint" / "checkpoint.json"
        return int(read_json(pointer)["epoch"]) if pointer.is_file() else 0

    def _validation(self, spec: job_spec.TrainingSpec) -> tuple[Any, int] | None:
        if spec.validation_dataset_id:
            return self.datasets.load(spec.validation_dataset_id, "train")
        if self.datasets.get(spec.train_dataset_id).validation_example_count:
            return self.datasets.load(spec.train_dataset_id, "validation")
        return None

    def _already_committed(self, job: _Job, spec: job_spec.TrainingSpec) -> bool:
        """A job killed between its commit and SUCCEEDED: finish it, don't train again."""
        author = f"job:{job.record.job_id}"
        model_id = spec.output_model_id or spec.model_id
        store = self.registry.store
        try:
            numbers = store.revision_numbers(model_id)
        except FileNotFoundError:
            return False
        for number in numbers:
            if number > (0 if spec.output_model_id else job.record.base_revision):
                record = store.read_revision(model_id, number)
                if record.author == author:
                    job.record = replace(job.record, result_model_id=model_id, result_revision=number)
                    self.writer.append(
                        job.events,
                        "log",
                        {"level": "INFO", "message": "result was committed before the restart"},
                    )
                    self._finish(job, SUCCEEDED, "")
                    return True
        return False

    def _commit(
        self,
        job: _Job,
        spec: job_spec.TrainingSpec,
        resident: Any,
        base: int,
        config_json: str,
        outcome: training.Outcome,
    ) -> tuple[str, int]:
        message = (
            f"job {job.record.job_id}: {outcome.epochs_completed} epoch(s), {outcome.steps_completed} steps"
        )
        author = f"job:{job.record.job_id}"
        if spec.output_model_id:
            info = self.registry.create_from_values(
                spec.output_model_id,
                config_json,
                outcome.values,
                message=message,
                author=author,
            )
            return info.model_id, info.revision
        staged = self.registry.store.stage_revision(spec.model_id)

        def prepare(state: ModelState, number: int) -> Prepared:
            current = state.manifest
            changed = {
                path: value
                for path, value in outcome.values.items()
                if value.tobytes() != snapshot(state.variables[path]).tobytes()
            }
            manifest = Manifest(
                layer_count=current.layer_count,
                variables=tuple(
                    staged.add_tensor(v.entry, changed[v.path]) if v.path in changed else v
                    for v in current.variables
                ),
            )
            record = RevisionRecord(
                model_id=spec.model_id,
                revision=number,
                create_time=utc_now(),
                author=author,
                message=message,
                kind="job",
                summary=f"{message}: {len(changed)} variable(s) trained",
                architecture_changed=False,
                architecture_revision=state.revision.architecture_revision,
                stored_bytes=staged.stored_bytes,
                changed_variables=[v.path for v in current.variables if v.path in changed],
            )
            return Prepared(record, manifest, {p: np.ascontiguousarray(v) for p, v in changed.items()})

        committed = self.registry.commit_revision(
            resident, staged, expected_revision=base, prepare=prepare, job_id=job.record.job_id
        )
        return spec.model_id, committed.revision
