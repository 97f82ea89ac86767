"""Training protos to domain objects and back: job specs, jobs, events, datasets."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from weightsmith.v1 import tensor_pb2, training_service_pb2
from weightsmith_server.api.convert import selector, timestamp
from weightsmith_server.datasets import DatasetInfo, DatasetSource, FeatureSpecInfo
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.jobs import spec as job_spec
from weightsmith_server.jobs.manager import JobRecord
from weightsmith_server.tensors import numpy_dtype_for, wire_dtype

pb = training_service_pb2

_FORMATS = {
    pb.DATASET_FORMAT_NPZ: "npz",
    pb.DATASET_FORMAT_TFRECORD: "tfrecord",
    pb.DATASET_FORMAT_IMAGE_FOLDER: "image_folder",
}
_FORMAT_ENUMS = {name: value for value, name in _FORMATS.items()}
_OPTIMIZERS = {
    pb.OPTIMIZER_KIND_UNSPECIFIED: "adam",
    pb.OPTIMIZER_KIND_ADAM: "adam",
    pb.OPTIMIZER_KIND_ADAMW: "adamw",
    pb.OPTIMIZER_KIND_SGD: "sgd",
    pb.OPTIMIZER_KIND_RMSPROP: "rmsprop",
}
_STATES = {
    "queued": pb.JOB_STATE_QUEUED,
    "running": pb.JOB_STATE_RUNNING,
    "succeeded": pb.JOB_STATE_SUCCEEDED,
    "failed": pb.JOB_STATE_FAILED,
    "cancelled": pb.JOB_STATE_CANCELLED,
}


def _feature(message: training_service_pb2.FeatureSpec, field: str) -> FeatureSpecInfo:
    dtype = numpy_dtype_for(message.dtype, field=f"{field}.dtype").name
    return FeatureSpecInfo(name=message.name, dtype=dtype, shape=tuple(message.shape))


def dataset_source(message: training_service_pb2.DatasetSource, field: str) -> DatasetSource:
    """Decode a source; the format must be set."""
    fmt = _FORMATS.get(message.format)
    if fmt is None:
        raise InvalidArgument(
            "Received no dataset format; set NPZ, TFRECORD or IMAGE_FOLDER.",
            reason="MISSING_FORMAT",
            field=f"{field}.format",
        )
    features = labels = None
    if message.HasField("tfrecord"):
        features = _feature(message.tfrecord.features, f"{field}.tfrecord.features")
        labels = _feature(message.tfrecord.labels, f"{field}.tfrecord.labels")
    image = message.image_folder
    return DatasetSource(
        format=fmt,
        tfrecord_features=features,
        tfrecord_labels=labels,
        image_size=tuple(image.image_size) if image.image_size else None,  # type: ignore[arg-type]
        channels=image.channels or 3,
    )


def dataset(info: DatasetInfo, used_by: list[str]) -> training_service_pb2.Dataset:
    return pb.Dataset(
        dataset_id=info.dataset_id,
        format=_FORMAT_ENUMS[info.format],
        example_count=info.example_count,
        validation_example_count=info.validation_example_count,
        features=tensor_pb2.TensorSpec(
            name=info.features.name, dtype=wire_dtype(info.features.dtype), shape=info.features.shape
        ),
        labels=tensor_pb2.TensorSpec(
            name=info.labels.name, dtype=wire_dtype(info.labels.dtype), shape=info.labels.shape
        ),
        class_count=info.class_count,
        class_names=info.class_names,
        size_bytes=info.size_bytes,
        create_time=timestamp(info.create_time),
        used_by_jobs=used_by,
    )


def _learning_rate(message: training_service_pb2.LearningRate) -> job_spec.LearningRateSpec:
    kind = message.WhichOneof("rate") or ""
    if kind == "constant":
        return job_spec.LearningRateSpec("constant", constant=message.constant)
    if kind == "exponential_decay":
        e = message.exponential_decay
        return job_spec.LearningRateSpec(
            kind,
            initial=e.initial_learning_rate,
            decay_steps=e.decay_steps,
            decay_rate=e.decay_rate,
            staircase=e.staircase,
        )
    if kind == "cosine_decay":
        c = message.cosine_decay
        return job_spec.LearningRateSpec(
            kind,
            initial=c.initial_learning_rate,
            decay_steps=c.decay_steps,
            alpha=c.alpha,
            warmup_steps=c.warmup_steps,
            warmup_from=c.warmup_from,
        )
    if kind == "piecewise_constant":
        p = message.piecewise_constant
        return job_spec.LearningRateSpec(kind, boundaries=tuple(p.boundaries), values=tuple(p.values))
    return job_spec.LearningRateSpec("")


def training_spec(message: training_service_pb2.JobSpec) -> job_spec.TrainingSpec:
    """Decode a job spec; `jobs.spec.validate` checks it against the server."""
    optimizer = message.optimizer
    known = set(_OPTIMIZERS)
    if optimizer.kind not in known:
        raise InvalidArgument(
            f"Received an unknown optimizer kind {optimizer.kind}.",
            reason="UNKNOWN_OPTIMIZER",
            field="spec.optimizer.kind",
        )
    trainable = message.trainable
    stopping = message.early_stopping if message.HasField("early_stopping") else None
    pre = message.preprocessing
    if pre.resize and len(pre.resize) != 2:
        raise InvalidArgument(
            f"Received resize={list(pre.resize)}, expected [height, width].",
            reason="INVALID_RESIZE",
            field="spec.preprocessing.resize",
        )
    return job_spec.TrainingSpec(
        model_id=message.model_id,
        train_dataset_id=message.train_dataset_id,
        epochs=message.epochs,
        batch_size=message.batch_size,
        optimizer=job_spec.OptimizerSpec(
            kind=_OPTIMIZERS[optimizer.kind],
            learning_rate=_learning_rate(optimizer.learning_rate),
            momentum=optimizer.momentum,
            nesterov=optimizer.nesterov,
            weight_decay=optimizer.weight_decay if optimizer.HasField("weight_decay") else None,
        ),
        loss=message.loss,
        metrics=tuple(message.metrics),
        output_model_id=message.output_model_id,
        validation_dataset_id=message.validation_dataset_id,
        validation_split=message.validation_split,
        freeze=selector(trainable.freeze) if trainable.HasField("freeze") else None,
        unfreeze=selector(trainable.unfreeze) if trainable.HasField("unfreeze") else None,
        train_last_layers=trainable.train_last_layers if trainable.HasField("train_last_layers") else None,
        early_stopping=job_spec.EarlyStoppingSpec(
            monitor=stopping.monitor or "val_loss",
            patience=stopping.patience,
            min_delta=stopping.min_delta,
            restore_best_weights=stopping.restore_best_weights,
        )
        if stopping is not None
        else None,
        checkpoint_every_epochs=message.checkpoint_every_epochs,
        progress_every_steps=message.progress_every_steps,
        seed=message.seed if message.HasField("seed") else None,
        preprocessing=job_spec.PreprocessingSpec(
            resize=tuple(pre.resize) if pre.resize else None,  # type: ignore[arg-type]
            rescale=pre.rescale if pre.HasField("rescale") else None,
            random_flip=pre.random_flip,
            random_rotation=pre.random_rotation,
            random_zoom=pre.random_zoom,
        ),
        mixed_precision=message.mixed_precision,
        shuffle=message.shuffle if message.HasField("shuffle") else True,
    )


def spec_document(message: training_service_pb2.JobSpec) -> dict[str, Any]:
    """The spec as the client sent it, kept to answer GetJob with it."""
    return json_format.MessageToDict(message)


def job(record: JobRecord, last_sequence: int) -> training_service_pb2.Job:
    spec = pb.JobSpec()
    json_format.ParseDict(record.document, spec)
    message = pb.Job(
        job_id=record.job_id,
        spec=spec,
        state=_STATES[record.state],
        create_time=timestamp(record.create_time),
        error=record.error,
        result_revision=record.result_revision,
        epoch=record.epoch,
        step=record.step,
        last_sequence=last_sequence,
        base_revision=record.base_revision,
    )
    if record.start_time:
        message.start_time.CopyFrom(timestamp(record.start_time))
    if record.end_time:
        message.end_time.CopyFrom(timestamp(record.end_time))
    return message


def event(raw: dict[str, Any]) -> training_service_pb2.JobEvent:
    message = pb.JobEvent(sequence=raw["sequence"], time=timestamp(raw["time"]))
    payload = raw["payload"]
    kind = raw["kind"]
    if kind == "state_changed":
        message.state_changed.CopyFrom(
            pb.StateChanged(state=_STATES[payload["state"]], detail=payload["detail"])
        )
    elif kind == "progress":
        message.progress.CopyFrom(pb.StepProgress(**payload))
    elif kind == "epoch_ended":
        message.epoch_ended.CopyFrom(pb.EpochEnded(**payload))
    elif kind == "checkpoint_saved":
        message.checkpoint_saved.CopyFrom(pb.CheckpointSaved(**payload))
    elif kind == "log":
        message.log.CopyFrom(pb.LogLine(**payload))
    elif kind == "result":
        message.result.CopyFrom(pb.JobResult(**payload))
    return message
