"""Resource ids: what a valid id is, and fresh ones."""

from __future__ import annotations

import re
import secrets

from weightsmith_server.errors import InvalidArgument

ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def validate_id(value: str, *, field: str, kind: str = "model") -> str:
    """Return `value` if it is a valid id, else raise `InvalidArgument` on `field`."""
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            f"Received an invalid {kind} id, expected 1 to 63 characters matching "
            f"`[a-z0-9][a-z0-9-]{{0,62}}` (lower case letters, digits and '-'). "
            f"Received: {value!r}",
            reason="INVALID_ID",
            field=field,
        )
    return value


def new_id(prefix: str) -> str:
    """Return a fresh random id such as `model-3f9a1c2b7d`."""
    return f"{prefix}-{secrets.token_hex(5)}"
