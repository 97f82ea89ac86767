"""WeightService over real gRPC: reads, writes, revisions, atomicity, bad input."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

import weightsmith
from tests.conftest import ServerHandle, tiny_cnn_config, tiny_config
from weightsmith import wire
from weightsmith.v1 import revision_pb2, weight_service_pb2

WRITE_METHOD = "/weightsmith.v1.WeightService/WriteWeights"


def _header(model_id: str, **fields: object) -> bytes:
    return weight_service_pb2.WriteWeightsRequest(
        header=weight_service_pb2.WriteWeightsHeader(model_id=model_id, **fields)  # type: ignore[arg-type]
    ).SerializeToString()


def _chunk(name: str, array: np.ndarray, offset: int, data: bytes) -> bytes:
    return wire.encode_chunk(2, name, wire.wire_dtype(array.dtype), array.shape, offset, memoryview(data))


def _raw_write(
    address: str, messages: Iterator[bytes] | list[bytes]
) -> weight_service_pb2.WriteWeightsResponse:
    """WriteWeights with hand-made messages, to send what a correct client never would."""
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_unary(
            WRITE_METHOD,
            request_serializer=lambda m: m,
            response_deserializer=weight_service_pb2.WriteWeightsResponse.FromString,
        )
        return call(iter(messages), timeout=60)


def _snapshot(client, model_id: str) -> tuple[int, dict[str, bytes]]:
    return client.get_model(model_id).revision, {
        k: v.tobytes() for k, v in client.read_weights(model_id).items()
    }


def test_round_trip_is_bit_exact_and_creates_a_revision(client, model_id: str) -> None:
    client.create_model(model_id, keras_config=tiny_cnn_config(), seed=2)
    original = client.read_weights(model_id)
    assert list(original) == [
        "conv1/kernel",
        "conv1/bias",
        "bn1/gamma",
        "bn1/beta",
        "bn1/moving_mean",
        "bn1/moving_variance",
        "conv2/kernel",
        "conv2/bias",
        "head/kernel",
        "head/bias",
    ]
    modified = {k: (v * 3 - 0.25).astype(v.dtype) for k, v in original.items()}

    revision = client.write_weights(model_id, modified, expected_revision=1, message="scaled")

    assert revision.revision == 2
    assert revision.message == "scaled"
    assert revision.author == "tests"
    assert revision.kind == revision_pb2.REVISION_KIND_WRITE_WEIGHTS
    assert list(revision.changed_variables) == list(original)
    again = client.read_weights(model_id)
    assert {k: v.tobytes() for k, v in again.items()} == {k: v.tobytes() for k, v in modified.items()}
    old = client.read_weights(model_id, revision=1)
    assert {k: v.tobytes() for k, v in old.items()} == {k: v.tobytes() for k, v in original.items()}


def test_partial_write_changes_only_what_was_sent(client, model_id: str) -> None:
    client.create_model(model_id, keras_config=tiny_config(), seed=2)
    before = client.read_weights(model_id)
    client.write_weights(model_id, {"logits/bias": np.array([1.0, 2.0], np.float32)})
    after = client.read_weights(model_id)
    assert after["logits/bias"].tolist() == [1.0, 2.0]
    for name in ("hidden/kernel", "hidden/bias", "logits/kernel"):
        assert after[name].tobytes() == before[name].tobytes()
    assert list(client.get_revision(model_id, 2).changed_variables) == ["logits/bias"]


def test_write_in_many_small_chunks(client, model_id: str) -> None:
    import keras

    config = keras.Sequential([keras.Input((512,)), keras.layers.Dense(1024, name="wide")]).to_json()
    client.create_model(model_id, keras_config=config)
    kernel = np.random.default_rng(1).normal(size=(512, 1024)).astype(np.float32)  # 2 MiB
    client.write_weights(model_id, {"wide/kernel": kernel}, chunk_size_bytes=64 * 1024)
    assert client.read_weights(model_id, "wide/kernel", chunk_size_bytes=64 * 1024)[
        "wide/kernel"
    ].tobytes() == (kernel.tobytes())


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("conv*/kernel", ["conv1/kernel", "conv2/kernel"]),
        (
            ["head/bias", "bn1/*"],
            ["bn1/gamma", "bn1/beta", "bn1/moving_mean", "bn1/moving_variance", "head/bias"],
        ),
        (weightsmith.Selector(paths=("head/kernel",)), ["head/kernel"]),
        (weightsmith.Selector(layer_range=(-2, None)), ["head/kernel", "head/bias"]),
        (
            weightsmith.Selector(kinds=("bias",), trainable_only=True),
            ["conv1/bias", "conv2/bias", "head/bias"],
        ),
        (weightsmith.Selector(layers=("bn1",), kinds=("gamma",)), ["bn1/gamma"]),
    ],
)
def test_read_selection(client, model_id: str, selector, expected: list[str]) -> None:
    client.create_model(model_id, keras_config=tiny_cnn_config())
    assert list(client.read_weights(model_id, selector)) == expected


def test_read_selection_matching_nothing(client, model_id: str) -> None:
    client.create_model(model_id, keras_config=tiny_config())
    with pytest.raises(weightsmith.InvalidArgumentError) as caught:
        client.read_weights(model_id, "nothing/*")
    assert caught.value.reason == "EMPTY_SELECTION"
    assert caught.value.field_violations[0][0] == "selector"


def test_read_unknown_revision(client, model_id: str) -> None:
    client.create_model(model_id, keras_config=tiny_config())
    with pytest.raises(weightsmith.NotFoundError) as caught:
        client.read_weights(model_id, revision=5)
    assert caught.value.field_violations[0][0] == "revision"


def test_revisions_list_newest_first_with_pages(client, model_id: str) -> None:
    client.create_model(model_id, keras_config=tiny_config(), message="created")
    for i in range(4):
        client.write_weights(model_id, {"logits/bias": np.full(2, i, np.float32)}, message=f"write {i}")
    page = client.list_revisions(model_id, page_size=2)
    assert [r.revision for r in page.revisions] == [5, 4]
    rest = client.list_revisions(model_id, page_size=10, page_token=page.next_page_token)
    assert [r.revision for r in rest.revisions] == [3, 2, 1]
    assert rest.next_page_token == ""
    assert [r.revision for r in client.iter_revisions(model_id)] == [5, 4, 3, 2, 1]
    first = client.get_revision(model_id, 1)
    assert first.message == "created"
    assert first.kind == revision_pb2.REVISION_KIND_CREATE
    assert first.architecture_changed
    assert first.create_time.seconds > 0
    assert client.get_revision(model_id, 3).message == "write 1"
    with pytest.raises(weightsmith.NotFoundError):
        client.get_revision(model_id, 6)
    with pytest.raises(weightsmith.InvalidArgumentError):
        client.get_revision(model_id, 0)


def test_expected_revision_mismatch_is_aborted(client, model_id: str) -> None:
    client.create_model(model_id, keras_config=tiny_config())
    client.write_weights(model_id, {"logits/bias": np.ones(2, np.float32)}, expected_revision=1)
    before = _snapshot(client, model_id)
    with pytest.raises(weightsmith.AbortedError) as caught:
        client.write_weights(model_id, {"logits/bias": np.zeros(2, np.float32)}, expected_revision=1)
    assert caught.value.reason == "REVISION_MISMATCH"
    assert caught.value.metadata["current_revision"] == "2"
    assert _snapshot(client, model_id) == before


def test_racing_writers_with_expected_revision_exactly_one_wins(
    client, server: ServerHandle, model_id: str
) -> None:
    client.create_model(model_id, keras_config=tiny_config())
    outcomes: list[str] = []

    def write(value: float) -> None:
        with weightsmith.Client(server.address) as own:
            try:
                own.write_weights(
                    model_id, {"logits/bias": np.full(2, value, np.float32)}, expected_revision=1
                )
                outcomes.append("won")
            except weightsmith.AbortedError:
                outcomes.append("aborted")

    threads = [threading.Thread(target=write, args=(float(i),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["aborted"] * 3 + ["won"]
    assert client.get_model(model_id).revision == 2


def _bad_write_cases(model_id: str) -> list[tuple[str, list[bytes], str, str]]:
    kernel = np.zeros((4, 3), np.float32)
    raw = kernel.tobytes()
    nan = kernel.copy()
    nan[1, 1] = np.nan
    inf = kernel.copy()
    inf[0, 0] = -np.inf
    head = _header(model_id)
    return [
        (
            "unknown variable",
            [head, _chunk("nope/kernel", kernel, 0, raw)],
            "chunks[0].name",
            "UNKNOWN_VARIABLE",
        ),
        (
            "wrong shape",
            [head, _chunk("hidden/kernel", np.zeros((3, 4), np.float32), 0, raw)],
            "chunks[0].shape",
            "WRONG_SHAPE",
        ),
        (
            "wrong dtype",
            [head, _chunk("hidden/kernel", np.zeros((4, 3), np.float64), 0, raw * 2)],
            "chunks[0].dtype",
            "WRONG_DTYPE",
        ),
        (
            "nan",
            [head, _chunk("hidden/kernel", nan, 0, nan.tobytes())],
            "chunks[0].data",
            "NON_FINITE_VALUES",
        ),
        (
            "inf",
            [head, _chunk("hidden/kernel", inf, 0, inf.tobytes())],
            "chunks[0].data",
            "NON_FINITE_VALUES",
        ),
        (
            "overlap",
            [head, _chunk("hidden/kernel", kernel, 0, raw[:24]), _chunk("", kernel, 16, raw[16:])],
            "chunks[1].offset",
            "CHUNK_OFFSET_MISMATCH",
        ),
        (
            "gap",
            [head, _chunk("hidden/kernel", kernel, 0, raw[:16]), _chunk("", kernel, 24, raw[24:])],
            "chunks[1].offset",
            "CHUNK_OFFSET_MISMATCH",
        ),
        (
            "short tensor",
            [head, _chunk("hidden/kernel", kernel, 0, raw[:40])],
            "chunks[0]",
            "INCOMPLETE_TENSOR",
        ),
        (
            "past the end",
            [head, _chunk("hidden/kernel", kernel, 0, raw + raw[:8])],
            "chunks[0].data",
            "CHUNK_PAST_END",
        ),
        (
            "short then next",
            [
                head,
                _chunk("hidden/kernel", kernel, 0, raw[:8]),
                _chunk("logits/bias", np.zeros(2, np.float32), 0, bytes(8)),
            ],
            "chunks[0]",
            "INCOMPLETE_TENSOR",
        ),
        (
            "sent twice",
            [head, _chunk("hidden/kernel", kernel, 0, raw), _chunk("hidden/kernel", kernel, 0, raw)],
            "chunks[1].name",
            "DUPLICATE_VARIABLE",
        ),
        ("orphan chunk", [head, _chunk("", kernel, 0, raw)], "chunks[0].name", "ORPHAN_CHUNK"),
        ("no header", [_chunk("hidden/kernel", kernel, 0, raw)], "header", "MISSING_HEADER"),
        ("empty", [head], "chunks", "EMPTY_WRITE"),
        (
            "half element",
            [head, _chunk("hidden/kernel", kernel, 0, raw[:6]), _chunk("", kernel, 6, raw[6:])],
            "chunks[0].data",
            "PARTIAL_ELEMENT",
        ),
        (
            "bad dtype",
            [head, wire.encode_chunk(2, "hidden/kernel", 99, (4, 3), 0, memoryview(raw))],
            "chunks[0].dtype",
            "INVALID_DTYPE",
        ),
        (
            "unknown model",
            [_header("no-such-model"), _chunk("hidden/kernel", kernel, 0, raw)],
            "header.model_id",
            "MODEL_NOT_FOUND",
        ),
        (
            "invalid model id",
            [_header("../x"), _chunk("hidden/kernel", kernel, 0, raw)],
            "header.model_id",
            "INVALID_ID",
        ),
    ]


@pytest.mark.parametrize("case", range(18))
def test_bad_writes_are_rejected_and_change_nothing(
    client, server: ServerHandle, model_id: str, case: int
) -> None:
    from grpc_status import rpc_status

    from weightsmith.errors import from_rpc_error

    client.create_model(model_id, keras_config=tiny_config(), seed=1)
    name, messages, field, reason = _bad_write_cases(model_id)[case]
    before = _snapshot(client, model_id)

    with pytest.raises(grpc.RpcError) as caught:
        _raw_write(server.address, messages)

    error = from_rpc_error(caught.value)
    expected_code = (
        grpc.StatusCode.NOT_FOUND if reason == "MODEL_NOT_FOUND" else grpc.StatusCode.INVALID_ARGUMENT
    )
    assert caught.value.code() == expected_code, name
    assert rpc_status.from_call(caught.value) is not None, name
    assert error.reason == reason, name
    assert error.field_violations[0][0] == field, name
    assert _snapshot(client, model_id) == before, name
    staging = list((server.store / "models" / model_id / "revisions").glob(".staging-*"))
    assert staging == [], name


def test_large_finite_values_are_not_mistaken_for_overflow(client, model_id: str) -> None:
    client.create_model(model_id, keras_config=tiny_config())
    bias = np.array([3e38, 3e38], np.float32)  # finite, but their sum overflows
    client.write_weights(model_id, {"logits/bias": bias})
    assert client.read_weights(model_id, "logits/bias")["logits/bias"].tobytes() == bias.tobytes()


def test_read_into_out_arrays_reuses_them(client, model_id: str) -> None:
    client.create_model(model_id, keras_config=tiny_config(), seed=1)
    first = client.read_weights(model_id)
    client.write_weights(model_id, {"hidden/bias": np.full(3, 4.0, np.float32)})
    second = client.read_weights(model_id, out=first)
    assert all(second[k] is first[k] for k in first)
    assert second["hidden/bias"].tolist() == [4.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="shape"):
        client.read_weights(model_id, out={"hidden/bias": np.zeros(4, np.float32)})


def test_fresh_reads_of_large_tensors_are_bit_exact_and_the_callers_own(client, model_id: str) -> None:
    """Tensors over `zerocopy.MIN_MAPPED_BYTES` land in pooled mappings: still plain, exact arrays."""
    import keras

    from weightsmith import zerocopy

    config = keras.Sequential([keras.Input((1024,)), keras.layers.Dense(1100, name="wide")]).to_json()
    client.create_model(model_id, keras_config=config)
    rng = np.random.default_rng(3)
    first = {"wide/kernel": rng.normal(size=(1024, 1100)).astype(np.float32)}
    assert first["wide/kernel"].nbytes > zerocopy.MIN_MAPPED_BYTES
    client.write_weights(model_id, first)
    second = {"wide/kernel": (first["wide/kernel"] * -2).astype(np.float32)}
    client.write_weights(model_id, second)

    current = client.read_weights(model_id, chunk_size_bytes=wire.MIN_CHUNK_BYTES)  # resident
    older = client.read_weights(model_id, revision=2)  # from the store
    assert current["wide/kernel"].tobytes() == second["wide/kernel"].tobytes()
    assert older["wide/kernel"].tobytes() == first["wide/kernel"].tobytes()
    assert current["wide/bias"].tobytes() == np.zeros(1100, np.float32).tobytes()
    kernel = current["wide/kernel"]
    assert kernel.flags.writeable and kernel.flags.c_contiguous and kernel.dtype == np.float32
    kernel[:] = 7.0  # the caller's copy: the model is untouched
    again = client.read_weights(model_id, "wide/kernel", out=older)
    assert again["wide/kernel"] is older["wide/kernel"]
    assert older["wide/kernel"].tobytes() == second["wide/kernel"].tobytes()


def test_non_finite_values_allowed_when_asked(client, model_id: str) -> None:
    client.create_model(model_id, keras_config=tiny_config())
    bias = np.array([np.nan, np.inf], np.float32)
    client.write_weights(model_id, {"logits/bias": bias}, allow_non_finite=True)
    assert client.read_weights(model_id, "logits/bias")["logits/bias"].tobytes() == bias.tobytes()


def test_client_abort_mid_stream_changes_nothing(client, server: ServerHandle, model_id: str) -> None:
    import keras

    config = keras.Sequential(
        [keras.Input((1024,)), keras.layers.Dense(1024, name="a"), keras.layers.Dense(1024, name="b")]
    ).to_json()
    client.create_model(model_id, keras_config=config, seed=3)
    before = _snapshot(client, model_id)
    kernel = np.ones((1024, 1024), np.float32)
    sent_some = threading.Event()
    release = threading.Event()

    def messages() -> Iterator[bytes]:
        yield _header(model_id)
        chunks = list(wire.iter_tensor_chunks("a/kernel", kernel, 1 << 20))
        for name, dtype, shape, offset, data in chunks[:2]:
            yield wire.encode_chunk(2, name, dtype, shape, offset, data)
        sent_some.set()
        release.wait(30)

    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_unary(
            WRITE_METHOD,
            request_serializer=lambda m: m,
            response_deserializer=weight_service_pb2.WriteWeightsResponse.FromString,
        ).future(messages())
        assert sent_some.wait(30)
        time.sleep(0.5)  # let the server stage what it received
        call.cancel()
        release.set()
        with pytest.raises(grpc.FutureCancelledError):
            call.result()

    deadline = time.monotonic() + 10
    revisions = server.store / "models" / model_id / "revisions"
    while list(revisions.glob(".staging-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(revisions.glob(".staging-*")) == []
    assert _snapshot(client, model_id) == before


def test_message_over_the_limit_is_resource_exhausted(small_message_server: ServerHandle) -> None:
    with weightsmith.Client(small_message_server.address) as small:
        small.create_model("big-input", keras_config=tiny_config(inputs=1024))
        with pytest.raises(weightsmith.ResourceExhaustedError) as too_big:
            small.predict("big-input", np.zeros((2048, 1024), np.float32))  # 8 MiB > 5 MiB
        assert too_big.value.reason == "MESSAGE_TOO_LARGE"
        assert too_big.value.field_violations[0][0] == "request"
        with pytest.raises(weightsmith.ResourceExhaustedError):  # over twice the limit: the transport
            small.predict("big-input", np.zeros((4096, 1024), np.float32))
        assert small.get_model("big-input").revision == 1
        big = np.zeros((1024, 1536), np.float32)  # one 6 MiB chunk on a stream
        message = wire.encode_chunk(2, "hidden/kernel", 1, big.shape, 0, memoryview(big.tobytes()))
        with pytest.raises(grpc.RpcError) as streamed:
            _raw_write(small_message_server.address, [_header("big-input"), message])
        from weightsmith.errors import from_rpc_error

        error = from_rpc_error(streamed.value)
        assert streamed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.field_violations[0][0] == "stream[1]"
        assert small.get_model("big-input").revision == 1
        with pytest.raises(weightsmith.ResourceExhaustedError) as caught:
            small.upload_model(b"x" * (2 * 1024 * 1024), "too-big")
        assert caught.value.field_violations[0][0] == "header.size_bytes"
        assert caught.value.reason == "UPLOAD_TOO_LARGE"


def test_readers_never_see_half_a_write(client, server: ServerHandle, model_id: str) -> None:
    """Every write sets both kernels to the same constant; Predict must agree."""
    import keras

    config = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(1, use_bias=False, name="a"),
            keras.layers.Dense(1, use_bias=False, name="b"),
        ]
    ).to_json()
    client.create_model(model_id, keras_config=config)
    client.write_weights(
        model_id, {"a/kernel": np.ones((1, 1), np.float32), "b/kernel": np.ones((1, 1), np.float32)}
    )
    stop = threading.Event()
    bad: list[float] = []

    def reader() -> None:
        with weightsmith.Client(server.address) as own:
            while not stop.is_set():
                (out,) = own.predict(model_id, np.ones((1, 1), np.float32)).outputs.values()
                value = float(out[0, 0])
                root = np.sqrt(value)
                if abs(root - round(root)) > 1e-4:  # c*c for integer c, never c*c'
                    bad.append(value)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for c in range(2, 22):
        value = np.full((1, 1), float(c), np.float32)
        client.write_weights(model_id, {"a/kernel": value, "b/kernel": value})
    stop.set()
    for thread in threads:
        thread.join()
    assert bad == []
