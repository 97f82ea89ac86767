"""Evaluate: the loss and metrics of a model revision on a dataset."""

from __future__ import annotations

from dataclasses import dataclass

from weightsmith_server.datasets import DatasetStore
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.jobs import spec as job_spec
from weightsmith_server.jobs.training import pipeline
from weightsmith_server.registry import Registry


@dataclass(frozen=True)
class Evaluation:
    loss: float
    metrics: dict[str, float]
    example_count: int
    revision: int


async def evaluate(
    registry: Registry,
    datasets: DatasetStore,
    model_id: str,
    dataset_id: str,
    *,
    revision: int,
    loss: str,
    metrics: tuple[str, ...],
    batch_size: int,
    split: str,
    rescale: float | None,
) -> Evaluation:
    """Evaluate a copy of the revision (on the model's device); serving is untouched."""
    resident = registry.get(model_id)
    number, _ = registry.revision_state(resident, revision)
    info = datasets.get(dataset_id)
    if batch_size < 0:
        raise InvalidArgument(
            f"Received batch_size={batch_size}, expected 0 (32) or more.",
            reason="INVALID_BATCH_SIZE",
            field="batch_size",
        )
    spec = job_spec.TrainingSpec(
        model_id=model_id,
        train_dataset_id=dataset_id,
        epochs=1,
        batch_size=batch_size or 32,
        optimizer=job_spec.OptimizerSpec("sgd", job_spec.LearningRateSpec("constant", constant=0.01)),
        loss=loss,
        metrics=tuple(metrics),
        preprocessing=job_spec.PreprocessingSpec(rescale=rescale),
        shuffle=False,
    )
    job_spec.check_loss_and_metrics(spec, prefix="")
    job_spec.check_data_fits_model(spec, resident, info, "dataset_id", prefix="")
    store = registry.store

    def run() -> Evaluation:
        import keras
        import tensorflow as tf

        from weightsmith_server import architecture
        from weightsmith_server.variables import model_variables

        manifest = store.read_manifest(model_id, number)
        with tf.device(resident.device):
            model = architecture.rebuild(store.read_architecture(model_id, number), device=resident.device)
            by_path = manifest.by_path()
            for entry, variable in model_variables(model):
                variable.assign(store.load_tensor(model_id, by_path[entry.path]))
            model.compile(loss=loss, metrics=list(metrics))
            data, count = datasets.load(dataset_id, split)
            batches = pipeline(
                data, spec, training=False, input_dtype=str(model.inputs[0].dtype), seed=None, count=count
            )
            results = model.evaluate(batches, verbose=0, return_dict=True)
        del keras
        values = {k: float(v) for k, v in results.items()}
        return Evaluation(values.pop("loss"), values, count, number)

    return await registry.run(run)
