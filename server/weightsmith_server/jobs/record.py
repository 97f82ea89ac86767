"""A job's lifecycle state and what `job.json` holds about it."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any

from weightsmith_server.jobs.spec import TrainingSpec


class JobState(enum.StrEnum):
    """QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED (stored as these strings)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class JobRecord:
    """A job's spec and current state, as `job.json` holds them."""

    job_id: str
    spec: TrainingSpec
    state: JobState
    create_time: str
    start_time: str = ""
    end_time: str = ""
    error: str = ""
    result_model_id: str = ""
    result_revision: int = 0
    epoch: int = 0
    step: int = 0
    base_revision: int = 0
    # The principal that created the job ("" without authentication); only it sees and controls it.
    owner: str = ""

    def __post_init__(self) -> None:
        self.state = JobState(self.state)

    def to_dict(self) -> dict[str, Any]:
        """JSON values: the domain spec (`TrainingSpec.to_dict`) and the state as its string."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> JobRecord:
        """Inverse of `to_dict`; the proto JSON `document` that older servers stored is ignored."""
        fields = {k: v for k, v in raw.items() if k != "document"}
        return cls(**(fields | {"spec": TrainingSpec.from_dict(raw["spec"])}))
