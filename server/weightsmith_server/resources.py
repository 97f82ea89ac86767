"""The lifecycle every stored resource kind shares: lookup, listing, id reservation, uploads.

Models, datasets and jobs each keep their committed resources in a
`ResourceTable`: one place answers "does it exist" (NOT_FOUND, or
FAILED_PRECONDITION for one the store holds but could not restore), lists
pages of them, and reserves ids while a creation is under way so two
creations never race for one id. `receive_file` writes an upload stream
to disk with the byte count checked, off the event loop.

An abandoned creation holds nothing: an id reserved for a stream is
released when the stream fails, times out or is cancelled, even while the
reservation itself is still running on a worker (`claim`), and a partial
upload file is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Generic, TypeVar

from weightsmith_server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from weightsmith_server.naming import new_id, validate_id
from weightsmith_server.paging import page_after
from weightsmith_server.workers import run_then

T = TypeVar("T")
R = TypeVar("R")


class ResourceTable(Generic[T]):
    """The committed resources of one kind, by id, with reservations for those being made.

    Args:
        kind: The resource kind in messages and reasons (`model` gives
            `MODEL_NOT_FOUND`, `MODEL_EXISTS`, `MODEL_UNRESTORABLE`).
        list_method: The RPC that lists them, named in NOT_FOUND messages.
        exists_on_disk: Whether an id is taken in the store (committed or not).
    """

    def __init__(self, kind: str, list_method: str, exists_on_disk: Callable[[str], bool]) -> None:
        self.kind = kind
        self._list_method = list_method
        self._exists_on_disk = exists_on_disk
        self._items: dict[str, T] = {}
        self._unrestorable: dict[str, str] = {}
        self._reserved: set[str] = set()
        self.lock = threading.RLock()

    # --- lookup --------------------------------------------------------------

    def get(self, resource_id: str, field: str) -> T:
        """The resource, or NotFound (InvalidArgument for a malformed id)."""
        validate_id(resource_id, field=field, kind=self.kind)
        if resource_id in self._unrestorable:
            raise FailedPrecondition(
                f"{self.kind.capitalize()} {resource_id!r} is in the store but could not be restored at "
                f"start-up: {self._unrestorable[resource_id]}. The server log has the details.",
                reason=f"{self.kind.upper()}_UNRESTORABLE",
                field=field,
            )
        try:
            return self._items[resource_id]
        except KeyError:
            raise NotFound(
                f"No {self.kind} with id {resource_id!r}; {self._list_method} shows the "
                f"{self.kind}s on this server.",
                reason=f"{self.kind.upper()}_NOT_FOUND",
                field=field,
                metadata={f"{self.kind}_id": resource_id},
            ) from None

    def find(self, resource_id: str) -> T | None:
        return self._items.get(resource_id)

    def values(self) -> list[T]:
        """Every resource, ordered by id."""
        items = dict(self._items)
        return [items[k] for k in sorted(items)]

    def page(self, size: int, token: str) -> tuple[list[T], str]:
        """One page of resources ordered by id, and the next page's token."""
        items = dict(self._items)
        ids, token = page_after(sorted(items), lambda k: k, size, token)
        return [items[k] for k in ids], token

    # --- changes ---------------------------------------------------------------

    def put(self, resource_id: str, item: T) -> None:
        with self.lock:
            self._items[resource_id] = item

    def remove(self, resource_id: str, item: T | None = None) -> bool:
        """Forget a resource (only if it is still `item`, when given); False if it was not there."""
        with self.lock:
            if resource_id not in self._items or (item is not None and self._items[resource_id] is not item):
                return False
            del self._items[resource_id]
            return True

    def mark_unrestorable(self, resource_id: str, detail: str) -> None:
        with self.lock:
            self._unrestorable[resource_id] = detail[:300]

    def replace_all(self, items: dict[str, T], unrestorable: dict[str, str]) -> None:
        """Install what a start-up restore found."""
        with self.lock:
            self._items = dict(items)
            self._unrestorable = {k: v[:300] for k, v in unrestorable.items()}

    # --- reservations --------------------------------------------------------

    def reserve(self, resource_id: str, field: str) -> str:
        """Claim an id (a fresh one when empty) until the creation finishes or fails."""
        if resource_id:
            validate_id(resource_id, field=field, kind=self.kind)
        else:
            resource_id = new_id(self.kind)
        with self.lock:
            if (
                resource_id in self._items
                or resource_id in self._reserved
                or resource_id in self._unrestorable
                or self._exists_on_disk(resource_id)
            ):
                raise AlreadyExists(
                    f"A {self.kind} with id {resource_id!r} exists already; pick another id or "
                    "delete it first.",
                    reason=f"{self.kind.upper()}_EXISTS",
                    field=field,
                    metadata={f"{self.kind}_id": resource_id},
                )
            self._reserved.add(resource_id)
        return resource_id

    def release(self, resource_id: str) -> None:
        with self.lock:
            self._reserved.discard(resource_id)

    @contextlib.contextmanager
    def reservation(self, resource_id: str, field: str) -> Iterator[str]:
        """Hold an id (a fresh one when empty) while a creation runs in this block."""
        reserved = self.reserve(resource_id, field)
        try:
            yield reserved
        finally:
            self.release(reserved)

    async def claim(self, executor: Executor, resource_id: str, field: str) -> str:
        """`reserve` on a worker thread (it looks at the disk), for a creation that first receives a stream.

        The caller hands the id to `run_reserved`, or releases it if the stream fails.
        """
        return await claim(executor, lambda: self.reserve(resource_id, field), self.release)

    async def run_reserved(
        self, executor: Executor, resource_id: str, function: Callable[[], R], leftover: Path | None = None
    ) -> R:
        """Run `function` in `executor` and release `resource_id` when the worker is done (`run_then`).

        `leftover`, a file `function` removes itself, is removed too if the call is cancelled before
        `function` ever runs.
        """

        def done() -> None:
            self.release(resource_id)
            if leftover is not None:
                remove_later(executor, leftover)

        return await run_then(executor, done, function)


async def claim(executor: Executor, reserve: Callable[[], str], release: Callable[[str], None]) -> str:
    """Run `reserve` in `executor` and return the id it reserved.

    If the caller is cancelled while `reserve` runs (a client that went
    away), the id is released as soon as the worker has reserved it, so an
    abandoned call never keeps an id.
    """
    future = executor.submit(reserve)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda done: _release_reserved(done, release))
        raise


def _release_reserved(done: Future[str], release: Callable[[str], None]) -> None:
    if not done.cancelled() and done.exception() is None:
        release(done.result())


def remove_later(executor: Executor, path: Path) -> None:
    """Remove `path` on a worker, not awaited (the caller may be cancelled); a no-op at shutdown."""
    with contextlib.suppress(RuntimeError):  # the executor shut down: start-up empties tmp/ anyway
        executor.submit(path.unlink, missing_ok=True)


def check_upload_size(size_bytes: int, limit: int, *, field: str, what: str, hint: str = "") -> None:
    """INVALID_ARGUMENT for a size that is not positive, RESOURCE_EXHAUSTED above `limit`."""
    if size_bytes <= 0:
        raise InvalidArgument(
            f"Received size_bytes={size_bytes}, expected the exact size of the {what} in bytes.",
            reason="INVALID_SIZE",
            field=field,
        )
    if size_bytes > limit:
        raise ResourceExhausted(
            f"The upload of {size_bytes} bytes exceeds the server's limit of {limit} bytes"
            f"{'; ' + hint if hint else ''} (--max-upload-mb).",
            reason="UPLOAD_TOO_LARGE",
            field=field,
        )


async def receive_file(
    path: Path, size_bytes: int, chunks: AsyncIterator[bytes], executor: Executor, *, field: str = "chunk"
) -> None:
    """Write an upload stream to `path`, refusing more or fewer bytes than announced.

    Opening, writing, closing and, when the stream fails or is cancelled,
    removing the partial file all run in `executor`: disk work never blocks
    the event loop.
    """
    try:
        await _receive(path, size_bytes, chunks, executor, field)
    except asyncio.CancelledError:
        remove_later(executor, path)  # not awaited: the call is being cancelled
        raise
    except BaseException:
        # Awaited: once the call has failed, the partial file is gone.
        await asyncio.get_running_loop().run_in_executor(
            executor, functools.partial(path.unlink, missing_ok=True)
        )
        raise


async def _receive(
    path: Path, size_bytes: int, chunks: AsyncIterator[bytes], executor: Executor, field: str
) -> None:
    loop = asyncio.get_running_loop()
    received = 0
    handle = await loop.run_in_executor(executor, open, path, "wb")
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > size_bytes:
                raise InvalidArgument(
                    f"Received more than the {size_bytes} bytes announced in `header.size_bytes`; "
                    "announce the file's exact size.",
                    reason="UPLOAD_SIZE_MISMATCH",
                    field=field,
                )
            await loop.run_in_executor(executor, handle.write, chunk)
    finally:
        await loop.run_in_executor(executor, handle.close)
    if received != size_bytes:
        raise InvalidArgument(
            f"The upload is truncated: received {received} of the {size_bytes} bytes announced; "
            "send the whole file.",
            reason="UPLOAD_TRUNCATED",
            field=field,
        )
