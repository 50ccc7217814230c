"""Query parameters of the history pages: RFC 3339 times and opaque cursors.

A cursor is base64url of ``v1|<occurred_at>|<entry_id>``: the keyset position of
the last row sent, so the next page starts right after it even when rows
arrive meanwhile. Clients must treat it as opaque; the API checks its shape
and refuses anything else with a 400 naming ``cursor``.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime

from posflow.security.problems import Problem, bad_parameter

__all__ = ["decode_cursor", "encode_cursor", "parse_time"]

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")


def parse_time(name: str, value: str | None) -> datetime | None:
    """An RFC 3339 timestamp with its offset (``Z`` or ``+hh:mm``), else a 400 naming it."""
    if value is None:
        return None
    if not _RFC3339.match(value):
        raise bad_parameter(
            "query",
            name,
            f"{value!r} is not an RFC 3339 timestamp with a timezone "
            "(example: 2026-11-05T14:30:00Z)",
        )
    text = value.upper().replace("Z", "+00:00")
    # Python keeps microseconds; nanosecond digits beyond them are dropped.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise bad_parameter("query", name, f"{value!r} is not a valid time: {exc}") from None


def encode_cursor(occurred_at: datetime, entry_id: int) -> str:
    raw = f"v1|{occurred_at.isoformat()}|{entry_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(value: str) -> tuple[datetime, int]:
    def bad() -> Problem:
        return bad_parameter(
            "query", "cursor", "not a cursor this API issued (pass next_cursor back unchanged)"
        )

    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        version, when, entry = raw.split("|")
        if version != "v1":
            raise bad()
        at = datetime.fromisoformat(when)
        entry_id = int(entry)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad() from None
    if at.tzinfo is None or entry_id < 0:
        raise bad()
    return at, entry_id
