"""The one place where domain errors become gRPC statuses, and RPCs get measured.

Servicers contain no `try/except`: whatever they raise passes through here.
A `WeightsmithError` becomes its status with details; anything else is
logged with its traceback and answered with a generic INTERNAL, so the
server never crashes on input and never leaks internals.

Client streams (WriteWeights, UploadModel, UploadDataset: every rpc with a
request stream) are bounded here too: each takes one of `max_write_streams`
slots for the whole call (RESOURCE_EXHAUSTED `TOO_MANY_STREAMS` beyond),
and its request iterator ends the call with DEADLINE_EXCEEDED when no
message comes for `stream_idle_seconds` (`STREAM_IDLE`) or the stream is
still open `stream_deadline_seconds` after the call began
(`STREAM_DEADLINE`). The error is raised inside the handler, where the
operation reading the stream releases what it held (staged tensors,
partial files, reserved ids) as for any failed stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from weightsmith_server import access, metrics
from weightsmith_server.api.limits import RequestLimits
from weightsmith_server.api.status import internal_status, to_status
from weightsmith_server.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, WeightsmithError
from weightsmith_server.limits import excerpt
from weightsmith_server.staging import StreamSlots, trim_soon

log = logging.getLogger(__name__)


async def abort_with(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    """End the call with the status `exc` maps to (details included), and count it."""
    started = time.perf_counter()
    try:
        await _abort(context, method, exc)
    finally:
        _record(method, started, context, cancelled=False)


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    if isinstance(exc, WeightsmithError):
        status = to_status(exc)
        log.info("%s -> %s %s: %s", method, status.code.name, exc.reason, exc.message)
    else:
        status = internal_status()
        log.exception("%s failed unexpectedly", method, exc_info=exc)
    _drop_locals(exc)
    await context.abort(status.code, status.details, status.trailing_metadata)


def _drop_locals(exc: BaseException) -> None:
    """Clear the locals of the finished frames the error (and the errors it chains) went through.

    `context.abort` raises while `exc` is still bound, so the error, its
    traceback and the frames on it form a cycle that only the cyclic garbage
    collector frees, perhaps minutes later. Those frames hold what the call
    held: a failed stream's last chunk, its staged tensors. Cleared, the
    cycle keeps only a few small objects.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__


def _record(method: str, started: float, context: grpc.aio.ServicerContext, cancelled: bool) -> None:
    code = context.code() if hasattr(context, "code") else None
    if cancelled:
        name = "CANCELLED"
    elif code in (None, grpc.StatusCode.OK, 0):
        name = "OK"
    else:
        name = getattr(code, "name", str(code))
    metrics.RPCS.labels(method, name).inc()
    metrics.RPC_SECONDS.labels(method).observe(time.perf_counter() - started)


@dataclass(frozen=True)
class _Oversized:
    """Stands in for a request message larger than the configured limit."""

    size: int


def _too_large(size: int, limit: int, field: str) -> ResourceExhausted:
    return ResourceExhausted(
        f"Received a message of {size} bytes; the server accepts at most {limit} bytes per message "
        "(--max-message-mb). Send weights and files in chunks.",
        reason="MESSAGE_TOO_LARGE",
        field=field,
        metadata={"size_bytes": str(size), "limit_bytes": str(limit)},
    )


def _limited(deserializer: Callable[[bytes], Any] | None, limit: int) -> Callable[[bytes], Any]:
    """A request deserializer that marks, instead of parsing, messages over `limit`."""

    def deserialize(data: bytes) -> Any:
        if len(data) > limit:
            return _Oversized(len(data))
        try:
            return deserializer(data) if deserializer is not None else data
        except DecodeError as exc:  # answered with details by `_checked`, not an opaque status
            return _Malformed(excerpt(exc))

    return deserialize


@dataclass(frozen=True)
class _Malformed:
    """Stands in for a request message that is not valid protobuf."""

    problem: str


def _malformed(request: _Malformed, field: str) -> InvalidArgument:
    return InvalidArgument(
        f"Received a message that is not a valid request of this RPC: {request.problem}.",
        reason="MALFORMED_REQUEST",
        field=field,
    )


def _checked(request: Any, limit: int, strings: RequestLimits | None = None) -> Any:
    """The request, unless it is over the message size or has an over-long string (`strings`)."""
    if isinstance(request, _Oversized):
        raise _too_large(request.size, limit, "request")
    if isinstance(request, _Malformed):
        raise _malformed(request, "request")
    if strings is not None:
        strings.check(request)
    return request


@dataclass(frozen=True)
class StreamTimeouts:
    """How long a client stream may stay silent, and open at all."""

    idle_seconds: float
    deadline_seconds: float


def _timed_out(timeouts: StreamTimeouts, index: int, idle: bool) -> DeadlineExceeded:
    if idle:
        return DeadlineExceeded(
            f"Received no message for {timeouts.idle_seconds:g} s after {index} message(s) of the stream; "
            "the server closes client streams idle that long (--stream-idle-seconds). Nothing was "
            "written or created; send the whole stream again.",
            reason="STREAM_IDLE",
            field=f"stream[{index}]",
            metadata={"idle_seconds": f"{timeouts.idle_seconds:g}"},
        )
    return DeadlineExceeded(
        f"The stream was still open {timeouts.deadline_seconds:g} s after the call began, after "
        f"{index} message(s); the server closes client streams open that long "
        "(--stream-deadline-seconds). Nothing was written or created.",
        reason="STREAM_DEADLINE",
        field=f"stream[{index}]",
        metadata={"deadline_seconds": f"{timeouts.deadline_seconds:g}"},
    )


async def _checked_stream(
    requests: AsyncIterator[Any],
    limit: int,
    timeouts: StreamTimeouts,
    deadline: float,
    strings: RequestLimits | None = None,
) -> AsyncIterator[Any]:
    """The request stream, each message size-checked and awaited no longer than the timeouts allow.

    `deadline` is the `time.monotonic()` at which the stream must have ended.
    """
    iterator = aiter(requests)
    index = 0
    while True:
        left = deadline - time.monotonic()
        idle = timeouts.idle_seconds <= left
        try:
            async with asyncio.timeout(min(timeouts.idle_seconds, left)):
                request = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise _timed_out(timeouts, index, idle) from None
        if isinstance(request, _Oversized):
            raise _too_large(request.size, limit, f"stream[{index}]")
        if isinstance(request, _Malformed):
            raise _malformed(request, f"stream[{index}]")
        if strings is not None:
            strings.check(request)
        index += 1
        yield request


@asynccontextmanager
async def _handled(context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[None]:
    """Turn what the handler raises into a status, and record the call."""
    started = time.perf_counter()
    cancelled = False
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except asyncio.CancelledError:
        cancelled = True
        raise
    except Exception as exc:
        await _abort(context, method, exc)
    finally:
        _record(method, started, context, cancelled)


@contextlib.contextmanager
def _stream_slot(slots: StreamSlots | None) -> Iterator[None]:
    """One of the concurrent client-stream slots (none for other calls); freed memory returned after.

    Runs inside `AuthInterceptor`, so the slot counts for the call's principal.
    """
    if slots is None:
        yield
        return
    caller = access.current()
    with slots.hold(caller.name if caller.authenticated else None):
        try:
            yield
        finally:
            trim_soon()


def _unary_response(
    behavior: Callable[..., Awaitable[Any]],
    method: str,
    check: Callable[[Any], Any],
    slots: StreamSlots | None = None,
) -> Callable[..., Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _handled(context, method):
            with _stream_slot(slots):
                return await behavior(check(request), context)

    return handle


def _stream_response(
    behavior: Callable[..., AsyncIterator[Any]],
    method: str,
    check: Callable[[Any], Any],
    slots: StreamSlots | None = None,
) -> Callable[..., AsyncIterator[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with _handled(context, method):
            with _stream_slot(slots):
                result = behavior(check(request), context)
                if inspect.isasyncgen(result):
                    async for response in result:
                        yield response
                else:  # a handler that writes with `context.write` (the health service's Watch)
                    await result

    return handle


_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def rebuilt(
    handler: grpc.RpcMethodHandler,
    wrap: Callable[[Callable[..., Any], bool, bool], Callable[..., Any]],
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """`handler` with its behavior replaced by `wrap(behavior, request_streaming, response_streaming)`.

    The one place an interceptor rebuilds a handler of any of the four rpc
    kinds; `request_deserializer` replaces the handler's own when given.
    """
    kind = (handler.request_streaming, handler.response_streaming)
    behavior = handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream
    return _HANDLER_FACTORIES[kind](
        wrap(behavior, *kind),
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions to statuses, refuses oversized messages, records metrics.

    The transport accepts messages up to twice `max_message_bytes`, so that
    one over the limit reaches this interceptor and gets an answer with
    details; beyond that the transport itself refuses it.
    """

    def __init__(
        self,
        max_message_bytes: int,
        *,
        stream_idle_seconds: float = 60.0,
        stream_deadline_seconds: float = 3600.0,
        max_write_streams: int = 16,
        request_limits: RequestLimits | None = None,
    ) -> None:
        self._limit = max_message_bytes
        self._strings = request_limits or RequestLimits()
        self._timeouts = StreamTimeouts(stream_idle_seconds, stream_deadline_seconds)
        self.stream_slots = StreamSlots(max_write_streams)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        limit = self._limit
        strings = self._strings
        one = lambda request: _checked(request, limit, strings)  # noqa: E731
        timeouts, slots = self._timeouts, self.stream_slots
        many = lambda requests: _checked_stream(  # noqa: E731
            requests, limit, timeouts, time.monotonic() + timeouts.deadline_seconds, strings
        )

        def wrap(behavior: Callable[..., Any], request_streaming: bool, response_streaming: bool) -> Any:
            respond = _stream_response if response_streaming else _unary_response
            if request_streaming:
                return respond(behavior, method, many, slots)
            return respond(behavior, method, one)

        return rebuilt(handler, wrap, request_deserializer=_limited(handler.request_deserializer, limit))
