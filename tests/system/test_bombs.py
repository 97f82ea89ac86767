"""The memory bombs of issue 8, sent to a server process: refused, and its peak memory barely moves.

Each bomb is built here: a zip whose one image inflates to 1 GiB, `.keras`
files whose config.json is 600 MiB (honestly declared, or hidden behind a
lying header) or nested a million deep, and two 4x4 PNGs asking for
4096x4096. The server's peak resident memory (VmHWM, reset before each
bomb through /proc/<pid>/clear_refs) may grow by less than 256 MB.
"""

from __future__ import annotations

import io
import signal
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import weightsmith
from tests.conftest import SpawnedServer, spawn_server

pytestmark = pytest.mark.slow

MIB = 1 << 20
PEAK_GROWTH_BYTES = 256 * MIB


def _deflated(pieces: list[tuple[bytes, int]]) -> tuple[bytes, int, int]:
    """Raw deflate of each `(block, times)` in turn, built in seconds: (data, crc32, size).

    Each block is compressed once from a fresh compressor and fully flushed,
    so its output refers to nothing before it and can be repeated as is.
    """
    out: list[bytes] = []
    crc = size = 0
    for block, times in pieces:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        segment = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
        out.append(segment * times)
        for _ in range(times):
            crc = zlib.crc32(block, crc)
        size += len(block) * times
    out.append(zlib.compressobj(9, zlib.DEFLATED, -15).flush())  # the final, empty block
    return b"".join(out), crc, size


def _zip(
    path: Path, members: list[tuple[str, bytes, int, int]], declared: dict[str, int] | None = None
) -> None:
    """A zip of deflated `(name, data, crc, size)` members; `declared` may lie about sizes."""
    local: list[bytes] = []
    central: list[bytes] = []
    offset = 0
    for name, data, crc, size in members:
        encoded = name.encode()
        claimed = (declared or {}).get(name, size)
        # Version 2.0, no flags, deflate, a fixed DOS time and date; then crc, sizes, name length.
        common = struct.pack("<HHHH", 0, 8, 0, 0x21) + struct.pack("<III", crc, len(data), claimed)
        header = struct.pack("<IH", 0x04034B50, 20) + common + struct.pack("<HH", len(encoded), 0)
        central.append(
            struct.pack("<IHH", 0x02014B50, 20, 20)
            + common
            + struct.pack("<HHHHHII", len(encoded), 0, 0, 0, 0, 0, offset)
            + encoded
        )
        local.append(header + encoded + data)
        offset += len(header) + len(encoded) + len(data)
    directory = b"".join(central)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(directory), offset, 0)
    path.write_bytes(b"".join(local) + directory + end)


def _member(name: str, data: bytes) -> tuple[str, bytes, int, int]:
    deflated, crc, size = _deflated([(data, 1)])
    return name, deflated, crc, size


def _png(height: int, width: int) -> bytes:
    """An RGB PNG of one gray, made by hand (no TensorFlow in the test process)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = (b"\0" + bytes([7]) * 3 * width) * height  # filter 0, then the pixels of each row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bombs")
    made: dict[str, Path] = {}
    # Signature and IHDR of a 4x4 PNG, then 1 GiB of zeros.
    bomb = ("cat/bomb.png", *_deflated([(_png(4, 4)[:33], 1), (bytes(16 * MIB), 64)]))
    image_zip = [_member("cat/small.png", _png(4, 4)), bomb]
    _zip(made.setdefault("image-zip", folder / "image-zip.zip"), image_zip)
    _zip(made.setdefault("image-zip-lying", folder / "lying.zip"), image_zip, {"cat/bomb.png": 4096})
    # A config.json of 600 MiB of whitespace inside a valid object.
    config = (
        "config.json",
        *_deflated([(b'{"class_name": "Sequential", "config": {}', 1), (b" " * (16 * MIB), 38), (b"}", 1)]),
    )
    keras_zip = [_member("metadata.json", b'{"keras_version": "3.0.0"}'), config]
    _zip(made.setdefault("keras-config", folder / "keras-config.keras"), keras_zip)
    _zip(made.setdefault("keras-config-lying", folder / "lying.keras"), keras_zip, {"config.json": 1000})
    path = made["keras-deep"] = folder / "keras-deep.keras"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", "[" * 1_000_000 + "]" * 1_000_000)
    path = made["image-size"] = folder / "image-size.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("cat/a.png", _png(4, 4))
        archive.writestr("dog/b.png", _png(4, 4))
    for name, path in made.items():
        assert path.stat().st_size < 4 * MIB, name  # small files: the danger is what they expand to
    return made


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpawnedServer]:
    """A server process with the default limits."""
    server = spawn_server(tmp_path_factory.mktemp("bomb-server") / "store")
    try:
        yield server
    finally:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(30)


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def _peak_growth(pid: int, call: Callable[[], None]) -> int:
    """How far the process's peak resident memory rose above its resident memory during `call`."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _memory(pid)["VmRSS"]
    call()
    return _memory(pid)["VmHWM"] - before


CASES = [
    ("image-zip", "dataset", weightsmith.ResourceExhaustedError, "MEMBER_TOO_LARGE"),
    ("image-zip-lying", "dataset", weightsmith.InvalidArgumentError, "CORRUPT_DATASET"),
    ("keras-config", "model", weightsmith.ResourceExhaustedError, "CONFIG_TOO_LARGE"),
    ("keras-config-lying", "model", weightsmith.InvalidArgumentError, "CORRUPT_MODEL_FILE"),
    ("keras-deep", "model", weightsmith.InvalidArgumentError, "CONFIG_TOO_DEEP"),
    ("image-size", "dataset-4096", weightsmith.ResourceExhaustedError, "IMAGE_SIZE_TOO_LARGE"),
]


@pytest.mark.parametrize(("bomb", "kind", "error", "reason"), CASES, ids=[c[0] for c in CASES])
def test_bombs_are_refused_without_the_memory_they_ask_for(
    bombs: dict[str, Path],
    spawned: SpawnedServer,
    bomb: str,
    kind: str,
    error: type[weightsmith.WeightsmithError],
    reason: str,
) -> None:
    with weightsmith.Client(spawned.address) as client:

        def send() -> None:
            with pytest.raises(error) as caught:
                if kind == "model":
                    client.upload_model(bombs[bomb], bomb)
                else:
                    size = [4096, 4096] if kind == "dataset-4096" else [4, 4]
                    client.upload_dataset(bombs[bomb], bomb, format="image_folder", image_size=size)
            assert caught.value.reason == reason, caught.value

        growth = _peak_growth(spawned.process.pid, send)
        assert growth < PEAK_GROWTH_BYTES, f"{bomb}: peak grew by {growth / MIB:.0f} MiB"
        # Nothing was created, and the id is free for an honest file.
        with pytest.raises(weightsmith.NotFoundError):
            if kind == "model":
                client.get_model(bomb)
            else:
                client.get_dataset(bomb)
        assert spawned.process.poll() is None


def test_the_server_still_takes_an_honest_image_folder(spawned: SpawnedServer) -> None:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("cat/a.png", _png(8, 8))
        zipped.writestr("dog/b.png", _png(8, 8))
    with weightsmith.Client(spawned.address) as client:
        info = client.upload_dataset(archive.getvalue(), "honest", format="image_folder", image_size=[4, 4])
    assert (info.example_count, list(info.class_names)) == (2, ["cat", "dog"])
