"""Job specs and records without gRPC: enums validated where defined, `job.json` old and new."""

from __future__ import annotations

import json

import pytest

from tests.jobs_support import full_training_spec
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.jobs.record import JobRecord, JobState
from weightsmith_server.jobs.spec import (
    LearningRateSpec,
    OptimizerKind,
    OptimizerSpec,
    PreprocessingSpec,
    RandomFlip,
    ScheduleKind,
    TrainingSpec,
)

CONSTANT = LearningRateSpec(ScheduleKind.CONSTANT, constant=0.1)


def test_a_full_spec_survives_job_json() -> None:
    spec = full_training_spec()
    record = JobRecord("job-1", spec, JobState.RUNNING, "2026-01-01T00:00:00Z", base_revision=3)
    stored = json.loads(json.dumps(record.to_dict()))
    assert stored["spec"] == json.loads(json.dumps(spec.to_dict()))
    assert "document" not in stored
    assert stored["state"] == "running" and stored["spec"]["preprocessing"]["random_flip"] == "horizontal"
    assert JobRecord.from_dict(stored) == record


def test_job_json_of_the_previous_server_reads_and_ignores_its_proto_document() -> None:
    spec = full_training_spec(preprocessing=PreprocessingSpec(random_flip=RandomFlip.NONE))
    old = json.loads(json.dumps(JobRecord("old", spec, JobState.SUCCEEDED, "2026-01-01T00:00:00Z").to_dict()))
    old["document"] = {"modelId": "base", "preprocessing": {"randomFlip": "horizontal"}}
    record = JobRecord.from_dict(old)
    assert record.spec == spec and record.state is JobState.SUCCEEDED
    assert record.spec.optimizer.kind is OptimizerKind.SGD
    assert record.spec.preprocessing.random_flip is RandomFlip.NONE


UNKNOWN_VALUES = [
    (lambda: OptimizerSpec("adagrad", CONSTANT), "spec.optimizer.kind", "UNKNOWN_OPTIMIZER"),  # type: ignore[arg-type]
    (lambda: LearningRateSpec("linear"), "spec.optimizer.learning_rate", "MISSING_LEARNING_RATE"),  # type: ignore[arg-type]
    (lambda: PreprocessingSpec(random_flip="diagonal"), "spec.preprocessing.random_flip", "INVALID_FLIP"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("build", "field", "reason"), UNKNOWN_VALUES, ids=["optimizer", "schedule", "flip"])
def test_spec_enums_refuse_unknown_values_where_they_are_defined(build, field: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        build()
    assert caught.value.reason == reason
    assert caught.value.violations[0][0] == field


def test_spec_enums_accept_their_stored_strings() -> None:
    optimizer = OptimizerSpec("rmsprop", LearningRateSpec("piecewise_constant"))  # type: ignore[arg-type]
    assert optimizer.kind is OptimizerKind.RMSPROP
    assert optimizer.learning_rate.kind is ScheduleKind.PIECEWISE_CONSTANT
    assert PreprocessingSpec(random_flip="vertical").random_flip is RandomFlip.VERTICAL  # type: ignore[arg-type]
    assert not PreprocessingSpec().augments


def test_job_state_refuses_unknown_values() -> None:
    with pytest.raises(ValueError):
        JobRecord("j", full_training_spec(), "paused", "2026-01-01T00:00:00Z")  # type: ignore[arg-type]
    assert [s for s in JobState if s.finished] == [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED]


def test_spec_intervals_default() -> None:
    spec = TrainingSpec("m", "d", 1, 1, OptimizerSpec(OptimizerKind.ADAM, CONSTANT), "mse")
    assert (spec.progress_interval, spec.checkpoint_interval) == (10, 1)
