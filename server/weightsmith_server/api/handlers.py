"""Service registration from the contract: every rpc of a service gets its handler, or start-up fails.

Handlers are built from the service descriptor, so an rpc added to a proto
without a servicer method is caught when the server starts (and by a test),
never answered with a silent UNIMPLEMENTED. A few methods swap in their own
(de)serializers: the weight streams use the zero-copy chunk codec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

Codec = Callable[[Any], Any]

_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def service_handler(
    service: ServiceDescriptor,
    servicer: object,
    *,
    request_deserializers: Mapping[str, Codec] | None = None,
    response_serializers: Mapping[str, Codec] | None = None,
) -> grpc.GenericRpcHandler:
    """The generic handler serving every rpc of `service` from `servicer`'s same-named methods.

    Raises:
        TypeError: `servicer` lacks a method for one of the service's rpcs.
    """
    deserializers = dict(request_deserializers or {})
    serializers = dict(response_serializers or {})
    missing = [m.name for m in service.methods if not callable(getattr(servicer, m.name, None))]
    if missing:
        raise TypeError(f"{type(servicer).__name__} has no handler for {service.full_name} rpcs {missing}")
    handlers = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        make = _KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=deserializers.pop(method.name, request.FromString),
            response_serializer=serializers.pop(method.name, response.SerializeToString),
        )
    unknown = sorted({*deserializers, *serializers})
    if unknown:
        raise TypeError(f"{service.full_name} has no rpcs {unknown}")
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
