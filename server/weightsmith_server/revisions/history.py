"""Reading history: pages of revisions, newest first, and single revisions."""

from __future__ import annotations

import json

from weightsmith_server.errors import InvalidArgument
from weightsmith_server.models.host import ModelHost
from weightsmith_server.paging import decode_number_token, encode_page_token, page_size
from weightsmith_server.revisions.record import RevisionRecord

# The most a page of revisions may hold: below the smallest --max-message-mb (5).
PAGE_BYTES = 4 * 1024 * 1024


def require_revision_number(value: int, field: str) -> None:
    """INVALID_ARGUMENT unless `value` can be a revision number (from 1)."""
    if value < 1:
        raise InvalidArgument(
            f"Received {field}={value}, expected a revision number of at least 1.",
            reason="INVALID_REVISION",
            field=field,
        )


def list_revisions(host: ModelHost, model_id: str, size: int, token: str) -> tuple[list[RevisionRecord], str]:
    """One page of a model's retained revisions, newest first, and the next page's token.

    A page also ends before its records would pass PAGE_BYTES, so that it
    always fits in a reply whatever the records hold.
    """
    host.revision(model_id, 0)
    size = page_size(size)
    numbers = sorted(host.store.revision_numbers(model_id), reverse=True)
    if token:
        before = decode_number_token(token)
        numbers = [n for n in numbers if n < before]
    page: list[RevisionRecord] = []
    held = 0
    for number in numbers[:size]:
        record = host.store.read_revision(model_id, number)
        held += record_bytes(record)
        if page and held > PAGE_BYTES:
            break
        page.append(record)
    more = len(numbers) > len(page)
    return page, encode_page_token(str(page[-1].revision)) if more and page else ""


def record_bytes(record: RevisionRecord) -> int:
    """About what a record takes in a reply (its JSON form, a little more than its protobuf)."""
    return len(json.dumps(record.to_dict()).encode())


def get_revision(host: ModelHost, model_id: str, revision: int) -> RevisionRecord:
    """One retained revision's record."""
    host.revision(model_id, 0)
    require_revision_number(revision, "revision")
    number, _ = host.revision(model_id, revision)
    return host.store.read_revision(model_id, number)
