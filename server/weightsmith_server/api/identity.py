"""Who is calling, as the server records it (a revision's author): the server's word, not the client's.

With authentication on, the author is the caller's principal and the
`weightsmith-author` metadata is ignored. Without it, the metadata names
the author (at most `MAX_AUTHOR_CHARS` characters), else the peer address;
an author starting with `job:` is refused, as only the server's own job
commits use that form.
"""

from __future__ import annotations

import grpc

from weightsmith_server import access
from weightsmith_server.errors import InvalidArgument

AUTHOR_METADATA_KEY = "weightsmith-author"
MAX_AUTHOR_CHARS = 200
RESERVED_PREFIX = "job:"


def author(context: grpc.aio.ServicerContext) -> str:
    """The principal's name; without authentication the `weightsmith-author` metadata, else the peer."""
    principal = access.author()
    if principal is not None:
        return principal
    for key, value in context.invocation_metadata() or ():
        if key == AUTHOR_METADATA_KEY and value:
            name = str(value)[:MAX_AUTHOR_CHARS]
            if name.startswith(RESERVED_PREFIX):
                raise InvalidArgument(
                    f"Authors starting with {RESERVED_PREFIX!r} are reserved for the server's jobs; "
                    f"choose another `{AUTHOR_METADATA_KEY}`.",
                    reason="AUTHOR_RESERVED",
                    field=AUTHOR_METADATA_KEY,
                )
            return name
    return context.peer() or "unknown"
