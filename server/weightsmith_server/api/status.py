"""Domain errors as gRPC statuses carrying `google.rpc` details."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from weightsmith.v1 import error_reason_pb2
from weightsmith_server import errors

log = logging.getLogger(__name__)

ERROR_DOMAIN = "weightsmith.v1"
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
    errors.Unauthenticated: code_pb2.UNAUTHENTICATED,
    errors.PermissionDenied: code_pb2.PERMISSION_DENIED,
    errors.DeadlineExceeded: code_pb2.DEADLINE_EXCEEDED,
}


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status(error: errors.WeightsmithError) -> grpc.Status:
    """A status with ErrorInfo, plus BadRequest or PreconditionFailure details, in MAX_ERROR_BYTES.

    Strings and lists are cut (marked `…(truncated)`) only when the whole
    status would not fit otherwise.
    """
    if error.reason not in _CATALOG:
        # A programming mistake: the reason is sent anyway, as the error is still right.
        log.error("error reason %r is not in error_reason.proto's ErrorReason catalog", error.reason)
    code = _CODES.get(type(error), code_pb2.INTERNAL)
    for cls, value in _CODES.items():
        if isinstance(error, cls):
            code = value
    for cap, count in _CUTS:
        status = _status_proto(error, code, cap, count)
        if reply_bytes(status) <= MAX_ERROR_BYTES:
            break
    else:
        for characters in (512, 128, 0):  # 512 characters of 4-byte UTF-8 percent-encode to 6 KiB
            status = status_pb2.Status(
                code=code,
                message=_cut(error.message, characters) if characters else TRUNCATED,
                details=[_pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN))],
            )
            if reply_bytes(status) <= MAX_ERROR_BYTES:
                break
    return rpc_status.to_status(status)


# Every error reply fits in this many bytes (GetServerInfo reports it). A
# status travels in the trailers twice over: `grpc-message` (percent-encoded)
# and `grpc-status-details-bin` (the whole Status). grpc clients refuse
# trailers past 8 KiB by default (a "soft" limit; 16 KiB is the hard one) and
# report RESOURCE_EXHAUSTED "Stream removed" instead of the error: so the two
# together stay under 8 KiB less room for the other headers.
MAX_ERROR_BYTES = 8 * 1024 - 1024
# (characters per string, items per list) tried in turn until the reply fits
# in MAX_ERROR_BYTES; None keeps everything. Errors quote inputs bounded already:
# this is the guarantee, should one forget.
_CUTS: tuple[tuple[int | None, int | None], ...] = ((None, None), (1024, 16), (256, 8), (64, 4))
TRUNCATED = "…(truncated)"


def reply_bytes(status: status_pb2.Status) -> int:
    """The trailer bytes a status takes: its serialized form plus its percent-encoded message."""
    encoded = sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in status.message.encode())
    return status.ByteSize() + encoded


# Folders no reply names: the store roots of the servers in this process.
_HIDDEN_FOLDERS: list[str] = []


def hide_folder(folder: Path) -> None:
    """Show paths under `folder` relative to it in every reply (`imports/x.npz`, never `/srv/...`)."""
    text = str(folder)
    if text not in _HIDDEN_FOLDERS:
        _HIDDEN_FOLDERS.append(text)
        _HIDDEN_FOLDERS.sort(key=len, reverse=True)


def _cut(text: str, cap: int | None) -> str:
    """`text` with hidden folders made relative, at most `cap` characters, marked when cut."""
    for folder in _HIDDEN_FOLDERS:
        if folder in text:
            text = text.replace(folder + os.sep, "").replace(folder, ".")
    return text if cap is None or len(text) <= cap else text[:cap] + TRUNCATED


def _status_proto(
    error: errors.WeightsmithError, code: int, cap: int | None, count: int | None
) -> status_pb2.Status:
    """The status with every string cut to `cap` characters and every list to `count` items."""
    metadata = {_cut(k, cap): _cut(v, cap) for k, v in list(error.metadata.items())[:count]}
    violations = [(_cut(f, cap), _cut(d, cap)) for f, d in error.violations[:count]]
    details = [
        _pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata))
    ]
    if violations:
        if isinstance(error, errors.FailedPrecondition | errors.Aborted):
            details.append(
                _pack(
                    error_details_pb2.PreconditionFailure(
                        violations=[
                            error_details_pb2.PreconditionFailure.Violation(
                                type=error.reason, subject=field, description=description
                            )
                            for field, description in violations
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
                        for field, description in violations
                    ]
                )
            )
        )
    message = _cut(error.message, cap)
    return status_pb2.Status(code=code, message=message, details=details)


def internal_status() -> grpc.Status:
    """The generic status for a failure the server did not anticipate."""
    return rpc_status.to_status(
        status_pb2.Status(
            code=code_pb2.INTERNAL,
            message="Internal server error; the server log has the details.",
            details=[_pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN))],
        )
    )
