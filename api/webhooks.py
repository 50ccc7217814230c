"""Webhook endpoints per merchant: add, list, remove, replay (the CLI's store).

An endpoint is a URL of one merchant. Its signing secret is generated here,
shown once, and stored only as a merchant secret (``posflow.security.keys
put_secret``, purpose ``webhook.<endpoint id>``): AES-256-GCM under the
merchant's key, so revoking the merchant key makes it unreadable and stops the
deliveries. ``webhook_cursors`` holds how far delivery got; the deliverer
(:mod:`api.delivery`) sends the merchant's cash-flow events in seq order.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import psycopg

from posflow.errors import PosflowError
from posflow.security.audit import record
from posflow.security.keys import KeyProvider, put_secret
from posflow.security.tls import is_loopback

__all__ = [
    "Endpoint",
    "add_endpoint",
    "list_endpoints",
    "remove_endpoint",
    "replay",
    "secret_purpose",
    "validate_url",
]

Conn = psycopg.Connection[Any]
CHANNEL = "posflow_cashflow"  # the deliverer LISTENs here too: a replay wakes it


@dataclass(frozen=True)
class Endpoint:
    endpoint_id: str
    merchant_id: str
    url: str
    created_at: datetime
    created_by: str
    state: str
    delivered_seq: int
    attempts: int
    failing_since: datetime | None
    next_attempt_at: datetime
    last_error: str | None
    dead_at: datetime | None


_SELECT = """
SELECT w.endpoint_id, w.merchant_id, w.url, w.created_at, w.created_by, c.state,
       c.delivered_seq, c.attempts, c.failing_since, c.next_attempt_at, c.last_error, c.dead_at
  FROM merchant_webhooks w JOIN webhook_cursors c USING (endpoint_id)
"""


def secret_purpose(endpoint_id: str) -> str:
    return f"webhook.{endpoint_id}"


def validate_url(url: str, *, allow_http: bool) -> str:
    """An absolute http(s) URL; plain http only to loopback unless ``allow_http``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PosflowError(
            f"webhook URL {url!r} is not an absolute http(s) URL",
            fix="pass --url https://host/path",
        )
    if parts.username or parts.password:
        raise PosflowError(
            "a webhook URL must not carry credentials", fix="receivers verify the signature"
        )
    if parts.scheme == "http" and not allow_http and not is_loopback(parts.hostname):
        raise PosflowError(
            f"webhook URL {url!r} is plain http: event data would cross the network unencrypted",
            fix="use https (or set POSFLOW_API__WEBHOOK_ALLOW_HTTP=true for a test receiver)",
        )
    return url


def _audit(conn: Conn, actor: str, source: str, action: str, ep_id: str, **detail: Any) -> None:
    record(
        conn,
        actor=actor,
        role="operator",
        action=action,
        target=f"webhook:{ep_id}",
        source=source,
        detail=detail,
    )


def add_endpoint(
    conn: Conn,
    provider: KeyProvider,
    merchant_id: str,
    url: str,
    *,
    actor: str,
    source: str,
    allow_http: bool,
    from_seq: int | None = None,
) -> tuple[Endpoint, str]:
    """Create an endpoint; returns it and its signing secret (shown once, stored encrypted).

    Delivery starts after the merchant's newest event, or at ``from_seq`` when given.
    """
    validate_url(url, allow_http=allow_http)
    endpoint_id = "wh" + secrets.token_hex(8)
    secret = "whsec_" + secrets.token_urlsafe(32)
    with conn.transaction():
        if (
            conn.execute("SELECT 1 FROM merchants WHERE merchant_id = %s", [merchant_id]).fetchone()
            is None
        ):
            raise PosflowError(f"no merchant {merchant_id!r}", fix="check the merchant id")
        if from_seq is None:
            row = conn.execute(
                "SELECT coalesce(max(seq), 0) FROM cashflow_events WHERE merchant_id = %s",
                [merchant_id],
            ).fetchone()
            start = int(row[0]) if row else 0
        else:
            start = max(from_seq - 1, 0)
        conn.execute(
            "INSERT INTO merchant_webhooks (endpoint_id, merchant_id, url, created_by)"
            " VALUES (%s, %s, %s, %s)",
            [endpoint_id, merchant_id, url, actor],
        )
        conn.execute(
            "INSERT INTO webhook_cursors (endpoint_id, delivered_seq) VALUES (%s, %s)",
            [endpoint_id, start],
        )
        # Raises MerchantKeyRevokedError (and rolls all of it back) without an active key.
        put_secret(conn, provider, merchant_id, secret_purpose(endpoint_id), secret)
        _audit(conn, actor, source, "webhook.add", endpoint_id, merchant=merchant_id, url=url)
    return get_endpoint(conn, endpoint_id), secret


def get_endpoint(conn: Conn, endpoint_id: str) -> Endpoint:
    row = conn.execute(_SELECT + " WHERE w.endpoint_id = %s", [endpoint_id]).fetchone()
    if row is None:
        raise PosflowError(
            f"no webhook endpoint {endpoint_id!r}",
            fix="`posflow api webhooks list --merchant M` shows the ids",
        )
    return Endpoint(*row)


def list_endpoints(conn: Conn, merchant_id: str | None = None) -> list[Endpoint]:
    rows = conn.execute(
        _SELECT + " WHERE %(m)s::text IS NULL OR w.merchant_id = %(m)s"
        " ORDER BY w.merchant_id, w.created_at, w.endpoint_id",
        {"m": merchant_id},
    ).fetchall()
    return [Endpoint(*row) for row in rows]


def remove_endpoint(conn: Conn, endpoint_id: str, *, actor: str, source: str) -> Endpoint:
    """Delete the endpoint, its cursor and its (encrypted) signing secret."""
    with conn.transaction():
        ep = get_endpoint(conn, endpoint_id)
        conn.execute(
            "DELETE FROM merchant_secrets WHERE merchant_id = %s AND purpose = %s",
            [ep.merchant_id, secret_purpose(endpoint_id)],
        )
        conn.execute("DELETE FROM merchant_webhooks WHERE endpoint_id = %s", [endpoint_id])
        _audit(conn, actor, source, "webhook.remove", endpoint_id, merchant=ep.merchant_id)
    return ep


def replay(
    conn: Conn,
    merchant_id: str,
    from_seq: int,
    *,
    actor: str,
    source: str,
    endpoint_id: str | None = None,
) -> list[Endpoint]:
    """Deliver again from ``from_seq`` (a dead endpoint comes back to life).

    The lease is cleared too, so a deliverer in the middle of a round notices and
    stops instead of moving the cursor past the replay point.
    """
    if from_seq < 1:
        raise PosflowError(f"--from-seq must be 1 or more (got {from_seq})")
    with conn.transaction():
        endpoints = [
            ep
            for ep in list_endpoints(conn, merchant_id)
            if endpoint_id is None or ep.endpoint_id == endpoint_id
        ]
        if not endpoints:
            raise PosflowError(
                f"merchant {merchant_id!r} has no webhook endpoint"
                + (f" {endpoint_id!r}" if endpoint_id else ""),
                fix="`posflow api webhooks add --merchant M --url URL`",
            )
        revoked = [ep.endpoint_id for ep in endpoints if ep.state == "revoked"]
        if revoked:
            raise PosflowError(
                f"webhook endpoint(s) {', '.join(revoked)} of merchant {merchant_id!r} cannot "
                "be replayed: the merchant key was revoked, their signing secrets are gone",
                fix="issue a new merchant key, remove these endpoints and add them again",
            )
        ids = [ep.endpoint_id for ep in endpoints]
        conn.execute(
            "UPDATE webhook_cursors SET delivered_seq = %s, state = 'active', attempts = 0,"
            " failing_since = NULL, next_attempt_at = now(), last_error = NULL, dead_at = NULL,"
            " lease_owner = NULL, lease_until = NULL, updated_at = now()"
            " WHERE endpoint_id = ANY(%s)",
            [from_seq - 1, ids],
        )
        for ep in endpoints:
            _audit(conn, actor, source, "webhook.replay", ep.endpoint_id, from_seq=from_seq)
        conn.execute("SELECT pg_notify(%s, %s)", [CHANNEL, merchant_id])
    return [get_endpoint(conn, i) for i in ids]
