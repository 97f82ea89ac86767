"""Job codecs without a server: specs round-trip, unknown enum numbers name their field, events encode."""

from __future__ import annotations

import pytest

from tests.jobs_support import full_training_spec
from weightsmith.v1 import job_pb2
from weightsmith_server.api.codecs import jobs as codec
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.jobs.events import (
    CheckpointSaved,
    EpochEnded,
    JobEvent,
    JobResult,
    LogLevel,
    LogLine,
    StateChanged,
    StepProgress,
)
from weightsmith_server.jobs.record import JobRecord, JobState
from weightsmith_server.jobs.spec import LearningRateSpec, OptimizerSpec, ScheduleKind
from weightsmith_server.selectors import Selector

RATES = [
    LearningRateSpec(ScheduleKind.CONSTANT, constant=0.1),
    LearningRateSpec(
        ScheduleKind.EXPONENTIAL_DECAY, initial=0.1, decay_steps=10, decay_rate=0.5, staircase=True
    ),
    LearningRateSpec(ScheduleKind.COSINE_DECAY, initial=0.1, decay_steps=10, alpha=0.1, warmup_from=0.01),
    LearningRateSpec(ScheduleKind.PIECEWISE_CONSTANT, boundaries=(10, 20), values=(0.1, 0.01, 0.001)),
    LearningRateSpec(None),
]


def test_a_full_spec_round_trips() -> None:
    spec = full_training_spec()
    assert codec.training_spec(codec.job_spec(spec)) == spec


@pytest.mark.parametrize("rate", RATES, ids=lambda r: str(r.kind))
def test_every_learning_rate_round_trips(rate: LearningRateSpec) -> None:
    spec = full_training_spec(optimizer=OptimizerSpec("adamw", rate))  # type: ignore[arg-type]
    assert codec.training_spec(codec.job_spec(spec)) == spec


def test_defaults_round_trip() -> None:
    spec = full_training_spec(
        freeze=None,
        unfreeze=Selector(layer_range=(None, None)),
        train_last_layers=None,
        early_stopping=None,
        seed=None,
        output_model_id="",
        shuffle=True,
    )
    assert codec.training_spec(codec.job_spec(spec)) == spec


UNKNOWN_ENUMS = [
    ("optimizer", lambda s: setattr(s.optimizer, "kind", 99), "spec.optimizer.kind"),
    ("random flip", lambda s: setattr(s.preprocessing, "random_flip", 42), "spec.preprocessing.random_flip"),
]


@pytest.mark.parametrize(("name", "corrupt", "field"), UNKNOWN_ENUMS, ids=[c[0] for c in UNKNOWN_ENUMS])
def test_unknown_enum_numbers_are_invalid_arguments_naming_the_field(name: str, corrupt, field: str) -> None:
    message = codec.job_spec(full_training_spec())
    corrupt(message)
    with pytest.raises(InvalidArgument) as caught:
        codec.training_spec(message)
    assert caught.value.reason == "INVALID_ENUM_VALUE", name
    assert caught.value.violations[0][0] == field, name


def test_an_unspecified_optimizer_is_adam() -> None:
    message = codec.job_spec(full_training_spec())
    message.optimizer.kind = job_pb2.OPTIMIZER_KIND_UNSPECIFIED
    assert codec.training_spec(message).optimizer.kind == "adam"


def test_a_job_carries_its_encoded_spec() -> None:
    record = JobRecord(
        "job-1",
        full_training_spec(),
        JobState.FAILED,
        "2026-01-01T00:00:00Z",
        start_time="2026-01-01T00:00:01Z",
        end_time="2026-01-01T00:00:02Z",
        error="boom",
    )
    message = codec.job(record, last_sequence=7)
    assert message.spec == codec.job_spec(record.spec)
    assert message.state == job_pb2.JOB_STATE_FAILED and message.last_sequence == 7
    assert message.end_time.seconds - message.create_time.seconds == 2


EVENTS = [
    (StateChanged(JobState.CANCELLED, "by request"), "state_changed"),
    (StepProgress(1, 2, 3, 4, 0.5, {"accuracy": 0.9}, 0.01, 100.0, 1.0), "progress"),
    (EpochEnded(1, {"loss": 0.5}, {"loss": 0.6}), "epoch_ended"),
    (CheckpointSaved(1, 3), "checkpoint_saved"),
    (LogLine(LogLevel.WARNING, "careful"), "log"),
    (JobResult("m", 2, {"loss": 0.4}, 1, 3), "result"),
]


@pytest.mark.parametrize(("payload", "kind"), EVENTS, ids=[e[1] for e in EVENTS])
def test_every_event_kind_encodes(payload, kind: str) -> None:
    message = codec.job_event(JobEvent(5, "2026-01-01T00:00:00Z", payload))
    assert message.sequence == 5 and message.WhichOneof("kind") == kind
    if kind == "log":
        assert message.log.level == job_pb2.LOG_LEVEL_WARNING and message.log.message == "careful"
    elif kind == "state_changed":
        assert message.state_changed.state == job_pb2.JOB_STATE_CANCELLED
    elif kind == "progress":
        assert message.progress.metrics["accuracy"] == pytest.approx(0.9)


def test_an_old_client_sending_random_flip_as_a_string_is_refused() -> None:
    # What a client built before RandomFlip existed puts on the wire: field 3, a string.
    old_preprocessing = b"\x1a\x0ahorizontal"
    spec = job_pb2.JobSpec(preprocessing=job_pb2.Preprocessing.FromString(old_preprocessing))
    with pytest.raises(InvalidArgument) as caught:
        codec.training_spec(spec)
    assert caught.value.reason == "INVALID_ENUM_VALUE"
    assert caught.value.violations[0][0] == "spec.preprocessing.random_flip"
