"""Domain errors: what went wrong, which request field caused it, and why.

Domain code raises these; `api.interceptors` alone turns them into gRPC
statuses with `google.rpc` details. The hierarchy::

    WeightsmithError
    ├── InvalidArgument      bad input (BadRequest field violations)
    ├── NotFound             an unknown model, revision, layer, file
    ├── AlreadyExists        an id that is taken
    ├── FailedPrecondition   the state forbids it right now
    ├── Aborted              `expected_revision` no longer matches
    ├── ResourceExhausted    a size or memory limit
    ├── Unavailable          not ready yet (start-up restore): retry
    ├── Unauthenticated      no credentials, or ones no principal has
    ├── PermissionDenied     the principal lacks the scope, or the model id is outside its patterns
    └── DeadlineExceeded     a client stream went idle or outlived its deadline
"""

from __future__ import annotations

from collections.abc import Sequence


class WeightsmithError(Exception):
    """Base class: a message, an UPPER_SNAKE reason and the offending fields."""

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        field: str | None = None,
        violations: Sequence[tuple[str, str]] = (),
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.violations: list[tuple[str, str]] = list(violations)
        if field is not None:
            self.violations.insert(0, (field, message))
        self.metadata = dict(metadata or {})

    def with_field_prefix(self, prefix: str) -> WeightsmithError:
        """Prefix every violation's field path (`selector` -> `edits[2].selector`)."""
        self.violations = [(f"{prefix}.{f}" if f else prefix, d) for f, d in self.violations]
        return self


class InvalidArgument(WeightsmithError):
    """The request is malformed or names something that cannot be."""


class NotFound(WeightsmithError):
    """A resource the request names does not exist."""


class AlreadyExists(WeightsmithError):
    """The resource the request would create exists already."""


class FailedPrecondition(WeightsmithError):
    """The system is not in a state that allows the request."""


class Aborted(WeightsmithError):
    """A concurrent change won: the expected revision is no longer current."""


class ResourceExhausted(WeightsmithError):
    """The request exceeds a configured size or memory limit."""


class Unavailable(WeightsmithError):
    """The server cannot answer yet (it is restoring its models); retry shortly."""


class Unauthenticated(WeightsmithError):
    """The call carries no credentials, or credentials that match no principal."""


class PermissionDenied(WeightsmithError):
    """The caller is known but may not do this (a missing scope, a model id outside its patterns)."""


class DeadlineExceeded(WeightsmithError):
    """A client stream sent nothing for too long, or stayed open past its deadline."""
