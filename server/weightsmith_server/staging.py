"""Budgets shared by in-flight streams: how many may run, how many bytes they may hold.

A `Budget` is a thread-safe counter with a limit. `acquire` takes an
amount or refuses at once with RESOURCE_EXHAUSTED (nothing waits, nothing
is taken); the `Lease` it returns gives the amount back exactly once, as a
context manager or by `release`. The server keeps two: the number of
concurrent write and upload streams (`--max-write-streams`) and the bytes
in-flight WriteWeights streams stage in memory (`--max-staging-mb`).

Memory a stream freed is not necessarily returned to the system: glibc keeps
freed chunks in its per-thread arenas, and a burst of streams (each message
buffer, each staged tensor) leaves hundreds of MiB of free but resident
memory behind. `trim_soon` asks the allocator to return it (`malloc_trim`)
shortly after streams end, at most once per `TRIM_INTERVAL`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType

from weightsmith_server.errors import ResourceExhausted

log = logging.getLogger(__name__)

# Seconds between two requests to the allocator to return freed memory.
TRIM_INTERVAL = 1.0


class Budget:
    """Up to `limit` units held at once by whoever acquired them.

    Args:
        limit: The most units held together.
        reason: The error reason of a refusal.
        describe: What the units are, for the refusal's message (`"bytes of
            staged tensors"`).
        hint: What the caller can do, appended to the message.
    """

    def __init__(self, limit: int, *, reason: str, describe: str, hint: str) -> None:
        self.limit = limit
        self.reason = reason
        self._describe = describe
        self._hint = hint
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """Units held right now."""
        return self._held

    def acquire(self, amount: int, *, field: str | None = None) -> Lease:
        """Take `amount` units, or raise ResourceExhausted and take nothing."""
        self._take(amount, field)
        return Lease(self, amount)

    def _take(self, amount: int, field: str | None) -> None:
        with self._lock:
            held = self._held
            if held + amount <= self.limit:
                self._held = held + amount
                return
        raise ResourceExhausted(
            f"The server holds {held} of at most {self.limit} {self._describe}; {amount} more would "
            f"exceed it. {self._hint}",
            reason=self.reason,
            field=field,
            metadata={"requested": str(amount), "held": str(held), "limit": str(self.limit)},
        )

    def _give_back(self, amount: int) -> None:
        with self._lock:
            self._held -= amount


class Lease:
    """Units taken from a `Budget`; `release` (or leaving the `with` block) gives them back once."""

    def __init__(self, budget: Budget, amount: int) -> None:
        self._budget = budget
        self._amount = amount
        self._lock = threading.Lock()

    @property
    def amount(self) -> int:
        """Units held by this lease right now."""
        return self._amount

    def grow(self, amount: int, *, field: str | None = None) -> None:
        """Take `amount` more units; ResourceExhausted, and nothing taken, if they do not fit."""
        self._budget._take(amount, field)
        with self._lock:
            self._amount += amount

    def release(self) -> None:
        """Give every unit back; later calls give back only what was grown since."""
        with self._lock:
            amount, self._amount = self._amount, 0
        if amount:
            self._budget._give_back(amount)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()


def stream_slots(limit: int) -> Budget:
    """The concurrent write and upload streams (`--max-write-streams`)."""
    return Budget(
        limit,
        reason="TOO_MANY_STREAMS",
        describe="concurrent write and upload streams",
        hint="Retry when one has finished (--max-write-streams).",
    )


class StreamSlots:
    """The concurrent write and upload streams: `limit` in all, and at most half of them (at least
    one) per authenticated principal, so that no principal can hold every slot for an hour.

    Without authentication every caller is the same anonymous one: only the total applies.
    """

    def __init__(self, limit: int) -> None:
        self.total = stream_slots(limit)
        self.per_principal = max(1, limit // 2)
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, principal: str | None) -> Iterator[None]:
        """One slot for the block, counted for `principal` (None: not authenticated)."""
        if principal is not None:
            self._take(principal)
        try:
            with self.total.acquire(1):
                yield
        finally:
            if principal is not None:
                with self._lock:
                    self._held[principal] -= 1
                    if not self._held[principal]:
                        del self._held[principal]

    def _take(self, principal: str) -> None:
        with self._lock:
            held = self._held.get(principal, 0)
            if held < self.per_principal:
                self._held[principal] = held + 1
                return
        raise ResourceExhausted(
            f"Principal {principal!r} holds {held} of the {self.total.limit} concurrent write and "
            f"upload streams, the most one principal may hold. Retry when one has finished "
            f"(--max-write-streams; a principal gets half of them).",
            reason="TOO_MANY_STREAMS",
            metadata={
                "requested": "1",
                "held": str(held),
                "limit": str(self.per_principal),
                "principal": principal,
            },
        )


def staging_memory(limit_bytes: int) -> Budget:
    """The bytes in-flight WriteWeights streams hold in memory (`--max-staging-mb`)."""
    return Budget(
        limit_bytes,
        reason="STAGING_MEMORY_EXHAUSTED",
        describe="bytes of tensors staged by in-flight writes",
        hint="Retry later, or write fewer variables per call (--max-staging-mb).",
    )


def _malloc_trim() -> Callable[[], None] | None:
    """glibc's `malloc_trim(0)`, or None where the C library has none (musl, macOS, Windows)."""
    try:
        function = ctypes.CDLL(None).malloc_trim  # the symbols the process already has
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return lambda: function(0)


_TRIM = _malloc_trim()
_trim_lock = threading.Lock()
_trim_pending = False


def trim_soon() -> None:
    """Return freed memory to the system in a moment, on a timer thread; requests in between coalesce."""
    global _trim_pending
    if _TRIM is None:
        return
    with _trim_lock:
        if _trim_pending:
            return
        _trim_pending = True
    timer = threading.Timer(TRIM_INTERVAL, _trim)
    timer.daemon = True
    timer.name = "weightsmith-trim"
    timer.start()


def _trim() -> None:
    global _trim_pending
    with _trim_lock:
        _trim_pending = False
    assert _TRIM is not None
    started = time.perf_counter()
    _TRIM()
    log.debug("returned freed memory to the system in %.1f ms", 1000 * (time.perf_counter() - started))
