"""Who is calling, as the server records it (a revision's author)."""

from __future__ import annotations

import grpc

AUTHOR_METADATA_KEY = "weightsmith-author"


def author(context: grpc.aio.ServicerContext) -> str:
    """The `weightsmith-author` metadata, else the peer address."""
    for key, value in context.invocation_metadata() or ():
        if key == AUTHOR_METADATA_KEY and value:
            return str(value)[:200]
    return context.peer() or "unknown"
