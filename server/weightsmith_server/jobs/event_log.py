"""A job's event log: persisted with gap-free sequence numbers, then published.

Training threads `append` without waiting: a writer thread assigns the
sequence number, appends the JSON line to `events.jsonl`, fsyncs, and only
then makes the event visible to readers. Watchers read the log from their
own position and wait for news on a per-log condition; nothing a watcher
does (reading slowly, stalling, disconnecting) reaches the training thread
or the other watchers, and every watcher sees every event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from weightsmith_server.clock import utc_now
from weightsmith_server.jobs.events import EventPayload, JobEvent

log = logging.getLogger(__name__)


class EventLog:
    """The events of one job, in memory and in `events.jsonl`."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._events: list[JobEvent] = []
        good = 0  # bytes up to the end of the last complete, readable line
        if path.exists():
            with open(path, "rb") as handle:
                for line in handle:
                    event = self._parse(line)
                    if event is None or event.sequence != len(self._events) + 1:
                        break
                    self._events.append(event)
                    good += len(line)
        self._handle = open(path, "ab")  # noqa: SIM115 (lives as long as the log)
        self._truncate(good)
        self._changed = threading.Condition()
        self._closed = False
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    @staticmethod
    def _parse(line: bytes) -> JobEvent | None:
        """The event a line holds, or None for a line torn by a crash (it was never published).

        Raises:
            ValueError: a complete JSON line that is not an event this server
                knows; cutting it off would reuse its sequence number.
        """
        if not line.endswith(b"\n"):
            return None
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            return None
        try:
            return JobEvent.from_json(raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"an event this server cannot read: {exc}") from exc

    @property
    def last_sequence(self) -> int:
        return self._events[-1].sequence if self._events else 0

    def events_after(self, sequence: int, limit: int | None = None) -> list[JobEvent]:
        """Published events with a greater sequence number, oldest first."""
        start = max(0, sequence)  # sequence numbers are 1..n, gap-free
        return self._events[start : None if limit is None else start + limit]

    def _truncate(self, size: int) -> None:
        """Cut the file to `size` bytes (a torn or failed tail), durably."""
        if os.fstat(self._handle.fileno()).st_size != size:
            os.ftruncate(self._handle.fileno(), size)
            os.fsync(self._handle.fileno())

    def write(self, payload: EventPayload) -> JobEvent:
        """Persist one event and publish it; called from the log's writer thread only."""
        event = JobEvent(self.last_sequence + 1, utc_now(), payload)
        size = os.fstat(self._handle.fileno()).st_size
        try:
            self._handle.write((json.dumps(event.to_json()) + "\n").encode())
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError:
            self._truncate(size)  # never leave half an event for the next start to trip on
            raise
        with self._changed:
            self._events.append(event)
            self._changed.notify_all()
            waiters = list(self._waiters)
        _wake(waiters)
        return event

    def close(self) -> None:
        """No more events: wake every watcher so it can finish."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            waiters = list(self._waiters)
        _wake(waiters)
        self._handle.close()

    @property
    def closed(self) -> bool:
        return self._closed

    async def follow(self, after: int) -> AsyncIterator[JobEvent]:
        """Yield events after `after`, then new ones as they come, until the log closes.

        A job's log closes right after its final event is published, so a
        watcher always receives that event before its stream ends.
        """
        loop = asyncio.get_running_loop()
        flag = asyncio.Event()
        waiter = (loop, flag)
        with self._changed:
            self._waiters.add(waiter)
        try:
            position = after
            while True:
                flag.clear()
                closed = self._closed  # read first: the final event is published before closing
                fresh = self.events_after(position)
                for event in fresh:
                    yield event
                    position = event.sequence
                if not fresh and closed:
                    return
                if not fresh:
                    await flag.wait()
        finally:
            with self._changed:
                self._waiters.discard(waiter)


def _wake(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
    """Set every waiter's flag, with one wake-up per event loop however many watchers it serves.

    Each `call_soon_threadsafe` writes to the loop's wake-up socket; the
    server's watchers all live on one loop, so per event that is one
    wake-up and one callback instead of one per watcher (fewer GIL hand-offs
    with the training thread).
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
    for loop, flag in waiters:
        by_loop.setdefault(loop, []).append(flag)
    for loop, flags in by_loop.items():
        loop.call_soon_threadsafe(_set_all, flags)


def _set_all(flags: list[asyncio.Event]) -> None:
    for flag in flags:
        flag.set()


# A log, the payload to write to it, and the flag to set once it is published; an item
# without a log is a flush marker.
_Item = tuple[EventLog | None, EventPayload | None, threading.Event | None]


class EventWriter:
    """One thread that persists the events of every job in order of arrival."""

    def __init__(self) -> None:
        self._queue: queue.Queue[_Item | None] = queue.Queue()  # None stops the thread
        self._thread = threading.Thread(target=self._run, name="weightsmith-events", daemon=True)
        self._thread.start()

    def append(self, events: EventLog, payload: EventPayload, *, wait: bool = False) -> None:
        """Queue an event; with `wait`, return once it is persisted and published."""
        done = threading.Event() if wait else None
        self._queue.put((events, payload, done))
        if done is not None:
            done.wait()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            events, payload, done = item
            try:
                if events is not None and payload is not None:
                    events.write(payload)
            except Exception:
                log.exception("persisting a job event failed")
            finally:
                if done is not None:
                    done.set()

    def flush(self) -> None:
        """Wait until every event queued so far is persisted."""
        done = threading.Event()
        self._queue.put((None, None, done))
        done.wait()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(30)
