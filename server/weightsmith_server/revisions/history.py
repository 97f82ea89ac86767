"""Reading history: pages of revisions, newest first, and single revisions."""

from __future__ import annotations

from weightsmith_server.errors import InvalidArgument
from weightsmith_server.models.host import ModelHost
from weightsmith_server.paging import decode_number_token, encode_page_token, page_size
from weightsmith_server.revisions.record import RevisionRecord


def require_revision_number(value: int, field: str) -> None:
    """INVALID_ARGUMENT unless `value` can be a revision number (from 1)."""
    if value < 1:
        raise InvalidArgument(
            f"Received {field}={value}, expected a revision number of at least 1.",
            reason="INVALID_REVISION",
            field=field,
        )


def list_revisions(host: ModelHost, model_id: str, size: int, token: str) -> tuple[list[RevisionRecord], str]:
    """One page of a model's retained revisions, newest first, and the next page's token."""
    host.revision(model_id, 0)
    size = page_size(size)
    numbers = sorted(host.store.revision_numbers(model_id), reverse=True)
    if token:
        before = decode_number_token(token)
        numbers = [n for n in numbers if n < before]
    page = numbers[:size]
    next_token = encode_page_token(str(page[-1])) if len(numbers) > size else ""
    return [host.store.read_revision(model_id, n) for n in page], next_token


def get_revision(host: ModelHost, model_id: str, revision: int) -> RevisionRecord:
    """One retained revision's record."""
    host.revision(model_id, 0)
    require_revision_number(revision, "revision")
    number, _ = host.revision(model_id, revision)
    return host.store.read_revision(model_id, number)
