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
from typing import Any

import grpc

from weightsmith_server import metrics
from weightsmith_server.api.status import internal_status, to_status
from weightsmith_server.errors import WeightsmithError

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


def _unary_response(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        cancelled = False
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            cancelled = True
            raise
        except Exception as exc:
            await _abort(context, method, exc)
        finally:
            _record(method, started, context, cancelled)

    return handle


def _stream_response(
    behavior: Callable[..., AsyncIterator[Any]], method: str
) -> Callable[..., AsyncIterator[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        started = time.perf_counter()
        cancelled = False
        try:
            result = behavior(request, context)
            if inspect.isasyncgen(result):
                async for response in result:
                    yield response
            else:  # a handler that writes with `context.write` (the health service's Watch)
                await result
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            cancelled = True
            raise
        except Exception as exc:
            await _abort(context, method, exc)
        finally:
            _record(method, started, context, cancelled)

    return handle


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions to statuses and records per-method metrics."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _unary_response(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _unary_response(handler.stream_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _stream_response(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _stream_response(handler.stream_stream, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
