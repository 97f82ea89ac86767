"""A client's checked settings and the gRPC channel options they make.

Both clients take the same options; `ClientSettings` checks them once and
derives what every call needs: the deadline of each kind of call, the
`weightsmith-author` and `authorization` metadata, the channel's credentials
(plaintext, TLS or mutual TLS) and its options (message size limits, the
retry policy of read-only methods, keepalive).
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from collections.abc import Sequence
from typing import Any, TypeAlias

import grpc

from weightsmith import _checks
from weightsmith._rpcs import RETRIED_METHODS, Rpc
from weightsmith._tls import TLS, channel_security, token_metadata

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_UPLOAD_CHUNK_BYTES = 1024 * 1024
AUTHOR_METADATA_KEY = "weightsmith-author"

SERVICE_CONFIG: dict[str, Any] = {
    "methodConfig": [
        {
            "name": [{"service": service, "method": method} for service, method in RETRIED_METHODS],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}

# Pings detect dead connections under long, quiet streams. A grpc server by
# default answers pings closer than 5 minutes apart with strikes and then a
# GOAWAY ("too_many_pings"), so the client never pings more often than that.
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
)

# Room for the fields around a `bytes` payload in one message.
MESSAGE_OVERHEAD_BYTES = 1024

ChannelOptions: TypeAlias = Sequence[tuple[str, Any]]


def default_author() -> str:
    """Return `user@host` for the `weightsmith-author` header."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # No login name, e.g. an arbitrary container uid.
        user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    author = f"{user}@{socket.gethostname()}"
    # grpc metadata values must be printable ASCII.
    return "".join(c if " " <= c <= "~" else "?" for c in author)


def _check_author(author: str) -> str:
    if not isinstance(author, str) or not author or not all(" " <= c <= "~" for c in author):
        raise ValueError(
            f"Received an invalid `author`, expected a non-empty string of printable ASCII "
            f"characters (it travels as gRPC metadata). Received: author={author!r}"
        )
    return author


class ClientSettings:
    """The checked options of one client; see `AsyncClient` for their meaning."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None,
        stream_timeout: float | None,
        author: str | None,
        max_message_bytes: int,
        credentials: grpc.ChannelCredentials | None,
        options: ChannelOptions,
        token: str | None = None,
        tls: TLS | bool | None = None,
        insecure: bool = False,
    ) -> None:
        if not isinstance(target, str) or not target:
            raise ValueError(
                f"Received an invalid `target`, expected an address such as "
                f"'127.0.0.1:50051' or 'dns:///weightsmith:50051'. Received: target={target!r}"
            )
        self.target = target
        self.timeout = _checks.timeout("timeout", timeout)
        self.stream_timeout = _checks.timeout("stream_timeout", stream_timeout)
        self.author = default_author() if author is None else _check_author(author)
        self.credentials, tls_options = channel_security(tls, credentials)
        self.metadata: tuple[tuple[str, str], ...] = (
            (AUTHOR_METADATA_KEY, self.author),
            *token_metadata(token, target=target, secure=self.credentials is not None, insecure=insecure),
        )
        self.max_message_bytes = _checks.integer(
            "max_message_bytes", max_message_bytes, 4 * MESSAGE_OVERHEAD_BYTES + 1
        )
        self.channel_options = self._channel_options((*tls_options, *options))

    def _channel_options(self, options: ChannelOptions) -> list[tuple[str, Any]]:
        merged: dict[str, Any] = {
            "grpc.max_send_message_length": self.max_message_bytes,
            "grpc.max_receive_message_length": self.max_message_bytes,
            "grpc.enable_retries": 1,
            "grpc.service_config": json.dumps(SERVICE_CONFIG),
            **dict(KEEPALIVE_OPTIONS),
        }
        # The caller's options win over ours.
        for key, value in options:
            merged[key] = value
        return list(merged.items())

    def deadline(self, rpc: Rpc) -> float | None:
        """The deadline of a call: `stream_timeout` when either side streams, else `timeout`."""
        return self.stream_timeout if rpc.streams else self.timeout

    def upload_chunk_size(self, chunk_size_bytes: int) -> int:
        """Check an upload's bytes per message against the channel's message limit."""
        return _checks.integer(
            "chunk_size_bytes", chunk_size_bytes, 1, self.max_message_bytes - MESSAGE_OVERHEAD_BYTES
        )
