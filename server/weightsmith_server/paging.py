"""AIP-158 pagination: page sizes, opaque page tokens and one page of a sorted listing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

from weightsmith_server.errors import InvalidArgument

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_size(value: int) -> int:
    """Apply the AIP page size rules: 0 means the default, large values are capped."""
    if value < 0:
        raise InvalidArgument(
            f"Received a negative page_size, expected 0 to {MAX_PAGE_SIZE}. Received: {value}",
            reason="INVALID_PAGE_SIZE",
            field="page_size",
        )
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


# A token is `ws1.` + base64url(the key and a checksum of it): a token this
# server did not make (garbage, truncated, edited) is INVALID_ARGUMENT, never
# an empty page.
_TOKEN_PREFIX = "ws1."
_CHECK_BYTES = 4


def _checksum(value: bytes) -> bytes:
    return hashlib.blake2b(value, digest_size=_CHECK_BYTES, person=b"ws-page").digest()


def encode_page_token(value: str) -> str:
    """An opaque page token for the last item of a page."""
    raw = value.encode()
    return _TOKEN_PREFIX + base64.urlsafe_b64encode(raw + _checksum(raw)).decode().rstrip("=")


def _invalid_token(field: str) -> InvalidArgument:
    return InvalidArgument(
        "Received an invalid page token; pass `next_page_token` from the previous page unchanged.",
        reason="INVALID_PAGE_TOKEN",
        field=field,
    )


def decode_page_token(token: str, field: str = "page_token") -> str:
    """The item a page token stands for; INVALID_ARGUMENT for a token we did not make."""
    body = token.removeprefix(_TOKEN_PREFIX)
    if body == token or not re.fullmatch(r"[A-Za-z0-9_-]+", body):
        raise _invalid_token(field)
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        value, check = raw[:-_CHECK_BYTES], raw[-_CHECK_BYTES:]
        if len(raw) <= _CHECK_BYTES or not hmac.compare_digest(check, _checksum(value)):
            raise _invalid_token(field)
        return value.decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise _invalid_token(field) from exc


def decode_number_token(token: str, field: str = "page_token") -> int:
    """A page token that stands for a number (a revision, a sequence number)."""
    value = decode_page_token(token, field)
    if not (value.isascii() and value.isdigit()):
        raise _invalid_token(field)
    return int(value)


def page_after(
    items: Sequence[T], key: Callable[[T], str], size: int, token: str, *, descending: bool = False
) -> tuple[list[T], str]:
    """One page of `items`, sorted by `key` (descending if so), after the item the token names.

    `key` gives each item's unique, stable sort key, which the token carries;
    the item a token names may be gone since, the page still starts right
    after where it stood. Returns the page and the next page's token ("" after
    the last page).
    """
    size = page_size(size)
    remaining = list(items)
    if token:
        after = decode_page_token(token)
        remaining = [i for i in remaining if (key(i) < after if descending else key(i) > after)]
    page = remaining[:size]
    return page, encode_page_token(key(page[-1])) if len(remaining) > size else ""
