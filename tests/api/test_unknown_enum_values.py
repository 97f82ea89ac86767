"""Every enum a request can carry refuses numbers outside the contract, naming the field.

Protobuf enums are open: a client can put any number on the wire. The
server must answer INVALID_ARGUMENT with a field violation for the field
that carries it, never treat it as a default, and change nothing.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.conftest import ServerHandle, tiny_config
from weightsmith.v1 import (
    dataset_pb2,
    edits_pb2,
    job_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    selector_pb2,
    tensor_pb2,
    training_service_pb2,
    training_service_pb2_grpc,
    weight_service_pb2,
    weight_service_pb2_grpc,
)

UNKNOWN = 97
MODEL = "enum-checks"
DATASET = "enum-checks-data"


@pytest.fixture(scope="module")
def stubs(server: ServerHandle) -> Iterator[dict[str, Any]]:
    with grpc.insecure_channel(server.address) as channel:
        models = model_service_pb2_grpc.ModelServiceStub(channel)
        training = training_service_pb2_grpc.TrainingServiceStub(channel)
        models.CreateModel(
            model_service_pb2.CreateModelRequest(model_id=MODEL, keras_config_json=tiny_config())
        )
        data = io.BytesIO()
        np.savez(data, x=np.zeros((8, 4), np.float32), y=np.zeros(8, np.int64))
        header = training_service_pb2.UploadDatasetHeader(
            dataset_id=DATASET,
            source=dataset_pb2.DatasetSource(format=dataset_pb2.DATASET_FORMAT_NPZ),
            size_bytes=len(data.getvalue()),
        )
        training.UploadDataset(
            iter(
                [
                    training_service_pb2.UploadDatasetRequest(header=header),
                    training_service_pb2.UploadDatasetRequest(chunk=data.getvalue()),
                ]
            )
        )
        yield {
            "models": models,
            "weights": weight_service_pb2_grpc.WeightServiceStub(channel),
            "training": training,
        }
        models.DeleteModel(model_service_pb2.DeleteModelRequest(model_id=MODEL))
        training.DeleteDataset(training_service_pb2.DeleteDatasetRequest(dataset_id=DATASET))


def _edit(**op: Any) -> Callable[[dict[str, Any]], Any]:
    def call(stubs: dict[str, Any]) -> Any:
        return stubs["weights"].ApplyEdits(
            weight_service_pb2.ApplyEditsRequest(model_id=MODEL, edits=[edits_pb2.Edit(**op)])
        )

    return call


def _job(**spec: Any) -> Callable[[dict[str, Any]], Any]:
    def call(stubs: dict[str, Any]) -> Any:
        base = {
            "model_id": MODEL,
            "train_dataset_id": DATASET,
            "epochs": 1,
            "loss": "sparse_categorical_crossentropy",
            "optimizer": job_pb2.Optimizer(
                kind=job_pb2.OPTIMIZER_KIND_SGD, learning_rate=job_pb2.LearningRate(constant=0.01)
            ),
        }
        request = training_service_pb2.CreateJobRequest(spec=job_pb2.JobSpec(**(base | spec)))
        return stubs["training"].CreateJob(request)

    return call


def _dataset(source: dataset_pb2.DatasetSource) -> Callable[[dict[str, Any]], Any]:
    def call(stubs: dict[str, Any]) -> Any:
        request = training_service_pb2.CreateDatasetRequest(dataset_id="never", source=source, uri="x.npz")
        return stubs["training"].CreateDataset(request)

    return call


ALL = selector_pb2.VariableSelector(patterns=["*"])
TFRECORD = dataset_pb2.DATASET_FORMAT_TFRECORD

CASES: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "CatalogArchitecture.pooling": (
        lambda s: s["models"].CreateModel(
            model_service_pb2.CreateModelRequest(
                model_id="never",
                catalog=model_service_pb2.CatalogArchitecture(name="MobileNetV2", pooling=UNKNOWN),
            )
        ),
        "catalog.pooling",
    ),
    "ExportModelRequest.format": (
        lambda s: next(
            iter(
                s["models"].ExportModel(model_service_pb2.ExportModelRequest(model_id=MODEL, format=UNKNOWN))
            )
        ),
        "format",
    ),
    "EvaluateRequest.split": (
        lambda s: s["models"].Evaluate(
            model_service_pb2.EvaluateRequest(model_id=MODEL, dataset_id=DATASET, loss="mse", split=UNKNOWN)
        ),
        "split",
    ),
    "Tensor.dtype (Predict)": (
        lambda s: s["models"].Predict(
            model_service_pb2.PredictRequest(
                model_id=MODEL,
                inputs=[
                    tensor_pb2.NamedTensor(
                        tensor=tensor_pb2.Tensor(dtype=UNKNOWN, shape=[1, 4], data=bytes(16))
                    )
                ],
            )
        ),
        "inputs[0].tensor",
    ),
    "Tensor.dtype (assign)": (
        _edit(
            assign=edits_pb2.AssignOp(
                variable="logits/bias", value=tensor_pb2.Tensor(dtype=UNKNOWN, shape=[2], data=bytes(8))
            )
        ),
        "edits[0].assign.value",
    ),
    "TensorChunk.dtype (WriteWeights)": (
        lambda s: s["weights"].WriteWeights(
            iter(
                [
                    weight_service_pb2.WriteWeightsRequest(
                        header=weight_service_pb2.WriteWeightsHeader(model_id=MODEL)
                    ),
                    weight_service_pb2.WriteWeightsRequest(
                        chunk=tensor_pb2.TensorChunk(
                            name="logits/bias", dtype=UNKNOWN, shape=[2], data=bytes(8)
                        )
                    ),
                ]
            )
        ),
        "chunks[0].dtype",
    ),
    "PruneOp.scope": (
        _edit(prune=edits_pb2.PruneOp(selector=ALL, sparsity=0.5, scope=UNKNOWN)),
        "edits[0].prune.scope",
    ),
    "PruneOp.granularity": (
        _edit(prune=edits_pb2.PruneOp(selector=ALL, sparsity=0.5, granularity=UNKNOWN)),
        "edits[0].prune.granularity",
    ),
    "PruneOp.norm": (
        _edit(prune=edits_pb2.PruneOp(selector=ALL, sparsity=0.5, norm=UNKNOWN)),
        "edits[0].prune.norm",
    ),
    "QuantizeOp.granularity": (
        _edit(quantize=edits_pb2.QuantizeOp(selector=ALL, bits=8, granularity=UNKNOWN)),
        "edits[0].quantize.granularity",
    ),
    "DatasetSource.format": (_dataset(dataset_pb2.DatasetSource(format=UNKNOWN)), "source.format"),
    "FeatureSpec.dtype": (
        _dataset(
            dataset_pb2.DatasetSource(
                format=TFRECORD,
                tfrecord=dataset_pb2.TfRecordOptions(
                    features=dataset_pb2.FeatureSpec(name="x", dtype=UNKNOWN, shape=[4]),
                    labels=dataset_pb2.FeatureSpec(name="y", dtype=tensor_pb2.DATA_TYPE_INT64),
                ),
            )
        ),
        "source.tfrecord.features.dtype",
    ),
    "Optimizer.kind": (
        _job(optimizer=job_pb2.Optimizer(kind=UNKNOWN, learning_rate=job_pb2.LearningRate(constant=0.01))),
        "spec.optimizer.kind",
    ),
    "Preprocessing.random_flip": (
        _job(preprocessing=job_pb2.Preprocessing(random_flip=UNKNOWN)),
        "spec.preprocessing.random_flip",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_unknown_enum_value_is_invalid_argument_naming_the_field(stubs: dict[str, Any], case: str) -> None:
    call, field = CASES[case]
    revision_before = (
        stubs["models"].GetModel(model_service_pb2.GetModelRequest(model_id=MODEL)).model.revision
    )
    with pytest.raises(grpc.RpcError) as caught:
        call(stubs)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    status = rpc_status.from_call(caught.value)
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(v.field for v in bad.field_violations)
    assert any(f == field or f.startswith(field + ".") for f in fields), (field, fields)
    after = stubs["models"].GetModel(model_service_pb2.GetModelRequest(model_id=MODEL)).model.revision
    assert after == revision_before
