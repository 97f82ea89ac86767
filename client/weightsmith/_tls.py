"""How a client proves who it talks to and who it is: TLS settings and bearer tokens.

`TLS` names the certificates of a secure channel: the CA that signed the
server's certificate (system roots when None), and for mutual TLS the
client's own certificate and key. `channel_credentials` turns the client's
`tls=` or `credentials=` into gRPC channel credentials, and
`token_metadata` checks a bearer token and makes its `authorization`
metadata, refusing to send it in the clear to anything but this machine.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import TypeAlias

import grpc

PemSource: TypeAlias = "str | os.PathLike[str] | bytes"
"""PEM given as bytes, as text starting with `-----BEGIN`, or as the path of a file."""

AUTHORIZATION_METADATA_KEY = "authorization"


def read_pem(name: str, source: PemSource) -> bytes:
    """The PEM bytes of `source`: itself when bytes or PEM text, else the file it names."""
    if isinstance(source, bytes):
        pem = source
    elif isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        pem = source.encode("ascii")
    elif isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as file:
            pem = file.read()
    else:
        raise TypeError(
            f"Received an invalid `{name}`, expected PEM bytes, PEM text or a file path. "
            f"Received: {name}={source!r}"
        )
    if b"-----BEGIN" not in pem:
        raise ValueError(f"Received an invalid `{name}`, expected PEM (`-----BEGIN ...`); {source!r} is not.")
    return pem


@dataclass(frozen=True)
class TLS:
    """The certificates of a TLS channel to a weightsmith server.

    Each of `ca`, `cert` and `key` is PEM bytes, PEM text, or the path of a
    PEM file; files are read when the client is created.

    Args:
        ca: The CA bundle that signed the server's certificate; None trusts
            the system's root certificates.
        cert: The client's certificate chain, for servers that require
            client certificates (mutual TLS, `--tls-client-ca`). Needs `key`.
        key: The private key of `cert`.
        server_name: The name to check the server's certificate against,
            when it differs from the host in the target (for example,
            connecting by IP address to a certificate issued for a DNS name).

    Example:

    ```python
    import weightsmith

    tls = weightsmith.TLS(ca="ca.crt", cert="alice.crt", key="alice.key")
    with weightsmith.Client("weightsmith.example.org:50051", tls=tls, token=token) as client:
        print(client.server_info().security.principal)
    ```
    """

    ca: PemSource | None = None
    cert: PemSource | None = None
    key: PemSource | None = field(default=None, repr=False)
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError(
                "Received only one of `cert` and `key`, expected both (mutual TLS) or neither. "
                f"Received: cert={self.cert!r}, key={'<set>' if self.key is not None else None}"
            )
        if self.server_name is not None and (not isinstance(self.server_name, str) or not self.server_name):
            raise ValueError(
                f"Received an invalid `server_name`, expected a host name or None. "
                f"Received: server_name={self.server_name!r}"
            )

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials of these certificates (files are read now)."""
        return grpc.ssl_channel_credentials(
            root_certificates=None if self.ca is None else read_pem("ca", self.ca),
            private_key=None if self.key is None else read_pem("key", self.key),
            certificate_chain=None if self.cert is None else read_pem("cert", self.cert),
        )

    def channel_options(self) -> tuple[tuple[str, str], ...]:
        """The channel options these settings need: the name override, if any."""
        if self.server_name is None:
            return ()
        return (("grpc.ssl_target_name_override", self.server_name),)


def channel_security(
    tls: TLS | bool | None, credentials: grpc.ChannelCredentials | None
) -> tuple[grpc.ChannelCredentials | None, tuple[tuple[str, str], ...]]:
    """The credentials of the channel (None for plaintext) and the options `tls` needs."""
    if tls is None or tls is False:
        return credentials, ()
    if credentials is not None:
        raise ValueError(
            "Received both `tls` and `credentials`, expected one: `tls` builds the credentials "
            "that `credentials` would give."
        )
    if tls is True:
        return grpc.ssl_channel_credentials(), ()
    if not isinstance(tls, TLS):
        raise TypeError(
            f"Received an invalid `tls`, expected a `weightsmith.TLS`, True (system roots) or None. "
            f"Received: tls={tls!r}"
        )
    return tls.credentials(), tls.channel_options()


def _target_hosts(target: str) -> list[str]:
    """The hosts a gRPC target names (`host:port`, `dns:///host:port`, `ipv4:a:p,b:p`, `[::1]:p`)."""
    scheme, _, rest = target.partition(":")
    if scheme in ("dns", "ipv4", "ipv6") and rest:
        if rest.startswith("//"):
            rest = rest[2:].partition("/")[2]  # dns://authority/host:port
        addresses = rest.split(",")
    else:
        addresses = [target]
    hosts = []
    for address in addresses:
        if address.startswith("["):
            hosts.append(address[1:].partition("]")[0])
        elif address.count(":") == 1:
            hosts.append(address.partition(":")[0])
        else:
            hosts.append(address)
    return hosts


def is_local_target(target: str) -> bool:
    """Whether every host of `target` is this machine: a loopback address, `localhost`, a Unix socket."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for host in _target_hosts(target):
        name = host.lower().rstrip(".")
        if name == "localhost" or name.endswith(".localhost"):
            continue
        try:
            if not ipaddress.ip_address(name).is_loopback:
                return False
        except ValueError:
            return False
    return True


def token_metadata(
    token: str | None, *, target: str, secure: bool, insecure: bool
) -> tuple[tuple[str, str], ...]:
    """The `authorization: Bearer <token>` metadata of `token` (none without one).

    A token sent in plaintext to another machine can be read on the way, so
    that is refused unless `insecure` says the network is protected otherwise.
    """
    if token is None:
        return ()
    if not isinstance(token, str) or not token or not all("!" <= c <= "~" for c in token):
        raise ValueError(
            "Received an invalid `token`, expected a non-empty string of printable ASCII without "
            "spaces (it travels as gRPC metadata)."  # The token itself is never echoed.
        )
    if not secure and not insecure and not is_local_target(target):
        raise ValueError(
            f"Refusing to send `token` in plaintext to {target!r}, expected `tls=` (or `credentials=`) "
            "for a server on another machine; pass `insecure=True` only when the network itself is "
            "protected (for example a service mesh)."
        )
    return ((AUTHORIZATION_METADATA_KEY, f"Bearer {token}"),)
