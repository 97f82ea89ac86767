"""Watching a job across reconnections: which events are new, and when to reconnect.

`watch_job` and `wait_job` drive a `JobWatch` over successive WatchJob calls;
it does no I/O, so both clients share it.
"""

from __future__ import annotations

import time

import grpc

from weightsmith import _checks
from weightsmith.errors import WeightsmithError
from weightsmith.v1 import job_pb2, training_service_pb2

DEFAULT_MAX_RECONNECTS = 20
WATCH_BACKOFF_INITIAL_S = 0.2
WATCH_BACKOFF_MAX_S = 2.0
TERMINAL_JOB_STATES = frozenset(
    {
        job_pb2.JOB_STATE_SUCCEEDED,
        job_pb2.JOB_STATE_FAILED,
        job_pb2.JOB_STATE_CANCELLED,
    }
)
_RECONNECTABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# How grpc words a connection that dropped mid-stream when it reports it as
# INTERNAL or UNKNOWN rather than UNAVAILABLE.
_DROPPED_CONNECTION_MARKERS = (
    "rst_stream",
    "stream removed",
    "socket closed",
    "connection reset",
    "goaway",
    "unexpected eos",
)


def is_reconnectable(exc: WeightsmithError) -> bool:
    """Whether a failed WatchJob stream may be resumed: the connection failed, not the request."""
    if exc.code in _RECONNECTABLE_CODES:
        return True
    if exc.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        message = exc.message.lower()
        return any(marker in message for marker in _DROPPED_CONNECTION_MARKERS)
    return False


class JobWatch:
    """The state of one `watch_job` across reconnections; both clients drive it, it does no I/O.

    It remembers the last sequence number seen, drops replayed events, and
    decides whether and when to reconnect after a stream fails: only for
    `is_reconnectable` errors, after a backoff of 0.2 s doubling to 2 s, at
    most `max_reconnects` times in a row (an event resets the count and the
    backoff). With `timeout` (for `wait_job`), every connection's deadline is
    capped to what is left and `TimeoutError` is raised when it runs out.
    """

    def __init__(
        self,
        job_id: str,
        *,
        after_sequence: int = 0,
        reconnect: bool = True,
        max_reconnects: int = DEFAULT_MAX_RECONNECTS,
        stream_timeout: float | None,
        timeout: float | None = None,
    ) -> None:
        self.job_id = job_id
        self.last_sequence = _checks.integer("after_sequence", after_sequence, 0)
        self.reconnects = 0
        self._reconnect = bool(reconnect)
        self._max_reconnects = _checks.integer("max_reconnects", max_reconnects, 0)
        self._stream_timeout = stream_timeout
        self._timeout = _checks.timeout("timeout", timeout)
        self._deadline = None if self._timeout is None else time.monotonic() + self._timeout
        self._failures = 0
        self._backoff = WATCH_BACKOFF_INITIAL_S

    def request(self) -> training_service_pb2.WatchJobRequest:
        """The WatchJob request of the next connection: from the last event seen."""
        return training_service_pb2.WatchJobRequest(job_id=self.job_id, after_sequence=self.last_sequence)

    def _remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def _timed_out(self) -> TimeoutError:
        return TimeoutError(
            f"Job {self.job_id!r} did not finish within timeout={self._timeout} seconds "
            f"(last event seen: {self.last_sequence})."
        )

    def call_timeout(self) -> float | None:
        """The deadline of the next connection; `TimeoutError` if `timeout` ran out."""
        remaining = self._remaining()
        if remaining is None:
            return self._stream_timeout
        if remaining <= 0:
            raise self._timed_out()
        return remaining if self._stream_timeout is None else min(remaining, self._stream_timeout)

    def accept(self, event: job_pb2.JobEvent) -> bool:
        """Record an event; False for one already seen (a replay), which the caller skips."""
        if event.sequence <= self.last_sequence:
            return False
        self.last_sequence = event.sequence
        self._failures = 0
        self._backoff = WATCH_BACKOFF_INITIAL_S
        return True

    def reconnect_delay(self, exc: WeightsmithError) -> float | None:
        """Seconds to wait before reconnecting after `exc`; None when `exc` should be raised.

        Raises `TimeoutError` (chained to `exc`) when `timeout` ran out.
        """
        if not self._reconnect or not is_reconnectable(exc):
            return None
        remaining = self._remaining()
        if remaining is not None and remaining <= 0:
            raise self._timed_out() from exc
        if self._failures >= self._max_reconnects:
            return None
        self._failures += 1
        self.reconnects += 1
        delay = self._backoff
        self._backoff = min(self._backoff * 2, WATCH_BACKOFF_MAX_S)
        return delay if remaining is None else max(0.0, min(delay, remaining))
