"""Fixtures of the client tier: one test body drives both the blocking and the asyncio client."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

import weightsmith


class BlockingView:
    """Runs an `AsyncClient`'s methods to completion on a private event loop.

    Coroutine methods return their result, async-generator methods become
    generators, everything else passes through: a test written against the
    blocking `Client` runs unchanged against the asyncio one.
    """

    def __init__(self, client: weightsmith.AsyncClient, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if inspect.iscoroutinefunction(attribute):
            return lambda *args, **kwargs: self._loop.run_until_complete(attribute(*args, **kwargs))
        if inspect.isasyncgenfunction(attribute):
            return lambda *args, **kwargs: self._iterate(attribute(*args, **kwargs))
        return attribute

    def _iterate(self, iterator: AsyncIterator[Any]) -> Iterator[Any]:
        try:
            while True:
                try:
                    yield self._loop.run_until_complete(anext(iterator))
                except StopAsyncIteration:
                    return
        finally:
            self._loop.run_until_complete(iterator.aclose())  # type: ignore[attr-defined]


Connect = Callable[..., contextlib.AbstractContextManager[Any]]


@pytest.fixture(params=["sync", "async"])
def connect(request: pytest.FixtureRequest) -> Iterator[Connect]:
    """`connect(target, **options)`: a context manager yielding a `Client`, or an `AsyncClient` driven
    through `BlockingView`; the test runs once with each."""
    if request.param == "sync":
        yield weightsmith.Client
        return
    loop = asyncio.new_event_loop()

    @contextlib.contextmanager
    def connect_async(*args: Any, **kwargs: Any) -> Iterator[Any]:
        client = weightsmith.AsyncClient(*args, **kwargs)
        try:
            yield BlockingView(client, loop)
        finally:
            loop.run_until_complete(client.close())

    try:
        yield connect_async
    finally:
        loop.close()
