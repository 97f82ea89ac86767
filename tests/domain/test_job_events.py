"""Job event logs, without gRPC: typed events, sequence numbers, torn tails, old logs, watchers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from weightsmith_server.jobs.event_log import EventLog, EventWriter
from weightsmith_server.jobs.events import (
    CheckpointSaved,
    EpochEnded,
    EventPayload,
    JobEvent,
    JobResult,
    LogLevel,
    LogLine,
    StateChanged,
    StepProgress,
)
from weightsmith_server.jobs.record import JobState


def _line(index: int) -> LogLine:
    return LogLine(LogLevel.INFO, str(index))


def test_sequences_are_gap_free_and_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    for index in range(3):
        log.write(_line(index))
    log.close()
    reopened = EventLog(path)
    assert [e.sequence for e in reopened.events_after(0)] == [1, 2, 3]
    assert reopened.events_after(0)[2].payload == _line(2)
    assert reopened.write(_line(3)).sequence == 4


def test_a_torn_tail_is_cut_so_no_sequence_is_reused(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    for index in range(3):
        log.write(_line(index))
    log.close()
    with open(path, "ab") as handle:
        handle.write(b'{"sequence": 4, "time": "2026-')  # a crash mid-write
    reopened = EventLog(path)
    assert reopened.last_sequence == 3
    reopened.write(LogLine(LogLevel.INFO, "after the crash"))
    reopened.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["sequence"] for e in lines] == [1, 2, 3, 4]
    assert lines[-1]["payload"]["message"] == "after the crash"


def test_a_complete_line_this_server_cannot_read_is_refused_not_cut(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log.write(_line(0))
    log.close()
    later_kind = b'{"sequence": 2, "time": "2026-11-29T00:00:00Z", "kind": "new_kind", "payload": {}}\n'
    with open(path, "ab") as handle:
        handle.write(later_kind)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="cannot read"):
        EventLog(path)
    assert path.read_bytes() == before  # the job becomes unrestorable; its log is left whole


PAYLOADS: list[EventPayload] = [
    StateChanged(JobState.RUNNING, "resumed from the checkpoint of epoch 2"),
    StepProgress(
        epoch=1,
        step=3,
        steps_per_epoch=10,
        global_step=3,
        loss=0.5,
        metrics={"accuracy": 0.75},
        learning_rate=0.01,
        samples_per_second=1000.0,
        eta_seconds=2.5,
    ),
    EpochEnded(epoch=1, train_metrics={"loss": 0.5}, validation_metrics={"loss": 0.6}),
    CheckpointSaved(epoch=1, global_step=10),
    LogLine(LogLevel.WARNING, "paused by server shutdown"),
    JobResult(model_id="m", revision=2, metrics={"loss": 0.4}, epochs_completed=1, steps_completed=10),
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: p.kind)
def test_every_payload_survives_the_log(tmp_path: Path, payload: EventPayload) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    written = log.write(payload)
    log.close()
    (read,) = EventLog(tmp_path / "events.jsonl").events_after(0)
    assert read == written and read.payload == payload


def test_logs_written_by_the_previous_server_read_as_typed_events(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    old = [
        {"sequence": 1, "time": "2026-01-01T00:00:00Z", "kind": "state_changed",
         "payload": {"state": "queued", "detail": ""}},
        {"sequence": 2, "time": "2026-01-01T00:00:01Z", "kind": "log",
         "payload": {"level": "INFO", "message": "result was committed before the restart"}},
        {"sequence": 3, "time": "2026-01-01T00:00:02Z", "kind": "checkpoint_saved",
         "payload": {"epoch": 2, "global_step": 20}},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in old))
    events = EventLog(path).events_after(0)
    assert events == [
        JobEvent(1, "2026-01-01T00:00:00Z", StateChanged(JobState.QUEUED)),
        JobEvent(
            2, "2026-01-01T00:00:01Z", LogLine(LogLevel.INFO, "result was committed before the restart")
        ),
        JobEvent(3, "2026-01-01T00:00:02Z", CheckpointSaved(epoch=2, global_step=20)),
    ]
    assert [e.to_json() for e in events] == old


def test_payload_enums_refuse_unknown_values() -> None:
    with pytest.raises(ValueError):
        StateChanged("paused")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LogLine("LOUD", "x")  # type: ignore[arg-type]


def test_watchers_see_every_event_including_the_last(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    writer = EventWriter()

    async def watch(after: int, delay: float) -> list[int]:
        seen = []
        async for event in log.follow(after):
            seen.append(event.sequence)
            await asyncio.sleep(delay)
        return seen

    async def scenario() -> list[list[int]]:
        watchers = [asyncio.create_task(watch(0, d)) for d in (0.0, 0.01)]
        late = asyncio.create_task(watch(5, 0.0))
        await asyncio.sleep(0.05)
        for index in range(20):
            writer.append(log, _line(index))
        await asyncio.get_running_loop().run_in_executor(None, writer.flush)
        log.close()
        return await asyncio.gather(*watchers, late)

    fast, slow, late = asyncio.run(scenario())
    writer.stop()
    assert fast == slow == list(range(1, 21))
    assert late == list(range(6, 21))
