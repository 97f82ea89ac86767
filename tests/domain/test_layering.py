"""The architecture as the tree shows it: domain packages never reach up into the wire layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[2] / "server" / "weightsmith_server"
CLIENT = SERVER.parents[1] / "client" / "weightsmith"

# The wire layer: only `api/` (and `app`, which wires it) may import these.
FORBIDDEN_IN_DOMAIN = (
    "grpc",
    "grpc_status",
    "grpc_health",
    "grpc_reflection",
    "google.protobuf",
    "google.rpc",
    "weightsmith.v1",
    "weightsmith_server.api",
    "weightsmith_server.app",
)
DOMAIN_MODULES = sorted(
    p for p in SERVER.rglob("*.py") if p.relative_to(SERVER).parts[0] not in ("api", "app.py", "__main__.py")
)


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("path", DOMAIN_MODULES, ids=lambda p: str(p.relative_to(SERVER)))
def test_domain_module_imports_no_wire_layer(path: Path) -> None:
    offending = sorted({n for n in _imports(path) if _matches(n, FORBIDDEN_IN_DOMAIN)})
    assert not offending, f"{path.relative_to(SERVER)} imports {offending}; only api/ may"


@pytest.mark.parametrize("path", sorted(CLIENT.rglob("*.py")), ids=lambda p: str(p.relative_to(CLIENT)))
def test_client_module_imports_no_tensorflow_or_server(path: Path) -> None:
    offending = sorted(
        {n for n in _imports(path) if _matches(n, ("tensorflow", "keras", "weightsmith_server"))}
    )
    assert not offending, f"{path.relative_to(CLIENT)} imports {offending}"


def test_the_domain_is_not_empty() -> None:
    names = {str(p.relative_to(SERVER)) for p in DOMAIN_MODULES}
    assert {"models/host.py", "revisions/commit.py", "operations/models.py", "store.py"} <= names


@pytest.mark.parametrize(
    "path",
    sorted(
        [
            *SERVER.rglob("*.py"),
            *(p for p in CLIENT.glob("*.py") if p.name not in ("client.py", "_async_client.py")),
        ]
    ),
    ids=lambda p: p.name,
)
def test_no_hand_written_module_over_600_lines(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= 600, f"{path} has {lines} lines; split it by concept"


def test_exactly_one_place_constructs_revision_records() -> None:
    """Only `RevisionDraft.record` calls `RevisionRecord(...)` (reading one back uses `from_dict`)."""
    calls = []
    for path in SERVER.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                if name == "RevisionRecord":
                    calls.append(f"{path.relative_to(SERVER)}:{node.lineno}")
    assert len(calls) == 1 and calls[0].startswith("revisions/record.py"), calls
