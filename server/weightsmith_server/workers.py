"""Blocking work (TensorFlow, disk) on the server's worker threads, never on the event loop."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")


class Blocking:
    """Runs blocking functions on `executor` and awaits them."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    async def __call__(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        call = functools.partial(function, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    async def then(
        self, done: Callable[[], None], function: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> T:
        """Like calling this object, and `done()` runs once the work ends or is cancelled before it starts."""
        return await run_then(self.executor, done, functools.partial(function, *args, **kwargs))


async def run_then(executor: Executor, done: Callable[[], None], function: Callable[[], T]) -> T:
    """Run `function` in `executor`; `done()` follows the worker's end, not the caller's.

    A caller that gives up (a cancelled RPC) does not stop the worker, and
    work cancelled before it started still gets its `done()`: what it holds
    (a reserved id) is released exactly when nothing uses it any more.
    """
    future = executor.submit(function)
    future.add_done_callback(lambda _: done())
    return await asyncio.wrap_future(future)
