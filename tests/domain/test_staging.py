"""Stream budgets, abandoned reservations and start-up crash hygiene, without gRPC."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from weightsmith_server.errors import AlreadyExists, ResourceExhausted
from weightsmith_server.resources import ResourceTable
from weightsmith_server.staging import StreamSlots, staging_memory, stream_slots
from weightsmith_server.store import Store


def test_a_budget_refuses_what_does_not_fit_and_takes_nothing() -> None:
    budget = staging_memory(100)
    lease = budget.acquire(60, field="chunks[0].name")
    with pytest.raises(ResourceExhausted) as caught:
        budget.acquire(41, field="chunks[3].name")
    assert caught.value.reason == "STAGING_MEMORY_EXHAUSTED"
    assert caught.value.metadata == {"requested": "41", "held": "60", "limit": "100"}
    assert caught.value.violations[0][0] == "chunks[3].name"
    assert budget.held == 60
    lease.grow(40)
    assert (budget.held, lease.amount) == (100, 100)
    with pytest.raises(ResourceExhausted):
        lease.grow(1)
    assert lease.amount == 100
    lease.release()
    lease.release()  # once only
    assert budget.held == 0


def test_stream_slots_are_returned_by_the_with_block_even_on_failure() -> None:
    slots = stream_slots(2)
    with slots.acquire(1), slots.acquire(1):
        with pytest.raises(ResourceExhausted) as caught:
            slots.acquire(1)
        assert caught.value.reason == "TOO_MANY_STREAMS"
    with pytest.raises(RuntimeError), slots.acquire(1):
        raise RuntimeError("the stream failed")
    assert slots.held == 0


def test_one_principal_holds_at_most_half_the_stream_slots() -> None:
    """A principal cannot starve the others; without authentication only the total applies."""
    slots = StreamSlots(4)
    with slots.hold("alice"), slots.hold("alice"):
        with pytest.raises(ResourceExhausted) as caught, slots.hold("alice"):
            pass
        assert caught.value.reason == "TOO_MANY_STREAMS"
        assert caught.value.metadata["principal"] == "alice"
        assert caught.value.metadata["limit"] == "2"
        assert slots.total.held == 2  # the refused one took nothing
        with slots.hold("bob"), slots.hold("bob"), pytest.raises(ResourceExhausted), slots.hold(None):
            pass  # the total (4) is full
    assert slots.total.held == 0
    with slots.hold("alice"), slots.hold("alice"):
        pass  # alice's slots came back
    with slots.hold(None), slots.hold(None), slots.hold(None), slots.hold(None):
        assert slots.total.held == 4


def test_a_budget_holds_under_concurrent_acquire_and_release() -> None:
    budget = staging_memory(10)
    peak: list[int] = []
    refused = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal refused
        for _ in range(2000):
            try:
                with budget.acquire(3):
                    peak.append(budget.held)
            except ResourceExhausted:
                with lock:
                    refused += 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert budget.held == 0
    assert max(peak) <= 10
    assert len(peak) + refused == 16000


def test_a_claim_cancelled_while_reserving_releases_the_id() -> None:
    entered, proceed = threading.Event(), threading.Event()

    def on_disk(resource_id: str) -> bool:
        entered.set()
        proceed.wait(10)
        return False

    table: ResourceTable[object] = ResourceTable("model", "ListModels", on_disk)

    async def abandon(executor: ThreadPoolExecutor) -> None:
        task = asyncio.ensure_future(table.claim(executor, "abandoned", "header.model_id"))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with ThreadPoolExecutor(1) as executor:
        asyncio.run(abandon(executor))
        proceed.set()  # the worker now finishes the reservation the caller gave up on
    # Released once the worker was done: the id can be reserved again.
    assert table.reserve("abandoned", "model_id") == "abandoned"
    with pytest.raises(AlreadyExists):
        table.reserve("abandoned", "model_id")


def test_start_up_empties_tmp_of_everything_and_removes_scratch_entries(tmp_path: Path) -> None:
    Store(tmp_path)
    tmp = tmp_path / "tmp"
    (tmp / "upload-m-1.keras").write_bytes(b"partial upload")
    (tmp / "export-m-1-abc.tar").write_bytes(b"partial export")
    (tmp / "dataset-upload-abc").write_bytes(b"partial dataset")
    (tmp / "nested" / "deeper").mkdir(parents=True)
    (tmp / "nested" / "deeper" / "file").write_bytes(b"x")
    outside = tmp_path / "outside.txt"
    outside.write_text("not the store's")
    os.symlink(outside, tmp / "link")
    os.symlink(tmp_path / "missing", tmp / "dangling")
    staged = tmp_path / "models" / "m" / "revisions" / ".staging-abc" / "tensors"
    staged.mkdir(parents=True)
    (tmp_path / "models" / "m" / "model.json").write_text("{}")
    committed = tmp_path / "models" / "m" / "revisions" / "000001" / "tensors"
    committed.mkdir(parents=True)
    (committed / "0000.npy").write_bytes(b"kept")
    checkpoint = tmp_path / "jobs" / "job1" / "checkpoint"
    (checkpoint / ".staging-00002").mkdir(parents=True)
    (checkpoint / ".checkpoint.json").write_text("{}")
    (checkpoint / "checkpoint.json").write_text("{}")
    (tmp_path / "jobs" / "job1" / ".job.json").write_text("{}")
    (tmp_path / "jobs" / "job1" / "job.json").write_text("{}")
    (tmp_path / "jobs" / ".staging-job2").mkdir()
    (tmp_path / "imports" / ".staging-mine").mkdir(parents=True)  # the user's folder: left alone

    Store(tmp_path)

    assert list(tmp.iterdir()) == []
    assert outside.read_text() == "not the store's"  # a link is removed, never followed
    assert not (tmp_path / "models" / "m" / "revisions" / ".staging-abc").exists()
    assert (committed / "0000.npy").read_bytes() == b"kept"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["checkpoint.json"]
    assert sorted(p.name for p in (tmp_path / "jobs" / "job1").iterdir()) == ["checkpoint", "job.json"]
    assert not (tmp_path / "jobs" / ".staging-job2").exists()
    assert (tmp_path / "imports" / ".staging-mine").is_dir()


def test_requests_to_return_freed_memory_coalesce(monkeypatch: pytest.MonkeyPatch) -> None:
    from weightsmith_server import staging

    trims: list[float] = []
    monkeypatch.setattr(staging, "_TRIM", lambda: trims.append(time.monotonic()))
    monkeypatch.setattr(staging, "TRIM_INTERVAL", 0.2)
    for _ in range(50):  # a burst of streams ending together
        staging.trim_soon()
    deadline = time.monotonic() + 10
    while not trims and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.4)
    assert len(trims) == 1
    staging.trim_soon()  # a later burst gets its own
    time.sleep(0.6)
    assert len(trims) == 2
