"""Authentication and scopes: who calls each RPC, and whether their scopes allow it.

`AuthInterceptor` wraps every rpc of the contract's services (health and
reflection stay open): it finds the principal from the `authorization:
Bearer <token>` metadata or, under mTLS, from the client certificate's
subject alternative names, checks the rpc's scope in `METHOD_SCOPES`, and
makes the caller current (`access.bind`) while the handler runs. Without a
principals file every call runs as `access.ANONYMOUS`. It is the outermost
interceptor: an unauthenticated call is refused (a status with details)
before anything else looks at its request or holds a stream slot.
Tokens are never logged, not even on failure.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from weightsmith_server import access
from weightsmith_server.access import Caller
from weightsmith_server.api.interceptors import abort_with, rebuilt
from weightsmith_server.errors import PermissionDenied, Unauthenticated
from weightsmith_server.principals import PrincipalTable

# Finds and checks the caller of a call, or ends the call with the refusal.
Authorize = Callable[[grpc.aio.ServicerContext], Awaitable[Caller]]

AUTHORIZATION_KEY = "authorization"
SAN_PROPERTY = "x509_subject_alternative_name"

_M = "/weightsmith.v1.ModelService/"
_W = "/weightsmith.v1.WeightService/"
_T = "/weightsmith.v1.TrainingService/"
# The scope each rpc needs; None: any authenticated caller (GetServerInfo reports who it is).
METHOD_SCOPES: dict[str, str | None] = {
    f"{_M}CreateModel": "admin",
    f"{_M}UploadModel": "admin",
    f"{_M}DeleteModel": "admin",
    f"{_M}UpdateModel": "edit",
    f"{_M}GetModel": "read",
    f"{_M}ListModels": "read",
    f"{_M}ExportModel": "read",
    f"{_M}Predict": "read",
    f"{_M}Evaluate": "read",
    f"{_M}GetServerInfo": None,
    f"{_W}ReadWeights": "read",
    f"{_W}ListRevisions": "read",
    f"{_W}GetRevision": "read",
    f"{_W}DiffRevisions": "read",
    f"{_W}WriteWeights": "edit",
    f"{_W}ApplyEdits": "edit",
    f"{_W}RevertModel": "edit",
    f"{_T}UploadDataset": "train",
    f"{_T}CreateDataset": "train",
    f"{_T}GetDataset": "train",
    f"{_T}ListDatasets": "train",
    f"{_T}DeleteDataset": "train",
    f"{_T}CreateJob": "train",
    f"{_T}GetJob": "train",
    f"{_T}ListJobs": "train",
    f"{_T}CancelJob": "train",
    f"{_T}WatchJob": "train",
    f"{_T}ListJobEvents": "train",
}


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


class Authenticator:
    """Finds the caller of a call from its metadata and peer certificate.

    Args:
        principals: The principals table; None turns authentication off.
        client_certificates: Whether the transport verified client certificates
            (mTLS); only then does a certificate's SAN identify a principal.
    """

    def __init__(self, principals: PrincipalTable | None, *, client_certificates: bool = False) -> None:
        self.principals = principals
        self.client_certificates = client_certificates

    def caller(self, context: grpc.aio.ServicerContext) -> Caller:
        """The call's principal; UNAUTHENTICATED without credentials or with unknown ones."""
        table = self.principals
        if table is None:
            return access.ANONYMOUS
        header = _metadata(context, AUTHORIZATION_KEY)
        if header is not None:
            scheme, _, token = header.strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated(
                    "The `authorization` metadata must be `Bearer <token>`.", reason="AUTHORIZATION_MALFORMED"
                )
            principal = table.by_token(token)
            if principal is None:
                raise Unauthenticated(
                    "The bearer token matches no principal of this server.", reason="TOKEN_UNKNOWN"
                )
            return Caller.of(principal)
        if self.client_certificates:
            presented = (context.auth_context() or {}).get(SAN_PROPERTY, ())
            sans = [s.decode(errors="replace") if isinstance(s, bytes) else str(s) for s in presented]
            if sans:
                principal = table.by_san(sans)
                if principal is None:
                    raise Unauthenticated(
                        "The client certificate's subject alternative names match no principal of this "
                        "server.",
                        reason="CERTIFICATE_UNKNOWN",
                    )
                return Caller.of(principal)
        raise Unauthenticated(
            "This server requires authentication: send `authorization: Bearer <token>` metadata"
            + (" or a client certificate." if self.client_certificates else "."),
            reason="UNAUTHENTICATED",
        )


def _require_scope(caller: Caller, method: str, scope: str | None) -> None:
    if scope is None or caller.has_scope(scope):
        return
    rpc = method.rsplit("/", 1)[-1]
    raise PermissionDenied(
        f"Principal {caller.name!r} lacks the {scope!r} scope, which {rpc} needs; it has "
        f"{sorted(caller.scopes)}.",
        reason="SCOPE_MISSING",
        metadata={"scope": scope, "method": rpc, "principal": caller.name},
    )


def _unary_response(
    behavior: Callable[..., Awaitable[Any]], authorize: Authorize
) -> Callable[..., Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        token = access.bind(await authorize(context))
        try:
            return await behavior(request, context)
        finally:
            access.unbind(token)

    return handle


def _stream_response(behavior: Callable[..., Any], authorize: Authorize) -> Callable[..., AsyncIterator[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        token = access.bind(await authorize(context))
        try:
            result = behavior(request, context)
            if inspect.isasyncgen(result):
                async for response in result:
                    yield response
            else:
                await result
        finally:
            access.unbind(token)

    return handle


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorizes every rpc of `services`; other services pass untouched.

    Raises:
        TypeError: `METHOD_SCOPES` lacks an rpc of `services` (start-up fails).
    """

    def __init__(self, authenticator: Authenticator, services: Iterable[ServiceDescriptor]) -> None:
        self._authenticator = authenticator
        methods = {f"/{s.full_name}/{m.name}" for s in services for m in s.methods}
        missing = sorted(methods - set(METHOD_SCOPES))
        if missing:
            raise TypeError(f"no scope for rpcs {missing}: add them to api/auth.py METHOD_SCOPES")
        self._scopes = {m: METHOD_SCOPES[m] for m in methods}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in self._scopes:
            return handler  # health, reflection, or an unknown method (UNIMPLEMENTED)
        scope = self._scopes[method]

        async def authorize(context: grpc.aio.ServicerContext) -> Caller:
            """The caller, or the call ends here with UNAUTHENTICATED / PERMISSION_DENIED and details."""
            try:
                caller = self._authenticator.caller(context)
                _require_scope(caller, method, scope)
            except (Unauthenticated, PermissionDenied) as exc:
                await abort_with(context, method, exc)
                raise  # not reached: abort_with ends the call
            return caller

        def wrap(behavior: Callable[..., Any], _request_streaming: bool, response_streaming: bool) -> Any:
            return (_stream_response if response_streaming else _unary_response)(behavior, authorize)

        return rebuilt(handler, wrap)
