"""Bounds on requests and replies: strings, configs, error sizes, seeds, page tokens, store paths."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2

import weightsmith
from tests.conftest import ServerHandle, _start_in_thread, _stop_in_thread, tiny_config
from weightsmith import wire
from weightsmith.errors import WeightsmithError, from_rpc_error
from weightsmith.v1 import (
    edits_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    selector_pb2,
    training_service_pb2,
    training_service_pb2_grpc,
    weight_service_pb2,
    weight_service_pb2_grpc,
)
from weightsmith_server.api import status
from weightsmith_server.datasets import images
from weightsmith_server.errors import InvalidArgument, ResourceExhausted
from weightsmith_server.limits import json_depth
from weightsmith_server.revisions import history


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """A server with 64-byte strings and 1 MiB configs."""
    handle, thread = _start_in_thread(
        tmp_path_factory.mktemp("bounds") / "store", max_string_bytes=64, max_config_mb=1
    )
    yield handle
    _stop_in_thread(handle, thread)


@pytest.fixture(scope="module")
def channel(server: ServerHandle) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as opened:
        yield opened


@pytest.fixture(scope="module")
def small_channel(small: ServerHandle) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(small.address) as opened:
        yield opened


def _error(call: Callable[..., Any], request: Any) -> tuple[WeightsmithError, int]:
    """The error a raw call ends with, and the trailer bytes it took (message and details)."""
    with pytest.raises(grpc.RpcError) as raised:
        call(request, timeout=60)
    rpc = raised.value
    trailer = sum(len(k) + len(v) for k, v in rpc.trailing_metadata() or ())  # type: ignore[attr-defined]
    return from_rpc_error(rpc), trailer + len((rpc.details() or "").encode())  # type: ignore[attr-defined]


def _expect(error: WeightsmithError, code: grpc.StatusCode, reason: str, field: str | None) -> None:
    assert (error.code, error.reason) == (code, reason), error
    if field is not None:
        assert error.field_violations[0][0] == field


def _models(channel: grpc.Channel) -> model_service_pb2_grpc.ModelServiceStub:
    return model_service_pb2_grpc.ModelServiceStub(channel)


def _weights(channel: grpc.Channel) -> weight_service_pb2_grpc.WeightServiceStub:
    return weight_service_pb2_grpc.WeightServiceStub(channel)


# --- strings -----------------------------------------------------------------


def test_a_long_string_field_is_refused_with_its_size_and_the_limit(channel: grpc.Channel) -> None:
    request = model_service_pb2.GetModelRequest(model_id="a" * 5000)
    error, _ = _error(_models(channel).GetModel, request)
    _expect(error, grpc.StatusCode.INVALID_ARGUMENT, "STRING_TOO_LONG", "model_id")
    assert error.metadata == {"size_bytes": "5000", "limit_bytes": "4096"}


def test_nested_repeated_strings_are_named_by_their_path(small_channel: grpc.Channel) -> None:
    def edits(layer: str) -> weight_service_pb2.ApplyEditsRequest:
        selector = selector_pb2.VariableSelector(layers=["ok", layer])
        return weight_service_pb2.ApplyEditsRequest(
            model_id="absent",
            edits=[
                edits_pb2.Edit(scale=edits_pb2.ScaleOp(factor=2)),
                edits_pb2.Edit(add_noise=edits_pb2.AddNoiseOp(selector=selector, stddev=1)),
            ],
        )

    # 33 characters of two bytes each: 66 bytes, over 64.
    error, _ = _error(_weights(small_channel).ApplyEdits, edits("é" * 33))
    _expect(
        error, grpc.StatusCode.INVALID_ARGUMENT, "STRING_TOO_LONG", "edits[1].add_noise.selector.layers[1]"
    )
    assert error.metadata["limit_bytes"] == "64"
    # 64 bytes exactly pass the bound: the call goes on to find no such model.
    error, _ = _error(_weights(small_channel).ApplyEdits, edits("é" * 32))
    assert error.reason == "MODEL_NOT_FOUND"


def test_map_values_and_keys_are_bounded(small_channel: grpc.Channel) -> None:
    config = struct_pb2.Struct()
    config.update({"mean": "x" * 65})
    request = weight_service_pb2.ApplyEditsRequest(
        model_id="absent",
        edits=[edits_pb2.Edit(reinitialize=edits_pb2.ReinitializeOp(initializer="Zeros", config=config))],
    )
    error, _ = _error(_weights(small_channel).ApplyEdits, request)
    _expect(
        error,
        grpc.StatusCode.INVALID_ARGUMENT,
        "STRING_TOO_LONG",
        "edits[0].reinitialize.config.fields['mean'].string_value",
    )
    keyed = struct_pb2.Struct()
    keyed.update({"k" * 65: 1})
    request.edits[0].reinitialize.config.CopyFrom(keyed)
    error, _ = _error(_weights(small_channel).ApplyEdits, request)
    assert error.reason == "STRING_TOO_LONG"
    assert error.field_violations[0][0].startswith("edits[0].reinitialize.config.fields['kkkk")


def test_too_many_items_in_one_repeated_field(channel: grpc.Channel) -> None:
    selector = selector_pb2.VariableSelector(paths=["a"] * 100_001)
    request = weight_service_pb2.ReadWeightsRequest(model_id="absent", selector=selector)
    with pytest.raises(grpc.RpcError) as raised:
        list(_weights(channel).ReadWeights(request, timeout=60))
    error = from_rpc_error(raised.value)
    _expect(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_ITEMS", "selector.paths")


def test_stream_headers_are_bounded_too(channel: grpc.Channel) -> None:
    """A WriteWeights header over 64 KiB is a long string, not a missing header."""
    header = weight_service_pb2.WriteWeightsRequest(
        header=weight_service_pb2.WriteWeightsHeader(model_id="absent", message="m" * (100 << 10))
    )
    write = channel.stream_unary(
        "/weightsmith.v1.WeightService/WriteWeights",
        request_serializer=weight_service_pb2.WriteWeightsRequest.SerializeToString,
        response_deserializer=weight_service_pb2.WriteWeightsResponse.FromString,
    )
    error, _ = _error(write, iter([header]))
    _expect(error, grpc.StatusCode.INVALID_ARGUMENT, "STRING_TOO_LONG", "header.message")
    upload = model_service_pb2.UploadModelRequest(
        header=model_service_pb2.UploadModelHeader(model_id="absent", size_bytes=10, message="m" * 5000)
    )
    error, _ = _error(_models(channel).UploadModel, iter([upload]))
    _expect(error, grpc.StatusCode.INVALID_ARGUMENT, "STRING_TOO_LONG", "header.message")


def test_the_chunk_codec_takes_big_headers_but_not_big_fields_beside_a_chunk() -> None:
    header = weight_service_pb2.WriteWeightsRequest(
        header=weight_service_pb2.WriteWeightsHeader(model_id="m", message="m" * (100 << 10))
    ).SerializeToString()
    chunk, rest = wire.parse_chunk_field(header, 2)
    assert chunk is None
    assert weight_service_pb2.WriteWeightsRequest.FromString(rest).header.message == "m" * (100 << 10)
    padded = wire.encode_chunk(2, "w", 1, (1,), 0, memoryview(b"\0\0\0\0")) + header
    with pytest.raises(ValueError, match="besides the chunk"):
        wire.parse_chunk_field(padded, 2)


def test_revision_messages_are_bounded(client, model_id: str) -> None:
    client.create_model(model_id, keras_config=tiny_config())
    with pytest.raises(weightsmith.InvalidArgumentError) as caught:
        client.write_weights(model_id, {"logits/bias": np.zeros(2, np.float32)}, message="m" * 4097)
    assert (caught.value.reason, caught.value.field_violations[0][0]) == ("STRING_TOO_LONG", "header.message")
    assert client.get_model(model_id).revision == 1


def test_revision_pages_end_before_they_grow_too_large(
    client, model_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.create_model(model_id, keras_config=tiny_config(), message="c" * 4000)
    for index in range(3):
        scale = edits_pb2.Edit(scale=edits_pb2.ScaleOp(factor=1.0))
        client.apply_edits(model_id, [scale], message=f"{index}" * 4000)
    assert len(client.list_revisions(model_id, page_size=100).revisions) == 4
    # Each record holds a 4000-byte message: a page of 4100 bytes holds one (always at least one).
    monkeypatch.setattr(history, "PAGE_BYTES", 4100)  # the in-process server's module
    seen: list[int] = []
    token = ""
    while True:
        page = client.list_revisions(model_id, page_size=100, page_token=token)
        assert len(page.revisions) == 1
        seen += [r.revision for r in page.revisions]
        token = page.next_page_token
        if not token:
            break
    assert seen == [4, 3, 2, 1]


# --- configs -----------------------------------------------------------------


def _bad_thirty_layer_config() -> str:
    """A real 30-layer Keras config (23 KB) that Keras refuses, echoing it in its error."""
    import keras

    layers = [keras.Input((4,)), *(keras.layers.Dense(3, name=f"dense_{i}") for i in range(30))]
    config = json.loads(keras.Sequential(layers).to_json())
    config["config"]["layers"][-1]["config"]["activation"] = "no_such_activation"
    return json.dumps(config)


def test_a_bad_thirty_layer_config_is_invalid_argument_in_a_small_reply(
    client, channel: grpc.Channel, model_id: str
) -> None:
    config = _bad_thirty_layer_config()
    assert len(config) > 20_000
    for _ in range(5):
        with pytest.raises(weightsmith.InvalidArgumentError) as caught:
            client.create_model(model_id, keras_config=config)
        assert caught.value.reason == "INVALID_MODEL_CONFIG"
    request = model_service_pb2.CreateModelRequest(model_id=model_id, keras_config_json=config)
    error, reply = _error(_models(channel).CreateModel, request)
    _expect(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MODEL_CONFIG", "keras_config_json")
    assert reply <= status.MAX_ERROR_BYTES < 16 * 1024


@pytest.mark.parametrize(
    "config",
    [
        "[" * 100_000 + "]" * 100_000,
        json.dumps({"class_name": "Sequential", "config": json.loads("[" * 150 + "]" * 150)}),
    ],
    ids=["100000-deep", "150-deep-in-a-config"],
)
def test_deeply_nested_configs_are_invalid_argument(channel: grpc.Channel, config: str) -> None:
    request = model_service_pb2.CreateModelRequest(model_id="deep", keras_config_json=config)
    error, _ = _error(_models(channel).CreateModel, request)
    _expect(error, grpc.StatusCode.INVALID_ARGUMENT, "CONFIG_TOO_DEEP", "keras_config_json")


def test_json_depth_needs_no_recursion() -> None:
    deep: Any = []
    for _ in range(50_000):
        deep = [deep, {"a": 1}]
    assert json_depth(deep) == 50_001
    assert json_depth({"a": [1, {"b": []}]}) == 4 and json_depth(7) == 0


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return wire._varint(number << 3 | 2) + wire._varint(len(payload)) + payload


def test_a_struct_nested_past_protobufs_limit_is_malformed_request(channel: grpc.Channel) -> None:
    value = _field(3, b"leaf")  # Value.string_value
    for _ in range(150):
        value = _field(6, _field(1, value))  # Value.list_value, ListValue.values
    config = _field(1, _field(1, b"deep") + _field(2, value))  # Struct.fields: key, value
    numbers = edits_pb2.ReinitializeOp.DESCRIPTOR.fields_by_name
    op = edits_pb2.ReinitializeOp(initializer="Zeros").SerializeToString() + _field(
        numbers["config"].number, config
    )
    edit = _field(edits_pb2.Edit.DESCRIPTOR.fields_by_name["reinitialize"].number, op)
    request = weight_service_pb2.ApplyEditsRequest(model_id="absent").SerializeToString() + _field(
        weight_service_pb2.ApplyEditsRequest.DESCRIPTOR.fields_by_name["edits"].number, edit
    )
    call = channel.unary_unary("/weightsmith.v1.WeightService/ApplyEdits")
    error, _ = _error(call, request)
    _expect(error, grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST", "request")


def test_configs_have_their_own_larger_bound(small: ServerHandle, small_channel: grpc.Channel) -> None:
    with weightsmith.Client(small.address) as connected:
        created = connected.create_model("fits", keras_config=tiny_config())  # longer than 64 bytes
    assert created.revision == 1
    request = model_service_pb2.CreateModelRequest(model_id="big", keras_config_json=" " * ((1 << 20) + 1))
    error, _ = _error(_models(small_channel).CreateModel, request)
    _expect(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "CONFIG_TOO_LARGE", "keras_config_json")
    assert error.metadata["limit_bytes"] == str(1 << 20)


# --- every reply fits ----------------------------------------------------------


def test_to_status_cuts_any_error_to_fit() -> None:
    huge = "é" * 100_000
    error = InvalidArgument(
        huge,
        reason="INVALID_MODEL_CONFIG",
        field="keras_config_json",
        violations=[(f"f{i}", huge) for i in range(100)],
        metadata={f"k{i}": huge for i in range(100)},
    )
    sent = status.to_status(error)
    details = dict(sent.trailing_metadata)["grpc-status-details-bin"]
    assert len(details) + 3 * len(sent.details.encode()) <= status.MAX_ERROR_BYTES
    assert sent.details.endswith(status.TRUNCATED)
    small = status.to_status(InvalidArgument("short", reason="INVALID_MODEL_CONFIG", field="x"))
    assert small.details == "short"


def test_store_paths_are_shown_relative_to_the_store(client, server: ServerHandle) -> None:
    root = str(server.store.resolve())
    with pytest.raises(weightsmith.InvalidArgumentError) as caught:
        client.create_model("weights-file", architecture="MobileNet", weights_file="nope.h5")
    assert "imports/" in str(caught.value) and root not in str(caught.value)
    error = InvalidArgument(f"cannot read {root}/imports/x.npz", reason="CORRUPT_DATASET", field="uri")
    assert status.to_status(error).details == "cannot read imports/x.npz"


# --- the small ones ----------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (edits_pb2.Edit(add_noise=edits_pb2.AddNoiseOp(stddev=0.1, seed=-1)), "edits[0].add_noise.seed"),
        (
            edits_pb2.Edit(reinitialize=edits_pb2.ReinitializeOp(initializer="Zeros", seed=-5)),
            "edits[0].reinitialize.seed",
        ),
    ],
    ids=["add-noise", "reinitialize"],
)
def test_negative_seeds_are_invalid_argument(client, model_id: str, edit: edits_pb2.Edit, field: str) -> None:
    client.create_model(model_id, keras_config=tiny_config())
    with pytest.raises(weightsmith.InvalidArgumentError) as caught:
        client.apply_edits(model_id, [edit])
    assert caught.value.reason == "INVALID_SEED"
    assert caught.value.field_violations[0][0] == field
    noisy = edits_pb2.Edit(add_noise=edits_pb2.AddNoiseOp(stddev=0.1, seed=2**63 - 1))
    assert client.apply_edits(model_id, [noisy]).revision.revision == 2


def test_create_model_seed_out_of_range(client, model_id: str) -> None:
    for seed in (-1, 2**32):
        with pytest.raises(weightsmith.InvalidArgumentError) as caught:
            client.create_model(model_id, keras_config=tiny_config(), seed=seed)
        assert (caught.value.reason, caught.value.field_violations[0][0]) == ("INVALID_SEED", "seed")


@pytest.mark.parametrize("token", ["garbage", "YWJj", "ws1.", "ws1.AAAAAAAA", "ws1.!!!!", "bW9kZWw"])
def test_garbage_page_tokens_are_invalid_argument(channel: grpc.Channel, model_id: str, token: str) -> None:
    training = training_service_pb2_grpc.TrainingServiceStub(channel)
    calls = [
        (_models(channel).ListModels, model_service_pb2.ListModelsRequest(page_token=token)),
        (
            _weights(channel).ListRevisions,
            weight_service_pb2.ListRevisionsRequest(model_id="x", page_token=token),
        ),
        (training.ListDatasets, training_service_pb2.ListDatasetsRequest(page_token=token)),
        (training.ListJobs, training_service_pb2.ListJobsRequest(page_token=token)),
    ]
    for call, request in calls:
        error, _ = _error(call, request)
        if error.reason == "MODEL_NOT_FOUND":  # ListRevisions looks the model up first
            continue
        _expect(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", "page_token")


def test_page_tokens_still_page(client, model_id: str) -> None:
    for suffix in ("a", "b", "c"):
        client.create_model(f"{model_id}-{suffix}", keras_config=tiny_config())
    first = client.list_models(page_size=1)
    assert first.next_page_token
    second = client.list_models(page_size=1, page_token=first.next_page_token)
    assert [m.model_id for m in second.models] != [m.model_id for m in first.models]
    for revision_token in ("garbage", first.next_page_token):  # a model-id token is no revision token
        with pytest.raises(weightsmith.InvalidArgumentError) as caught:
            client.list_revisions(f"{model_id}-a", page_token=revision_token)
        assert caught.value.reason == "INVALID_PAGE_TOKEN"


def test_dataset_uri_errors_hide_the_store(client, server: ServerHandle) -> None:
    root = str(server.store.resolve())
    with pytest.raises(WeightsmithError) as caught:
        client.create_dataset("../../etc/passwd", format="npz")
    assert root not in str(caught.value) and caught.value.field_violations[0][0] == "uri"


def test_paths_in_errors_are_not_store_absolute_after_a_missing_import(client, server: ServerHandle) -> None:
    root = str(server.store.resolve())
    with pytest.raises(WeightsmithError) as caught:
        client.create_dataset("missing.npz", format="npz")
    text = f"{caught.value} {caught.value.field_violations} {caught.value.metadata}"
    assert root not in text


def test_job_seed_out_of_range(client, model_id: str) -> None:
    from weightsmith import jobs

    client.create_model(model_id, keras_config=tiny_config(inputs=4, outputs=2))
    data = {"x": np.zeros((8, 4), np.float32), "y": np.zeros(8, np.int64)}
    dataset = client.upload_dataset(data, f"{model_id}-data")
    spec = jobs.spec(
        model_id,
        dataset.dataset_id,
        epochs=1,
        batch_size=4,
        optimizer=jobs.adam(0.01),
        loss="sparse_categorical_crossentropy",
        seed=-1,
    )
    with pytest.raises(weightsmith.InvalidArgumentError) as caught:
        client.create_job(spec)
    assert (caught.value.reason, caught.value.field_violations[0][0]) == ("INVALID_SEED", "spec.seed")


def _gif(colors: list[int], width: int = 2, height: int = 2) -> bytes:
    """An animated GIF of one-color frames, LZW-coded by hand (3-bit codes, a clear code every 2 pixels)."""
    palette = bytes([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    out = b"GIF89a" + struct.pack("<HHBBB", width, height, 0xF1, 0, 0) + palette
    for color in colors:
        codes: list[int] = []
        for index in range(width * height):
            if index % 2 == 0:
                codes.append(4)  # clear
            codes.append(color)
        codes.append(5)  # end of information
        data = sum(code << (3 * i) for i, code in enumerate(codes)).to_bytes(
            (3 * len(codes) + 7) // 8, "little"
        )
        control = b"\x21\xf9\x04\x00\x0a\x00\x00\x00"  # a graphic control extension: 0.1 s per frame
        descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
        out += control + descriptor + b"\x02" + bytes([len(data)]) + data + b"\x00"
    return out + b"\x3b"


def test_only_the_first_frame_of_a_gif_is_decoded() -> None:
    import tensorflow as tf

    animated = _gif([1, 2, 3])
    assert tf.io.decode_gif(animated).shape[0] == 3
    first = images.first_gif_frame(animated)
    frames = tf.io.decode_gif(first).numpy()
    assert frames.shape == (1, 2, 2, 3) and (frames[0] == [255, 0, 0]).all()
    decoded = images.decode_image(animated, "a.gif", (2, 2), 3, "chunk", max_pixels=4)
    assert (decoded == [255, 0, 0]).all()
    with pytest.raises(ResourceExhausted) as caught:
        images.decode_image(animated, "a.gif", (2, 2), 3, "chunk", max_pixels=3)
    assert caught.value.reason == "IMAGE_TOO_LARGE"
    with pytest.raises(InvalidArgument) as unknown:
        images.decode_image(b"RIFF....WEBPVP8 ", "a.webp", (2, 2), 3, "chunk", max_pixels=4)
    assert unknown.value.reason == "CORRUPT_IMAGE"


@pytest.mark.parametrize("character", ["a", "\U0001f600", "%"])
def test_every_status_fits_the_error_bound_whatever_its_message(character: str) -> None:
    """Even a huge message of 4-byte characters (percent-encoded 12 bytes each) and huge details fit."""
    error = InvalidArgument(
        character * 100_000,
        reason="STRING_TOO_LONG",
        field="x" * 100_000,
        metadata={f"k{i}": character * 5000 for i in range(50)},
    )
    sent = status.to_status(error)
    details = dict(sent.trailing_metadata)["grpc-status-details-bin"]
    encoded = sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in sent.details.encode())
    assert len(details) + encoded <= status.MAX_ERROR_BYTES
    assert b"STRING_TOO_LONG" in details
