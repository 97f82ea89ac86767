"""The I/O that differs between grpc.aio and grpc, behind a pair of twin classes.

`AsyncClient` calls an `AsyncTransport`; the generated `Client` calls a
`SyncTransport`, whose methods have the same names and block. Everything else
the clients do is written once, in `_async_client.py`.

A transport opens the channel, starts calls, and translates grpc errors into
`WeightsmithError`s in the one place they surface: as a call returns, or as a
server stream is iterated (`errors.translate_errors`). It also runs blocking
work (file reads and writes) where each client wants it: the asyncio one in
worker threads, off the event loop, the blocking one in the caller's thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from types import ModuleType, TracebackType
from typing import Any, TypeVar

import grpc

from weightsmith._channel import ClientSettings
from weightsmith._rpcs import Rpc, serialize_request
from weightsmith.errors import translate_errors

_T = TypeVar("_T")


def _open_channel(grpc_module: ModuleType, settings: ClientSettings) -> Any:
    # `grpc` and `grpc.aio` name their channel constructors alike.
    if settings.credentials is None:
        return grpc_module.insecure_channel(settings.target, options=settings.channel_options)
    return grpc_module.secure_channel(settings.target, settings.credentials, options=settings.channel_options)


def _multicallable(channel: Any, rpc: Rpc) -> Any:
    # Built on the channel rather than taken from the generated stubs, so that
    # the weight streams can use their zero-copy (de)serializers.
    if rpc.request_streams:
        factory = channel.stream_unary
    elif rpc.response_streams:
        factory = channel.unary_stream
    else:
        factory = channel.unary_unary
    return factory(rpc.path, request_serializer=serialize_request, response_deserializer=rpc.deserialize)


class AsyncResponses:
    """The responses of a server-streaming call on grpc.aio.

    Iterate it inside `async with`: errors arrive as `WeightsmithError`s, and
    leaving the block by an exception cancels the call at once, so the server
    stops sending.
    """

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call

    async def __aenter__(self) -> AsyncResponses:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._call.cancel()

    async def __aiter__(self) -> AsyncIterator[Any]:
        with translate_errors():
            async for response in self._call:
                yield response


class SyncResponses:
    """The responses of a server-streaming call on grpc; the twin of `AsyncResponses`."""

    def __init__(self, call: grpc.Call) -> None:
        self._call = call

    def __enter__(self) -> SyncResponses:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._call.cancel()

    def __iter__(self) -> Iterator[Any]:
        with translate_errors():
            yield from self._call  # type: ignore[misc]


class AsyncTransport:
    """Calls over a grpc.aio channel, opened on the first call.

    A grpc.aio channel binds to the event loop running when it is created,
    hence lazily: the client may be created outside the loop that uses it.
    """

    def __init__(self, settings: ClientSettings) -> None:
        self._settings = settings
        self._channel: grpc.aio.Channel | None = None
        self._methods: dict[Rpc, Any] = {}
        self._closed = False

    def _method(self, rpc: Rpc) -> Any:
        if self._closed:
            raise RuntimeError(
                "Received a call on a closed AsyncClient, expected an open one; create a new AsyncClient."
            )
        if self._channel is None:
            self._channel = _open_channel(grpc.aio, self._settings)
        if rpc not in self._methods:
            self._methods[rpc] = _multicallable(self._channel, rpc)
        return self._methods[rpc]

    def call(self, rpc: Rpc, request: Any, *, timeout: float | None, metadata: Any) -> Any:
        """Start a call: an awaitable of the response, or `AsyncResponses` for a server stream."""
        call = self._method(rpc)(request, timeout=timeout, metadata=metadata)
        if rpc.response_streams:
            return AsyncResponses(call)
        return self._response(call)

    @staticmethod
    async def _response(call: Any) -> Any:
        with translate_errors():
            return await call

    async def run_blocking(
        self, function: Callable[..., _T], *args: Any, executor: Executor | None = None, **kwargs: Any
    ) -> _T:
        """Run blocking `function(*args, **kwargs)` in a worker thread: `executor`'s, else asyncio's."""
        if executor is None:
            return await asyncio.to_thread(function, *args, **kwargs)
        return await asyncio.wrap_future(executor.submit(function, *args, **kwargs))

    async def sleep(self, seconds: float) -> None:
        """Wait without blocking the event loop."""
        await asyncio.sleep(seconds)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled and later calls refused."""
        self._closed = True
        if self._channel is not None:
            channel, self._channel = self._channel, None
            self._methods.clear()
            await channel.close()


class SyncTransport:
    """Calls over a grpc channel, opened at once; the twin of `AsyncTransport`. Thread-safe."""

    def __init__(self, settings: ClientSettings) -> None:
        self._channel: grpc.Channel = _open_channel(grpc, settings)
        self._methods: dict[Rpc, Any] = {}

    def _method(self, rpc: Rpc) -> Any:
        # A race here builds the same multicallable twice; both work.
        if rpc not in self._methods:
            self._methods[rpc] = _multicallable(self._channel, rpc)
        return self._methods[rpc]

    def call(self, rpc: Rpc, request: Any, *, timeout: float | None, metadata: Any) -> Any:
        """Make a call: the response, or `SyncResponses` for a server stream."""
        method = self._method(rpc)
        if rpc.response_streams:
            return SyncResponses(method(request, timeout=timeout, metadata=metadata))
        with translate_errors():
            return method(request, timeout=timeout, metadata=metadata)

    def run_blocking(
        self, function: Callable[..., _T], *args: Any, executor: Executor | None = None, **kwargs: Any
    ) -> _T:
        """Run blocking `function(*args, **kwargs)` and wait for it: on `executor` if given, else here."""
        if executor is None:
            return function(*args, **kwargs)
        return executor.submit(function, *args, **kwargs).result()

    def sleep(self, seconds: float) -> None:
        """Block the calling thread."""
        time.sleep(seconds)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()
