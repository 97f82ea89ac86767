"""Exceptions raised by the weightsmith client.

Every failed call raises a `WeightsmithError`, one subclass per gRPC status
code, carrying the `google.rpc` details the server attached (the field that
was wrong, an UPPER_SNAKE reason, the precondition that failed). Errors from
grpc are translated in one place, `translate_errors()`, and chained with
`raise ... from exc` so the original `grpc.RpcError` stays reachable. The
hierarchy::

    Exception
    └── WeightsmithError
        ├── CancelledError           CANCELLED
        ├── UnknownError             UNKNOWN
        ├── InvalidArgumentError     INVALID_ARGUMENT
        ├── DeadlineExceededError    DEADLINE_EXCEEDED
        ├── NotFoundError            NOT_FOUND
        ├── AlreadyExistsError       ALREADY_EXISTS
        ├── PermissionDeniedError    PERMISSION_DENIED
        ├── ResourceExhaustedError   RESOURCE_EXHAUSTED
        ├── FailedPreconditionError  FAILED_PRECONDITION
        ├── AbortedError             ABORTED
        ├── OutOfRangeError          OUT_OF_RANGE
        ├── UnimplementedError       UNIMPLEMENTED
        ├── InternalError            INTERNAL
        ├── UnavailableError         UNAVAILABLE
        ├── DataLossError            DATA_LOSS
        └── UnauthenticatedError     UNAUTHENTICATED

`reason` is the name of a `weightsmith.ErrorReason` value (the enum of
`protos/weightsmith/v1/error_reason.proto`, exported by the package), which
documents when the server sends each reason, with which code and field.

`CancelledError` is weightsmith's, not `asyncio.CancelledError`: it means the
RPC was cancelled, and it derives from `Exception` like the others.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


class WeightsmithError(Exception):
    """A weightsmith call failed; the base class of every client error.

    Attributes:
        code: The gRPC status code.
        message: The server's (or the client's) description of what went wrong.
        reason: The UPPER_SNAKE `google.rpc.ErrorInfo.reason`, "" when absent.
        metadata: `google.rpc.ErrorInfo.metadata`, for example the model id.
        field_violations: `(field, description)` pairs from
            `google.rpc.BadRequest`, for example
            `("selector.paths[0]", "no variable dense_9/kernel")`.
        precondition_failures: `(type, subject, description)` triples from
            `google.rpc.PreconditionFailure`.
        details: The raw `google.rpc.Status`, None when the server sent none.
    """

    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str = "",
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
        precondition_failures: Sequence[tuple[str, str, str]] = (),
        details: status_pb2.Status | None = None,
    ) -> None:
        super().__init__(message)
        self.code: grpc.StatusCode = code if code is not None else self.grpc_code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        self.precondition_failures: list[tuple[str, str, str]] = list(precondition_failures)
        self.details = details

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.reason:
            text += f" [{self.reason}]"
        for field, description in self.field_violations:
            text += f"\n  field {field}: {description}"
        for kind, subject, description in self.precondition_failures:
            text += f"\n  precondition {kind} on {subject}: {description}"
        return text


class CancelledError(WeightsmithError):
    """The call was cancelled, usually by the caller."""

    grpc_code = grpc.StatusCode.CANCELLED


class UnknownError(WeightsmithError):
    """The server failed in a way that maps to no other status code."""

    grpc_code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(WeightsmithError):
    """The request is malformed; `field_violations` names the offending fields."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(WeightsmithError):
    """The call did not finish before its deadline (the client's `timeout`)."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(WeightsmithError):
    """A model, revision, layer or file named by the request does not exist."""

    grpc_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(WeightsmithError):
    """The resource the request would create, such as a model id, exists already."""

    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(WeightsmithError):
    """The caller is known but not allowed to do this."""

    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(WeightsmithError):
    """A size, memory or quota limit of the server or the channel was hit."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(WeightsmithError):
    """The model's current state forbids the request, for example while a job runs."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(WeightsmithError):
    """A concurrency conflict, such as an `expected_revision` that no longer matches."""

    grpc_code = grpc.StatusCode.ABORTED


class OutOfRangeError(WeightsmithError):
    """A value lies past the valid range, such as a revision that does not exist yet."""

    grpc_code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(WeightsmithError):
    """The server does not implement this call or option."""

    grpc_code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(WeightsmithError):
    """The server hit an unexpected error; its logs hold the traceback."""

    grpc_code = grpc.StatusCode.INTERNAL


class UnavailableError(WeightsmithError):
    """The server cannot be reached or is shutting down; retrying later may work."""

    grpc_code = grpc.StatusCode.UNAVAILABLE


class DataLossError(WeightsmithError):
    """Data was lost or corrupted, for example a malformed or truncated stream."""

    grpc_code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(WeightsmithError):
    """The call lacks valid credentials."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED


_ERROR_BY_CODE: dict[grpc.StatusCode, type[WeightsmithError]] = {
    cls.grpc_code: cls
    for cls in (
        CancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}


def error_class(code: grpc.StatusCode) -> type[WeightsmithError]:
    """Return the exception class raised for a status code (`WeightsmithError` for OK)."""
    return _ERROR_BY_CODE.get(code, WeightsmithError)


def _rich_status(exc: grpc.RpcError) -> status_pb2.Status | None:
    # A bare `grpc.RpcError` (not a `grpc.Call`) carries no trailing metadata.
    if not callable(getattr(exc, "trailing_metadata", None)):
        return None
    try:
        return rpc_status.from_call(exc)
    except ValueError:
        # The status proto disagrees with the call's code or message: the
        # trailer was not written by a conforming server, so trust the call.
        return None


def from_rpc_error(exc: grpc.RpcError) -> WeightsmithError:
    """Translate a `grpc.RpcError` into the matching `WeightsmithError` subclass.

    Unpacks the `google.rpc.Status` the server sent in the
    `grpc-status-details-bin` trailer: `BadRequest` field violations,
    `ErrorInfo` (reason and metadata; the first one wins) and
    `PreconditionFailure` violations. Other detail types stay available in
    `details`.

    Args:
        exc: The error raised by a grpc call, sync (`grpc.Call`) or async
            (`grpc.aio.AioRpcError`).

    Returns:
        The exception to raise; it is not raised here.
    """
    code_method = getattr(exc, "code", None)
    code = code_method() if callable(code_method) else grpc.StatusCode.UNKNOWN
    details_method = getattr(exc, "details", None)
    message = (details_method() if callable(details_method) else None) or str(exc)

    status = _rich_status(exc)
    reason = ""
    metadata: dict[str, str] = {}
    field_violations: list[tuple[str, str]] = []
    precondition_failures: list[tuple[str, str, str]] = []
    if status is not None:
        message = status.message or message
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                field_violations.extend((v.field, v.description) for v in bad_request.field_violations)
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) and not reason:
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
                metadata = dict(info.metadata)
            elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
                failure = error_details_pb2.PreconditionFailure()
                detail.Unpack(failure)
                precondition_failures.extend((v.type, v.subject, v.description) for v in failure.violations)
    return error_class(code)(
        message,
        code=code,
        reason=reason,
        metadata=metadata,
        field_violations=field_violations,
        precondition_failures=precondition_failures,
        details=status,
    )


@contextmanager
def translate_errors() -> Iterator[None]:
    """Raise `grpc.RpcError`s raised inside the block as `WeightsmithError`s.

    The original error is chained (`from exc`). Works around `await` in async
    code too: `grpc.aio.AioRpcError` is a `grpc.RpcError`.

    Example:

    ```python
    with translate_errors():
        stub.GetModel(request)
    ```
    """
    try:
        yield
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from exc
