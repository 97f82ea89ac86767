"""Evaluate: the loss and metrics of a model revision on a dataset."""

from __future__ import annotations

from dataclasses import dataclass

from weightsmith_server.datasets import DatasetSplit, DatasetStore
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.jobs import spec as job_spec
from weightsmith_server.jobs.training import pipeline
from weightsmith_server.jobs.validation import check_data_fits_model, check_loss_and_metrics
from weightsmith_server.models.host import ModelHost
from weightsmith_server.models.resident import ResidentModel


@dataclass(frozen=True)
class Evaluation:
    loss: float
    metrics: dict[str, float]
    example_count: int
    revision: int


def evaluate(
    host: ModelHost,
    datasets: DatasetStore,
    model_id: str,
    dataset_id: str,
    *,
    revision: int,
    loss: str,
    metrics: tuple[str, ...],
    batch_size: int,
    split: DatasetSplit | str,
    rescale: float | None,
) -> Evaluation:
    """Evaluate a copy of the revision (on the model's device); serving is untouched."""
    number, _ = host.revision(model_id, revision)
    info = datasets.get(dataset_id)
    spec = _evaluation_spec(model_id, dataset_id, loss, metrics, batch_size, rescale)
    check_loss_and_metrics(spec, prefix="")

    def check(resident: ResidentModel) -> str:
        check_data_fits_model(spec, resident, info, "dataset_id", prefix="")
        return resident.device

    device = host.run(model_id, check)
    state = host.materialize(model_id, number, device)
    import tensorflow as tf  # here: TensorFlow loads slowly and the module is imported at start-up

    with tf.device(device):
        model = state.keras_model
        model.compile(loss=loss, metrics=list(metrics))
        data, count = datasets.load(dataset_id, split)
        batches = pipeline(data, spec, input_dtype=str(model.inputs[0].dtype), count=count)
        results = model.evaluate(batches, verbose=0, return_dict=True)
    values = {k: float(v) for k, v in results.items()}
    return Evaluation(values.pop("loss"), values, count, number)


def _evaluation_spec(
    model_id: str,
    dataset_id: str,
    loss: str,
    metrics: tuple[str, ...],
    batch_size: int,
    rescale: float | None,
) -> job_spec.TrainingSpec:
    """The spec whose input pipeline, loss and metrics an evaluation shares with training."""
    if batch_size < 0:
        raise InvalidArgument(
            f"Received batch_size={batch_size}, expected 0 (32) or more.",
            reason="INVALID_BATCH_SIZE",
            field="batch_size",
        )
    return job_spec.TrainingSpec(
        model_id=model_id,
        train_dataset_id=dataset_id,
        epochs=1,
        batch_size=batch_size or 32,
        optimizer=job_spec.OptimizerSpec(
            job_spec.OptimizerKind.SGD,
            job_spec.LearningRateSpec(job_spec.ScheduleKind.CONSTANT, constant=0.01),
        ),
        loss=loss,
        metrics=tuple(metrics),
        preprocessing=job_spec.PreprocessingSpec(rescale=rescale),
        shuffle=False,
    )
