"""Job protos to domain objects and back: job specs, jobs and their events.

`training_spec` decodes a `JobSpec` and `job_spec` encodes one; GetJob
answers with the spec encoded from the domain's `TrainingSpec`, so
`training_spec(job_spec(x)) == x` for every spec (a test holds it).
"""

from __future__ import annotations

from dataclasses import asdict

from google.protobuf import unknown_fields
from google.protobuf.message import Message

from weightsmith.v1 import job_pb2
from weightsmith_server.api.codecs.common import EnumTable, timestamp
from weightsmith_server.api.codecs.selectors import selector, selector_message
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
from weightsmith_server.jobs.spec import (
    EarlyStoppingSpec,
    LearningRateSpec,
    OptimizerKind,
    OptimizerSpec,
    PreprocessingSpec,
    RandomFlip,
    ScheduleKind,
    TrainingSpec,
)

# An unspecified optimizer is Adam, the documented default.
OPTIMIZER_KINDS = EnumTable(
    job_pb2.OptimizerKind,
    {
        job_pb2.OPTIMIZER_KIND_UNSPECIFIED: OptimizerKind.ADAM,
        job_pb2.OPTIMIZER_KIND_ADAM: OptimizerKind.ADAM,
        job_pb2.OPTIMIZER_KIND_ADAMW: OptimizerKind.ADAMW,
        job_pb2.OPTIMIZER_KIND_SGD: OptimizerKind.SGD,
        job_pb2.OPTIMIZER_KIND_RMSPROP: OptimizerKind.RMSPROP,
    },
)
RANDOM_FLIPS = EnumTable(
    job_pb2.RandomFlip,
    {
        job_pb2.RANDOM_FLIP_UNSPECIFIED: RandomFlip.NONE,
        job_pb2.RANDOM_FLIP_HORIZONTAL: RandomFlip.HORIZONTAL,
        job_pb2.RANDOM_FLIP_VERTICAL: RandomFlip.VERTICAL,
        job_pb2.RANDOM_FLIP_HORIZONTAL_AND_VERTICAL: RandomFlip.HORIZONTAL_AND_VERTICAL,
    },
)
JOB_STATES = EnumTable(
    job_pb2.JobState,
    {
        job_pb2.JOB_STATE_QUEUED: JobState.QUEUED,
        job_pb2.JOB_STATE_RUNNING: JobState.RUNNING,
        job_pb2.JOB_STATE_SUCCEEDED: JobState.SUCCEEDED,
        job_pb2.JOB_STATE_FAILED: JobState.FAILED,
        job_pb2.JOB_STATE_CANCELLED: JobState.CANCELLED,
    },
)
LOG_LEVELS = EnumTable(
    job_pb2.LogLevel,
    {
        job_pb2.LOG_LEVEL_DEBUG: LogLevel.DEBUG,
        job_pb2.LOG_LEVEL_INFO: LogLevel.INFO,
        job_pb2.LOG_LEVEL_WARNING: LogLevel.WARNING,
        job_pb2.LOG_LEVEL_ERROR: LogLevel.ERROR,
    },
)


# --- specs: wire to domain ---------------------------------------------------------


def _learning_rate(message: job_pb2.LearningRate) -> LearningRateSpec:
    kind = message.WhichOneof("rate")
    if kind == "constant":
        return LearningRateSpec(ScheduleKind.CONSTANT, constant=message.constant)
    if kind == "exponential_decay":
        e = message.exponential_decay
        return LearningRateSpec(
            ScheduleKind.EXPONENTIAL_DECAY,
            initial=e.initial_learning_rate,
            decay_steps=e.decay_steps,
            decay_rate=e.decay_rate,
            staircase=e.staircase,
        )
    if kind == "cosine_decay":
        c = message.cosine_decay
        return LearningRateSpec(
            ScheduleKind.COSINE_DECAY,
            initial=c.initial_learning_rate,
            decay_steps=c.decay_steps,
            alpha=c.alpha,
            warmup_steps=c.warmup_steps,
            warmup_from=c.warmup_from,
        )
    if kind == "piecewise_constant":
        p = message.piecewise_constant
        return LearningRateSpec(
            ScheduleKind.PIECEWISE_CONSTANT, boundaries=tuple(p.boundaries), values=tuple(p.values)
        )
    return LearningRateSpec(None)  # `jobs.validation` names the missing rate


def _optimizer(message: job_pb2.Optimizer) -> OptimizerSpec:
    return OptimizerSpec(
        kind=OPTIMIZER_KINDS.decode(message.kind, field="spec.optimizer.kind"),
        learning_rate=_learning_rate(message.learning_rate),
        momentum=message.momentum,
        nesterov=message.nesterov,
        weight_decay=message.weight_decay if message.HasField("weight_decay") else None,
    )


# `Preprocessing.random_flip` was a string in field 3 before it became an enum.
_OLD_RANDOM_FLIP_FIELD = 3


def _preprocessing(message: job_pb2.Preprocessing) -> PreprocessingSpec:
    if any(f.field_number == _OLD_RANDOM_FLIP_FIELD for f in unknown_fields.UnknownFieldSet(message)):
        raise InvalidArgument(
            "Received `random_flip` as a string (field 3), which this server no longer reads; send the "
            "RandomFlip enum (field 6), e.g. RANDOM_FLIP_HORIZONTAL, with an updated client.",
            reason="INVALID_ENUM_VALUE",
            field="spec.preprocessing.random_flip",
        )
    if message.resize and len(message.resize) != 2:
        raise InvalidArgument(
            f"Received resize={list(message.resize)}, expected [height, width].",
            reason="INVALID_RESIZE",
            field="spec.preprocessing.resize",
        )
    return PreprocessingSpec(
        resize=tuple(message.resize) if message.resize else None,  # type: ignore[arg-type]
        rescale=message.rescale if message.HasField("rescale") else None,
        random_flip=RANDOM_FLIPS.decode(message.random_flip, field="spec.preprocessing.random_flip"),
        random_rotation=message.random_rotation,
        random_zoom=message.random_zoom,
    )


def _early_stopping(message: job_pb2.EarlyStopping) -> EarlyStoppingSpec:
    return EarlyStoppingSpec(
        monitor=message.monitor or "val_loss",
        patience=message.patience,
        min_delta=message.min_delta,
        restore_best_weights=message.restore_best_weights,
    )


def training_spec(message: job_pb2.JobSpec) -> TrainingSpec:
    """Decode a job spec; `jobs.validation.validate` checks it against the server."""
    trainable = message.trainable
    return TrainingSpec(
        model_id=message.model_id,
        train_dataset_id=message.train_dataset_id,
        epochs=message.epochs,
        batch_size=message.batch_size,
        optimizer=_optimizer(message.optimizer),
        loss=message.loss,
        metrics=tuple(message.metrics),
        output_model_id=message.output_model_id,
        validation_dataset_id=message.validation_dataset_id,
        validation_split=message.validation_split,
        freeze=selector(trainable.freeze) if trainable.HasField("freeze") else None,
        unfreeze=selector(trainable.unfreeze) if trainable.HasField("unfreeze") else None,
        train_last_layers=trainable.train_last_layers if trainable.HasField("train_last_layers") else None,
        early_stopping=_early_stopping(message.early_stopping)
        if message.HasField("early_stopping")
        else None,
        checkpoint_every_epochs=message.checkpoint_every_epochs,
        progress_every_steps=message.progress_every_steps,
        checkpoint_every_steps=message.checkpoint_every_steps,
        seed=message.seed if message.HasField("seed") else None,
        preprocessing=_preprocessing(message.preprocessing),
        mixed_precision=message.mixed_precision,
        shuffle=message.shuffle if message.HasField("shuffle") else True,
    )


# --- specs: domain to wire ---------------------------------------------------------


def _learning_rate_message(rate: LearningRateSpec) -> job_pb2.LearningRate:
    if rate.kind == ScheduleKind.CONSTANT:
        return job_pb2.LearningRate(constant=rate.constant)
    if rate.kind == ScheduleKind.EXPONENTIAL_DECAY:
        decay = job_pb2.ExponentialDecay(
            initial_learning_rate=rate.initial,
            decay_steps=rate.decay_steps,
            decay_rate=rate.decay_rate,
            staircase=rate.staircase,
        )
        return job_pb2.LearningRate(exponential_decay=decay)
    if rate.kind == ScheduleKind.COSINE_DECAY:
        cosine = job_pb2.CosineDecay(
            initial_learning_rate=rate.initial,
            decay_steps=rate.decay_steps,
            alpha=rate.alpha,
            warmup_steps=rate.warmup_steps,
            warmup_from=rate.warmup_from,
        )
        return job_pb2.LearningRate(cosine_decay=cosine)
    if rate.kind == ScheduleKind.PIECEWISE_CONSTANT:
        pieces = job_pb2.PiecewiseConstant(boundaries=rate.boundaries, values=rate.values)
        return job_pb2.LearningRate(piecewise_constant=pieces)
    return job_pb2.LearningRate()


def _trainable_message(spec: TrainingSpec) -> job_pb2.TrainableSelection:
    message = job_pb2.TrainableSelection()
    if spec.freeze is not None:
        message.freeze.CopyFrom(selector_message(spec.freeze))
    if spec.unfreeze is not None:
        message.unfreeze.CopyFrom(selector_message(spec.unfreeze))
    if spec.train_last_layers is not None:
        message.train_last_layers = spec.train_last_layers
    return message


def _preprocessing_message(pre: PreprocessingSpec) -> job_pb2.Preprocessing:
    message = job_pb2.Preprocessing(
        resize=pre.resize or (),
        random_flip=RANDOM_FLIPS.encode(pre.random_flip),
        random_rotation=pre.random_rotation,
        random_zoom=pre.random_zoom,
    )
    if pre.rescale is not None:
        message.rescale = pre.rescale
    return message


def job_spec(spec: TrainingSpec) -> job_pb2.JobSpec:
    """Encode a domain spec: the inverse of `training_spec`."""
    optimizer = spec.optimizer
    message = job_pb2.JobSpec(
        model_id=spec.model_id,
        output_model_id=spec.output_model_id,
        train_dataset_id=spec.train_dataset_id,
        validation_dataset_id=spec.validation_dataset_id,
        validation_split=spec.validation_split,
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        optimizer=job_pb2.Optimizer(
            kind=OPTIMIZER_KINDS.encode(optimizer.kind),
            learning_rate=_learning_rate_message(optimizer.learning_rate),
            momentum=optimizer.momentum,
            nesterov=optimizer.nesterov,
            weight_decay=optimizer.weight_decay,
        ),
        loss=spec.loss,
        metrics=spec.metrics,
        trainable=_trainable_message(spec),
        checkpoint_every_epochs=spec.checkpoint_every_epochs,
        progress_every_steps=spec.progress_every_steps,
        checkpoint_every_steps=spec.checkpoint_every_steps,
        seed=spec.seed,
        preprocessing=_preprocessing_message(spec.preprocessing),
        mixed_precision=spec.mixed_precision,
        shuffle=spec.shuffle,
    )
    if spec.early_stopping is not None:
        message.early_stopping.CopyFrom(job_pb2.EarlyStopping(**asdict(spec.early_stopping)))
    return message


# --- jobs and events ---------------------------------------------------------------


def job(record: JobRecord, last_sequence: int) -> job_pb2.Job:
    """A job as GetJob answers it: its spec, state, progress and result."""
    message = job_pb2.Job(
        job_id=record.job_id,
        spec=job_spec(record.spec),
        state=JOB_STATES.encode(record.state),
        create_time=timestamp(record.create_time),
        error=record.error,
        result_revision=record.result_revision,
        epoch=record.epoch,
        step=record.step,
        last_sequence=last_sequence,
        base_revision=record.base_revision,
        owner=record.owner,
    )
    if record.start_time:
        message.start_time.CopyFrom(timestamp(record.start_time))
    if record.end_time:
        message.end_time.CopyFrom(timestamp(record.end_time))
    return message


# Payloads whose fields map one to one onto their message: the `kind` oneof field and message type.
_PLAIN_PAYLOADS: dict[type, tuple[str, type[Message]]] = {
    StepProgress: ("progress", job_pb2.StepProgress),
    EpochEnded: ("epoch_ended", job_pb2.EpochEnded),
    CheckpointSaved: ("checkpoint_saved", job_pb2.CheckpointSaved),
    JobResult: ("result", job_pb2.JobResult),
}


def job_event(event: JobEvent) -> job_pb2.JobEvent:
    """One job event, its payload in the `kind` oneof."""
    message = job_pb2.JobEvent(sequence=event.sequence, time=timestamp(event.time))
    payload = event.payload
    if isinstance(payload, StateChanged):
        state = JOB_STATES.encode(payload.state)
        message.state_changed.CopyFrom(job_pb2.StateChanged(state=state, detail=payload.detail))
    elif isinstance(payload, LogLine):
        level = LOG_LEVELS.encode(payload.level)
        message.log.CopyFrom(job_pb2.LogLine(level=level, message=payload.message))
    else:
        name, message_type = _PLAIN_PAYLOADS[type(payload)]
        getattr(message, name).CopyFrom(message_type(**asdict(payload)))
    return message
