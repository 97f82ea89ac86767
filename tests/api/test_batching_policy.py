"""Per-model Predict batching policy: set at creation, changed with UpdateModel, durable, per model.

The session server runs with the default flags (`--batch-max-size 32`,
`--batch-wait-ms 5`). Which callers ran together is observed where the
server runs the model: `inference.predict_many` receives one batch of
callers' inputs per model run (wrapped here to record each batch's size for
one model, and to run a little longer so that concurrent calls queue).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import weightsmith
from tests.conftest import ServerHandle, _start_in_thread, _stop_in_thread, tiny_config
from weightsmith.v1 import model_pb2, model_service_pb2, model_service_pb2_grpc
from weightsmith_server.models import inference

DEFAULT = (32, 0.005)  # the session server's flags


def _policy(model: model_pb2.Model) -> tuple[int, float]:
    assert model.batching.HasField("max_batch_size") and model.batching.HasField("max_wait_seconds")
    return model.batching.max_batch_size, round(model.batching.max_wait_seconds, 9)


def _error(caught: pytest.ExceptionInfo[Any]) -> tuple[Any, str, list[str]]:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(caught.value)
    assert status is not None
    reason, fields = "", []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    return caught.value.code(), reason, fields


def test_create_sets_the_model_policy_and_unset_fields_follow_the_defaults(
    client: Any, model_id: str
) -> None:
    own = client.create_model(model_id, keras_config=tiny_config(), seed=0, batching={"max_batch_size": 4})
    assert _policy(own) == (4, DEFAULT[1])
    plain = client.create_model(f"{model_id}-plain", keras_config=tiny_config(), seed=0)
    assert _policy(plain) == DEFAULT
    zero = client.create_model(
        f"{model_id}-zero", keras_config=tiny_config(), seed=0, batching={"max_wait_seconds": 0}
    )
    assert _policy(zero) == (DEFAULT[0], 0.0)  # an explicit 0 is kept, not taken for "unset"
    assert _policy(client.get_model(model_id)) == (4, DEFAULT[1])
    listed = {m.model_id: _policy(m) for m in client.iter_models()}
    assert listed[model_id] == (4, DEFAULT[1]) and listed[f"{model_id}-plain"] == DEFAULT


def test_upload_takes_a_policy_in_its_header(client: Any, model_id: str, tmp_path: Path) -> None:
    import keras

    path = tmp_path / "m.keras"
    keras.models.model_from_json(tiny_config()).save(path)
    model = client.upload_model(path, model_id, batching={"max_batch_size": 2, "max_wait_seconds": 0.25})
    assert _policy(model) == (2, 0.25)
    with pytest.raises(ValueError):  # the client checks the type and sign first
        client.upload_model(path, f"{model_id}-bad", batching={"max_batch_size": 0})
    with pytest.raises(weightsmith.errors.InvalidArgumentError) as caught:  # the server the range
        client.upload_model(path, f"{model_id}-bad", batching={"max_wait_seconds": 2.0})
    assert "header.batching.max_wait_seconds" in str(caught.value)
    with pytest.raises(weightsmith.errors.NotFoundError):
        client.get_model(f"{model_id}-bad")


def test_update_changes_only_the_named_fields_and_none_restores_the_default(
    client: Any, model_id: str
) -> None:
    created = client.create_model(model_id, keras_config=tiny_config(), seed=0)
    model = client.update_model(model_id, batching={"max_batch_size": 8})
    assert _policy(model) == (8, DEFAULT[1])
    model = client.update_model(model_id, batching={"max_wait_seconds": 0.0})
    assert _policy(model) == (8, 0.0)
    model = client.update_model(model_id, batching={"max_batch_size": None})
    assert _policy(model) == (DEFAULT[0], 0.0)
    # Not a revision: the weights' revision and update time stay as they were.
    assert model.revision == created.revision == 1
    assert model.update_time == created.update_time
    assert [r.revision for r in client.iter_revisions(model_id)] == [1]
    assert _policy(client.get_model(model_id)) == (DEFAULT[0], 0.0)


def test_update_mask_semantics_on_the_wire(server: ServerHandle, client: Any, model_id: str) -> None:
    client.create_model(model_id, keras_config=tiny_config(), seed=0, batching={"max_batch_size": 3})
    stub = model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(server.address))
    # Empty mask: the fields set in `batching` change, the others are kept.
    request = model_service_pb2.UpdateModelRequest(
        model_id=model_id, batching=model_pb2.BatchingPolicy(max_wait_seconds=0.5)
    )
    assert _policy(stub.UpdateModel(request).model) == (3, 0.5)
    # `batching` in the mask: the whole policy; unset fields go back to the defaults.
    request = model_service_pb2.UpdateModelRequest(
        model_id=model_id, batching=model_pb2.BatchingPolicy(max_batch_size=5)
    )
    request.update_mask.paths.append("batching")
    assert _policy(stub.UpdateModel(request).model) == (5, DEFAULT[1])
    request.update_mask.paths[:] = ["revision"]
    with pytest.raises(grpc.RpcError) as caught:
        stub.UpdateModel(request)
    assert _error(caught) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_UPDATE_MASK",
        ["update_mask.paths[0]"],
    )


@pytest.mark.parametrize(
    ("batching", "field"),
    [
        ({"max_batch_size": 0}, "batching.max_batch_size"),
        ({"max_batch_size": 65537}, "batching.max_batch_size"),
        ({"max_wait_seconds": -0.001}, "batching.max_wait_seconds"),
        ({"max_wait_seconds": 1.5}, "batching.max_wait_seconds"),
    ],
)
def test_out_of_range_values_are_refused_and_change_nothing(
    server: ServerHandle, client: Any, model_id: str, batching: dict[str, float], field: str
) -> None:
    client.create_model(model_id, keras_config=tiny_config(), seed=0, batching={"max_batch_size": 7})
    stub = model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(server.address))
    request = model_service_pb2.UpdateModelRequest(
        model_id=model_id, batching=model_pb2.BatchingPolicy(**batching)
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.UpdateModel(request)
    assert _error(caught) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BATCHING_POLICY", [field])
    assert _policy(client.get_model(model_id)) == (7, DEFAULT[1])
    create = model_service_pb2.CreateModelRequest(
        model_id=f"{model_id}-new", keras_config_json=tiny_config(), batching=request.batching
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateModel(create)
    assert _error(caught)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BATCHING_POLICY")
    with pytest.raises(weightsmith.errors.NotFoundError):
        client.get_model(f"{model_id}-new")


def test_unknown_model_is_not_found(client: Any, model_id: str) -> None:
    with pytest.raises(weightsmith.errors.NotFoundError):
        client.update_model(model_id, batching={"max_batch_size": 2})


def test_the_policy_survives_a_restart_and_goes_with_the_model(tmp_path: Path) -> None:
    store = tmp_path / "store"
    handle, thread = _start_in_thread(store)
    try:
        with weightsmith.Client(handle.address) as client:
            client.create_model("kept", keras_config=tiny_config(), seed=0, batching={"max_batch_size": 6})
            client.update_model("kept", batching={"max_wait_seconds": 0.0})
            client.create_model("gone", keras_config=tiny_config(), seed=0, batching={"max_batch_size": 2})
            client.delete_model("gone")
    finally:
        _stop_in_thread(handle, thread)
    assert (store / "models" / "kept" / "serving.json").is_file()
    assert not (store / "models" / "gone").exists()
    handle, thread = _start_in_thread(store, batch_max_size=16, batch_wait_ms=2)
    try:
        with weightsmith.Client(handle.address) as client:
            assert _policy(client.get_model("kept")) == (6, 0.0)
            # The id reused after the delete starts from the (new) defaults, not the old policy.
            assert _policy(client.create_model("gone", keras_config=tiny_config(), seed=0)) == (16, 0.002)
    finally:
        _stop_in_thread(handle, thread)


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[int]]]:
    """Callers per model run, by model id; each run lasts at least 50 ms so that callers queue."""
    seen: dict[str, list[int]] = {}
    original = inference.predict_many

    def recording(resident: Any, requests: Any, output_layers: Any) -> Any:
        seen.setdefault(resident.model_id, []).append(len(requests))
        time.sleep(0.05)
        return original(resident, requests, output_layers)

    monkeypatch.setattr(inference, "predict_many", recording)
    yield seen


def _concurrent_predicts(address: str, model_id: str, callers: int) -> list[np.ndarray]:
    """`callers` threads, each with its own client, each predicting its own row at the same time."""
    rows = [np.full((1, 4), i, np.float32) for i in range(callers)]
    results: list[np.ndarray] = [np.empty(0)] * callers
    barrier = threading.Barrier(callers)

    def call(i: int) -> None:
        with weightsmith.Client(address) as own:
            own.predict(model_id, rows[i])  # connected and warm
            barrier.wait()
            results[i] = own.predict(model_id, rows[i]).outputs["logits"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_max_batch_size_one_makes_every_call_run_alone(
    server: ServerHandle, client: Any, model_id: str, batches: dict[str, list[int]]
) -> None:
    client.create_model(model_id, keras_config=tiny_config(), seed=0)
    alone = [client.predict(model_id, np.full((1, 4), i, np.float32)).outputs["logits"] for i in range(6)]
    batches.clear()
    together = _concurrent_predicts(server.address, model_id, 6)
    assert max(batches[model_id]) > 1  # the defaults batch concurrent callers
    for mine, expected in zip(together, alone, strict=True):
        np.testing.assert_array_equal(mine, expected)

    client.update_model(model_id, batching={"max_batch_size": 1})
    batches.clear()
    together = _concurrent_predicts(server.address, model_id, 6)
    assert batches[model_id] == [1] * 12  # 6 warm-ups and 6 concurrent calls, each alone
    for mine, expected in zip(together, alone, strict=True):
        np.testing.assert_array_equal(mine, expected)
