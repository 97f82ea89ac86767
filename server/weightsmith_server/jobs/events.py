"""What a job reports while it runs: one typed payload per kind of event, and the event itself.

`events.jsonl` stores each event as `{"sequence", "time", "kind", "payload"}`
with the payload's fields as JSON values; `JobEvent.to_json` and
`JobEvent.from_json` are the only code that knows that layout.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from weightsmith_server.jobs.record import JobState


class LogLevel(enum.StrEnum):
    """The severity of a job's log line (stored as these strings)."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


@dataclass(frozen=True)
class StateChanged:
    """The job entered `state`; `detail` says why (an error, a resume) when there is more to say."""

    kind: ClassVar[str] = "state_changed"
    state: JobState
    detail: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", JobState(self.state))


@dataclass(frozen=True)
class StepProgress:
    """Training progress after a step: reported every `progress_interval` steps and at epoch ends."""

    kind: ClassVar[str] = "progress"
    epoch: int
    step: int
    steps_per_epoch: int
    global_step: int
    loss: float
    metrics: dict[str, float]
    learning_rate: float
    samples_per_second: float
    eta_seconds: float


@dataclass(frozen=True)
class EpochEnded:
    """An epoch finished, with its training metrics and validation metrics (without `val_`)."""

    kind: ClassVar[str] = "epoch_ended"
    epoch: int
    train_metrics: dict[str, float] = field(default_factory=dict)
    validation_metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointSaved:
    """A checkpoint of `epoch` is on disk: a restart resumes from here."""

    kind: ClassVar[str] = "checkpoint_saved"
    epoch: int
    global_step: int


@dataclass(frozen=True)
class LogLine:
    """A message about the job for people watching it."""

    kind: ClassVar[str] = "log"
    level: LogLevel
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "level", LogLevel(self.level))


@dataclass(frozen=True)
class JobResult:
    """The trained values are committed as `revision` of `model_id`."""

    kind: ClassVar[str] = "result"
    model_id: str
    revision: int
    metrics: dict[str, float]
    epochs_completed: int
    steps_completed: int


EventPayload = StateChanged | StepProgress | EpochEnded | CheckpointSaved | LogLine | JobResult

_PAYLOADS: dict[str, type[EventPayload]] = {
    payload.kind: payload
    for payload in (StateChanged, StepProgress, EpochEnded, CheckpointSaved, LogLine, JobResult)
}


@dataclass(frozen=True)
class JobEvent:
    """One persisted event: its gap-free sequence number (from 1), its RFC 3339 time and payload."""

    sequence: int
    time: str
    payload: EventPayload

    def to_json(self) -> dict[str, Any]:
        """The event as one line of `events.jsonl` holds it."""
        return {
            "sequence": self.sequence,
            "time": self.time,
            "kind": self.payload.kind,
            "payload": asdict(self.payload),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> JobEvent:
        """Inverse of `to_json`; KeyError, TypeError or ValueError for a line it did not write."""
        payload = _PAYLOADS[raw["kind"]](**raw["payload"])
        return cls(sequence=int(raw["sequence"]), time=str(raw["time"]), payload=payload)
