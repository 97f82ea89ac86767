"""The principals file (`--auth-tokens`): who may call, with which scopes, on which models.

The file is JSON::

    {"principals": [
        {"name": "alice", "token_sha256": "<64 hex>", "scopes": ["read", "edit"], "models": ["team-a-*"]},
        {"name": "svc", "cert_san": "spiffe://example.org/svc", "scopes": ["train"], "models": ["*"]}
    ]}

A principal is matched by a bearer token (its SHA-256 is stored, never the
token), by a client certificate's subject alternative name, or either.
Tokens are compared in constant time and neither tokens nor hashes are ever
logged. `PrincipalTable` holds the current table and reloads it from the
file: an invalid file at start-up is an error, an invalid file on reload
is logged and the previous table kept.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith_server.config import Config

log = logging.getLogger(__name__)

SCOPES = ("read", "edit", "train", "admin")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_MAX_NAME = 200
_FIELDS = frozenset({"name", "token_sha256", "cert_san", "scopes", "models"})


class PrincipalsError(ValueError):
    """The principals file is missing, unreadable or invalid; the message says where."""


@dataclass(frozen=True)
class Principal:
    """One caller the server knows: its name, credentials, scopes and model-id glob patterns."""

    name: str
    token_digest: bytes | None
    cert_san: str
    scopes: frozenset[str]
    models: tuple[str, ...]

    def __repr__(self) -> str:  # never show the digest
        return f"Principal(name={self.name!r}, scopes={sorted(self.scopes)}, models={list(self.models)})"


def token_digest(token: str) -> bytes:
    """The SHA-256 of a bearer token, as the principals file stores it (in hex)."""
    return hashlib.sha256(token.encode()).digest()


def _fail(path: Path, where: str, problem: str) -> PrincipalsError:
    return PrincipalsError(f"principals file {path}: {where}: {problem}")


def _strings(raw: Any, path: Path, where: str) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(v, str) and v for v in raw):
        raise _fail(path, where, "expected a list of non-empty strings")
    return list(raw)


def _principal(raw: Any, index: int, path: Path) -> Principal:
    where = f"principals[{index}]"
    if not isinstance(raw, dict):
        raise _fail(path, where, "expected an object")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise _fail(path, where, f"unknown keys {unknown}; expected some of {sorted(_FIELDS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME or not name.isprintable():
        raise _fail(path, f"{where}.name", f"expected 1 to {_MAX_NAME} printable characters")
    if name.startswith("job:"):
        raise _fail(path, f"{where}.name", "names starting with `job:` are reserved for the server's jobs")
    where = f"principal {name!r}"
    token_hex = raw.get("token_sha256", "")
    if not isinstance(token_hex, str) or (token_hex and not _HEX64.fullmatch(token_hex)):
        # The value is not echoed: it may be a token pasted by mistake.
        raise _fail(path, f"{where}.token_sha256", "expected 64 hexadecimal digits (the token's SHA-256)")
    cert_san = raw.get("cert_san", "")
    if not isinstance(cert_san, str):
        raise _fail(path, f"{where}.cert_san", "expected a string")
    if not token_hex and not cert_san:
        raise _fail(path, where, "needs `token_sha256`, `cert_san` or both")
    scopes = _strings(raw.get("scopes", []), path, f"{where}.scopes")
    wrong = sorted(set(scopes) - set(SCOPES))
    if wrong:
        raise _fail(path, f"{where}.scopes", f"unknown scopes {wrong}; expected some of {list(SCOPES)}")
    models = _strings(raw.get("models", []), path, f"{where}.models")
    return Principal(
        name=name,
        token_digest=bytes.fromhex(token_hex) if token_hex else None,
        cert_san=cert_san,
        scopes=frozenset(scopes),
        models=tuple(models),
    )


def parse_principals(text: str, path: Path) -> tuple[Principal, ...]:
    """The principals of a file's text; PrincipalsError names what is wrong and where."""
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise _fail(path, "not JSON", str(exc)) from None
    if not isinstance(document, dict) or not isinstance(document.get("principals"), list):
        raise _fail(path, "top level", 'expected {"principals": [...]}')
    principals = tuple(_principal(raw, i, path) for i, raw in enumerate(document["principals"]))
    names = [p.name for p in principals]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise _fail(path, "principals", f"duplicate names {duplicates}")
    digests = [p.token_digest for p in principals if p.token_digest is not None]
    if len(set(digests)) != len(digests):
        raise _fail(path, "principals", "two principals share a token")
    sans = [p.cert_san for p in principals if p.cert_san]
    if len(set(sans)) != len(sans):
        raise _fail(path, "principals", "two principals share a `cert_san`")
    return principals


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


class PrincipalTable:
    """The principals in force, loaded from a file and reloaded when it changes.

    Lookups never touch the disk: `reload` (SIGHUP) and the watcher thread
    (`watch`, which polls the file's mtime, size and inode) swap in a new
    table atomically.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._signature = _signature(self.path)
        self._principals = self._read()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        log.info("loaded %d principal(s) from %s", len(self._principals), self.path)

    def _read(self) -> tuple[Principal, ...]:
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise _fail(self.path, "unreadable", exc.strerror or type(exc).__name__) from None
        return parse_principals(text, self.path)

    @property
    def principals(self) -> tuple[Principal, ...]:
        return self._principals

    def reload(self) -> bool:
        """Read the file again; on any problem log it and keep the current table. True if replaced."""
        with self._lock:
            self._signature = _signature(self.path)
            try:
                principals = self._read()
            except PrincipalsError as exc:
                log.error("%s; keeping the %d principal(s) loaded before", exc, len(self._principals))
                return False
            self._principals = principals
        log.info("reloaded %d principal(s) from %s", len(principals), self.path)
        return True

    def reload_if_changed(self) -> bool:
        """Reload when the file's mtime, size or inode changed since the last read."""
        if _signature(self.path) == self._signature:
            return False
        return self.reload()

    def watch(self, interval: float = 1.0) -> None:
        """Start a daemon thread that reloads the file when it changes (checked every `interval` s)."""

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.reload_if_changed()
                except Exception:  # never let the watcher die
                    log.exception("watching %s failed", self.path)

        self._watcher = threading.Thread(target=run, name="weightsmith-principals", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        """Stop the watcher thread."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(5)

    def by_token(self, token: str) -> Principal | None:
        """The principal whose token hash matches, compared in constant time against every hash."""
        digest = token_digest(token)
        found = None
        for principal in self._principals:
            if principal.token_digest is not None and hmac.compare_digest(digest, principal.token_digest):
                found = principal
        return found

    def by_san(self, sans: Iterable[str]) -> Principal | None:
        """The principal whose `cert_san` is one of a client certificate's subject alternative names."""
        presented = set(sans)
        for principal in self._principals:
            if principal.cert_san and principal.cert_san in presented:
                return principal
        return None


def is_loopback(address: str) -> bool:
    """Whether a listen address (`host:port`) only accepts connections from this machine.

    `localhost`, 127.0.0.0/8, `::1` and Unix sockets are; `0.0.0.0`, `[::]`
    and every other name or address are not.
    """
    if address.startswith("unix:"):
        return True
    host = address.rpartition(":")[0].strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def principals_for(config: Config) -> PrincipalTable | None:
    """The principals table of `--auth-tokens` (None without one), after the safe-default check.

    Raises:
        SystemExit: the principals file is invalid, or the address is not
            loopback while authentication is off and `--insecure` is not given.
    """
    if config.auth_tokens:
        try:
            return PrincipalTable(config.auth_tokens)
        except PrincipalsError as exc:
            raise SystemExit(f"weightsmith-server cannot start: {exc}") from None
    if is_loopback(config.address):
        return None
    if not config.insecure:
        raise SystemExit(
            f"weightsmith-server refuses to listen on {config.address} without authentication: anyone "
            "who can reach the port could read, change and delete every model. Pass --auth-tokens FILE "
            "(README, Security), bind a loopback address, or pass --insecure to accept the risk."
        )
    log.warning(
        "INSECURE: listening on %s without authentication (--insecure); anyone who can reach the port "
        "can read, change and delete every model",
        config.address,
    )
    return None
