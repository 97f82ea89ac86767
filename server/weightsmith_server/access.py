"""Who is calling and what they may touch: the caller of the current RPC and the checks on it.

The auth interceptor sets the `Caller` for the duration of each call on a
context variable; the operations layer reads it on the event loop (context
variables do not follow work into executor threads: capture the caller
there and pass it in) and asks:

- `require_model`: a model outside the caller's patterns is NOT_FOUND,
  exactly like a missing one, so its existence does not leak;
- `require_creatable`: a new model id must be inside the patterns
  (PERMISSION_DENIED: nothing leaks);
- `require_owner`: datasets and jobs belong to the principal that made them.

With authentication off every call runs as `ANONYMOUS`, which may do
everything. Outside a call the caller is `NOBODY`, who may do nothing: code
that loses the call's context fails closed.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from fnmatch import fnmatchcase

from weightsmith_server.errors import NotFound, PermissionDenied
from weightsmith_server.naming import new_id, validate_id
from weightsmith_server.principals import SCOPES, Principal


@dataclass(frozen=True)
class Caller:
    """The principal of a call: name, scopes, model-id glob patterns.

    `authenticated` is False only for `ANONYMOUS` (authentication off).
    """

    name: str
    scopes: frozenset[str]
    model_patterns: tuple[str, ...]
    authenticated: bool = True

    @classmethod
    def of(cls, principal: Principal) -> Caller:
        return cls(principal.name, principal.scopes, principal.models)

    def has_scope(self, scope: str) -> bool:
        return not self.authenticated or scope in self.scopes

    def may_see(self, model_id: str) -> bool:
        """Whether the model id matches one of the caller's patterns."""
        return not self.authenticated or any(fnmatchcase(model_id, p) for p in self.model_patterns)

    def owns(self, owner: str) -> bool:
        """Whether a dataset or job with this owner is the caller's."""
        return not self.authenticated or (bool(self.name) and owner == self.name)

    @property
    def owner(self) -> str:
        """What a new dataset or job records as its owner ("" without authentication)."""
        return self.name if self.authenticated else ""


ANONYMOUS = Caller("", frozenset(SCOPES), ("*",), authenticated=False)
NOBODY = Caller("", frozenset(), ())

_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("weightsmith_caller", default=NOBODY)
_LISTS = {"model": "ListModels", "dataset": "ListDatasets", "job": "ListJobs"}


def current() -> Caller:
    """The caller of the RPC being served (`NOBODY` outside one)."""
    return _CALLER.get()


def bind(caller: Caller) -> contextvars.Token[Caller]:
    """Make `caller` the current one; `unbind` with the token when the call ends."""
    return _CALLER.set(caller)


def unbind(token: contextvars.Token[Caller]) -> None:
    # An async generator closed from another context: that context ends anyway.
    with contextlib.suppress(ValueError):
        _CALLER.reset(token)


def _hidden(kind: str, resource_id: str, field: str) -> NotFound:
    """The NOT_FOUND a missing resource gets (`ResourceTable.get`), word for word."""
    return NotFound(
        f"No {kind} with id {resource_id!r}; {_LISTS[kind]} shows the {kind}s on this server.",
        reason=f"{kind.upper()}_NOT_FOUND",
        field=field,
        metadata={f"{kind}_id": resource_id},
    )


def visible(model_id: str, caller: Caller | None = None) -> bool:
    """Whether the caller (the current one by default) may see a model id."""
    return (caller or current()).may_see(model_id)


def require_model(model_id: str, field: str = "model_id", caller: Caller | None = None) -> None:
    """NOT_FOUND, as for a missing model, when the id is outside the caller's patterns."""
    caller = caller or current()
    if not caller.authenticated:
        return
    validate_id(model_id, field=field, kind="model")
    if not caller.may_see(model_id):
        raise _hidden("model", model_id, field)


def require_creatable(model_id: str, field: str = "model_id", caller: Caller | None = None) -> str:
    """The id a new model gets (a fresh one for an empty id when authenticated).

    PERMISSION_DENIED when it is outside the caller's patterns: refusing to
    create reveals nothing about what exists.
    """
    caller = caller or current()
    if not caller.authenticated:
        return model_id
    model_id = validate_id(model_id, field=field, kind="model") if model_id else new_id("model")
    if not caller.may_see(model_id):
        raise PermissionDenied(
            f"Principal {caller.name!r} may not create model {model_id!r}: its model patterns are "
            f"{list(caller.model_patterns)}. Name an id matching one of them.",
            reason="MODEL_OUTSIDE_PATTERNS",
            field=field,
            metadata={"model_id": model_id, "principal": caller.name},
        )
    return model_id


def require_dataset_owner(
    dataset_id: str, owner: str, field: str = "dataset_id", caller: Caller | None = None
) -> None:
    """NOT_FOUND, as for a missing dataset, unless the caller made it."""
    if not (caller or current()).owns(owner):
        raise _hidden("dataset", dataset_id, field)


def require_job_owner(job_id: str, owner: str, field: str = "job_id", caller: Caller | None = None) -> None:
    """NOT_FOUND, as for a missing job, unless the caller made it."""
    if not (caller or current()).owns(owner):
        raise _hidden("job", job_id, field)


def author(caller: Caller | None = None) -> str | None:
    """The principal's name when authentication is on (it is every revision's author), else None."""
    caller = caller or current()
    return caller.name if caller.authenticated else None
