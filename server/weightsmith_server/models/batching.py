"""Dynamic batching: concurrent small Predicts on one model run as one batch.

Leader/follower on the event loop, per (model, input signature, output
layers): a caller that finds no batch running for its signature runs at
once, in its own coroutine (a lone caller never waits and takes no extra
hop). Callers that arrive while a batch runs queue up; when the batch ends,
the queue's first `max_batch_size` rows start the next batch from the
completion callback. Each batch is one hop to the worker pool, as an
unbatched Predict is, and no worker thread ever blocks waiting for another
caller.

`max_wait` applies under load only: a next batch that is not full waits for
more calls (the callers of the batch that just ended, typically, so that two
half batches merge into one) up to `max_wait` and at most a quarter of the
last batch's run time (a wait longer than the model runs would only add
latency); it starts as soon as it is full. Calls of `max_batch_size` rows or more, and calls on
tensors without a batch dimension, run on their own.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

R = TypeVar("R")

# Under load, a next batch waits at most this share of the last batch's run time (and `max_wait`).
WAIT_SHARE = 0.25


@dataclass(frozen=True)
class BatchingPolicy:
    """At most `max_batch_size` rows a batch; under load a batch not yet full waits up to `max_wait_ms`."""

    max_batch_size: int = 32
    max_wait_ms: float = 5.0

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1


def signature(
    model_id: str, inputs: Sequence[tuple[str, np.ndarray]], output_layers: Sequence[str]
) -> tuple[Hashable, int] | None:
    """The batching key of a call and its rows; None if its tensors cannot be concatenated."""
    if not inputs or any(array.ndim == 0 for _, array in inputs):
        return None
    rows = len(inputs[0][1])
    if any(len(array) != rows for _, array in inputs):
        return None
    key = (
        model_id,
        tuple(output_layers),
        tuple((name, array.dtype.str, array.shape[1:]) for name, array in inputs),
    )
    return key, rows


@dataclass
class _Call(Generic[R]):
    inputs: Sequence[tuple[str, np.ndarray]]
    rows: int
    future: asyncio.Future[R]


@dataclass
class _Queue(Generic[R]):
    waiting: deque[_Call[R]] = field(default_factory=deque)
    busy: bool = False  # a batch runs, or a started one waits for more rows
    timer: asyncio.TimerHandle | None = None
    started: float = 0.0  # loop time the running batch started


# Runs one batch on the worker pool: each call's result, or the exception it raises alone.
RunBatch = Callable[
    [str, list[Sequence[tuple[str, np.ndarray]]], tuple[str, ...]], Awaitable[list[R | Exception]]
]


class Batcher(Generic[R]):
    """Groups concurrent calls with the same signature into batches (event-loop only, no locks)."""

    def __init__(self, run_batch: RunBatch[R]) -> None:
        self._run_batch = run_batch
        self._queues: dict[Hashable, _Queue[R]] = {}
        # Batches run so far and the calls they served (for tests and metrics).
        self.batches = 0
        self.calls = 0

    async def submit(
        self,
        model_id: str,
        inputs: Sequence[tuple[str, np.ndarray]],
        output_layers: Sequence[str],
        policy: BatchingPolicy,
    ) -> R:
        """The call's own result, computed alone or as part of a batch."""
        keyed = signature(model_id, inputs, output_layers) if policy.enabled else None
        if keyed is None or keyed[1] >= policy.max_batch_size:
            return await self._alone(model_id, inputs, output_layers)
        key, rows = keyed
        queue = self._queues.setdefault(key, _Queue())
        if not queue.busy:
            return await self._lead(key, inputs, policy)
        call = _Call(inputs, rows, asyncio.get_running_loop().create_future())
        queue.waiting.append(call)
        if queue.timer is not None and sum(c.rows for c in queue.waiting) >= policy.max_batch_size:
            self._launch(key, policy)  # a waiting batch is full: start it now
        return await call.future

    async def _lead(
        self, key: Hashable, inputs: Sequence[tuple[str, np.ndarray]], policy: BatchingPolicy
    ) -> R:
        """A lone caller runs in its own coroutine (no task, no extra hop); then the queued calls start."""
        queue = self._queues[key]
        queue.busy = True
        queue.started = asyncio.get_running_loop().time()
        try:
            return await self._alone(key[0], inputs, key[1])  # type: ignore[index]
        finally:
            self._next(key, policy)

    async def _alone(
        self, model_id: str, inputs: Sequence[tuple[str, np.ndarray]], output_layers: Sequence[str]
    ) -> R:
        self.batches += 1
        self.calls += 1
        [result] = await self._run_batch(model_id, [inputs], tuple(output_layers))
        if isinstance(result, Exception):
            raise result
        return result

    def _launch(self, key: Hashable, policy: BatchingPolicy) -> None:
        """Start a batch of the queue's first calls, up to `max_batch_size` rows (at least one call)."""
        queue = self._queues[key]
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None
        batch: list[_Call[R]] = []
        rows = 0
        while queue.waiting:
            call = queue.waiting[0]
            if call.future.done():  # cancelled while queued
                queue.waiting.popleft()
                continue
            if batch and rows + call.rows > policy.max_batch_size:
                break
            batch.append(queue.waiting.popleft())
            rows += call.rows
        if not batch:
            queue.busy = False
            del self._queues[key]
            return
        self.batches += 1
        self.calls += len(batch)
        queue.started = asyncio.get_running_loop().time()
        model_id, layers, _ = key  # type: ignore[misc]
        task = asyncio.ensure_future(self._run_batch(model_id, [c.inputs for c in batch], layers))
        task.add_done_callback(lambda done: self._finished(key, policy, batch, done))

    def _finished(
        self,
        key: Hashable,
        policy: BatchingPolicy,
        batch: list[_Call[R]],
        done: asyncio.Future[list[R | Exception]],
    ) -> None:
        """Hand each caller its result (or the batch's error), then start the next batch if any."""
        if done.cancelled():  # the server is stopping
            for call in batch:
                call.future.cancel()
            self._next(key, policy)
            return
        try:
            try:
                results: list[R | Exception] = done.result()
            except Exception as exc:  # the whole batch failed (model not found, ...): each caller gets it
                results = [exc] * len(batch)
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} calls returned {len(results)} results")
            for call, result in zip(batch, results, strict=True):
                if call.future.done():
                    continue
                if isinstance(result, Exception):
                    call.future.set_exception(result)
                else:
                    call.future.set_result(result)
        except BaseException as exc:  # never leave a caller waiting, nor the queue busy for good
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(exc)
            raise
        finally:
            self._next(key, policy)

    def _next(self, key: Hashable, policy: BatchingPolicy) -> None:
        """After a batch: start the next one now, or (not full, `max_wait` set) when full or the wait ends."""
        queue = self._queues[key]
        rows = sum(c.rows for c in queue.waiting if not c.future.done())
        loop = asyncio.get_running_loop()
        # Never more than a quarter of what the last batch took: a wait that merges two half
        # batches pays for itself; one longer than the model runs would only add latency.
        wait = min(policy.max_wait_ms / 1000, (loop.time() - queue.started) * WAIT_SHARE)
        if wait > 0 and 0 < rows < policy.max_batch_size:
            queue.timer = loop.call_later(wait, self._launch, key, policy)
        else:
            self._launch(key, policy)
