"""Authentication and authorization over a real server: every rpc x every kind of caller.

One server with a principals file serves the module. The matrix is driven
by the service descriptors, so a new rpc without a scope or a request here
fails. Raw stubs send `authorization: Bearer <token>` metadata themselves.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from tests.conftest import ServerHandle, _start_in_thread, _stop_in_thread, tiny_config
from weightsmith import jobs
from weightsmith.v1 import (
    dataset_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    training_service_pb2,
    training_service_pb2_grpc,
    weight_service_pb2,
    weight_service_pb2_grpc,
)
from weightsmith_server.api.auth import METHOD_SCOPES

SERVICES = (
    model_service_pb2.DESCRIPTOR.services_by_name["ModelService"],
    weight_service_pb2.DESCRIPTOR.services_by_name["WeightService"],
    training_service_pb2.DESCRIPTOR.services_by_name["TrainingService"],
)
METHODS = [(s, m) for s in SERVICES for m in s.methods]
SCOPES = ("read", "edit", "train", "admin")
MINE = "team-a-missing"  # inside the patterns, not there: a call that passes the checks fails later
THEIRS = "team-b-model"  # another team's model, which exists
BAD_ID = "Not An Id"


def _principal(name: str, token: str, scopes: list[str], models: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
        "scopes": scopes,
        "models": models,
    }


class _Logs(logging.Handler):
    """Every log record of the module's server, formatted."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class Env:
    """The module's server, its principals file and tokens, and stubs."""

    def __init__(self, handle: ServerHandle, path: Path, tokens: dict[str, str], logs: _Logs) -> None:
        self.handle = handle
        self.path = path
        self.tokens = tokens
        self.logs = logs
        self.channel = grpc.insecure_channel(handle.address)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.weights = weight_service_pb2_grpc.WeightServiceStub(self.channel)
        self.training = training_service_pb2_grpc.TrainingServiceStub(self.channel)

    def stub(self, service: str) -> Any:
        return {"ModelService": self.models, "WeightService": self.weights, "TrainingService": self.training}[
            service
        ]

    def auth(self, name: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.tokens[name]}"), *extra]


def _npz(rows: int = 32) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    x = rng.normal(size=(rows, 4)).astype(np.float32)
    np.savez(buffer, x=x, y=rng.normal(size=(rows, 2)).astype(np.float32))
    return buffer.getvalue()


def _upload_dataset(env: Env, who: str, dataset_id: str) -> dataset_pb2.Dataset:
    data = _npz()
    header = training_service_pb2.UploadDatasetHeader(
        dataset_id=dataset_id,
        source=dataset_pb2.DatasetSource(format=dataset_pb2.DATASET_FORMAT_NPZ),
        size_bytes=len(data),
    )
    requests = [
        training_service_pb2.UploadDatasetRequest(header=header),
        training_service_pb2.UploadDatasetRequest(chunk=data),
    ]
    return env.training.UploadDataset(iter(requests), metadata=env.auth(who)).dataset


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("auth")
    tokens = {name: secrets.token_urlsafe(24) for name in ("alice", "bob", *SCOPES, "carol")}
    principals = [
        _principal("alice", tokens["alice"], list(SCOPES), ["team-a-*"]),
        _principal("bob", tokens["bob"], list(SCOPES), ["team-b-*"]),
        *(_principal(f"only-{s}", tokens[s], [s], ["team-a-*"]) for s in SCOPES),
    ]
    path = root / "principals.json"
    path.write_text(json.dumps({"principals": principals}))
    logs = _Logs()
    logging.getLogger().addHandler(logs)
    previous = logging.getLogger().level
    logging.getLogger().setLevel(logging.DEBUG)
    handle, thread = _start_in_thread(root / "store", auth_tokens=str(path))
    environment = Env(handle, path, tokens, logs)
    for who, model_id in (("alice", "team-a-model"), ("alice", "team-a-model-2"), ("bob", THEIRS)):
        request = model_service_pb2.CreateModelRequest(
            model_id=model_id, keras_config_json=tiny_config(), seed=0
        )
        environment.models.CreateModel(request, metadata=environment.auth(who))
    _upload_dataset(environment, "alice", "alice-data")
    try:
        yield environment
    finally:
        environment.channel.close()
        _stop_in_thread(handle, thread)
        logging.getLogger().removeHandler(logs)
        logging.getLogger().setLevel(previous)


def _error(exc: grpc.RpcError) -> tuple[grpc.StatusCode, error_details_pb2.ErrorInfo]:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None, f"{exc.code()} without details: {exc.details()}"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return exc.code(), info


# --- one request per rpc -------------------------------------------------------------


def _upload_model(model_id: str) -> Iterator[model_service_pb2.UploadModelRequest]:
    header = model_service_pb2.UploadModelHeader(model_id=model_id, size_bytes=10)
    return iter([model_service_pb2.UploadModelRequest(header=header)])


def _write_weights(model_id: str) -> Iterator[weight_service_pb2.WriteWeightsRequest]:
    header = weight_service_pb2.WriteWeightsHeader(model_id=model_id)
    return iter([weight_service_pb2.WriteWeightsRequest(header=header)])


def _upload_dataset_header(dataset_id: str) -> Iterator[training_service_pb2.UploadDatasetRequest]:
    header = training_service_pb2.UploadDatasetHeader(
        dataset_id=dataset_id,
        source=dataset_pb2.DatasetSource(format=dataset_pb2.DATASET_FORMAT_NPZ),
        size_bytes=10,
    )
    return iter([training_service_pb2.UploadDatasetRequest(header=header)])


def _job_spec(model_id: str, dataset_id: str = "alice-data", output: str = "") -> Any:
    return jobs.spec(
        model_id,
        dataset_id,
        epochs=1,
        batch_size=8,
        optimizer=jobs.adam(0.01),
        loss="mse",
        output_model_id=output,
        seed=0,
    )


_ms, _ws, _ts = model_service_pb2, weight_service_pb2, training_service_pb2
# Each rpc's request naming model `m` (a factory: streams are consumed once). A request that passes
# the auth checks must do nothing: ids that do not exist, or are invalid.
REQUESTS: dict[str, Callable[[str], Any]] = {
    "CreateModel": lambda m: _ms.CreateModelRequest(model_id=m, keras_config_json="{}"),
    "UploadModel": _upload_model,
    "GetModel": lambda m: _ms.GetModelRequest(model_id=m),
    "ListModels": lambda m: _ms.ListModelsRequest(),
    "UpdateModel": lambda m: _ms.UpdateModelRequest(model_id=m),
    "DeleteModel": lambda m: _ms.DeleteModelRequest(model_id=m),
    "ExportModel": lambda m: _ms.ExportModelRequest(model_id=m),
    "Predict": lambda m: _ms.PredictRequest(model_id=m),
    "GetServerInfo": lambda m: _ms.GetServerInfoRequest(),
    "Evaluate": lambda m: _ms.EvaluateRequest(model_id=m, dataset_id="alice-data"),
    "ReadWeights": lambda m: _ws.ReadWeightsRequest(model_id=m),
    "WriteWeights": _write_weights,
    "ListRevisions": lambda m: _ws.ListRevisionsRequest(model_id=m),
    "GetRevision": lambda m: _ws.GetRevisionRequest(model_id=m, revision=1),
    "ApplyEdits": lambda m: _ws.ApplyEditsRequest(model_id=m),
    "DiffRevisions": lambda m: _ws.DiffRevisionsRequest(model_id=m, from_revision=1, to_revision=1),
    "RevertModel": lambda m: _ws.RevertModelRequest(model_id=m, to_revision=1),
    "UploadDataset": lambda m: _upload_dataset_header(BAD_ID),
    "CreateDataset": lambda m: _ts.CreateDatasetRequest(dataset_id=BAD_ID, uri="x.npz"),
    "GetDataset": lambda m: _ts.GetDatasetRequest(dataset_id="missing"),
    "ListDatasets": lambda m: _ts.ListDatasetsRequest(),
    "DeleteDataset": lambda m: _ts.DeleteDatasetRequest(dataset_id="missing"),
    "CreateJob": lambda m: _ts.CreateJobRequest(job_id=BAD_ID, spec=_job_spec(m)),
    "GetJob": lambda m: _ts.GetJobRequest(job_id="missing"),
    "ListJobs": lambda m: _ts.ListJobsRequest(),
    "CancelJob": lambda m: _ts.CancelJobRequest(job_id="missing"),
    "WatchJob": lambda m: _ts.WatchJobRequest(job_id="missing"),
    "ListJobEvents": lambda m: _ts.ListJobEventsRequest(job_id="missing"),
}
# Rpcs that create the model they name: outside the patterns they are PERMISSION_DENIED.
CREATING = {"CreateModel", "UploadModel"}
# Rpcs whose request names no model (or only a dataset or job).
NO_MODEL = {
    "ListModels",
    "GetServerInfo",
    "UploadDataset",
    "CreateDataset",
    "GetDataset",
    "ListDatasets",
    "DeleteDataset",
    "GetJob",
    "ListJobs",
    "CancelJob",
    "WatchJob",
    "ListJobEvents",
}


def _outcome(env: Env, service: Any, method: Any, model_id: str, metadata: list[tuple[str, str]]) -> Any:
    """The call's code and ErrorInfo (None when it succeeds); a response stream is read to its end."""
    function = getattr(env.stub(service.name), method.name)
    try:
        reply = function(REQUESTS[method.name](model_id), metadata=metadata, timeout=60)
        if method.server_streaming:
            list(reply)
    except grpc.RpcError as exc:
        return _error(exc)
    return grpc.StatusCode.OK, None


def test_the_scope_table_covers_exactly_the_rpcs_of_the_contract() -> None:
    assert set(METHOD_SCOPES) == {f"/{s.full_name}/{m.name}" for s, m in METHODS}
    assert set(REQUESTS) == {m.name for _, m in METHODS}
    assert {scope for scope in METHOD_SCOPES.values() if scope} == set(SCOPES)


@pytest.mark.parametrize(("service", "method"), METHODS, ids=lambda v: v.name)
def test_every_rpc_refuses_calls_without_a_known_token(env: Env, service: Any, method: Any) -> None:
    cases = {
        "UNAUTHENTICATED": [],
        "TOKEN_UNKNOWN": [("authorization", "Bearer " + secrets.token_urlsafe(24))],
        "AUTHORIZATION_MALFORMED": [("authorization", "Basic dXNlcjpwYXNz")],
    }
    for reason, metadata in cases.items():
        code, info = _outcome(env, service, method, MINE, metadata)
        assert (code, info.reason) == (grpc.StatusCode.UNAUTHENTICATED, reason), method.name
    # A token that is right except for its author metadata is still unknown elsewhere.
    code, info = _outcome(env, service, method, MINE, [("weightsmith-author", "alice")])
    assert code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(("service", "method"), METHODS, ids=lambda v: v.name)
def test_every_rpc_needs_its_scope_and_only_it(env: Env, service: Any, method: Any) -> None:
    needed = METHOD_SCOPES[f"/{service.full_name}/{method.name}"]
    for scope in SCOPES:
        code, info = _outcome(env, service, method, MINE, env.auth(scope))
        if needed is None or scope == needed:
            assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), (
                method.name,
                scope,
                info,
            )
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, (method.name, scope)
            assert info.reason == "SCOPE_MISSING"
            assert info.metadata["scope"] == needed and info.metadata["method"] == method.name
            assert info.metadata["principal"] == f"only-{scope}"


@pytest.mark.parametrize(
    ("service", "method"), [(s, m) for s, m in METHODS if m.name not in NO_MODEL], ids=lambda v: v.name
)
def test_a_model_outside_the_patterns_is_not_found_or_not_creatable(
    env: Env, service: Any, method: Any
) -> None:
    code, info = _outcome(env, service, method, THEIRS, env.auth("alice"))
    if method.name in CREATING:
        assert (code, info.reason) == (grpc.StatusCode.PERMISSION_DENIED, "MODEL_OUTSIDE_PATTERNS")
        assert info.metadata["model_id"] == THEIRS
    else:
        assert (code, info.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"), method.name
        assert info.metadata["model_id"] == THEIRS


def test_a_hidden_model_is_reported_exactly_like_a_missing_one(env: Env) -> None:
    def details(model_id: str) -> tuple[Any, ...]:
        with pytest.raises(grpc.RpcError) as caught:
            env.models.GetModel(_ms.GetModelRequest(model_id=model_id), metadata=env.auth("alice"))
        status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
        assert status is not None
        text = status.SerializeToString().replace(model_id.encode(), b"<id>")
        return caught.value.code(), caught.value.details().replace(model_id, "<id>"), text

    hidden, missing = details(THEIRS), details("team-b-other")  # same length: same bytes
    assert hidden == missing
    assert hidden[0] == grpc.StatusCode.NOT_FOUND


def test_lists_show_only_what_the_caller_may_see_in_full_pages(env: Env) -> None:
    def ids(who: str, size: int) -> list[list[str]]:
        pages, token = [], ""
        while True:
            reply = env.models.ListModels(
                _ms.ListModelsRequest(page_size=size, page_token=token), metadata=env.auth(who)
            )
            pages.append([m.model_id for m in reply.models])
            token = reply.next_page_token
            if not token:
                return pages

    (everything,) = ids("alice", 100)
    assert len(everything) >= 2 and all(m.startswith("team-a-") for m in everything)
    paged = ids("alice", 1)
    assert all(len(page) == 1 for page in paged) and [m for page in paged for m in page] == everything
    assert ids("bob", 100) == [[THEIRS]]
    info = env.models.GetServerInfo(_ms.GetServerInfoRequest(), metadata=env.auth("alice"))
    placed = {m for device in info.devices for m in device.model_ids}
    assert "team-a-model" in placed and THEIRS not in placed


def test_datasets_and_jobs_belong_to_their_creator(env: Env) -> None:
    alice, bob = env.auth("alice"), env.auth("bob")
    dataset = env.training.GetDataset(_ts.GetDatasetRequest(dataset_id="alice-data"), metadata=alice).dataset
    assert dataset.owner == "alice"
    for call in (
        lambda: env.training.GetDataset(_ts.GetDatasetRequest(dataset_id="alice-data"), metadata=bob),
        lambda: env.training.DeleteDataset(_ts.DeleteDatasetRequest(dataset_id="alice-data"), metadata=bob),
        lambda: env.models.Evaluate(
            _ms.EvaluateRequest(model_id=THEIRS, dataset_id="alice-data", loss="mse"), metadata=bob
        ),
        lambda: env.training.CreateJob(_ts.CreateJobRequest(spec=_job_spec(THEIRS)), metadata=bob),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert _error(caught.value)[1].reason == "DATASET_NOT_FOUND"
    listed = env.training.ListDatasets(_ts.ListDatasetsRequest(), metadata=bob).datasets
    assert "alice-data" not in [d.dataset_id for d in listed]

    # A job's output model must be inside its owner's patterns.
    with pytest.raises(grpc.RpcError) as caught:
        env.training.CreateJob(
            _ts.CreateJobRequest(spec=_job_spec("team-a-model", output="team-b-out")), metadata=alice
        )
    assert _error(caught.value)[1].reason == "MODEL_OUTSIDE_PATTERNS"

    job = env.training.CreateJob(
        _ts.CreateJobRequest(job_id="alice-job", spec=_job_spec("team-a-model", output="team-a-trained")),
        metadata=alice,
    ).job
    assert job.owner == "alice"
    for call in (
        lambda: env.training.GetJob(_ts.GetJobRequest(job_id="alice-job"), metadata=bob),
        lambda: env.training.CancelJob(_ts.CancelJobRequest(job_id="alice-job"), metadata=bob),
        lambda: env.training.ListJobEvents(_ts.ListJobEventsRequest(job_id="alice-job"), metadata=bob),
        lambda: list(env.training.WatchJob(_ts.WatchJobRequest(job_id="alice-job"), metadata=bob)),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        code, info = _error(caught.value)
        assert (code, info.reason) == (grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND")
    assert "alice-job" not in [
        j.job_id for j in env.training.ListJobs(_ts.ListJobsRequest(), metadata=bob).jobs
    ]
    assert "alice-job" in [
        j.job_id for j in env.training.ListJobs(_ts.ListJobsRequest(), metadata=alice).jobs
    ]
    events = list(env.training.WatchJob(_ts.WatchJobRequest(job_id="alice-job"), metadata=alice, timeout=120))
    final = env.training.GetJob(_ts.GetJobRequest(job_id="alice-job"), metadata=alice).job
    assert events and final.state == 3, final.error  # SUCCEEDED
    revisions = env.weights.ListRevisions(_ws.ListRevisionsRequest(model_id="team-a-trained"), metadata=alice)
    assert revisions.revisions[0].author == "job:alice-job"


def test_the_author_is_the_principal_whatever_the_metadata_says(env: Env) -> None:
    metadata = env.auth("alice", ("weightsmith-author", "bob"))
    request = _ms.CreateModelRequest(model_id="team-a-authored", keras_config_json=tiny_config(), seed=1)
    env.models.CreateModel(request, metadata=metadata)
    edits = _ws.ApplyEditsRequest(model_id="team-a-authored", edits=[], message="m")
    with pytest.raises(grpc.RpcError):  # no edits: refused, but after the checks
        env.weights.ApplyEdits(edits, metadata=metadata)
    reverted = env.weights.RevertModel(
        _ws.RevertModelRequest(model_id="team-a-authored", to_revision=1), metadata=metadata
    )
    assert reverted.revision.author == "alice"
    forged = env.auth("alice", ("weightsmith-author", "job:alice-job"))
    reverted = env.weights.RevertModel(
        _ws.RevertModelRequest(model_id="team-a-authored", to_revision=1), metadata=forged
    )
    assert reverted.revision.author == "alice"
    listed = env.weights.ListRevisions(
        _ws.ListRevisionsRequest(model_id="team-a-authored"), metadata=metadata
    )
    assert {r.author for r in listed.revisions} == {"alice"}


def test_server_info_reports_the_callers_identity(env: Env) -> None:
    info = env.models.GetServerInfo(_ms.GetServerInfoRequest(), metadata=env.auth("edit")).security
    assert info.authentication and not info.tls and not info.client_certificates
    assert (info.principal, list(info.scopes), list(info.model_patterns)) == (
        "only-edit",
        ["edit"],
        ["team-a-*"],
    )


def test_health_and_reflection_stay_open(env: Env) -> None:
    health = health_pb2_grpc.HealthStub(env.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(env.channel)
    replies = list(
        reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in replies[0].list_services_response.service}
    assert "weightsmith.v1.ModelService" in names


def test_the_file_reloads_on_change_and_keeps_the_old_table_when_invalid(env: Env) -> None:
    running = env.handle.running
    original = env.path.read_text()
    carol = _principal("carol", env.tokens["carol"], ["read"], ["team-a-*"])
    document = json.loads(original)
    request = _ms.ListModelsRequest()

    def carol_can_list() -> bool:
        try:
            env.models.ListModels(request, metadata=env.auth("carol"))
        except grpc.RpcError as exc:
            assert _error(exc)[1].reason == "TOKEN_UNKNOWN"
            return False
        return True

    try:
        assert not carol_can_list()
        env.path.write_text(json.dumps({"principals": [*document["principals"], carol]}))
        deadline = time.monotonic() + 10
        while not carol_can_list():  # the watcher notices within about a second
            assert time.monotonic() < deadline, "the changed file was not reloaded"
            time.sleep(0.1)
        env.path.write_text('{"principals": [{"name": "x"}]')
        assert running.principals.reload() is False  # type: ignore[attr-defined]
        assert carol_can_list()
        assert any("keeping the" in line for line in env.logs.lines)
    finally:
        env.path.write_text(original)
        running.principals.reload()  # type: ignore[attr-defined]
    assert not carol_can_list()


def test_tokens_never_reach_the_log(env: Env) -> None:
    """Run last in the module: every call above has logged what it logs."""
    secret = secrets.token_urlsafe(24)
    for metadata in ([("authorization", f"Bearer {secret}")], [("authorization", secret)]):
        with pytest.raises(grpc.RpcError):
            env.models.GetModel(_ms.GetModelRequest(model_id=MINE), metadata=metadata)
    text = "\n".join(env.logs.lines)
    assert "UNAUTHENTICATED" in text  # the refusals are logged, without the credentials
    for token in [secret, *env.tokens.values()]:
        assert token not in text
        assert hashlib.sha256(token.encode()).hexdigest() not in text


def test_without_auth_a_job_author_is_refused_and_everyone_is_anonymous(server: ServerHandle) -> None:
    with grpc.insecure_channel(server.address) as channel:
        models = model_service_pb2_grpc.ModelServiceStub(channel)
        request = _ms.CreateModelRequest(model_id="forged-job-author", keras_config_json=tiny_config())
        with pytest.raises(grpc.RpcError) as caught:
            models.CreateModel(request, metadata=[("weightsmith-author", "job:job1")])
        code, info = _error(caught.value)
        assert (code, info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "AUTHOR_RESERVED")
        with pytest.raises(grpc.RpcError):
            models.GetModel(_ms.GetModelRequest(model_id="forged-job-author"))
        long_author = "x" * 5000
        models.CreateModel(request, metadata=[("weightsmith-author", long_author)])
        weights = weight_service_pb2_grpc.WeightServiceStub(channel)
        revisions = weights.ListRevisions(_ws.ListRevisionsRequest(model_id="forged-job-author")).revisions
        assert revisions[0].author == "x" * 200
        security = models.GetServerInfo(_ms.GetServerInfoRequest()).security
        assert not security.authentication and security.principal == ""
        assert sorted(security.scopes) == sorted(SCOPES) and list(security.model_patterns) == ["*"]


def test_sighup_reloads_the_file_of_a_running_server(tmp_path: Path) -> None:
    """The watcher cannot see this change (same size, inode and mtime): only SIGHUP reloads it."""
    import os
    import signal

    from tests.conftest import spawn_server

    old, new = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    path = tmp_path / "principals.json"
    path.write_text(json.dumps({"principals": [_principal("dora", old, ["read"], ["*"])]}))
    before = os.stat(path)
    spawned = spawn_server(tmp_path / "store", "--auth-tokens", str(path))
    try:
        with grpc.insecure_channel(spawned.address) as channel:
            models = model_service_pb2_grpc.ModelServiceStub(channel)

            def works(token: str) -> bool:
                try:
                    models.ListModels(
                        _ms.ListModelsRequest(), metadata=[("authorization", f"Bearer {token}")]
                    )
                except grpc.RpcError as exc:
                    assert _error(exc)[1].reason == "TOKEN_UNKNOWN"
                    return False
                return True

            assert works(old) and not works(new)
            with open(path, "r+") as handle:  # same inode, same size
                handle.write(
                    path.read_text().replace(
                        _principal("", old, [], [])["token_sha256"],
                        _principal("", new, [], [])["token_sha256"],
                    )
                )
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
            time.sleep(1.5)  # the watcher looked, and saw nothing
            assert works(old) and not works(new)
            spawned.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while not works(new):
                assert time.monotonic() < deadline, "SIGHUP did not reload the principals file"
                time.sleep(0.1)
            assert not works(old)
    finally:
        spawned.process.terminate()
        spawned.process.wait(30)
    log = spawned.log()
    assert "reloaded 1 principal(s)" in log and "TOKEN_UNKNOWN" in log
    for token in (old, new):
        assert token not in log and hashlib.sha256(token.encode()).hexdigest() not in log


def test_concurrent_callers_never_see_each_others_identity(env: Env) -> None:
    """Each call has its own caller, even while many interleave on the server's event loop."""
    from concurrent.futures import ThreadPoolExecutor

    def listed(who: str) -> tuple[str, set[str], str]:
        reply = env.models.ListModels(_ms.ListModelsRequest(), metadata=env.auth(who))
        info = env.models.GetServerInfo(_ms.GetServerInfoRequest(), metadata=env.auth(who))
        return who, {m.model_id.split("-")[1] for m in reply.models}, info.security.principal

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(listed, ["alice", "bob"] * 20))
    for who, teams, principal in results:
        assert teams == {"a" if who == "alice" else "b"} and principal == who
