"""Blocking domain work, run on the server's worker threads instead of the event loop."""

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
