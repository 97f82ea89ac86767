"""The generated blocking client: `scripts/unasync.py` and the `client.py` it writes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "unasync.py"


@pytest.fixture(scope="module")
def unasync() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unasync", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_client_is_up_to_date() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_fails_with_a_diff_when_stale(
    unasync: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "client.py"
    stale.write_text(unasync.TARGET.read_text().replace("def get_model(", "def get_a_model(", 1))
    monkeypatch.setattr(unasync, "TARGET", stale)
    monkeypatch.setattr(unasync, "PACKAGE", tmp_path)
    assert unasync.main(["--check"]) == 1
    captured = capsys.readouterr()
    assert "-    def get_a_model(" in captured.out and "+    def get_model(" in captured.out
    assert "is stale" in captured.err


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("    async def get_job(self) -> job_pb2.Job:", "    def get_job(self) -> job_pb2.Job:"),
        ("        return await self._send(rpc, request)", "        return self._send(rpc, request)"),
        ("    return (await self._send(rpc, request)).job", "    return self._send(rpc, request).job"),
        ("        async with call as responses:", "        with call as responses:"),
        ("            async for item in items:", "            for item in items:"),
        ("    async def __aenter__(self) -> AsyncClient:", "    def __enter__(self) -> Client:"),
        ("    async def __aexit__(", "    def __exit__("),
        ("        self._transport = AsyncTransport(s)", "        self._transport = SyncTransport(s)"),
        ("    ) -> AsyncIterator[job_pb2.Job]:", "    ) -> Iterator[job_pb2.Job]:"),
        ("            An async iterator of `Job`s.", "            An iterator of `Job`s."),
        (
            "from collections.abc import AsyncIterator, Callable, Mapping",
            "from collections.abc import Callable, Iterator, Mapping",
        ),
        ("        awaited = 1  # not a keyword", "        awaited = 1  # not a keyword"),
    ],
)
def test_unasync_line(unasync: ModuleType, line: str, expected: str) -> None:
    assert unasync.unasync_line(line) == expected


def test_loops_that_only_reyield_become_yield_from(unasync: ModuleType) -> None:
    source = (
        "async def f(self) -> AsyncIterator[int]:\n"
        "    async for item in self._items():\n"
        "        yield item\n"
        "    async for item in self._items():\n"
        "        yield item\n"
        "        print(item)\n"
    )
    generated = unasync.generate(source)
    assert "    yield from self._items()\n" in generated
    assert "    for item in self._items():\n        yield item\n        print(item)\n" in generated
