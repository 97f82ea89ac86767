"""WeightService operations: weight streams, history, edits, diff and revert."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
from collections.abc import AsyncIterator, Sequence

import numpy as np

from weightsmith.wire import ChunkView
from weightsmith_server import access
from weightsmith_server.edits.base import EditOp
from weightsmith_server.edits.context import EditReport
from weightsmith_server.edits.engine import apply_edits
from weightsmith_server.models.host import ModelHost
from weightsmith_server.revisions import diff, history, revert
from weightsmith_server.revisions.record import RevisionRecord
from weightsmith_server.selectors import Selector
from weightsmith_server.staging import Budget
from weightsmith_server.weights import WeightWrite, read_weights
from weightsmith_server.workers import Blocking


class WeightOperations:
    """Read and write weights, edit them, and walk and restore their history."""

    def __init__(self, host: ModelHost, blocking: Blocking, staging: Budget | None = None) -> None:
        self._host = host
        self._blocking = blocking
        # The bytes in-flight writes hold in memory (`--max-staging-mb`); None: unbounded.
        self._staging = staging

    async def read_weights(
        self, model_id: str, selector: Selector, revision: int
    ) -> tuple[int, list[tuple[str, np.ndarray]]]:
        access.require_model(model_id)
        return await self._blocking(read_weights, self._host, model_id, selector, revision)

    async def write_weights(
        self,
        model_id: str,
        chunks: AsyncIterator[ChunkView],
        *,
        expected_revision: int | None,
        message: str,
        allow_non_finite: bool,
        author: str,
    ) -> RevisionRecord:
        """Run one WriteWeights stream to its commit; on any failure nothing changes.

        A stream that fails, goes idle past the stream timeouts (the request
        iterator raises) or is cancelled aborts the write: its staging folder
        is removed and its staged memory returned to the budget.
        """
        access.require_model(model_id, "header.model_id")
        starting = self._blocking.executor.submit(
            functools.partial(
                WeightWrite,
                self._host,
                model_id,
                expected_revision=expected_revision,
                message=message,
                allow_non_finite=allow_non_finite,
                author=author,
                staging=self._staging,
            )
        )
        try:
            write = await asyncio.wrap_future(starting)
        except asyncio.CancelledError:
            # The caller left while the worker was still opening the write: abort it once it exists.
            starting.add_done_callback(self._abort_opened)
            raise
        try:
            async for chunk in chunks:
                # Checking a chunk and queueing its copy takes well under a millisecond:
                # doing it here saves a thread hop per chunk.
                write.add(chunk.name, chunk.dtype, chunk.shape, chunk.offset, chunk.data)
        except asyncio.CancelledError:
            self._blocking.executor.submit(write.abort)  # the client went away; do not await
            raise
        except BaseException:
            await self._blocking(write.abort)
            raise
        # Shielded: once the commit runs, a cancelled call must not interrupt it half way.
        return await asyncio.shield(self._blocking(write.commit))

    def _abort_opened(self, opened: concurrent.futures.Future[WeightWrite]) -> None:
        """Abort a write its caller left before it was opened (on a worker: abort touches the disk)."""
        if not opened.cancelled() and opened.exception() is None:
            self._blocking.executor.submit(opened.result().abort)

    async def list_revisions(
        self, model_id: str, page_size: int, page_token: str
    ) -> tuple[list[RevisionRecord], str]:
        access.require_model(model_id)
        return await self._blocking(history.list_revisions, self._host, model_id, page_size, page_token)

    async def get_revision(self, model_id: str, revision: int) -> RevisionRecord:
        access.require_model(model_id)
        return await self._blocking(history.get_revision, self._host, model_id, revision)

    async def apply_edits(
        self,
        model_id: str,
        ops: Sequence[EditOp],
        *,
        expected_revision: int | None,
        message: str,
        dry_run: bool,
        author: str,
    ) -> tuple[RevisionRecord | None, list[EditReport]]:
        access.require_model(model_id)
        _require_referenced_models(ops)
        return await self._blocking(
            apply_edits,
            self._host,
            model_id,
            ops,
            expected_revision=expected_revision,
            message=message,
            dry_run=dry_run,
            author=author,
        )

    async def diff_revisions(self, model_id: str, from_revision: int, to_revision: int) -> diff.RevisionDiff:
        access.require_model(model_id)
        return await self._blocking(diff.diff, self._host, model_id, from_revision, to_revision)

    async def revert(
        self, model_id: str, to_revision: int, *, expected_revision: int | None, message: str, author: str
    ) -> RevisionRecord:
        access.require_model(model_id)
        return await self._blocking(
            revert.revert,
            self._host,
            model_id,
            to_revision,
            expected_revision=expected_revision,
            message=message,
            author=author,
        )


def _require_referenced_models(ops: Sequence[EditOp]) -> None:
    """Edits that read other models (interpolate, task_vector, copy_from) need them visible too."""
    caller = access.current()
    for index, op in enumerate(ops):
        for field in dataclasses.fields(op) if dataclasses.is_dataclass(op) else ():
            value = getattr(op, field.name)
            if field.name.endswith("model_id") and isinstance(value, str):
                access.require_model(value, f"edits[{index}].{op.name}.{field.name}", caller)
