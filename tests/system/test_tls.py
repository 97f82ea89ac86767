"""TLS and mutual TLS end to end, with certificates made in the test; certificates reload in place.

Every certificate comes from `tests.tls_support`: a CA, a server certificate
for localhost and 127.0.0.1, client certificates whose subject alternative
name is a SPIFFE URI. The servers run in process on loopback ports.
"""

from __future__ import annotations

import logging
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import weightsmith
from tests.conftest import REPO, ServerHandle, _start_in_thread, _stop_in_thread, tiny_config
from tests.tls_support import CertificateAuthority, Issued, common_name
from weightsmith import edits, jobs
from weightsmith.v1 import job_pb2
from weightsmith_server.api.tls import CertificateFiles, certificate_files
from weightsmith_server.config import Config

TIMEOUT = 30.0  # generous: the suite shares few cores; refusals still fail at once


@dataclass
class TlsServer:
    """A running TLS server, the CA that signed its certificate, and its certificate files."""

    handle: ServerHandle
    ca: CertificateAuthority
    cert_path: Path
    key_path: Path

    @property
    def port(self) -> int:
        return int(self.handle.address.rpartition(":")[2])


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


def _serve(
    folder: Path, ca: CertificateAuthority, *, client_ca: Path | None = None, **overrides: object
) -> tuple[TlsServer, threading.Thread]:
    # The layout of a Kubernetes TLS secret: tls.crt, tls.key and ca.crt in one folder.
    cert_path, key_path = ca.server("first").write(folder / "tls", "tls")
    ca.write(folder / "tls")
    extra = {"tls_client_ca": str(client_ca)} if client_ca is not None else {}
    handle, thread = _start_in_thread(
        folder / "store", tls_cert=str(cert_path), tls_key=str(key_path), **extra, **overrides
    )
    return TlsServer(handle, ca, cert_path, key_path), thread


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority) -> Iterator[TlsServer]:
    running, thread = _serve(tmp_path_factory.mktemp("tls"), ca)
    yield running
    _stop_in_thread(running.handle, thread)


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority) -> Iterator[TlsServer]:
    folder = tmp_path_factory.mktemp("mtls")
    running, thread = _serve(folder, ca, client_ca=folder / "tls" / "ca.crt")
    yield running
    _stop_in_thread(running.handle, thread)


def _exercise_whole_client(client: weightsmith.Client, model_id: str, *, mutual: bool) -> None:
    """Every kind of call once: create, weights both ways, an edit, predict, revisions, a dataset, a job."""
    rng = np.random.default_rng(0)
    security = client.server_info().security
    assert (security.tls, security.client_certificates, security.authentication) == (True, mutual, False)
    created = client.create_model(model_id, keras_config=tiny_config(), seed=3)
    assert created.revision == 1
    weights = client.read_weights(model_id)
    assert set(weights) == {"hidden/kernel", "hidden/bias", "logits/kernel", "logits/bias"}
    written = client.write_weights(
        model_id, {"logits/bias": np.array([1.5, -2.0], np.float32)}, message="over TLS"
    )
    assert written.revision == 2
    np.testing.assert_array_equal(client.read_weights(model_id, "logits/bias")["logits/bias"], [1.5, -2.0])
    edited = client.apply_edits(model_id, [edits.scale("hidden/kernel", 0.5)], message="halve")
    assert edited.revision.revision == 3
    np.testing.assert_array_equal(
        client.read_weights(model_id, "hidden/kernel")["hidden/kernel"], weights["hidden/kernel"] * 0.5
    )
    predicted = client.predict(model_id, np.ones((2, 4), np.float32))
    assert next(iter(predicted.outputs.values())).shape == (2, 2) and predicted.revision == 3
    assert [r.revision for r in client.list_revisions(model_id).revisions] == [3, 2, 1]
    assert client.get_revision(model_id, 2).message == "over TLS"

    dataset_id = f"{model_id}-data"
    x = rng.normal(size=(16, 4)).astype(np.float32)
    dataset = client.upload_dataset({"x": x, "y": rng.integers(0, 2, 16)}, dataset_id)
    assert dataset.example_count == 16
    spec = jobs.spec(
        model_id,
        dataset_id,
        epochs=1,
        batch_size=8,
        optimizer=jobs.sgd(0.01),
        loss="sparse_categorical_crossentropy",
    )
    job = client.create_job(spec)
    events = list(client.watch_job(job.job_id))
    states = [e.state_changed.state for e in events if e.HasField("state_changed")]
    assert states[-1] == job_pb2.JOB_STATE_SUCCEEDED
    assert [e.result.revision for e in events if e.HasField("result")] == [4]
    finished = client.get_job(job.job_id)
    assert finished.state == job_pb2.JOB_STATE_SUCCEEDED and finished.result_revision == 4
    assert client.get_model(model_id).revision == 4


def test_the_whole_client_works_over_tls(tls_server: TlsServer, tmp_path: Path) -> None:
    tls = weightsmith.TLS(ca=tls_server.ca.pem)
    with weightsmith.Client(tls_server.handle.address, tls=tls, author="tls-tests") as client:
        _exercise_whole_client(client, "over-tls", mutual=False)
    # The CA as a file, and by DNS name: the certificate names both localhost and 127.0.0.1.
    ca_file = tls_server.ca.write(tmp_path)
    with weightsmith.Client(f"localhost:{tls_server.port}", tls=weightsmith.TLS(ca=ca_file)) as client:
        assert client.get_model("over-tls").revision == 4


def test_the_asyncio_client_works_over_tls(tls_server: TlsServer) -> None:
    import asyncio

    async def run() -> tuple[int, list[str]]:
        tls = weightsmith.TLS(ca=tls_server.ca.pem)
        async with weightsmith.AsyncClient(tls_server.handle.address, tls=tls) as client:
            model = await client.create_model("async-over-tls", keras_config=tiny_config(), seed=1)
            weights = await client.read_weights("async-over-tls", "logits/*")
            return model.revision, sorted(weights)

    assert asyncio.run(run()) == (1, ["logits/bias", "logits/kernel"])


def _assert_refused(address: str, tls: weightsmith.TLS | None) -> None:
    """A call over this channel never reaches the server: UNAVAILABLE (not retried, so at once)."""
    options = [("grpc.enable_retries", 0)]
    with (
        weightsmith.Client(address, tls=tls, timeout=TIMEOUT, options=options) as client,
        pytest.raises(weightsmith.UnavailableError),
    ):
        client.list_models()


def test_plaintext_and_untrusting_clients_cannot_reach_a_tls_server(tls_server: TlsServer) -> None:
    address = tls_server.handle.address
    _assert_refused(address, None)  # plaintext
    # A CA that did not sign the server's certificate.
    _assert_refused(address, weightsmith.TLS(ca=CertificateAuthority("another CA").pem))
    # The right CA, but a name the certificate does not carry.
    _assert_refused(address, weightsmith.TLS(ca=tls_server.ca.pem, server_name="not-weightsmith.example.org"))


def _client_tls(ca: CertificateAuthority, issued: Issued | None) -> weightsmith.TLS:
    if issued is None:
        return weightsmith.TLS(ca=ca.pem)
    return weightsmith.TLS(ca=ca.pem, cert=issued.cert, key=issued.key)


def test_the_whole_client_works_over_mutual_tls(mtls_server: TlsServer, tmp_path: Path) -> None:
    alice = mtls_server.ca.client("spiffe://example.org/alice")
    cert, key = alice.write(tmp_path, "alice")
    tls = weightsmith.TLS(ca=mtls_server.ca.pem, cert=cert, key=key)
    with weightsmith.Client(mtls_server.handle.address, tls=tls, author="mtls-tests") as client:
        _exercise_whole_client(client, "over-mtls", mutual=True)
        assert client.get_revision("over-mtls", 2).author == "mtls-tests"


def test_mutual_tls_refuses_clients_without_a_certificate_it_trusts(mtls_server: TlsServer) -> None:
    address = mtls_server.handle.address
    stranger = CertificateAuthority("stranger CA").client("spiffe://example.org/mallory", "mallory")
    for issued in (None, stranger):
        _assert_refused(address, _client_tls(mtls_server.ca, issued))
    with weightsmith.Client(
        address, tls=_client_tls(mtls_server.ca, mtls_server.ca.client()), timeout=TIMEOUT
    ) as client:
        client.list_models()


def _served_common_name(port: int) -> str:
    return common_name(ssl.get_server_certificate(("127.0.0.1", port), timeout=TIMEOUT).encode())


def _replace(path: Path, data: bytes) -> None:
    """Swap a file's content in one step, as `kubectl` and cert-manager do."""
    staging = path.with_suffix(".new")
    staging.write_bytes(data)
    os.replace(staging, path)


def test_a_replaced_certificate_serves_new_connections_without_a_restart(
    tmp_path: Path, ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    running, thread = _serve(tmp_path, ca)
    try:
        assert _served_common_name(running.port) == "first"
        with weightsmith.Client(running.handle.address, tls=_client_tls(ca, None)) as before:
            before.create_model("kept", keras_config=tiny_config(), seed=0)

            # A rotation to a certificate from a new CA: only the new certificate satisfies a client
            # that trusts only the new CA, so that client connecting proves what is served.
            rotated_ca = CertificateAuthority("rotated CA")
            second = rotated_ca.server("second")
            _replace(running.key_path, second.key)
            _replace(running.cert_path, second.cert)
            assert _served_common_name(running.port) == "second"
            with weightsmith.Client(running.handle.address, tls=_client_tls(rotated_ca, None)) as after:
                assert after.get_model("kept").revision == 1
            # The connection opened before the rotation keeps working.
            assert before.get_model("kept").revision == 1

            # A broken pair (a key that is not the certificate's) is refused: the last good one stays.
            third = rotated_ca.server("third")
            caplog.set_level(logging.ERROR, logger="weightsmith_server.tls")
            _replace(running.cert_path, third.cert)
            for _ in range(3):
                assert _served_common_name(running.port) == "second"
            refusals = [r for r in caplog.records if "keeping the previous TLS certificate" in r.getMessage()]
            assert len(refusals) == 1, "a broken pair is logged once, not at every connection"
            _replace(running.key_path, third.key)
            assert _served_common_name(running.port) == "third"
    finally:
        _stop_in_thread(running.handle, thread)


def test_certificate_files_reload_only_on_change_and_keep_the_last_good_pair(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    first, second = ca.server("first"), ca.server("second")
    cert, key = first.write(tmp_path, "server")
    client_ca = ca.write(tmp_path)
    files = CertificateFiles(cert, key, client_ca)
    assert files.client_ca == client_ca and files.current.client_ca == ca.pem
    assert files.reload() is None and files.fetch() is None  # unchanged: gRPC keeps its configuration

    _replace(cert, second.cert)  # half-way through a rotation: the key is still the old one
    assert files.reload() is None and files.current.cert == first.cert
    _replace(key, second.key)
    reloaded = files.reload()
    assert reloaded is not None and reloaded.cert == second.cert and reloaded.key == second.key
    assert files.current is reloaded and files.reload() is None

    key.unlink()  # a missing file: keep serving, pick it up when it is back
    assert files.reload() is None and files.current is reloaded
    _replace(key, second.key)
    assert files.reload() is not None  # back, with a new inode

    third = ca.server("third")  # overwritten in place, as through a file bind mount (same inodes)
    cert.write_bytes(third.cert)
    key.write_bytes(third.key)
    overwritten = files.reload()
    assert overwritten is not None and overwritten.cert == third.cert

    _replace(client_ca, b"not a CA")
    assert files.reload() is None and files.current.client_ca == ca.pem


def test_unusable_files_stop_the_start_with_their_names(tmp_path: Path, ca: CertificateAuthority) -> None:
    first, second = ca.server("first"), ca.server("second")
    cert, _ = first.write(tmp_path, "server")
    _, key = second.write(tmp_path, "other")
    with pytest.raises(ValueError, match=r"unusable TLS files .*server\.crt"):
        CertificateFiles(cert, key)
    with pytest.raises(FileNotFoundError):
        CertificateFiles(tmp_path / "missing.crt", key)
    # An encrypted key is refused rather than prompting for its passphrase.
    from cryptography.hazmat.primitives import serialization

    encrypted = serialization.load_pem_private_key(second.key, None).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    second_cert, second_key = second.write(tmp_path, "second")
    second_key.write_bytes(encrypted)
    with pytest.raises(ValueError, match="the private key is encrypted"):
        CertificateFiles(second_cert, second_key)
    # The server's start-up says which file and why, without a traceback.
    with pytest.raises(SystemExit, match=r"cannot start: unusable TLS files .*server\.crt"):
        certificate_files(Config(tls_cert=str(cert), tls_key=str(key)))
    with pytest.raises(SystemExit, match=r"missing-ca\.crt"):
        certificate_files(
            Config(
                tls_cert=str(cert),
                tls_key=str(tmp_path / "server.key"),
                tls_client_ca=str(tmp_path / "missing-ca.crt"),
            )
        )
    assert certificate_files(Config()) is None


def _probe(server: TlsServer, **settings: str) -> subprocess.CompletedProcess[str]:
    """Run the container health probe (deploy/healthcheck.py) with the server's settings as variables."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSMITH_")}
    environ["WEIGHTSMITH_ADDRESS"] = f"0.0.0.0:{server.port}"
    environ["WEIGHTSMITH_PROBE_TIMEOUT"] = str(TIMEOUT)
    environ.update(settings)
    command = [sys.executable, str(REPO / "deploy" / "healthcheck.py")]
    return subprocess.run(command, env=environ, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_the_container_health_probe_speaks_the_servers_tls(
    request: pytest.FixtureRequest, mutual: bool
) -> None:
    server: TlsServer = request.getfixturevalue("mtls_server" if mutual else "tls_server")
    settings = {"WEIGHTSMITH_TLS_CERT": str(server.cert_path), "WEIGHTSMITH_TLS_KEY": str(server.key_path)}
    if mutual:
        settings["WEIGHTSMITH_TLS_CLIENT_CA"] = str(server.cert_path.parent / "ca.crt")
    passed = _probe(server, **settings)
    assert passed.returncode == 0, passed.stderr
    # Plaintext (the native Kubernetes gRPC probe's way) cannot reach it.
    assert _probe(server).returncode == 1
    stranger = server.cert_path.parent.parent / "stranger-ca.crt"
    stranger.write_bytes(CertificateAuthority("stranger CA").pem)
    refused = _probe(server, **settings, WEIGHTSMITH_PROBE_CA=str(stranger))
    assert refused.returncode == 1 and "health check failed" in refused.stderr


def test_mutual_tls_matches_principals_by_certificate_and_records_them_as_authors(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    import hashlib
    import json

    token = "carol-token-0123456789"
    principals = {
        "principals": [
            {
                "name": "alice",
                "cert_san": "spiffe://example.org/alice",
                "scopes": ["read", "edit", "admin"],
                "models": ["*"],
            },
            {
                "name": "reader",
                "cert_san": "spiffe://example.org/reader",
                "scopes": ["read"],
                "models": ["*"],
            },
            {
                "name": "carol",
                "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
                "scopes": ["read"],
                "models": ["*"],
            },
        ]
    }
    principals_path = tmp_path / "principals.json"
    principals_path.write_text(json.dumps(principals))
    running, thread = _serve(
        tmp_path, ca, client_ca=tmp_path / "tls" / "ca.crt", auth_tokens=str(principals_path)
    )
    address = running.handle.address
    try:
        alice = _client_tls(ca, ca.client("spiffe://example.org/alice"))
        # The certificate is the identity: the author metadata cannot override it.
        with weightsmith.Client(address, tls=alice, author="mallory@forged") as client:
            client.create_model("by-cert", keras_config=tiny_config(), seed=0)
            written = client.write_weights("by-cert", {"logits/bias": np.ones(2, np.float32)}, message="m")
            assert written.author == "alice"
            assert [r.author for r in client.list_revisions("by-cert").revisions] == ["alice", "alice"]
            assert client.server_info().security.principal == "alice"
        # Another certificate of the same CA: its own principal, with its own scopes.
        reader = _client_tls(ca, ca.client("spiffe://example.org/reader", "reader"))
        with weightsmith.Client(address, tls=reader) as client:
            assert client.get_model("by-cert").revision == 2
            with pytest.raises(weightsmith.PermissionDeniedError):
                client.write_weights("by-cert", {"logits/bias": np.zeros(2, np.float32)})
        # A certificate the CA signed whose SAN names no principal, without a token: UNAUTHENTICATED.
        stranger = _client_tls(ca, ca.client("spiffe://example.org/nobody", "nobody"))
        with (
            weightsmith.Client(address, tls=stranger) as client,
            pytest.raises(weightsmith.UnauthenticatedError),
        ):
            client.list_models()
        # ... with a token, the token's principal.
        with weightsmith.Client(address, tls=stranger, token=token) as client:
            assert client.server_info().security.principal == "carol"
    finally:
        _stop_in_thread(running.handle, thread)


def test_deployment_files_name_real_settings_and_probe_over_tls() -> None:
    """Every `WEIGHTSMITH_*` name in deploy/ and docker-compose.yml is a server flag or a probe setting,
    and every health check runs the TLS-aware probe the images ship."""
    import dataclasses
    import re

    probe = (REPO / "deploy" / "healthcheck.py").read_text()
    known = {f"WEIGHTSMITH_{f.name.upper()}" for f in dataclasses.fields(Config)}
    known |= set(re.findall(r"WEIGHTSMITH_PROBE_[A-Z_]+", probe))
    known |= {"WEIGHTSMITH_SERVICE_HOST", "WEIGHTSMITH_PORT"}  # Kubernetes' service links, named to turn off
    files = [
        REPO / "docker-compose.yml",
        *sorted((REPO / "deploy").rglob("*")),
        REPO / "deploy" / "README.md",
    ]
    texts = {path: path.read_text() for path in files if path.is_file() and path.suffix != ".py"}
    for path, text in texts.items():
        unknown = set(re.findall(r"WEIGHTSMITH_[A-Z_]*[A-Z]", text)) - known
        assert not unknown, f"{path.name} names unknown settings {sorted(unknown)}"
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = texts[REPO / "deploy" / name]
        assert "COPY deploy/healthcheck.py /opt/weightsmith/healthcheck.py" in text
        assert "HEALTHCHECK" in text and 'CMD ["python", "/opt/weightsmith/healthcheck.py"]' in text
    for name in ("statefulset.yaml", "statefulset-gpu.yaml"):
        text = texts[REPO / "deploy" / "kubernetes" / name]
        assert "grpc:\n" not in text, "Kubernetes' native gRPC probe cannot speak TLS"
        assert text.count('command: ["python", "/opt/weightsmith/healthcheck.py"]') == 3
        assert "secretName: weightsmith-tls" in text and "secretName: weightsmith-auth" in text
        assert "subPath" not in text.replace("never subPath", "").replace("subPath mounts", "")
    compose = texts[REPO / "docker-compose.yml"]
    assert 'test: ["CMD", "python", "/opt/weightsmith/healthcheck.py"]' in compose
    for variable in ("WEIGHTSMITH_AUTH_TOKENS", "WEIGHTSMITH_TLS_CERT", "WEIGHTSMITH_TLS_KEY"):
        assert f"{variable}: /run/secrets/" in compose
