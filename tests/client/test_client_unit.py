"""The client library without a weightsmith server.

Request building, response decoding, the zero-copy weight codec as the
client uses it, error translation, channel configuration, and both clients
over real gRPC against a small in-process fake that uses only the generated
protobuf classes (as a server in another language would).
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

import weightsmith
from weightsmith import _channel, _requests, _rpcs, _streams, _uploads, errors, wire
from weightsmith._types import selector_to_proto
from weightsmith.v1 import (
    edits_pb2,
    model_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    revision_pb2,
    selector_pb2,
    tensor_pb2,
    weight_service_pb2,
    weight_service_pb2_grpc,
)

CLIENT_DIR = Path(weightsmith.__file__).resolve().parent.parent


def _settings(**overrides: Any) -> _channel.ClientSettings:
    kwargs: dict[str, Any] = {
        "timeout": 60.0,
        "stream_timeout": None,
        "author": "tester@host",
        "max_message_bytes": _channel.DEFAULT_MAX_MESSAGE_BYTES,
        "credentials": None,
        "options": (),
    }
    kwargs.update(overrides)
    return _channel.ClientSettings("127.0.0.1:1", **kwargs)


# --- package surface ---------------------------------------------------------


def test_import_does_not_import_tensorflow() -> None:
    code = (
        "import sys, weightsmith, weightsmith.client, weightsmith._async_client; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')); "
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(CLIENT_DIR)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_all_is_sorted_and_exports_the_public_api() -> None:
    assert weightsmith.__all__ == sorted(weightsmith.__all__)
    expected = {"Client", "AsyncClient", "Selector", "PredictResult", "WeightsmithError"}
    assert expected <= set(weightsmith.__all__)
    for name in weightsmith.__all__:
        assert getattr(weightsmith, name) is not None
    assert weightsmith.__version__ == "0.1.0"


def test_sync_and_async_clients_are_twins() -> None:
    import inspect

    def public(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(member)
            for name, member in vars(cls).items()
            if callable(member) and not name.startswith("_")
        }

    def blocking(annotation: object) -> object:
        # Annotations are strings (`from __future__ import annotations`).
        return annotation.replace("AsyncIterator", "Iterator") if isinstance(annotation, str) else annotation

    sync_methods = public(weightsmith.Client)
    async_methods = public(weightsmith.AsyncClient)
    assert sync_methods.keys() == async_methods.keys()
    for name, signature in sync_methods.items():
        sync_params = list(signature.parameters.values())
        async_params = list(async_methods[name].parameters.values())
        assert [(p.name, p.kind, p.default) for p in sync_params] == [
            (p.name, p.kind, p.default) for p in async_params
        ], name
        assert [p.annotation for p in sync_params] == [p.annotation for p in async_params], name
        assert signature.return_annotation == blocking(async_methods[name].return_annotation), name
        assert getattr(weightsmith.Client, name).__doc__, name
        assert inspect.iscoroutinefunction(
            getattr(weightsmith.AsyncClient, name)
        ) or inspect.isasyncgenfunction(getattr(weightsmith.AsyncClient, name)), name


def test_every_rpc_of_every_service_has_one_call_description() -> None:
    from weightsmith.v1 import training_service_pb2

    methods = {
        (service.full_name, method.name, method.client_streaming, method.server_streaming)
        for module in (model_service_pb2, weight_service_pb2, training_service_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    described = {(r.service, r.method, r.request_streams, r.response_streams) for r in _rpcs.ALL_RPCS}
    assert described == methods
    assert len(_rpcs.ALL_RPCS) == len(methods)
    assert not any(r.request_streams and r.response_streams for r in _rpcs.ALL_RPCS)
    assert _rpcs.GET_MODEL.path == "/weightsmith.v1.ModelService/GetModel"
    assert _rpcs.READ_WEIGHTS.streams and _rpcs.WRITE_WEIGHTS.streams and not _rpcs.PREDICT.streams


# --- errors --------------------------------------------------------------------


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK])
def test_one_exported_error_class_per_status_code(code: grpc.StatusCode) -> None:
    cls = errors.error_class(code)
    assert cls is not weightsmith.WeightsmithError
    assert issubclass(cls, weightsmith.WeightsmithError)
    assert cls.grpc_code is code
    assert getattr(weightsmith, cls.__name__) is cls
    assert cls.__name__ in weightsmith.__all__
    assert cls.__doc__ and cls.__doc__.strip().endswith(".") and "\n" not in cls.__doc__.strip()
    assert cls("boom").code is code


class FakeRpcError(grpc.RpcError, grpc.Call):
    """What a sync stub raises: an `RpcError` that is also a `Call`."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple = ()) -> None:
        self._code = code
        self._details = details
        self._trailing = trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailing

    def initial_metadata(self) -> tuple:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _rich_status(code: int = code_pb2.INVALID_ARGUMENT, message: str = "bad") -> status_pb2.Status:
    return status_pb2.Status(
        code=code,
        message=message,
        details=[
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field="edits[2].scale.selector", description="matches no variable"
                        ),
                        error_details_pb2.BadRequest.FieldViolation(
                            field="model_id", description="must match [a-z0-9][a-z0-9-]{0,62}"
                        ),
                    ]
                )
            ),
            _packed(
                error_details_pb2.ErrorInfo(
                    reason="SELECTOR_EMPTY", domain="weightsmith", metadata={"model_id": "m1"}
                )
            ),
            _packed(
                error_details_pb2.PreconditionFailure(
                    violations=[
                        error_details_pb2.PreconditionFailure.Violation(
                            type="MODEL_BUSY", subject="models/m1", description="a job is running"
                        )
                    ]
                )
            ),
        ],
    )


def test_from_rpc_error_unpacks_every_detail() -> None:
    status = rpc_status.to_status(_rich_status())
    error = errors.from_rpc_error(FakeRpcError(status.code, status.details, status.trailing_metadata))
    assert type(error) is weightsmith.InvalidArgumentError
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "bad"
    assert error.reason == "SELECTOR_EMPTY"
    assert error.metadata == {"model_id": "m1"}
    assert error.field_violations == [
        ("edits[2].scale.selector", "matches no variable"),
        ("model_id", "must match [a-z0-9][a-z0-9-]{0,62}"),
    ]
    assert error.precondition_failures == [("MODEL_BUSY", "models/m1", "a job is running")]
    assert error.details == _rich_status()
    text = str(error)
    assert text.startswith("INVALID_ARGUMENT: bad [SELECTOR_EMPTY]")
    assert "edits[2].scale.selector: matches no variable" in text
    assert "MODEL_BUSY on models/m1" in text


def test_from_rpc_error_without_details() -> None:
    error = errors.from_rpc_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, "no model 'x'"))
    assert type(error) is weightsmith.NotFoundError
    assert (error.message, error.reason, error.details) == ("no model 'x'", "", None)
    assert error.field_violations == [] and error.precondition_failures == []
    assert error.metadata == {}


def test_from_rpc_error_ignores_a_status_that_contradicts_the_call() -> None:
    status = rpc_status.to_status(_rich_status(code=code_pb2.NOT_FOUND))
    error = errors.from_rpc_error(FakeRpcError(grpc.StatusCode.INTERNAL, "other", status.trailing_metadata))
    assert type(error) is weightsmith.InternalError
    assert error.details is None and error.message == "other"


def test_from_rpc_error_accepts_a_bare_rpc_error() -> None:
    error = errors.from_rpc_error(grpc.RpcError("lost"))
    assert type(error) is weightsmith.UnknownError
    assert error.message == "lost"


def test_from_rpc_error_accepts_an_aio_error() -> None:
    status = rpc_status.to_status(_rich_status(code=code_pb2.ABORTED, message="stale"))
    aio_error = grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        details=status.details,
    )
    error = errors.from_rpc_error(aio_error)
    assert type(error) is weightsmith.AbortedError
    assert error.reason == "SELECTOR_EMPTY"
    assert error.field_violations[0][0] == "edits[2].scale.selector"


def test_translate_errors_chains_the_grpc_error() -> None:
    original = FakeRpcError(grpc.StatusCode.ALREADY_EXISTS, "taken")
    with pytest.raises(weightsmith.AlreadyExistsError) as caught, errors.translate_errors():
        raise original
    assert caught.value.__cause__ is original
    with errors.translate_errors():
        pass
    with pytest.raises(KeyError), errors.translate_errors():
        raise KeyError("not grpc")


def test_translate_errors_around_await() -> None:
    async def failing() -> None:
        await asyncio.sleep(0)
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down"
        )

    async def main() -> None:
        with errors.translate_errors():
            await failing()

    with pytest.raises(weightsmith.UnavailableError, match="down"):
        asyncio.run(main())


def test_errors_survive_pickling() -> None:
    status = rpc_status.to_status(_rich_status())
    error = errors.from_rpc_error(FakeRpcError(status.code, status.details, status.trailing_metadata))
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert vars(copy) == vars(error)
    assert str(copy) == str(error)


# --- selectors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (weightsmith.Selector(), selector_pb2.VariableSelector()),
        (
            weightsmith.Selector(paths=["a/kernel"], patterns="b*/bias", layers=("c",)),
            selector_pb2.VariableSelector(paths=["a/kernel"], patterns=["b*/bias"], layers=["c"]),
        ),
        (
            weightsmith.Selector(layer_range=(-5, None), kinds=["kernel"], trainable_only=True),
            selector_pb2.VariableSelector(
                layer_range=selector_pb2.LayerRange(start=-5),
                kinds=["kernel"],
                trainable_only=True,
            ),
        ),
        (
            weightsmith.Selector(layer_range=(0, 0)),
            selector_pb2.VariableSelector(layer_range=selector_pb2.LayerRange(start=0, stop=0)),
        ),
        (
            weightsmith.Selector(layer_range=slice(None, 3)),
            selector_pb2.VariableSelector(layer_range=selector_pb2.LayerRange(stop=3)),
        ),
        (
            weightsmith.Selector(layer_range=(None, None)),
            selector_pb2.VariableSelector(layer_range=selector_pb2.LayerRange()),
        ),
    ],
)
def test_selector_to_proto(selector: weightsmith.Selector, expected: Any) -> None:
    proto = selector.to_proto()
    assert proto == expected
    assert proto.HasField("layer_range") == (selector.layer_range is not None)
    if selector.layer_range is not None:
        start, stop = selector.layer_range
        assert proto.layer_range.HasField("start") == (start is not None)
        assert proto.layer_range.HasField("stop") == (stop is not None)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"layer_range": slice(0, 4, 2)}, ValueError),
        ({"layer_range": (1, 2, 3)}, ValueError),
        ({"layer_range": (1.5, None)}, TypeError),
        ({"layer_range": (True, None)}, TypeError),
        ({"paths": ["ok", 3]}, TypeError),
    ],
)
def test_selector_rejects_bad_input(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match="Received"):
        weightsmith.Selector(**kwargs)


def test_selector_like_forms() -> None:
    build = selector_to_proto
    assert build(None) is None
    assert build("dense*/kernel") == selector_pb2.VariableSelector(patterns=["dense*/kernel"])
    assert build(["a/*", "b/*"]) == selector_pb2.VariableSelector(patterns=["a/*", "b/*"])
    proto = selector_pb2.VariableSelector(layers=["x"])
    assert build(proto) is proto
    assert build(weightsmith.Selector(kinds="bias")) == selector_pb2.VariableSelector(kinds=["bias"])
    with pytest.raises(TypeError, match="expected a Selector"):
        build(42)  # type: ignore[arg-type]


# --- ModelService requests -----------------------------------------------------


def _create(**kwargs: Any) -> model_service_pb2.CreateModelRequest:
    defaults: dict[str, Any] = {
        "architecture": None,
        "include_top": None,
        "input_shape": None,
        "classes": 0,
        "pooling": None,
        "weights_file": "",
        "classifier_activation": "",
        "keras_config": None,
        "seed": None,
        "message": "",
    }
    defaults.update(kwargs)
    return _requests.create_model("m1", **defaults)


def test_create_model_request_from_catalog() -> None:
    request = _create(
        architecture="MobileNetV2",
        include_top=False,
        input_shape=(96, 96, np.int64(3)),
        classes=10,
        pooling="avg",
        weights_file="mnv2.weights.h5",
        classifier_activation="linear",
        seed=0,
        message="first",
    )
    assert request == model_service_pb2.CreateModelRequest(
        model_id="m1",
        catalog=model_service_pb2.CatalogArchitecture(
            name="MobileNetV2",
            include_top=False,
            input_shape=[96, 96, 3],
            classes=10,
            pooling=model_service_pb2.POOLING_AVG,
            weights_file="mnv2.weights.h5",
            classifier_activation="linear",
        ),
        seed=0,
        message="first",
    )
    assert request.HasField("seed") and request.catalog.HasField("include_top")
    plain = _create(architecture="ResNet50")
    assert not plain.HasField("seed") and not plain.catalog.HasField("include_top")
    assert plain.WhichOneof("architecture") == "catalog"


def test_create_model_request_from_keras_config() -> None:
    config = {"class_name": "Sequential", "config": {"layers": []}}
    request = _create(keras_config=config, seed=3)
    assert json.loads(request.keras_config_json) == config
    assert request.seed == 3
    assert _create(keras_config='{"a": 1}').keras_config_json == '{"a": 1}'


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "neither"),
        ({"architecture": "ResNet50", "keras_config": "{}"}, ValueError, "both"),
        ({"keras_config": "{}", "classes": 3}, ValueError, "classes"),
        ({"keras_config": "{}", "include_top": False}, ValueError, "include_top"),
        ({"keras_config": ""}, TypeError, "non-empty JSON"),
        ({"keras_config": 5}, TypeError, "keras_config"),
        ({"architecture": ""}, ValueError, "architecture"),
        ({"architecture": "ResNet50", "pooling": "mean"}, ValueError, "pooling"),
        ({"architecture": "ResNet50", "input_shape": [0, 3]}, ValueError, r"input_shape\[0\]"),
        ({"architecture": "ResNet50", "classes": -1}, ValueError, "classes"),
    ],
)
def test_create_model_request_rejects(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        _create(**kwargs)


def test_predict_request_forms() -> None:
    build = _requests.predict
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y = np.ones((2, 1), dtype=np.int64)

    single = build("m", x, ())
    assert [(t.name, tuple(t.tensor.shape)) for t in single.inputs] == [("", (2, 3))]
    np.testing.assert_array_equal(wire.tensor_from_proto(single.inputs[0].tensor), x)

    positional = build("m", [x, y], ["block5_pool"])
    assert [t.name for t in positional.inputs] == ["", ""]
    assert list(positional.output_layers) == ["block5_pool"]
    assert positional.inputs[1].tensor.dtype == tensor_pb2.DATA_TYPE_INT64

    named = build("m", {"image": x, "meta": y}, "features")
    assert [t.name for t in named.inputs] == ["image", "meta"]
    assert list(named.output_layers) == ["features"]

    big_endian = build("m", x.astype(">f4"), ())
    np.testing.assert_array_equal(wire.tensor_from_proto(big_endian.inputs[0].tensor), x)

    with pytest.raises(ValueError, match="no inputs"):
        build("m", [], ())
    with pytest.raises(ValueError, match=r"inputs\['text'\]"):
        build("m", {"text": np.array(["a"], dtype=object)}, ())


def test_predict_result_decoding() -> None:
    out = np.array([[0.25, 0.75]], np.float32)
    feature = np.zeros((1, 4), np.float16)
    response = model_service_pb2.PredictResponse(
        outputs=[tensor_pb2.NamedTensor(name="probs", tensor=wire.tensor_to_proto(out))],
        layer_outputs=[tensor_pb2.NamedTensor(name="pool", tensor=wire.tensor_to_proto(feature))],
        revision=4,
    )
    result = _requests.predict_result(response)
    assert isinstance(result, weightsmith.PredictResult)
    assert result.revision == 4
    assert list(result.outputs) == ["probs"] and list(result.layer_outputs) == ["pool"]
    np.testing.assert_array_equal(result.output, out)
    assert result.layer_outputs["pool"].dtype == np.float16

    two = model_service_pb2.PredictResponse(
        outputs=[
            tensor_pb2.NamedTensor(tensor=wire.tensor_to_proto(out)),
            tensor_pb2.NamedTensor(tensor=wire.tensor_to_proto(out)),
        ]
    )
    decoded = _requests.predict_result(two)
    assert list(decoded.outputs) == ["output_0", "output_1"]
    with pytest.raises(ValueError, match="exactly one"):
        _ = decoded.output

    broken = model_service_pb2.PredictResponse(
        outputs=[
            tensor_pb2.NamedTensor(
                name="x",
                tensor=tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[2], data=b"123"),
            )
        ]
    )
    with pytest.raises(weightsmith.DataLossError, match="3 bytes"):
        _requests.predict_result(broken)


def test_export_and_upload_requests(tmp_path: Path) -> None:
    request = _requests.export_model("m", 3, "saved_model")
    assert request == model_service_pb2.ExportModelRequest(
        model_id="m", revision=3, format=model_service_pb2.EXPORT_FORMAT_SAVED_MODEL
    )
    with pytest.raises(ValueError, match="format"):
        _requests.export_model("m", 0, "h5")
    with pytest.raises(ValueError, match="revision"):
        _requests.export_model("m", -1, "keras")

    from_bytes = _uploads.model_upload(b"abcdef", "m", "")
    assert (from_bytes.size_bytes, from_bytes.path) == (6, None)
    with from_bytes.open() as file:
        chunks = [from_bytes.chunk(block) for block in iter(lambda: file.read(4), b"")]
    assert [c.chunk for c in chunks] == [b"abcd", b"ef"]
    file = tmp_path / "m.keras"
    file.write_bytes(b"x" * 10)
    from_path = _uploads.model_upload(file, "m", "msg")
    assert (from_path.size_bytes, from_path.path) == (10, file)
    header = from_path.header
    assert header.header == model_service_pb2.UploadModelHeader(model_id="m", size_bytes=10, message="msg")
    with pytest.raises(FileNotFoundError, match="not a file"):
        _uploads.model_upload(tmp_path / "missing.keras", "m", "")
    with pytest.raises(TypeError, match="source"):
        _uploads.model_upload(3, "m", "")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size_bytes"):
        _settings().upload_chunk_size(_channel.DEFAULT_MAX_MESSAGE_BYTES)


# --- WeightService: the weight codec as the client uses it ---------------------


def _sample_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    nan_payload = np.array([0x7FC00001, 0xFFC12345, 0x7F800000], dtype=np.uint32).view(np.float32)
    weights = {
        "dense/kernel": rng.standard_normal((300, 257)).astype(np.float32),  # ~301 KiB
        "dense/bias": nan_payload,
        "conv/kernel": rng.standard_normal((3, 3, 4, 8)).astype(np.float16),
        "embedding/embeddings": rng.integers(-(2**62), 2**62, (7, 5), dtype=np.int64),
        "mask/flags": rng.integers(0, 2, 11).astype(bool),
        "empty/values": np.zeros((0, 4), np.uint8),
        "scalar/step": np.array(12345, dtype=np.int32),
        "big_endian/kernel": rng.standard_normal((40, 30)).astype(">f8"),
        "transposed/kernel": rng.standard_normal((64, 33)).astype(np.float32).T,
    }
    return weights


def _write_messages(weights: dict[str, np.ndarray], **kwargs: Any) -> list[Any]:
    options: dict[str, Any] = {
        "expected_revision": None,
        "message": "",
        "allow_non_finite": False,
        "chunk_size_bytes": 0,
    }
    options.update(kwargs)
    return list(_streams.write_weights_messages("m1", weights, **options))


def _assert_bit_exact(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(actual) == list(expected)
    for name, array in expected.items():
        got = actual[name]
        assert got.shape == array.shape, name
        assert got.dtype == array.dtype.newbyteorder("<"), name
        assert got.tobytes() == np.ascontiguousarray(array.astype(got.dtype)).tobytes(), name


def test_write_weights_stream_round_trips_bit_exactly() -> None:
    weights = _sample_weights()
    messages = _write_messages(
        weights,
        expected_revision=7,
        message="edit",
        allow_non_finite=True,
        chunk_size_bytes=wire.MIN_CHUNK_BYTES,
    )
    encoded = [_rpcs.serialize_request(m) for m in messages]
    assert all(isinstance(m, bytes) for m in messages[1:])

    header = weight_service_pb2.WriteWeightsRequest.FromString(encoded[0])
    assert header.WhichOneof("payload") == "header"
    assert header.header == weight_service_pb2.WriteWeightsHeader(
        model_id="m1", expected_revision=7, message="edit", allow_non_finite=True
    )
    assert header.header.HasField("expected_revision")

    assembler = wire.TensorAssembler()
    for data in encoded[1:]:
        # Standard protobuf parses the fast path's bytes...
        standard = weight_service_pb2.WriteWeightsRequest.FromString(data)
        assert standard.WhichOneof("payload") == "chunk"
        assert len(standard.chunk.data) <= wire.MIN_CHUNK_BYTES
        # ...and so does the zero-copy parser the server uses.
        chunk, rest = wire.parse_chunk_field(data, 2)
        assert chunk is not None and rest == b""
        assert (chunk.name, chunk.offset, bytes(chunk.data)) == (
            standard.chunk.name,
            standard.chunk.offset,
            standard.chunk.data,
        )
        assembler.add(chunk)
    _assert_bit_exact(assembler.finish(), weights)
    # 301 KiB of dense/kernel at 64 KiB per chunk: 5 chunks, the rest one each.
    assert len(encoded) - 1 == 5 + len(weights) - 1


def test_write_weights_bfloat16_round_trip() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    weights = {"bf/kernel": np.arange(12, dtype=np.float32).astype(ml_dtypes.bfloat16)}
    assembler = wire.TensorAssembler()
    for message in _write_messages(weights)[1:]:
        assembler.add(wire.parse_chunk_field(message, 2)[0])
    _assert_bit_exact(assembler.finish(), weights)


def test_write_weights_header_without_expected_revision() -> None:
    header = _write_messages({"a": np.zeros(2, np.float32)})[0]
    assert not header.header.HasField("expected_revision")
    assert not header.header.allow_non_finite


@pytest.mark.parametrize(
    ("weights", "kwargs", "error", "match"),
    [
        ({}, {}, ValueError, "no weights"),
        ([("a", np.zeros(1))], {}, TypeError, "mapping"),
        ({"": np.zeros(1)}, {}, ValueError, "variable path"),
        ({"a": np.array(["s"], dtype=object)}, {}, ValueError, "'a'"),
        ({"a": np.zeros(1)}, {"chunk_size_bytes": 1024}, ValueError, "65536 to 4194304"),
        ({"a": np.zeros(1)}, {"chunk_size_bytes": 8 << 20}, ValueError, "chunk_size_bytes"),
        ({"a": np.zeros(1)}, {"expected_revision": 0}, ValueError, "expected_revision"),
    ],
)
def test_write_weights_rejects_before_streaming(
    weights: Any, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        _write_messages(weights, **kwargs)


def _standard_read_stream(weights: dict[str, np.ndarray], chunk_bytes: int, revision: int) -> Iterator[bytes]:
    """ReadWeights responses as generated code in any language would write them."""
    for name, array in weights.items():
        array = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")
        data = array.tobytes()
        for offset in range(0, max(len(data), 1), chunk_bytes):
            first = offset == 0
            yield weight_service_pb2.ReadWeightsResponse(
                chunk=tensor_pb2.TensorChunk(
                    name=name if first else "",
                    dtype=wire.wire_dtype(array.dtype) if first else 0,
                    shape=array.shape if first else (),
                    offset=offset,
                    data=data[offset : offset + chunk_bytes],
                ),
                revision=revision,
            ).SerializeToString()


def test_read_weights_assembles_a_standard_stream() -> None:
    weights = _sample_weights()
    reader = _streams.WeightsReader()
    for data in _standard_read_stream(weights, 100_000, revision=9):
        reader.add(_streams.parse_read_weights_response(data))
    assert reader.revision == 9
    _assert_bit_exact(reader.finish(), weights)


def test_read_weights_request() -> None:
    request = _requests.read_weights("m", "a/*", 2, 1 << 20)
    assert request == weight_service_pb2.ReadWeightsRequest(
        model_id="m",
        selector=selector_pb2.VariableSelector(patterns=["a/*"]),
        revision=2,
        chunk_size_bytes=1 << 20,
    )
    assert not _requests.read_weights("m", None, 0, 0).HasField("selector")
    with pytest.raises(ValueError, match="chunk_size_bytes"):
        _requests.read_weights("m", None, 0, 100)


def test_read_weights_rejects_malformed_streams() -> None:
    weights = {"a": np.arange(40_000, dtype=np.float32)}
    stream = list(_standard_read_stream(weights, 65536, revision=1))
    assert len(stream) == 3

    truncated = _streams.WeightsReader()
    for data in stream[:-1]:
        truncated.add(_streams.parse_read_weights_response(data))
    with pytest.raises(weightsmith.DataLossError, match="ended after"):
        truncated.finish()

    gap = _streams.WeightsReader()
    gap.add(_streams.parse_read_weights_response(stream[0]))
    with pytest.raises(weightsmith.DataLossError, match="gap"):
        gap.add(_streams.parse_read_weights_response(stream[2]))

    moving = _streams.WeightsReader()
    moving.add(_streams.parse_read_weights_response(stream[0]))
    other_revision = weight_service_pb2.ReadWeightsResponse.FromString(stream[1])
    other_revision.revision = 2
    with pytest.raises(weightsmith.DataLossError, match="revision changed"):
        moving.add(_streams.parse_read_weights_response(other_revision.SerializeToString()))

    garbage = _streams.parse_read_weights_response(b"\x0a\xff\xff\xff\x0f")
    assert garbage.chunk is None and garbage.error
    with pytest.raises(weightsmith.DataLossError, match="malformed"):
        _streams.WeightsReader().add(garbage)
    with pytest.raises(weightsmith.DataLossError, match="no chunk"):
        _streams.WeightsReader().add(_streams.parse_read_weights_response(b"\x10\x01"))
    with pytest.raises(weightsmith.DataLossError):
        _streams.WeightsReader().add(None)


def test_export_receiver_checks_sizes() -> None:
    def response(chunk: bytes, size: int = 6, revision: int = 2) -> Any:
        return model_service_pb2.ExportModelResponse(chunk=chunk, size_bytes=size, revision=revision)

    ok = _streams.ExportReceiver()
    assert ok.add(response(b"abc")) + ok.add(response(b"def")) == b"abcdef"
    ok.finish()
    short = _streams.ExportReceiver()
    short.add(response(b"abc"))
    with pytest.raises(weightsmith.DataLossError, match="3 of 6"):
        short.finish()
    with pytest.raises(weightsmith.DataLossError, match="without any message"):
        _streams.ExportReceiver().finish()
    changing = _streams.ExportReceiver()
    changing.add(response(b"a"))
    with pytest.raises(weightsmith.DataLossError, match="mid-stream"):
        changing.add(response(b"b", revision=3))
    too_long = _streams.ExportReceiver()
    with pytest.raises(weightsmith.DataLossError, match="more than"):
        too_long.add(response(b"abcdefg"))


# --- configuration --------------------------------------------------------------


def test_channel_options() -> None:
    options = dict(_settings(max_message_bytes=8 << 20).channel_options)
    assert options["grpc.max_send_message_length"] == 8 << 20
    assert options["grpc.max_receive_message_length"] == 8 << 20
    assert options["grpc.enable_retries"] == 1
    assert options["grpc.keepalive_time_ms"] >= 300_000
    config = json.loads(options["grpc.service_config"])
    (method_config,) = config["methodConfig"]
    names = {(n["service"], n["method"]) for n in method_config["name"]}
    assert names == {
        ("weightsmith.v1.ModelService", "GetModel"),
        ("weightsmith.v1.ModelService", "ListModels"),
        ("weightsmith.v1.ModelService", "Predict"),
        ("weightsmith.v1.ModelService", "GetServerInfo"),
        ("weightsmith.v1.ModelService", "Evaluate"),
        ("weightsmith.v1.WeightService", "ReadWeights"),
        ("weightsmith.v1.WeightService", "ListRevisions"),
        ("weightsmith.v1.WeightService", "GetRevision"),
        ("weightsmith.v1.WeightService", "DiffRevisions"),
        ("weightsmith.v1.TrainingService", "GetDataset"),
        ("weightsmith.v1.TrainingService", "ListDatasets"),
        ("weightsmith.v1.TrainingService", "GetJob"),
        ("weightsmith.v1.TrainingService", "ListJobs"),
        ("weightsmith.v1.TrainingService", "ListJobEvents"),
    }
    assert method_config["retryPolicy"] == {
        "maxAttempts": 5,
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    overridden = _settings(options=[("grpc.keepalive_time_ms", 10_000), ("x.custom", "v")])
    merged = overridden.channel_options
    assert dict(merged)["grpc.keepalive_time_ms"] == 10_000
    assert len([k for k, _ in merged if k == "grpc.keepalive_time_ms"]) == 1
    assert ("x.custom", "v") in merged


def test_author_and_timeouts() -> None:
    default = _settings(author=None)
    assert "@" in default.author and default.author.isascii() and default.author.isprintable()
    assert default.metadata == (("weightsmith-author", default.author),)
    assert _settings(author="ci-bot").metadata == (("weightsmith-author", "ci-bot"),)
    for bad in ("", "caf\u00e9", "two\nlines"):
        with pytest.raises(ValueError, match="author"):
            _settings(author=bad)
    assert _settings(timeout=None).timeout is None
    for bad_timeout in (0, -1, "5"):
        with pytest.raises(ValueError, match="timeout"):
            _settings(timeout=bad_timeout)
    with pytest.raises(ValueError, match="target"):
        _channel.ClientSettings(
            "",
            timeout=1,
            stream_timeout=None,
            author="a",
            max_message_bytes=1 << 20,
            credentials=None,
            options=(),
        )


# --- both clients over real gRPC, against a fake server --------------------------


class CallLog:
    """What the fake server saw of each call: author metadata and deadline."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None, float | None]] = []

    def record(self, method: str, context: grpc.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata())
        remaining = context.time_remaining()
        # grpc reports "no deadline" as a huge number of seconds.
        deadline = remaining if remaining is not None and remaining < 1e6 else None
        self.calls.append((method, metadata.get("weightsmith-author"), deadline))

    def last(self, method: str) -> tuple[str | None, float | None]:
        for name, author, remaining in reversed(self.calls):
            if name == method:
                return author, remaining
        raise AssertionError(f"{method} was not called")


def _abort(context: grpc.ServicerContext, code: int, message: str, field: str) -> None:
    status = status_pb2.Status(
        code=code,
        message=message,
        details=[
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
                    ]
                )
            ),
            _packed(error_details_pb2.ErrorInfo(reason="MODEL_NOT_FOUND", domain="weightsmith")),
        ],
    )
    context.abort_with_status(rpc_status.to_status(status))


class FakeModels(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, log: CallLog) -> None:
        self.log = log
        self.ids = ["a", "b", "c", "d", "e"]
        self.export_bytes = bytes(range(256)) * 1000
        self.uploads: list[tuple[model_service_pb2.UploadModelHeader, bytes]] = []

    def CreateModel(self, request: Any, context: Any) -> Any:
        self.log.record("CreateModel", context)
        architecture = request.catalog.name or "Sequential"
        return model_service_pb2.CreateModelResponse(
            model=model_pb2.Model(model_id=request.model_id, revision=1, architecture=architecture)
        )

    def UploadModel(self, request_iterator: Any, context: Any) -> Any:
        self.log.record("UploadModel", context)
        header = next(request_iterator).header
        data = b"".join(r.chunk for r in request_iterator)
        self.uploads.append((header, data))
        return model_service_pb2.UploadModelResponse(
            model=model_pb2.Model(model_id=header.model_id or "picked", revision=1)
        )

    def GetModel(self, request: Any, context: Any) -> Any:
        self.log.record("GetModel", context)
        if request.model_id not in self.ids:
            _abort(context, code_pb2.NOT_FOUND, f"no model {request.model_id!r}", "model_id")
        return model_service_pb2.GetModelResponse(
            model=model_pb2.Model(model_id=request.model_id, revision=3)
        )

    def ListModels(self, request: Any, context: Any) -> Any:
        self.log.record("ListModels", context)
        start = int(request.page_token or 0)
        end = start + (request.page_size or 100)
        return model_service_pb2.ListModelsResponse(
            models=[model_pb2.Model(model_id=i) for i in self.ids[start:end]],
            next_page_token=str(end) if end < len(self.ids) else "",
        )

    def DeleteModel(self, request: Any, context: Any) -> Any:
        self.log.record("DeleteModel", context)
        self.ids.remove(request.model_id)
        return model_service_pb2.DeleteModelResponse()

    def ExportModel(self, request: Any, context: Any) -> Iterator[Any]:
        self.log.record("ExportModel", context)
        data = self.export_bytes
        if request.format == model_service_pb2.EXPORT_FORMAT_SAVED_MODEL:
            data = data[:10]  # announce more than is sent: a truncated stream
        for start in range(0, len(data), 65536):
            yield model_service_pb2.ExportModelResponse(
                chunk=data[start : start + 65536],
                size_bytes=len(self.export_bytes),
                revision=request.revision or 3,
            )

    def Predict(self, request: Any, context: Any) -> Any:
        self.log.record("Predict", context)
        outputs = []
        for i, named in enumerate(request.inputs):
            doubled = wire.tensor_from_proto(named.tensor) * 2
            outputs.append(
                tensor_pb2.NamedTensor(name=named.name or f"out{i}", tensor=wire.tensor_to_proto(doubled))
            )
        layer_outputs = [
            tensor_pb2.NamedTensor(name=layer, tensor=wire.tensor_to_proto(np.zeros((1, 2), np.float32)))
            for layer in request.output_layers
        ]
        return model_service_pb2.PredictResponse(outputs=outputs, layer_outputs=layer_outputs, revision=3)

    def GetServerInfo(self, request: Any, context: Any) -> Any:
        self.log.record("GetServerInfo", context)
        return model_service_pb2.GetServerInfoResponse(version="fake", tensorflow_version="none")


class FakeWeights(weight_service_pb2_grpc.WeightServiceServicer):
    def __init__(self, log: CallLog) -> None:
        self.log = log
        self.tensors = _sample_weights()
        self.revision = 3
        self.last_header: weight_service_pb2.WriteWeightsHeader | None = None
        self.requests: list[Any] = []

    def ReadWeights(self, request: Any, context: Any) -> Iterator[bytes]:
        self.log.record("ReadWeights", context)
        if request.model_id != "m1":
            _abort(context, code_pb2.NOT_FOUND, f"no model {request.model_id!r}", "model_id")
        patterns = list(request.selector.patterns) or ["*"]
        chosen = {
            name: array
            for name, array in self.tensors.items()
            if any(fnmatch.fnmatchcase(name, p) for p in patterns)
        }
        chunk = request.chunk_size_bytes or 65536
        for data in _standard_read_stream(chosen, chunk, self.revision):
            yield weight_service_pb2.ReadWeightsResponse.FromString(data)

    def WriteWeights(self, request_iterator: Any, context: Any) -> Any:
        # Plain generated classes: the fast path must look like any client.
        self.log.record("WriteWeights", context)
        header = next(request_iterator).header
        if header.HasField("expected_revision") and header.expected_revision != self.revision:
            context.abort(grpc.StatusCode.ABORTED, "revision moved")
        buffers: dict[str, tuple[np.dtype, tuple[int, ...], bytearray]] = {}
        current = ""
        for request in request_iterator:
            chunk = request.chunk
            if chunk.name:
                current = chunk.name
                buffers[current] = (
                    wire.numpy_dtype(chunk.dtype),
                    tuple(chunk.shape),
                    bytearray(),
                )
            buffer = buffers[current][2]
            assert chunk.offset == len(buffer)
            buffer += chunk.data
        for name, (dtype, shape, data) in buffers.items():
            self.tensors[name] = np.frombuffer(bytes(data), dtype=dtype).reshape(shape)
        self.revision += 1
        self.last_header = header
        author = dict(context.invocation_metadata()).get("weightsmith-author", "")
        return weight_service_pb2.WriteWeightsResponse(
            revision=revision_pb2.Revision(
                model_id=header.model_id,
                revision=self.revision,
                author=author,
                message=header.message,
                changed_variables=list(buffers),
            )
        )

    def ListRevisions(self, request: Any, context: Any) -> Any:
        self.log.record("ListRevisions", context)
        start = int(request.page_token or 0)
        numbers = list(range(self.revision, 0, -1))
        end = start + (request.page_size or 100)
        return weight_service_pb2.ListRevisionsResponse(
            revisions=[
                revision_pb2.Revision(model_id=request.model_id, revision=n) for n in numbers[start:end]
            ],
            next_page_token=str(end) if end < len(numbers) else "",
        )

    def GetRevision(self, request: Any, context: Any) -> Any:
        self.log.record("GetRevision", context)
        return weight_service_pb2.GetRevisionResponse(
            revision=revision_pb2.Revision(model_id=request.model_id, revision=request.revision)
        )

    def ApplyEdits(self, request: Any, context: Any) -> Any:
        self.log.record("ApplyEdits", context)
        self.requests.append(request)
        results = [edits_pb2.EditResult()] * len(request.edits)
        if request.dry_run:
            return weight_service_pb2.ApplyEditsResponse(results=results)
        self.revision += 1
        return weight_service_pb2.ApplyEditsResponse(
            revision=revision_pb2.Revision(model_id=request.model_id, revision=self.revision), results=results
        )

    def DiffRevisions(self, request: Any, context: Any) -> Any:
        self.log.record("DiffRevisions", context)
        self.requests.append(request)
        return weight_service_pb2.DiffRevisionsResponse(
            changed=[revision_pb2.VariableDiff(path="dense/kernel", delta_l2=1.5)], unchanged_count=3
        )

    def RevertModel(self, request: Any, context: Any) -> Any:
        self.log.record("RevertModel", context)
        self.requests.append(request)
        if request.HasField("expected_revision") and request.expected_revision != self.revision:
            context.abort(grpc.StatusCode.ABORTED, "revision moved")
        self.revision += 1
        return weight_service_pb2.RevertModelResponse(
            revision=revision_pb2.Revision(
                model_id=request.model_id, revision=self.revision, reverted_to=request.to_revision
            )
        )


class FakeServer:
    def __init__(self) -> None:
        self.log = CallLog()
        self.models = FakeModels(self.log)
        self.weights = FakeWeights(self.log)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
            ],
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(self.models, self.server)
        weight_service_pb2_grpc.add_WeightServiceServicer_to_server(self.weights, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        self.server.start()


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.server.stop(None)


def test_client_against_fake_server(connect: Callable[..., Any], fake: FakeServer, tmp_path: Path) -> None:
    with connect(fake.address, author="alice@test", timeout=30) as client:
        # Weights: the fast path both ways, checked against plain protobuf.
        everything = client.read_weights("m1")
        _assert_bit_exact(everything, _sample_weights())
        assert fake.log.last("ReadWeights") == ("alice@test", None)
        dense = client.read_weights("m1", "dense/*", chunk_size_bytes=1 << 20)
        assert list(dense) == ["dense/kernel", "dense/bias"]

        new = {k: v + 1 for k, v in everything.items() if k.startswith(("dense", "conv"))}
        revision = client.write_weights(
            "m1", new, expected_revision=3, message="plus one", chunk_size_bytes=65536
        )
        assert (revision.revision, revision.author, revision.message) == (
            4,
            "alice@test",
            "plus one",
        )
        assert list(revision.changed_variables) == list(new)
        _assert_bit_exact({k: fake.weights.tensors[k] for k in new}, new)
        assert fake.weights.last_header is not None
        assert fake.weights.last_header.expected_revision == 3
        with pytest.raises(weightsmith.AbortedError, match="revision moved"):
            client.write_weights("m1", new, expected_revision=1)

        # Models.
        model = client.create_model("c1", architecture="ResNet50", seed=1)
        assert (model.model_id, model.architecture) == ("c1", "ResNet50")
        author, remaining = fake.log.last("CreateModel")
        assert author == "alice@test" and remaining is not None and 0 < remaining < 31
        assert client.get_model("a").revision == 3
        with pytest.raises(weightsmith.NotFoundError) as caught:
            client.get_model("zz")
        assert caught.value.reason == "MODEL_NOT_FOUND"
        assert caught.value.field_violations == [("model_id", "no model 'zz'")]
        assert isinstance(caught.value.__cause__, grpc.RpcError)

        assert [m.model_id for m in client.iter_models(page_size=2)] == ["a", "b", "c", "d", "e"]
        page = client.list_models(page_size=2)
        assert (len(page.models), page.next_page_token) == (2, "2")
        client.delete_model("e")
        assert [m.model_id for m in client.iter_models()] == ["a", "b", "c", "d"]

        x = np.ones((2, 3), np.float32)
        result = client.predict("a", {"in": x}, output_layers=["pool"])
        np.testing.assert_array_equal(result.outputs["in"], x * 2)
        assert list(result.layer_outputs) == ["pool"] and result.revision == 3

        assert client.export_model("a") == fake.models.export_bytes
        path = client.export_model("a", revision=2, path=tmp_path / "a.keras")
        assert path == tmp_path / "a.keras" and path.read_bytes() == fake.models.export_bytes
        with pytest.raises(weightsmith.DataLossError, match="ended after"):
            client.export_model("a", format="saved_model", path=tmp_path / "b.tar")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.keras"]

        source = tmp_path / "up.keras"
        source.write_bytes(os.urandom(300_000))
        assert client.upload_model(source, "up", chunk_size_bytes=65536).model_id == "up"
        assert client.upload_model(b"tiny", message="m").model_id == "picked"
        (header, data), (header2, data2) = fake.models.uploads
        assert (header.size_bytes, data) == (300_000, source.read_bytes())
        assert (header2.size_bytes, data2, header2.message) == (4, b"tiny", "m")

        assert client.server_info().version == "fake"
        assert [r.revision for r in client.iter_revisions("m1", page_size=3)] == [4, 3, 2, 1]
        assert client.get_revision("m1", 2).revision == 2


def test_client_round_trips_against_fake_server(
    connect: Callable[..., Any], fake: FakeServer, tmp_path: Path
) -> None:
    with connect(fake.address, author="bob@test") as client:
        everything = client.read_weights("m1")
        _assert_bit_exact(everything, _sample_weights())
        with pytest.raises(weightsmith.NotFoundError, match="no model 'nope'"):
            client.read_weights("nope")

        new = {"dense/kernel": everything["dense/kernel"] * 3}
        revision = client.write_weights("m1", new, message="times three")
        assert (revision.revision, revision.author) == (4, "bob@test")
        _assert_bit_exact({"dense/kernel": fake.weights.tensors["dense/kernel"]}, new)

        model = client.create_model(keras_config={"class_name": "Sequential"})
        assert model.architecture == "Sequential"
        with pytest.raises(weightsmith.NotFoundError) as caught:
            client.get_model("zz")
        assert caught.value.reason == "MODEL_NOT_FOUND"
        ids = [m.model_id for m in client.iter_models(page_size=2)]
        assert ids == ["a", "b", "c", "d", "e"]
        client.delete_model("a")

        result = client.predict("b", [np.arange(3, dtype=np.int32)])
        np.testing.assert_array_equal(result.output, np.arange(3) * 2)

        assert client.export_model("b") == fake.models.export_bytes
        path = client.export_model("b", path=str(tmp_path / "b.keras"))
        assert path.read_bytes() == fake.models.export_bytes
        with pytest.raises(weightsmith.DataLossError):
            client.export_model("b", format="saved_model", path=tmp_path / "c.tar")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["b.keras"]

        source = tmp_path / "up.keras"
        source.write_bytes(os.urandom(100_000))
        uploaded = client.upload_model(source, "up", chunk_size_bytes=30_000)
        assert uploaded.model_id == "up"
        assert fake.models.uploads[-1][1] == source.read_bytes()

        assert client.server_info().version == "fake"
        revisions = [r.revision for r in client.iter_revisions("m1", page_size=3)]
        assert revisions == [4, 3, 2, 1]
        assert client.get_revision("m1", 1).revision == 1
        assert client.list_revisions("m1").revisions[0].revision == 4
    author, remaining = fake.log.last("GetModel")
    assert author == "bob@test" and remaining is not None and 0 < remaining < 61


def test_edit_calls_against_fake_server(connect: Callable[..., Any], fake: FakeServer) -> None:
    from weightsmith import edits

    with connect(fake.address, author="carol@test", timeout=20) as client:
        batch = [edits.scale("*/kernel", 0.5), edits.prune("*/kernel", 0.3)]
        dry = client.apply_edits("m1", batch, dry_run=True)
        assert not dry.HasField("revision") and len(dry.results) == 2
        applied = client.apply_edits("m1", batch, expected_revision=3, message="halve")
        assert applied.revision.revision == 4
        sent = fake.weights.requests[-1]
        assert (list(sent.edits), sent.expected_revision, sent.message) == (batch, 3, "halve")
        author, remaining = fake.log.last("ApplyEdits")
        assert author == "carol@test" and remaining is not None and 0 < remaining < 21

        diff = client.diff_revisions("m1", 1)
        assert [(d.path, d.delta_l2) for d in diff.changed] == [("dense/kernel", 1.5)]
        assert (fake.weights.requests[-1].from_revision, fake.weights.requests[-1].to_revision) == (1, 0)

        reverted = client.revert_model("m1", 1, expected_revision=4, message="undo")
        assert (reverted.revision, reverted.reverted_to) == (5, 1)
        with pytest.raises(weightsmith.AbortedError, match="revision moved"):
            client.revert_model("m1", 1, expected_revision=4)


def test_async_client_refuses_calls_once_closed(fake: FakeServer) -> None:
    async def main() -> None:
        async with weightsmith.AsyncClient(fake.address) as client:
            assert (await client.get_model("b")).model_id == "b"
        with pytest.raises(RuntimeError, match="closed"):
            await client.get_model("b")

    asyncio.run(main())


def test_async_client_created_outside_the_loop(fake: FakeServer) -> None:
    client = weightsmith.AsyncClient(fake.address)

    async def main() -> str:
        try:
            return (await client.server_info()).version
        finally:
            await client.close()

    assert asyncio.run(main()) == "fake"


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_server_raises_unavailable(connect: Callable[..., Any]) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    with connect(address, timeout=10) as client, pytest.raises(weightsmith.UnavailableError):
        client.delete_model("m")
