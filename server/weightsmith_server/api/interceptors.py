"""The one place where domain errors become gRPC statuses, and RPCs get measured.

Servicers contain no `try/except`: whatever they raise passes through here.
A `WeightsmithError` becomes its status with details; anything else is
logged with its traceback and answered with a generic INTERNAL, so the
server never crashes on input and never leaks internals.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from weightsmith_server import metrics
from weightsmith_server.api.status import internal_status, to_status
from weightsmith_server.errors import ResourceExhausted, WeightsmithError

log = logging.getLogger(__name__)


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    if isinstance(exc, WeightsmithError):
        status = to_status(exc)
        log.info("%s -> %s %s: %s", method, status.code.name, exc.reason, exc.message)
    else:
        status = internal_status()
        log.exception("%s failed unexpectedly", method, exc_info=exc)
    await context.abort(status.code, status.details, status.trailing_metadata)


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
        return deserializer(data) if deserializer is not None else data

    return deserialize


def _checked(request: Any, limit: int) -> Any:
    if isinstance(request, _Oversized):
        raise _too_large(request.size, limit, "request")
    return request


async def _checked_stream(requests: AsyncIterator[Any], limit: int) -> AsyncIterator[Any]:
    index = 0
    async for request in requests:
        if isinstance(request, _Oversized):
            raise _too_large(request.size, limit, f"stream[{index}]")
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


def _unary_response(
    behavior: Callable[..., Awaitable[Any]], method: str, check: Callable[[Any], Any]
) -> Callable[..., Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _handled(context, method):
            return await behavior(check(request), context)

    return handle


def _stream_response(
    behavior: Callable[..., AsyncIterator[Any]], method: str, check: Callable[[Any], Any]
) -> Callable[..., AsyncIterator[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with _handled(context, method):
            result = behavior(check(request), context)
            if inspect.isasyncgen(result):
                async for response in result:
                    yield response
            else:  # a handler that writes with `context.write` (the health service's Watch)
                await result

    return handle


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions to statuses, refuses oversized messages, records metrics.

    The transport accepts messages up to twice `max_message_bytes`, so that
    one over the limit reaches this interceptor and gets an answer with
    details; beyond that the transport itself refuses it.
    """

    def __init__(self, max_message_bytes: int) -> None:
        self._limit = max_message_bytes

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
        options = {
            "request_deserializer": _limited(handler.request_deserializer, limit),
            "response_serializer": handler.response_serializer,
        }
        one = lambda request: _checked(request, limit)  # noqa: E731
        many = lambda requests: _checked_stream(requests, limit)  # noqa: E731
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _unary_response(handler.unary_unary, method, one), **options
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _unary_response(handler.stream_unary, method, many), **options
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _stream_response(handler.unary_stream, method, one), **options
            )
        return grpc.stream_stream_rpc_method_handler(
            _stream_response(handler.stream_stream, method, many), **options
        )
