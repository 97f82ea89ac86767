"""The client's `token=`, `tls=` and `insecure=` options, without a server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

import weightsmith
from weightsmith import _channel, _tls

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def _settings(target: str = "127.0.0.1:1", **overrides: Any) -> _channel.ClientSettings:
    kwargs: dict[str, Any] = {
        "timeout": 60.0,
        "stream_timeout": None,
        "author": "tester@host",
        "max_message_bytes": _channel.DEFAULT_MAX_MESSAGE_BYTES,
        "credentials": None,
        "options": (),
    }
    kwargs.update(overrides)
    return _channel.ClientSettings(target, **kwargs)


def test_token_travels_as_bearer_metadata_after_the_author() -> None:
    settings = _settings(token="s3cret-token")
    assert settings.metadata == (
        ("weightsmith-author", "tester@host"),
        ("authorization", "Bearer s3cret-token"),
    )
    assert _settings().metadata == (("weightsmith-author", "tester@host"),)


@pytest.mark.parametrize("token", ["", "has space", "tab\t", "naïve", "line\nbreak"])
def test_invalid_tokens_are_refused_without_echoing_them(token: str) -> None:
    with pytest.raises(ValueError, match="invalid `token`") as caught:
        _settings(token=token)
    assert token not in str(caught.value) or not token


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1:50051",
        "127.0.0.2:1",
        "localhost:50051",
        "LOCALHOST.:1",
        "[::1]:50051",
        "dns:///localhost:50051",
        "dns://8.8.8.8/localhost:50051",
        "ipv4:127.0.0.1:1,127.0.0.1:2",
        "ipv6:[::1]:1",
        "unix:/tmp/weightsmith.sock",
        "unix-abstract:weightsmith",
    ],
)
def test_local_targets_may_receive_a_token_in_plaintext(target: str) -> None:
    assert _tls.is_local_target(target)
    assert _settings(target, token="t").metadata[-1] == ("authorization", "Bearer t")


@pytest.mark.parametrize(
    "target",
    [
        "10.0.0.5:50051",
        "weightsmith:50051",
        "dns:///weightsmith.prod:50051",
        "[2001:db8::1]:1",
        "ipv4:127.0.0.1:1,10.0.0.1:1",
    ],
)
def test_a_token_in_plaintext_to_another_machine_is_refused(target: str) -> None:
    assert not _tls.is_local_target(target)
    with pytest.raises(ValueError, match="Refusing to send `token` in plaintext") as caught:
        _settings(target, token="s3cret")
    assert "s3cret" not in str(caught.value)
    # Allowed when the caller says the network protects it, or over TLS.
    assert _settings(target, token="s3cret", insecure=True).credentials is None
    assert _settings(target, token="s3cret", tls=True).credentials is not None
    assert (
        _settings(target, token="s3cret", credentials=grpc.ssl_channel_credentials()).credentials is not None
    )


def test_tls_true_uses_system_roots_and_plaintext_is_the_default() -> None:
    assert _settings().credentials is None
    assert _settings(tls=False).credentials is None
    assert isinstance(_settings(tls=True).credentials, grpc.ChannelCredentials)


def test_tls_and_credentials_are_exclusive_and_tls_is_typed() -> None:
    with pytest.raises(ValueError, match="both `tls` and `credentials`"):
        _settings(tls=True, credentials=grpc.ssl_channel_credentials())
    with pytest.raises(TypeError, match="invalid `tls`"):
        _settings(tls="ca.crt")


def test_tls_reads_pem_from_bytes_text_and_files(tmp_path: Path) -> None:
    path = tmp_path / "ca.crt"
    path.write_bytes(PEM)
    assert _tls.read_pem("ca", PEM) == PEM
    assert _tls.read_pem("ca", PEM.decode()) == PEM
    assert _tls.read_pem("ca", path) == PEM
    assert _tls.read_pem("ca", str(path)) == PEM
    with pytest.raises(FileNotFoundError):
        _tls.read_pem("ca", tmp_path / "missing.crt")
    (tmp_path / "junk").write_bytes(b"not a certificate")
    with pytest.raises(ValueError, match="expected PEM"):
        _tls.read_pem("ca", tmp_path / "junk")
    with pytest.raises(TypeError, match="invalid `cert`"):
        _tls.read_pem("cert", 42)  # type: ignore[arg-type]


def test_tls_needs_cert_and_key_together_and_hides_the_key() -> None:
    with pytest.raises(ValueError, match="only one of `cert` and `key`"):
        weightsmith.TLS(cert=PEM)
    with pytest.raises(ValueError, match="only one of `cert` and `key`"):
        weightsmith.TLS(key=b"-----BEGIN PRIVATE KEY-----")
    tls = weightsmith.TLS(ca=PEM, cert=PEM, key=b"-----BEGIN PRIVATE KEY-----secret")
    assert "secret" not in repr(tls)
    with pytest.raises(ValueError, match="invalid `server_name`"):
        weightsmith.TLS(server_name="")


def test_server_name_overrides_the_checked_host() -> None:
    settings = _settings(tls=weightsmith.TLS(ca=PEM, server_name="weightsmith.internal"))
    assert ("grpc.ssl_target_name_override", "weightsmith.internal") in settings.channel_options
    # The caller's own options still win.
    settings = _settings(
        tls=weightsmith.TLS(ca=PEM, server_name="a"), options=[("grpc.ssl_target_name_override", "b")]
    )
    assert dict(settings.channel_options)["grpc.ssl_target_name_override"] == "b"


def test_both_clients_take_the_options(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_bytes(PEM)
    with weightsmith.Client("localhost:1", token="t", tls=weightsmith.TLS(ca=ca)) as client:
        assert client.target == "localhost:1"
    client = weightsmith.AsyncClient("10.1.2.3:1", token="t", tls=True)
    assert client.target == "10.1.2.3:1"
    with pytest.raises(ValueError, match="Refusing"):
        weightsmith.AsyncClient("10.1.2.3:1", token="t")
    with pytest.raises(ValueError, match="Refusing"):
        weightsmith.Client("10.1.2.3:1", token="t")
