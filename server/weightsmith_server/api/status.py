"""Domain errors as gRPC statuses carrying `google.rpc` details."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from weightsmith.v1 import error_reason_pb2
from weightsmith_server import errors

log = logging.getLogger(__name__)

ERROR_DOMAIN = "weightsmith.v1"
# Every error reply (message plus details) fits in this many bytes: replies
# never echo unbounded input, and stay far below any client's message limit.
MAX_ERROR_BYTES = 16 * 1024
# The reasons clients are told about: `weightsmith.v1.ErrorReason`.
_CATALOG = frozenset(error_reason_pb2.ErrorReason.keys())

_CODES: dict[type[errors.WeightsmithError], int] = {
    errors.InvalidArgument: code_pb2.INVALID_ARGUMENT,
    errors.NotFound: code_pb2.NOT_FOUND,
    errors.AlreadyExists: code_pb2.ALREADY_EXISTS,
    errors.FailedPrecondition: code_pb2.FAILED_PRECONDITION,
    errors.Aborted: code_pb2.ABORTED,
    errors.ResourceExhausted: code_pb2.RESOURCE_EXHAUSTED,
    errors.Unavailable: code_pb2.UNAVAILABLE,
}


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status(error: errors.WeightsmithError) -> grpc.Status:
    """A status with ErrorInfo, plus BadRequest or PreconditionFailure details."""
    if error.reason not in _CATALOG:
        # A programming mistake: the reason is sent anyway, as the error is still right.
        log.error("error reason %r is not in error_reason.proto's ErrorReason catalog", error.reason)
    code = _CODES.get(type(error), code_pb2.INTERNAL)
    for cls, value in _CODES.items():
        if isinstance(error, cls):
            code = value
    details = [
        _pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata))
    ]
    if error.violations:
        if isinstance(error, errors.FailedPrecondition | errors.Aborted):
            details.append(
                _pack(
                    error_details_pb2.PreconditionFailure(
                        violations=[
                            error_details_pb2.PreconditionFailure.Violation(
                                type=error.reason, subject=field, description=description
                            )
                            for field, description in error.violations
                        ]
                    )
                )
            )
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=field, description=description, reason=error.reason
                        )
                        for field, description in error.violations
                    ]
                )
            )
        )
    return rpc_status.to_status(status_pb2.Status(code=code, message=error.message, details=details))


def internal_status() -> grpc.Status:
    """The generic status for a failure the server did not anticipate."""
    return rpc_status.to_status(
        status_pb2.Status(
            code=code_pb2.INTERNAL,
            message="Internal server error; the server log has the details.",
            details=[_pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN))],
        )
    )
