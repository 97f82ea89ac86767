"""The server's listening port: plaintext, TLS, or mutual TLS, with certificates that reload.

With `--tls-cert` and `--tls-key` the port speaks TLS only; `--tls-client-ca`
also requires every client to present a certificate that CA signed (mTLS).
gRPC asks `CertificateFiles.fetch` for a new configuration before each new
connection's handshake: when any of the files changed on disk (their inode,
size or modification time), the pair is read again and checked, and new
connections get it; calls on existing connections are untouched. A new pair
that fails the check (a key that does not match, a half-written file) is
logged once and the previous one stays in use, so rotating certificates
never needs a restart and never takes the server down.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from weightsmith_server.config import Config

log = logging.getLogger("weightsmith_server.tls")

_Signature = tuple[tuple[int, int, int], ...]


def _no_passphrase() -> bytes:
    raise ValueError("the private key is encrypted; gRPC needs an unencrypted PEM key")


@dataclass(frozen=True)
class CertificatePair:
    """The PEM bytes one configuration is made of, read from disk together."""

    cert: bytes
    key: bytes
    client_ca: bytes | None

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """The gRPC certificate configuration of this pair (and client CA)."""
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert)], self.client_ca)


class CertificateFiles:
    """The certificate, key and optional client-CA files of a TLS server, watched for changes.

    `fetch` runs on gRPC's own threads, once per new connection; it only
    stats the files unless they changed.
    """

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.paths = tuple(p for p in (cert, key, client_ca) if p is not None)
        self._lock = threading.Lock()
        self._signature: _Signature | None = self._stat()
        self.current = self._load()

    @property
    def client_ca(self) -> Path | None:
        """The client CA bundle's path; None without mTLS."""
        return self.paths[2] if len(self.paths) == 3 else None

    def _stat(self) -> _Signature:
        stats = [os.stat(p) for p in self.paths]
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def _load(self) -> CertificatePair:
        """Read and check the files; raise `ValueError` naming the problem when they are unusable."""
        cert, key = (p.read_bytes() for p in self.paths[:2])
        client_ca = self.paths[2].read_bytes() if self.client_ca is not None else None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            # Checks that both parse and that the key is the certificate's (never prompting for a
            # passphrase: gRPC cannot use an encrypted key).
            context.load_cert_chain(self.paths[0], self.paths[1], password=_no_passphrase)
            if client_ca is not None:
                context.load_verify_locations(cadata=client_ca.decode("ascii", errors="replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(f"unusable TLS files {', '.join(map(str, self.paths))}: {exc}") from exc
        return CertificatePair(cert, key, client_ca)

    def reload(self) -> CertificatePair | None:
        """The new pair when the files changed and check out; None when unchanged or unusable."""
        with self._lock:
            signature = self._stat_or_empty()
            if signature == self._signature:
                return None
            # Seen: a broken state is logged once and retried when the files change again.
            self._signature = signature
            try:
                pair = self._load()
            except (OSError, ValueError) as exc:
                log.error("keeping the previous TLS certificate: %s", exc)
                return None
            if self._stat_or_empty() != signature:
                self._signature = None  # Written while we read: read again on the next connection.
                return None
            self.current = pair
            log.info("TLS certificate reloaded from %s", self.paths[0])
            return pair

    def _stat_or_empty(self) -> _Signature:
        try:
            return self._stat()
        except OSError:
            return ()

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration when the files changed, else None (keep the current)."""
        pair = self.reload()
        return None if pair is None else pair.configuration()


def certificate_files(config: Config) -> CertificateFiles | None:
    """The watched TLS files of `config`; None for a plaintext server.

    Raises:
        SystemExit: a file is missing or unreadable, or the pair does not check out.
    """
    if not config.tls_cert:
        return None
    client_ca = Path(config.tls_client_ca) if config.tls_client_ca else None
    try:
        return CertificateFiles(Path(config.tls_cert), Path(config.tls_key), client_ca)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"weightsmith-server cannot start: {exc}") from None


def server_credentials(files: CertificateFiles) -> grpc.ServerCredentials:
    """Credentials that reload `files` and, with a client CA, require client certificates."""
    return grpc.dynamic_ssl_server_credentials(
        files.current.configuration(),
        files.fetch,
        require_client_authentication=files.client_ca is not None,
    )


def bind(server: grpc.aio.Server, config: Config) -> int:
    """Open `config.address` on `server`, with TLS when configured; return the bound port."""
    files = certificate_files(config)
    if files is None:
        return server.add_insecure_port(config.address)
    mode = "mutual TLS" if files.client_ca is not None else "TLS"
    log.info("%s with certificate %s (reloaded when it changes)", mode, files.paths[0])
    return server.add_secure_port(config.address, server_credentials(files))
