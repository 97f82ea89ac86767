"""Destination arrays for ReadWeights: pooled mappings inside, plain numpy arrays outside."""

from __future__ import annotations

import gc
import mmap

import numpy as np
import pytest

from weightsmith import _streams, wire, zerocopy
from weightsmith.v1 import weight_service_pb2


def _stream(weights: dict[str, np.ndarray], chunk_bytes: int, revision: int = 3) -> list[bytes]:
    trailer = wire.varint_field(2, revision)
    return [
        wire.encode_chunk(1, *fields, trailer)
        for name, array in weights.items()
        for fields in wire.iter_tensor_chunks(name, array, chunk_bytes)
    ]


def _read(messages: list[bytes], out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    reader = _streams.WeightsReader(out)
    for data in messages:
        reader.add(_streams.parse_read_weights_response(data))
    return reader.finish()


@pytest.fixture
def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    big = rng.standard_normal((7, 150_001)).astype(np.float32)
    assert big.nbytes > zerocopy.MIN_MAPPED_BYTES
    return {
        "big/kernel": big,  # mapped: over MIN_MAPPED_BYTES, not a whole number of pages
        "big/bias": rng.standard_normal(7).astype(np.float32),  # np.empty
        "half": rng.standard_normal((1100, 2000)).astype(np.float16),  # mapped, 2-byte items
        "empty": np.zeros((0, 4), np.float32),
    }


@pytest.mark.parametrize("pooling", [True, False])
def test_fresh_arrays_are_bit_exact_writable_numpy(
    weights: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch, pooling: bool
) -> None:
    monkeypatch.setattr(zerocopy, "pooling", pooling and zerocopy.SUPPORTED)
    result = _read(_stream(weights, wire.MIN_CHUNK_BYTES))
    assert list(result) == list(weights)
    for name, array in weights.items():
        got = result[name]
        assert got.shape == array.shape and got.dtype == array.dtype, name
        assert got.tobytes() == array.tobytes(), name
        assert got.flags.c_contiguous and got.flags.writeable, name
    result["big/kernel"][0, 0] = 42.0  # the caller owns the arrays
    assert result["big/kernel"][0, 0] == 42.0


@pytest.mark.skipif(not zerocopy.SUPPORTED, reason="pooled mappings are Linux only")
def test_large_tensors_get_their_own_mapping_small_ones_numpy(weights: dict[str, np.ndarray]) -> None:
    result = _read(_stream(weights, wire.MAX_CHUNK_BYTES))

    def owner(array: np.ndarray) -> object:
        while isinstance(array.base, np.ndarray):
            array = array.base
        return array.base.obj if isinstance(array.base, memoryview) else array.base

    assert isinstance(owner(result["big/kernel"]), mmap.mmap)
    assert isinstance(owner(result["half"]), mmap.mmap)
    assert not isinstance(owner(result["big/bias"]), mmap.mmap)


def test_out_arrays_are_filled_in_place_and_others_allocated(weights: dict[str, np.ndarray]) -> None:
    out = {"big/kernel": np.zeros_like(weights["big/kernel"])}
    result = _read(_stream(weights, wire.MIN_CHUNK_BYTES), out)
    assert result["big/kernel"] is out["big/kernel"]
    assert out["big/kernel"].tobytes() == weights["big/kernel"].tobytes()
    assert result["half"].tobytes() == weights["half"].tobytes()


def test_out_mismatch_and_bad_streams_raise(weights: dict[str, np.ndarray]) -> None:
    messages = _stream(weights, wire.MAX_CHUNK_BYTES)
    with pytest.raises(ValueError, match="shape"):
        _read(messages, {"half": np.zeros((2000, 1100), np.float16)})
    with pytest.raises(wire.OutMismatchError):
        _read(messages, {"big/kernel": np.zeros(weights["big/kernel"].shape, np.float64)})
    unknown = wire.encode_chunk(1, "x", 999, (2,), 0, memoryview(b"12345678"))
    with pytest.raises(Exception, match="dtype"):
        _read([unknown])
    negative = wire.encode_chunk(1, "x", wire.wire_dtype(np.float32), (-2,), 0, memoryview(b""))
    with pytest.raises(Exception, match="negative"):
        _read([negative])
    with pytest.raises(Exception, match="ended after"):
        _read(messages[:1])  # the big tensor is cut short: nothing returned


def test_a_stream_cut_short_leaves_nothing_behind(weights: dict[str, np.ndarray]) -> None:
    """A partial read's arrays are plain garbage: nothing keeps the mapping alive."""
    import weakref

    reader = _streams.WeightsReader()
    for data in _stream(weights, wire.MAX_CHUNK_BYTES)[:1]:
        reader.add(_streams.parse_read_weights_response(data))
    array = reader._assembler.tensors["big/kernel"]
    probe = weakref.ref(array)
    del array, reader
    _streams.COPIER.submit(lambda: None).result()  # the queued copies hold the array until done
    gc.collect()
    assert probe() is None


def test_sizes_that_cannot_be_mapped_fall_back_to_numpy() -> None:
    assert zerocopy.empty((3, 2), np.dtype(np.float32)).shape == (3, 2)
    assert zerocopy.empty((0,), np.dtype(np.float64)).size == 0
    with pytest.raises((ValueError, MemoryError)):
        zerocopy.empty((1 << 62, 1 << 62), np.dtype(np.float32))


def test_transparent_huge_pages_mode_is_readable() -> None:
    assert zerocopy.transparent_huge_pages() in {"", "always", "madvise", "never"}


def test_read_response_header_fields_still_parse() -> None:
    parsed = _streams.parse_read_weights_response(
        weight_service_pb2.ReadWeightsResponse(revision=4).SerializeToString()
    )
    assert parsed.chunk is None and parsed.revision == 4


def _mapping(array: np.ndarray) -> object:
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array.base.obj if isinstance(array.base, memoryview) else array.base


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> zerocopy._Pool:
    if not zerocopy.SUPPORTED:
        pytest.skip("pooled mappings are Linux only")
    fresh = zerocopy._Pool()
    monkeypatch.setattr(zerocopy, "POOL", fresh)
    monkeypatch.setattr(zerocopy, "pooling", True)
    yield fresh
    fresh.clear()


def test_freed_mappings_are_reused_with_the_new_values(
    weights: dict[str, np.ndarray], pool: zerocopy._Pool
) -> None:
    first = _read(_stream(weights, wire.MAX_CHUNK_BYTES))
    used = {name: id(_mapping(first[name])) for name in ("big/kernel", "half")}
    del first
    gc.collect()
    assert pool.kept_bytes == weights["big/kernel"].nbytes + weights["half"].nbytes
    changed = {k: (v * 2 + 1).astype(v.dtype) for k, v in weights.items()}
    second = _read(_stream(changed, wire.MIN_CHUNK_BYTES))
    assert {name: id(_mapping(second[name])) for name in used} == used
    assert pool.kept_bytes == 0
    for name, array in changed.items():
        assert second[name].tobytes() == array.tobytes(), name


def test_memory_in_use_is_never_reused(weights: dict[str, np.ndarray], pool: zerocopy._Pool) -> None:
    first = _read(_stream(weights, wire.MAX_CHUNK_BYTES))
    row = first["big/kernel"][3]  # a view keeps the whole tensor's mapping
    exported = memoryview(first["half"])
    del first
    gc.collect()
    assert pool.kept_bytes == 0
    changed = {k: (v * 3).astype(v.dtype) for k, v in weights.items()}
    _read(_stream(changed, wire.MAX_CHUNK_BYTES))
    assert row.tobytes() == weights["big/kernel"][3].tobytes()
    assert bytes(exported) == weights["half"].tobytes()


def test_a_miss_unmaps_kept_memory_first_and_clear_empties(
    weights: dict[str, np.ndarray], pool: zerocopy._Pool
) -> None:
    _read(_stream(weights, wire.MAX_CHUNK_BYTES))
    gc.collect()
    kept = pool.kept_bytes
    assert kept > 0
    other = zerocopy.empty((kept // 4 + 1024,), np.dtype(np.float32))  # no size matches
    assert pool.kept_bytes == 0
    del other
    gc.collect()
    assert pool.kept_bytes > 0
    pool.clear()
    assert pool.kept_bytes == 0


def test_a_cut_stream_gives_its_mapping_back_and_the_next_read_is_exact(
    weights: dict[str, np.ndarray], pool: zerocopy._Pool
) -> None:
    messages = _stream(weights, wire.MIN_CHUNK_BYTES)
    reader = _streams.WeightsReader()
    for data in messages[:3]:  # part of the big kernel
        reader.add(_streams.parse_read_weights_response(data))
    del reader
    _streams.COPIER.submit(lambda: None).result()  # the queued copies hold the array until done
    gc.collect()
    assert pool.kept_bytes == weights["big/kernel"].nbytes
    result = _read(messages)
    assert all(result[k].tobytes() == v.tobytes() for k, v in weights.items())


def test_a_slow_copier_holds_up_the_receiving_thread_not_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    monkeypatch.setattr(_streams, "COPY_BACKLOG", 2)
    copier = _streams._BoundedCopier()
    gate = threading.Event()
    queued = [copier.submit(gate.wait) for _ in range(2)]
    third_submitted = threading.Event()
    thread = threading.Thread(target=lambda: (copier.submit(lambda: None), third_submitted.set()))
    thread.start()
    assert not third_submitted.wait(0.3)  # both slots taken: the third chunk waits
    gate.set()
    thread.join(10)
    assert third_submitted.is_set() and all(f.result() for f in queued)
