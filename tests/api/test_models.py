"""ModelService over real gRPC: create, get, list, delete, predict, export, upload."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

import weightsmith
from tests.conftest import ServerHandle, tiny_cnn_config, tiny_config
from weightsmith.v1 import model_pb2, model_service_pb2, tensor_pb2


def test_create_from_config_reports_layers_variables_and_device(client, model_id: str) -> None:
    model = client.create_model(model_id, keras_config=tiny_config(), seed=7, message="first")
    assert model.model_id == model_id
    assert model.revision == 1
    assert model.source == model_pb2.MODEL_SOURCE_CONFIG
    assert model.architecture == "Sequential"
    assert model.device == "/device:CPU:0"
    assert [v.path for v in model.variables] == [
        "hidden/kernel",
        "hidden/bias",
        "logits/kernel",
        "logits/bias",
    ]
    assert [list(v.shape) for v in model.variables] == [[4, 3], [3], [3, 2], [2]]
    assert model.parameter_count == 4 * 3 + 3 + 3 * 2 + 2
    assert model.weight_bytes == 4 * model.parameter_count
    assert [layer.name for layer in model.layers] == ["hidden", "logits"]
    assert list(model.inputs[0].shape) == [-1, 4]
    assert model.inputs[0].dtype == tensor_pb2.DATA_TYPE_FLOAT32
    assert client.get_model(model_id) == model


def test_seed_makes_creation_reproducible(client, model_id: str) -> None:
    client.create_model(f"{model_id}-a", keras_config=tiny_config(), seed=3)
    client.create_model(f"{model_id}-b", keras_config=tiny_config(), seed=3)
    client.create_model(f"{model_id}-c", keras_config=tiny_config(), seed=4)
    a, b, c = (client.read_weights(f"{model_id}-{s}") for s in "abc")
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert a["hidden/kernel"].tobytes() != c["hidden/kernel"].tobytes()


def test_create_from_catalog_without_top(client, model_id: str) -> None:
    model = client.create_model(
        model_id,
        architecture="MobileNetV2",
        include_top=False,
        input_shape=(32, 32, 3),
        pooling="avg",
        seed=1,
    )
    assert model.source == model_pb2.MODEL_SOURCE_CATALOG
    assert model.architecture == "MobileNetV2"
    assert list(model.outputs[0].shape) == [-1, 1280]
    result = client.predict(model_id, np.zeros((2, 32, 32, 3), np.float32))
    (features,) = result.outputs.values()
    assert features.shape == (2, 1280)


def test_catalog_with_top_and_classes(client, model_id: str) -> None:
    model = client.create_model(
        model_id,
        architecture="MobileNetV2",
        input_shape=(32, 32, 3),
        classes=5,
        classifier_activation="linear",
    )
    assert list(model.outputs[0].shape) == [-1, 5]


def test_list_models_paginates_in_id_order(client, model_id: str) -> None:
    ids = [f"{model_id}-{i}" for i in range(5)]
    for each in ids:
        client.create_model(each, keras_config=tiny_config())
    seen: list[str] = []
    token = ""
    while True:
        page = client.list_models(page_size=2, page_token=token)
        assert len(page.models) <= 2
        seen.extend(m.model_id for m in page.models)
        token = page.next_page_token
        if not token:
            break
    assert [s for s in seen if s.startswith(model_id)] == ids
    assert seen == sorted(seen)
    assert [m.model_id for m in client.iter_models(page_size=3)] == seen


def test_delete_model(client, model_id: str) -> None:
    client.create_model(model_id, keras_config=tiny_config())
    client.delete_model(model_id)
    with pytest.raises(weightsmith.NotFoundError) as caught:
        client.get_model(model_id)
    assert caught.value.reason == "MODEL_NOT_FOUND"
    assert caught.value.field_violations[0][0] == "model_id"
    client.create_model(model_id, keras_config=tiny_config())  # the id is free again


def test_predict_matches_in_process_keras(client, model_id: str) -> None:
    import keras

    client.create_model(model_id, keras_config=tiny_cnn_config(), seed=11)
    weights = client.read_weights(model_id)
    local = keras.models.model_from_json(tiny_cnn_config())
    for variable in local.weights:
        variable.assign(weights[variable.path])
    batch = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype(np.float32)

    result = client.predict(model_id, batch, output_layers=["pool", "conv1"])

    np.testing.assert_allclose(result.outputs["head"], local(batch, training=False), rtol=1e-5, atol=1e-6)
    assert result.layer_outputs["pool"].shape == (3, 8)
    assert result.layer_outputs["conv1"].shape == (3, 6, 6, 4)
    assert result.revision == 1
    named = client.predict(model_id, {"image": batch})
    np.testing.assert_array_equal(named.outputs["head"], result.outputs["head"])


@pytest.mark.parametrize(
    ("inputs", "field", "reason"),
    [
        (np.zeros((2, 5), np.float32), "inputs[0].tensor.shape", "WRONG_SHAPE"),
        (np.zeros((2, 4, 1), np.float32), "inputs[0].tensor.shape", "WRONG_SHAPE"),
        (np.zeros((2, 4), np.float64), "inputs[0].tensor.dtype", "WRONG_DTYPE"),
        ({"nope": np.zeros((2, 4), np.float32)}, "inputs[0].name", "UNKNOWN_INPUT"),
        ([np.zeros((2, 4), np.float32)] * 2, "inputs", "WRONG_INPUT_COUNT"),
    ],
)
def test_predict_rejects_bad_inputs(client, model_id: str, inputs, field: str, reason: str) -> None:
    client.create_model(model_id, keras_config=tiny_config())
    with pytest.raises(weightsmith.InvalidArgumentError) as caught:
        client.predict(model_id, inputs)
    assert caught.value.reason == reason
    assert caught.value.field_violations[0][0] == field


def test_predict_unknown_layer(client, model_id: str) -> None:
    client.create_model(model_id, keras_config=tiny_config())
    with pytest.raises(weightsmith.InvalidArgumentError) as caught:
        client.predict(model_id, np.zeros((1, 4), np.float32), output_layers=["nope"])
    assert caught.value.field_violations[0][0] == "output_layers[0]"


def test_predict_tensor_with_inconsistent_bytes(client, server: ServerHandle, model_id: str) -> None:
    import grpc

    from weightsmith.v1 import model_service_pb2_grpc

    client.create_model(model_id, keras_config=tiny_config())
    bad = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1, 4], data=b"\0" * 15)
    with grpc.insecure_channel(server.address) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(
                model_service_pb2.PredictRequest(
                    model_id=model_id, inputs=[tensor_pb2.NamedTensor(tensor=bad)]
                )
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_export_keras_loads_with_identical_weights(client, model_id: str, tmp_path: Path) -> None:
    import keras

    client.create_model(model_id, keras_config=tiny_cnn_config(), seed=5)
    original = client.read_weights(model_id)
    path = client.export_model(model_id, path=tmp_path / "model.keras")
    loaded = keras.models.load_model(path)
    assert {v.path.removeprefix("tiny_cnn/"): v.numpy().tobytes() for v in loaded.weights} == {
        k: v.tobytes() for k, v in original.items()
    }


def test_export_old_revision(client, model_id: str, tmp_path: Path) -> None:
    import keras

    client.create_model(model_id, keras_config=tiny_config(), seed=5)
    first = client.read_weights(model_id)
    client.write_weights(model_id, {"hidden/bias": np.full(3, 9.0, np.float32)})
    data = client.export_model(model_id, revision=1)
    (tmp_path / "r1.keras").write_bytes(data)
    loaded = keras.models.load_model(tmp_path / "r1.keras")
    assert loaded.get_layer("hidden").bias.numpy().tobytes() == first["hidden/bias"].tobytes()


def test_export_saved_model_tar(client, model_id: str) -> None:
    client.create_model(model_id, keras_config=tiny_config())
    data = client.export_model(model_id, format="saved_model")
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        names = archive.getnames()
    assert "saved_model/saved_model.pb" in names


def _keras_bytes(model, tmp_path: Path) -> bytes:
    path = tmp_path / "upload.keras"
    model.save(path)
    return path.read_bytes()


def test_upload_round_trip(client, model_id: str, tmp_path: Path) -> None:
    import keras

    local = keras.models.model_from_json(tiny_cnn_config())
    model = client.upload_model(_keras_bytes(local, tmp_path), model_id, message="uploaded")
    assert model.source == model_pb2.MODEL_SOURCE_UPLOAD
    assert model.revision == 1
    weights = client.read_weights(model_id)
    for variable in local.weights:
        assert weights[variable.path].tobytes() == variable.numpy().tobytes()
    revision = client.get_revision(model_id, 1)
    assert revision.message == "uploaded"
    assert revision.author == "tests"


def test_upload_with_lambda_is_refused_without_running_it(client, model_id: str, tmp_path: Path) -> None:
    import keras

    marker = tmp_path / "executed"
    model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda x: x * 2)])
    data = _keras_bytes(model, tmp_path)
    with pytest.raises(weightsmith.InvalidArgumentError) as caught:
        client.upload_model(data, model_id)
    assert caught.value.reason == "UNSAFE_MODEL"
    assert caught.value.field_violations[0][0] == "chunk"
    assert not marker.exists()
    with pytest.raises(weightsmith.NotFoundError):
        client.get_model(model_id)


def test_upload_with_foreign_module_is_refused(client, model_id: str, tmp_path: Path) -> None:
    import keras

    data = _keras_bytes(keras.models.model_from_json(tiny_config()), tmp_path)
    source = zipfile.ZipFile(io.BytesIO(data))
    config = json.loads(source.read("config.json"))
    config["config"]["layers"][1]["module"] = "os"
    config["config"]["layers"][1]["class_name"] = "system"
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for item in source.infolist():
            payload = json.dumps(config).encode() if item.filename == "config.json" else source.read(item)
            target.writestr(item, payload)
    with pytest.raises(weightsmith.InvalidArgumentError) as caught:
        client.upload_model(out.getvalue(), model_id)
    assert caught.value.reason == "UNSAFE_MODEL"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip"])
def test_upload_truncated_or_corrupt(
    client, server: ServerHandle, model_id: str, tmp_path: Path, damage: str
) -> None:
    import grpc
    import keras

    from weightsmith.v1 import model_service_pb2_grpc

    data = _keras_bytes(keras.models.model_from_json(tiny_config()), tmp_path)
    if damage == "truncate":
        # Announce the full size but send only half: the server must notice.
        header = model_service_pb2.UploadModelHeader(model_id=model_id, size_bytes=len(data))
        messages = [
            model_service_pb2.UploadModelRequest(header=header),
            model_service_pb2.UploadModelRequest(chunk=data[: len(data) // 2]),
        ]
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as caught:
            model_service_pb2_grpc.ModelServiceStub(channel).UploadModel(iter(messages))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "truncated" in caught.value.details()
    else:
        payload = (
            b"not a zip file at all" * 50 if damage == "garbage" else data[:200] + bytes(200) + data[400:]
        )
        with pytest.raises(weightsmith.InvalidArgumentError) as caught_client:
            client.upload_model(payload, model_id)
        assert caught_client.value.reason == "CORRUPT_MODEL_FILE"
    with pytest.raises(weightsmith.NotFoundError):
        client.get_model(model_id)


@pytest.mark.parametrize(
    ("bad_id", "field"),
    [
        ("../x", "model_id"),
        ("UPPER", "model_id"),
        ("a" * 64, "model_id"),
        ("-lead", "model_id"),
        ("a_b", "model_id"),
    ],
)
def test_invalid_model_ids(client, bad_id: str, field: str) -> None:
    with pytest.raises(weightsmith.InvalidArgumentError) as caught:
        client.create_model(bad_id, keras_config=tiny_config())
    assert caught.value.reason == "INVALID_ID"
    assert caught.value.field_violations[0][0] == field
    with pytest.raises(weightsmith.InvalidArgumentError):
        client.get_model(bad_id)


def test_duplicate_id_changes_nothing(client, model_id: str) -> None:
    client.create_model(model_id, keras_config=tiny_config(), seed=1)
    before = client.read_weights(model_id)
    with pytest.raises(weightsmith.AlreadyExistsError) as caught:
        client.create_model(model_id, keras_config=tiny_config(), seed=2)
    assert caught.value.field_violations[0][0] == "model_id"
    after = client.read_weights(model_id)
    assert all(before[k].tobytes() == after[k].tobytes() for k in before)
    assert client.get_model(model_id).revision == 1


@pytest.mark.parametrize(
    ("kwargs", "field", "reason"),
    [
        ({"architecture": "NotANet"}, "catalog.name", "UNKNOWN_ARCHITECTURE"),
        (
            {"architecture": "MobileNetV2", "input_shape": (8, 8, 3), "include_top": False},
            "catalog",
            "INVALID_ARCHITECTURE_ARGUMENTS",
        ),
        (
            {"architecture": "VGG16", "weights_file": "../../etc/passwd"},
            "catalog.weights_file",
            "WEIGHTS_FILE_NOT_FOUND",
        ),
        ({"keras_config": "{not json"}, "keras_config_json", "INVALID_MODEL_CONFIG"),
        ({"keras_config": "UNBUILT"}, "keras_config_json", "MODEL_NOT_BUILT"),
    ],
)
def test_create_rejects_bad_architectures(
    client, model_id: str, kwargs: dict, field: str, reason: str
) -> None:
    if kwargs.get("keras_config") == "UNBUILT":
        import keras

        kwargs = {"keras_config": keras.Sequential([keras.layers.Dense(2)]).to_json()}
    with pytest.raises(weightsmith.InvalidArgumentError) as caught:
        client.create_model(model_id, **kwargs)
    assert caught.value.reason == reason
    assert caught.value.field_violations[0][0] == field
    with pytest.raises(weightsmith.NotFoundError):
        client.get_model(model_id)


def test_server_info(client) -> None:
    info = client.server_info()
    assert info.version == weightsmith.__version__
    assert info.tensorflow_version.startswith("2.")
    assert info.devices[0].name == "/device:CPU:0"
    assert info.limits.max_message_bytes == 64 * 1024 * 1024
    assert "ResNet50" in info.catalog_architectures


def test_health_and_reflection(server: ServerHandle) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "weightsmith.v1.ModelService", "weightsmith.v1.WeightService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request])))
        names = {s.name for s in response.list_services_response.service}
        assert {
            "weightsmith.v1.ModelService",
            "weightsmith.v1.WeightService",
            "grpc.health.v1.Health",
        } <= names
