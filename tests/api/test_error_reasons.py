"""The `ErrorReason` catalog lists exactly the `ErrorInfo.reason`s the server can send.

The server's reasons are found by reading its source: every `reason=` given to a
call, and the positional argument of helpers that take a `reason` parameter.
Reasons built at run time are expanded: `f"{self.kind.upper()}_NOT_FOUND"` in a
class with every constant `kind` its constructor is called with, and
`f"UNKNOWN_{kind.upper()}"` with every constant passed for that parameter. A
reason the scan cannot read fails the test, so that the catalog never drifts.
A reason outside the catalog that reaches `api.status` anyway is logged as an
error and still sent.
"""

from __future__ import annotations

import ast
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from google.rpc import error_details_pb2, status_pb2

from weightsmith.v1 import error_reason_pb2
from weightsmith_server.api import status
from weightsmith_server.errors import InvalidArgument

SERVER = Path(__file__).resolve().parents[2] / "server" / "weightsmith_server"


@dataclass
class _Scope:
    """Where a node sits: its module, enclosing class and function."""

    path: Path
    cls: ast.ClassDef | None = None
    function: ast.FunctionDef | ast.AsyncFunctionDef | None = None


@dataclass
class _Scan:
    reasons: dict[str, set[str]] = field(default_factory=dict)
    unresolved: list[str] = field(default_factory=list)


def _params(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    names = [a.arg for a in function.args.posonlyargs + function.args.args]
    return names[1:] if names[:1] in (["self"], ["cls"]) else names


def _callee(call: ast.Call) -> str | None:
    func = call.func.value if isinstance(call.func, ast.Subscript) else call.func  # Table[T](...)
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else None


def _walk(node: ast.AST, scope: _Scope) -> Iterator[tuple[ast.AST, _Scope]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef):
            inner = _Scope(scope.path, child, None)
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            inner = _Scope(scope.path, scope.cls, child)
        else:
            inner = scope
        yield child, inner
        yield from _walk(child, inner)


class _Source:
    """The parsed server package and the calls in it."""

    def __init__(self, root: Path) -> None:
        self.nodes = [
            pair
            for path in sorted(root.rglob("*.py"))
            for pair in _walk(ast.parse(path.read_text()), _Scope(path))
        ]
        self.calls = [(node, scope) for node, scope in self.nodes if isinstance(node, ast.Call)]
        # Helpers taking `reason` positionally, by name: the argument's index.
        self.reason_index: dict[str, int] = {}
        self.signatures: dict[str, list[str]] = {}
        for node, _ in self.nodes:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                self.signatures.setdefault(node.name, _params(node))
                if "reason" in _params(node):
                    self.reason_index[node.name] = _params(node).index("reason")
            if isinstance(node, ast.ClassDef):
                init = next(
                    (n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None
                )
                if init is not None:
                    self.signatures[node.name] = _params(init)

    def constant_arguments(self, callee: str, param: str) -> set[str] | None:
        """Every constant string passed for `param` to `callee`; None if one is not constant."""
        index = (
            self.signatures.get(callee, []).index(param) if param in self.signatures.get(callee, []) else None
        )
        values: set[str] = set()
        for call, _ in self.calls:
            if _callee(call) != callee:
                continue
            given = [k.value for k in call.keywords if k.arg == param]
            if not given and index is not None and index < len(call.args):
                given = [call.args[index]]
            for value in given:
                if not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
                    return None
                values.add(value.value)
        return values

    def _placeholder(self, value: ast.expr, scope: _Scope) -> set[str] | None:
        """Values of `{x.upper()}` in an f-string: a parameter's or a constructor argument's."""
        if not (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)):
            return None
        if value.func.attr != "upper" or value.args:
            return None
        target = value.func.value
        if (
            isinstance(target, ast.Name)
            and scope.function is not None
            and target.id in _params(scope.function)
        ):
            found = self.constant_arguments(scope.function.name, target.id)
        elif (
            isinstance(target, ast.Attribute)
            and isinstance(target.value, ast.Name)
            and target.value.id == "self"
            and scope.cls is not None
        ):
            found = self.constant_arguments(scope.cls.name, target.attr)
        else:
            return None
        return None if found is None else {v.upper() for v in found}

    def resolve(self, expr: ast.expr, scope: _Scope) -> set[str] | None:
        """The reason strings `expr` can evaluate to; None if the scan cannot tell."""
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return {expr.value}
        if isinstance(expr, ast.IfExp):
            body, orelse = self.resolve(expr.body, scope), self.resolve(expr.orelse, scope)
            return None if body is None or orelse is None else body | orelse
        if isinstance(expr, ast.JoinedStr):
            parts: list[set[str]] = []
            for part in expr.values:
                if isinstance(part, ast.Constant):
                    parts.append({str(part.value)})
                    continue
                values = (
                    self._placeholder(part.value, scope) if isinstance(part, ast.FormattedValue) else None
                )
                if values is None:
                    return None
                parts.append(values)
            return {"".join(combo) for combo in itertools.product(*parts)}
        return None

    def scan(self) -> _Scan:
        result = _Scan()
        for call, scope in self.calls:
            given = [k.value for k in call.keywords if k.arg == "reason"]
            index = self.reason_index.get(_callee(call) or "")
            if not given and index is not None and index < len(call.args):
                given = [call.args[index]]
            for expr in given:
                if _forwarded(expr, scope):
                    continue
                where = f"{scope.path.relative_to(SERVER)}:{call.lineno}"
                values = self.resolve(expr, scope)
                if values is None:
                    result.unresolved.append(f"{where}: reason={ast.unparse(expr)}")
                    continue
                for value in values:
                    result.reasons.setdefault(value, set()).add(where)
        return result


def _forwarded(expr: ast.expr, scope: _Scope) -> bool:
    """A reason passed on unchanged: a `reason` parameter, or another error's `.reason`."""
    if isinstance(expr, ast.Attribute):
        return expr.attr == "reason"
    return (
        isinstance(expr, ast.Name)
        and expr.id == "reason"
        and scope.function is not None
        and "reason" in _params(scope.function) + [a.arg for a in scope.function.args.kwonlyargs]
    )


def _scan() -> _Scan:
    return _Source(SERVER).scan()


def _catalog() -> set[str]:
    return set(error_reason_pb2.ErrorReason.keys()) - {"ERROR_REASON_UNSPECIFIED"}


def test_scan_reads_every_reason() -> None:
    unresolved = _scan().unresolved
    assert not unresolved, "reasons the scan cannot read; make them literal or teach the scan:\n" + "\n".join(
        unresolved
    )


def test_every_reason_sent_is_in_the_catalog() -> None:
    sent = _scan().reasons
    missing = sorted(set(sent) - _catalog())
    assert not missing, "add to protos/weightsmith/v1/error_reason.proto:\n" + "\n".join(
        f"{reason} (sent at {', '.join(sorted(sent[reason]))})" for reason in missing
    )


def test_every_catalog_entry_is_sent() -> None:
    unused = sorted(_catalog() - set(_scan().reasons))
    assert not unused, "the server never sends these; remove them from error_reason.proto:\n" + "\n".join(
        unused
    )


@pytest.mark.parametrize(("reason", "logged"), [("MODEL_NOT_FOUND", False), ("NOT_IN_THE_CATALOG", True)])
def test_reasons_outside_the_catalog_are_logged_and_still_sent(
    reason: str, logged: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger=status.__name__):
        sent = status.to_status(InvalidArgument("Bad.", reason=reason, field="model_id"))
    assert (reason in caplog.text) is logged
    details = dict(sent.trailing_metadata)["grpc-status-details-bin"]
    info = error_details_pb2.ErrorInfo()
    assert status_pb2.Status.FromString(details).details[0].Unpack(info)
    assert info.reason == reason
