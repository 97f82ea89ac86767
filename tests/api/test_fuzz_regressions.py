"""Minimal requests that the fuzzer (tests/system/test_fuzz.py) found mishandled, each now answered right.

One test per finding of /tmp/plan/fuzz-findings.md that was fixed here; each
sends the smallest request that showed the fault, through the session server.
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import Message

import weightsmith
from tests.conftest import ServerHandle, tiny_config
from weightsmith import edits, jobs, wire
from weightsmith.errors import from_rpc_error
from weightsmith.v1 import (
    edits_pb2,
    job_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    selector_pb2,
    tensor_pb2,
    weight_service_pb2,
    weight_service_pb2_grpc,
)


@pytest.fixture
def model_and_data(client, model_id: str) -> tuple[str, str]:
    client.create_model(model_id, keras_config=tiny_config())
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((8, 4), np.float32), y=np.zeros((8, 2), np.float32))
    client.upload_dataset(buffer.getvalue(), dataset_id=f"{model_id}-data", format="npz")
    return model_id, f"{model_id}-data"


def _spec(model_id: str, dataset_id: str, metrics: list[str]) -> job_pb2.JobSpec:
    return job_pb2.JobSpec(
        model_id=model_id,
        train_dataset_id=dataset_id,
        epochs=1,
        batch_size=4,
        optimizer=jobs.sgd(0.01),
        loss="mse",
        metrics=metrics,
    )


def test_a_job_with_a_thousand_metrics_is_refused_up_front(client, model_and_data) -> None:
    """F3: 1,000 metrics kept a job compiling for minutes, past CancelJob."""
    model_id, dataset_id = model_and_data
    with pytest.raises(weightsmith.InvalidArgumentError) as caught:
        client.create_job(_spec(model_id, dataset_id, ["mae"] * 1000))
    assert caught.value.reason == "TOO_MANY_METRICS"
    assert caught.value.field_violations[0][0] == "spec.metrics"
    assert all(job.spec.model_id != model_id for job in client.iter_jobs())
    assert client.get_model(model_id).revision == 1


def test_sixteen_metrics_are_accepted(client, model_and_data) -> None:
    model_id, dataset_id = model_and_data
    job = client.create_job(_spec(model_id, dataset_id, ["mae"] * 16))
    assert client.wait_job(job.job_id, timeout=120).state == job_pb2.JOB_STATE_SUCCEEDED


def test_evaluate_with_a_thousand_metrics_is_refused(client, model_and_data) -> None:
    model_id, dataset_id = model_and_data
    with pytest.raises(weightsmith.InvalidArgumentError) as caught:
        client.evaluate(model_id, dataset_id, loss="mse", metrics=["mae"] * 17)
    assert caught.value.reason == "TOO_MANY_METRICS"
    assert caught.value.field_violations[0][0] == "metrics"


def _refused(server: ServerHandle, stub: type, method: str, request: Message) -> weightsmith.WeightsmithError:
    """Send `request` with a generated stub (no client-side checks); return the error it got."""
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as caught:
        getattr(stub(channel), method)(request, timeout=60)
    return from_rpc_error(caught.value)


@pytest.mark.parametrize("weights_file", ["\x00", "a\x00b.weights.h5", "0" * 256, "a/" + "b" * 300 + "/c"])
def test_a_weights_file_with_a_nul_byte_is_not_found(
    client, server: ServerHandle, model_id: str, weights_file: str
) -> None:
    """F4: a NUL byte or an over-long name in `catalog.weights_file` raised in path resolution: INTERNAL."""
    request = model_service_pb2.CreateModelRequest(
        model_id=model_id,
        catalog=model_service_pb2.CatalogArchitecture(name="MobileNetV3Small", weights_file=weights_file),
    )
    error = _refused(server, model_service_pb2_grpc.ModelServiceStub, "CreateModel", request)
    assert isinstance(error, weightsmith.InvalidArgumentError)
    assert error.reason == "WEIGHTS_FILE_NOT_FOUND"
    assert error.field_violations[0][0] == "catalog.weights_file"
    with pytest.raises(weightsmith.NotFoundError):
        client.get_model(model_id)


def _edits_call(server: ServerHandle, request: Message) -> weightsmith.WeightsmithError:
    return _refused(server, weight_service_pb2_grpc.WeightServiceStub, "ApplyEdits", request)


def _config(**values: object) -> struct_pb2.Struct:
    config = struct_pb2.Struct()
    config.update(values)
    return config


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_number_in_an_edit_config_is_invalid(
    client, server: ServerHandle, model_id: str, value: float
) -> None:
    """F5: NaN in a Struct config (reinitialize, replace_head) failed JSON conversion: INTERNAL."""
    client.create_model(model_id, keras_config=tiny_config())
    reinitialize = edits_pb2.ReinitializeOp(
        selector=selector_pb2.VariableSelector(patterns=["hidden/*"]),
        initializer="RandomNormal",
        config=_config(stddev=value),
    )
    head = edits_pb2.ReplaceHeadOp(
        cut_at_layer="hidden",
        layers=[edits_pb2.LayerSpec(class_name="Dense", config=_config(units=2, x=value))],
    )
    for edit, field in [
        (edits_pb2.Edit(reinitialize=reinitialize), "edits[0].reinitialize.config"),
        (edits_pb2.Edit(replace_head=head), "edits[0].replace_head.layers[0].config"),
    ]:
        error = _edits_call(server, weight_service_pb2.ApplyEditsRequest(model_id=model_id, edits=[edit]))
        assert isinstance(error, weightsmith.InvalidArgumentError)
        assert error.reason == "NOT_FINITE"
        assert error.field_violations[0][0] == field
    assert client.get_model(model_id).revision == 1


def test_an_initializer_config_missing_an_argument_is_invalid(
    client, server: ServerHandle, model_id: str
) -> None:
    """F6: `Constant` without `value` raised KeyError in Keras' `from_config`: INTERNAL."""
    client.create_model(model_id, keras_config=tiny_config())
    op = edits_pb2.ReinitializeOp(
        selector=selector_pb2.VariableSelector(patterns=["hidden/*"]),
        initializer="Constant",
        config=_config(x=1.0),
    )
    error = _edits_call(
        server,
        weight_service_pb2.ApplyEditsRequest(model_id=model_id, edits=[edits_pb2.Edit(reinitialize=op)]),
    )
    assert isinstance(error, weightsmith.InvalidArgumentError)
    assert error.reason == "INVALID_INITIALIZER_CONFIG"
    assert error.field_violations[0][0] == "edits[0].reinitialize.config"
    assert client.get_model(model_id).revision == 1


def test_add_noise_with_a_negative_zero_stddev_is_a_zero_stddev(client, model_id: str) -> None:
    """F7: `stddev=-0.0` passed the `< 0` check, then numpy refused it ("scale < 0"): INTERNAL."""
    client.create_model(model_id, keras_config=tiny_config())
    before = client.read_weights(model_id, "hidden/kernel")["hidden/kernel"]
    reply = client.apply_edits(model_id, [edits.add_noise("hidden/kernel", stddev=-0.0, seed=1)])
    assert reply.revision.revision == 2
    after = client.read_weights(model_id, "hidden/kernel")["hidden/kernel"]
    assert after.tobytes() == before.tobytes()


@pytest.mark.parametrize("model_id", ["0" * 256, "a\x00b"])
def test_predict_and_update_refuse_an_impossible_model_id(server: ServerHandle, model_id: str) -> None:
    """F9: a 256-character id made the per-model settings lookup raise ENAMETOOLONG: INTERNAL."""
    stub = model_service_pb2_grpc.ModelServiceStub
    tensor = tensor_pb2.NamedTensor(tensor=wire.tensor_to_proto(np.ones((1, 4), np.float32)))
    predict = model_service_pb2.PredictRequest(model_id=model_id, inputs=[tensor])
    update = model_service_pb2.UpdateModelRequest(model_id=model_id)
    for method, request in (("Predict", predict), ("UpdateModel", update)):
        error = _refused(server, stub, method, request)
        assert isinstance(error, weightsmith.InvalidArgumentError), (method, error)
        assert error.reason == "INVALID_ID"
