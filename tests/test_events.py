"""Job event logs, without gRPC: sequence numbers, torn tails, watchers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from weightsmith_server.jobs.events import EventLog, EventWriter


def test_sequences_are_gap_free_and_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    for index in range(3):
        log.write("log", {"level": "INFO", "message": str(index)})
    log.close()
    reopened = EventLog(path)
    assert [e["sequence"] for e in reopened.events_after(0)] == [1, 2, 3]
    assert reopened.write("log", {"level": "INFO", "message": "more"})["sequence"] == 4


def test_a_torn_tail_is_cut_so_no_sequence_is_reused(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    for index in range(3):
        log.write("log", {"level": "INFO", "message": str(index)})
    log.close()
    with open(path, "ab") as handle:
        handle.write(b'{"sequence": 4, "time": "2026-')  # a crash mid-write
    reopened = EventLog(path)
    assert reopened.last_sequence == 3
    reopened.write("log", {"level": "INFO", "message": "after the crash"})
    reopened.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["sequence"] for e in lines] == [1, 2, 3, 4]
    assert lines[-1]["payload"]["message"] == "after the crash"


def test_watchers_see_every_event_including_the_last(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    writer = EventWriter()

    async def watch(after: int, delay: float) -> list[int]:
        seen = []
        async for event in log.follow(after):
            seen.append(event["sequence"])
            await asyncio.sleep(delay)
        return seen

    async def scenario() -> list[list[int]]:
        watchers = [asyncio.create_task(watch(0, d)) for d in (0.0, 0.01)]
        late = asyncio.create_task(watch(5, 0.0))
        await asyncio.sleep(0.05)
        for index in range(20):
            writer.append(log, "log", {"level": "INFO", "message": str(index)})
        await asyncio.get_running_loop().run_in_executor(None, writer.flush)
        log.close()
        return await asyncio.gather(*watchers, late)

    fast, slow, late = asyncio.run(scenario())
    writer.stop()
    assert fast == slow == list(range(1, 21))
    assert late == list(range(6, 21))
