"""The principals file, the caller checks and the safe defaults, without a server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from weightsmith_server import access
from weightsmith_server.config import Config
from weightsmith_server.errors import InvalidArgument, NotFound, PermissionDenied
from weightsmith_server.principals import (
    PrincipalsError,
    PrincipalTable,
    is_loopback,
    parse_principals,
    principals_for,
)

TOKEN = "s3cret-token-value-0123456789"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _write(path: Path, principals: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"principals": principals}))
    return path


ALICE = {"name": "alice", "token_sha256": _hash(TOKEN), "scopes": ["read", "edit"], "models": ["team-a-*"]}
SVC = {"name": "svc", "cert_san": "spiffe://example.org/svc", "scopes": ["train"], "models": ["*"]}


def test_a_valid_file_gives_principals_matched_by_token_or_san(tmp_path: Path) -> None:
    table = PrincipalTable(_write(tmp_path / "p.json", [ALICE, SVC]))
    alice = table.by_token(TOKEN)
    assert alice is not None and alice.name == "alice"
    assert alice.scopes == frozenset({"read", "edit"}) and alice.models == ("team-a-*",)
    assert table.by_token(TOKEN + "x") is None
    assert table.by_token("") is None
    svc = table.by_san(["DNS:other", "spiffe://example.org/svc"])
    assert svc is not None and svc.name == "svc"
    assert table.by_san(["spiffe://example.org/other"]) is None
    assert TOKEN not in repr(alice) and _hash(TOKEN) not in repr(alice)


def test_upper_case_hashes_are_accepted(tmp_path: Path) -> None:
    table = PrincipalTable(_write(tmp_path / "p.json", [ALICE | {"token_sha256": _hash(TOKEN).upper()}]))
    assert table.by_token(TOKEN) is not None


@pytest.mark.parametrize(
    ("document", "complaint"),
    [
        ("not json", "not JSON"),
        ("[]", "expected {"),
        (json.dumps({"principals": [ALICE | {"token_sha256": TOKEN}]}), "64 hexadecimal"),
        (json.dumps({"principals": [ALICE | {"scopes": ["root"]}]}), "unknown scopes"),
        (json.dumps({"principals": [{"name": "x", "scopes": ["read"]}]}), "needs `token_sha256`"),
        (json.dumps({"principals": [ALICE, ALICE | {"token_sha256": "0" * 64}]}), "duplicate names"),
        (json.dumps({"principals": [ALICE, ALICE | {"name": "bob"}]}), "share a token"),
        (json.dumps({"principals": [SVC, SVC | {"name": "svc2"}]}), "share a `cert_san`"),
        (json.dumps({"principals": [ALICE | {"name": "job:1"}]}), "reserved"),
        (json.dumps({"principals": [ALICE | {"name": ""}]}), "name"),
        (json.dumps({"principals": [ALICE | {"models": "team-a-*"}]}), "list of non-empty strings"),
        (json.dumps({"principals": [ALICE | {"token": TOKEN}]}), "unknown keys"),
    ],
)
def test_invalid_files_are_refused_with_the_reason_and_no_secret(document: str, complaint: str) -> None:
    with pytest.raises(PrincipalsError, match="principals file") as caught:
        parse_principals(document, Path("p.json"))
    assert complaint in str(caught.value)
    assert TOKEN not in str(caught.value) and _hash(TOKEN) not in str(caught.value)


def test_an_invalid_file_on_reload_keeps_the_previous_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write(tmp_path / "p.json", [ALICE])
    table = PrincipalTable(path)
    assert table.reload_if_changed() is False  # unchanged: not read again
    path.write_text("{broken")
    with caplog.at_level(logging.ERROR):
        assert table.reload_if_changed() is False
    assert table.by_token(TOKEN) is not None
    assert "keeping the 1 principal(s)" in caplog.text
    _write(path, [ALICE | {"name": "alice2"}, SVC])
    assert table.reload() is True
    principal = table.by_token(TOKEN)
    assert principal is not None and principal.name == "alice2"


def test_the_watcher_reloads_a_changed_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.json", [ALICE])
    table = PrincipalTable(path)
    table.watch(interval=0.05)
    try:
        _write(path, [SVC])
        for _ in range(200):
            if table.by_token(TOKEN) is None:
                break
            time.sleep(0.02)
        assert table.by_token(TOKEN) is None and table.by_san(["spiffe://example.org/svc"]) is not None
    finally:
        table.close()


def test_a_missing_file_at_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PrincipalsError, match="unreadable"):
        PrincipalTable(tmp_path / "absent.json")


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.10:1", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("unix:/tmp/weightsmith.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("10.1.2.3:50051", False),
        ("weightsmith.example.org:50051", False),
    ],
)
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_a_non_loopback_bind_without_auth_needs_insecure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(SystemExit, match=r"refuses to listen on 0\.0\.0\.0:50051 without authentication"):
        principals_for(Config(address="0.0.0.0:50051"))
    with caplog.at_level(logging.WARNING):
        assert principals_for(Config(address="0.0.0.0:50051", insecure=True)) is None
    assert "INSECURE" in caplog.text
    assert principals_for(Config(address="127.0.0.1:0")) is None
    table = principals_for(Config(address="[::]:0", auth_tokens=str(_write(tmp_path / "p.json", [ALICE]))))
    assert table is not None and table.by_token(TOKEN) is not None
    with pytest.raises(SystemExit, match="cannot start: principals file"):
        principals_for(Config(address="127.0.0.1:0", auth_tokens=str(tmp_path / "absent.json")))


def test_create_server_refuses_an_exposed_address_before_binding(tmp_path: Path) -> None:
    from weightsmith_server.app import create_server

    with pytest.raises(SystemExit, match="without authentication"):
        asyncio.run(create_server(Config(address="0.0.0.0:0", store=tmp_path / "store")))
    assert not (tmp_path / "store").exists()


def test_the_caller_checks() -> None:
    caller = access.Caller("alice", frozenset({"read"}), ("team-a-*", "shared"))
    assert caller.may_see("team-a-x") and caller.may_see("shared") and not caller.may_see("team-b-x")
    assert not caller.may_see("Team-a-x")  # case-sensitive globs
    assert caller.owns("alice") and not caller.owns("bob") and not caller.owns("")
    assert caller.has_scope("read") and not caller.has_scope("edit")
    access.require_model("team-a-x", caller=caller)
    with pytest.raises(NotFound) as caught:
        access.require_model("team-b-x", "spec.model_id", caller)
    assert (caught.value.reason, caught.value.violations[0][0]) == ("MODEL_NOT_FOUND", "spec.model_id")
    with pytest.raises(InvalidArgument):
        access.require_model("Not An Id", caller=caller)
    assert access.require_creatable("team-a-new", caller=caller) == "team-a-new"
    with pytest.raises(PermissionDenied) as denied:
        access.require_creatable("team-b-new", caller=caller)
    assert denied.value.reason == "MODEL_OUTSIDE_PATTERNS"
    with pytest.raises(PermissionDenied):
        access.require_creatable("", caller=caller)  # a fresh `model-...` id is outside the patterns
    with pytest.raises(NotFound, match="No job with id 'j'"):
        access.require_job_owner("j", "bob", caller=caller)
    with pytest.raises(NotFound, match="No dataset with id 'd'"):
        access.require_dataset_owner("d", "bob", caller=caller)
    assert access.author(caller) == "alice" and caller.owner == "alice"


def test_anonymous_may_do_everything_and_nobody_nothing() -> None:
    anonymous = access.ANONYMOUS
    assert anonymous.may_see("anything") and anonymous.owns("bob") and anonymous.owns("")
    assert all(anonymous.has_scope(s) for s in ("read", "edit", "train", "admin"))
    assert access.require_creatable("", caller=anonymous) == ""  # the host picks the id
    assert access.author(anonymous) is None and anonymous.owner == ""
    # Outside a call (a worker thread that lost the call's context) the caller is NOBODY.
    assert access.current() is access.NOBODY
    with pytest.raises(NotFound):
        access.require_model("any-model")
    assert not access.NOBODY.owns("") and not access.NOBODY.has_scope("read")


def test_bind_and_unbind_scope_the_caller() -> None:
    caller = access.Caller("alice", frozenset(), ("*",))
    token = access.bind(caller)
    try:
        assert access.current() is caller
    finally:
        access.unbind(token)
    assert access.current() is access.NOBODY


def test_no_token_appears_in_a_file_error_even_pasted_raw(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"principals": [ALICE | {"token_sha256": TOKEN * 3}]}))
    with pytest.raises(PrincipalsError) as caught:
        PrincipalTable(path)
    assert TOKEN not in str(caught.value)
    os.chmod(path, 0o000)
    try:
        if os.geteuid() != 0:  # root reads it anyway
            with pytest.raises(PrincipalsError, match="unreadable"):
                PrincipalTable(path)
    finally:
        os.chmod(path, 0o600)


def test_owners_survive_a_restart_and_older_records_have_none() -> None:
    """`job.json` and `dataset.json` keep the owner; records written before owners existed load as ""."""
    from tests.jobs_support import full_training_spec
    from weightsmith_server.datasets.records import DatasetFormat, DatasetInfo, DatasetSource, StoredDataset
    from weightsmith_server.jobs.record import JobRecord, JobState
    from weightsmith_server.tensor_spec import TensorSpecInfo

    record = JobRecord("j", full_training_spec(), JobState.QUEUED, "2026-01-01T00:00:00Z", owner="alice")
    raw = json.loads(json.dumps(record.to_dict()))
    assert JobRecord.from_dict(raw).owner == "alice"
    assert JobRecord.from_dict({k: v for k, v in raw.items() if k != "owner"}).owner == ""

    spec = TensorSpecInfo("x", "float32", (4,))
    info = DatasetInfo(
        "d", DatasetFormat.NPZ, 1, 0, spec, spec, 0, [], 10, "2026-01-01T00:00:00Z", owner="bob"
    )
    stored = json.loads(json.dumps(StoredDataset(info, DatasetSource(DatasetFormat.NPZ)).to_json()))
    assert StoredDataset.from_json(stored).info.owner == "bob"
    del stored["dataset"]["owner"]
    assert StoredDataset.from_json(stored).info.owner == ""
