"""Time as the store writes it: RFC 3339 strings in UTC."""

from __future__ import annotations

import datetime as dt


def utc_now() -> str:
    """The current time as an RFC 3339 string, as stored in the JSON files."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
