"""Per-merchant API keys: ``pf_<key_id>_<secret>``, stored as SHA-256 of the secret.

Every key has a role (``posflow.security.roles.Role``): a merchant key reads its own
merchant; staff keys (support, finance, security) read what the role matrix allows.

The key id is public (it names the key in lists, logs and revocations); the
secret is 32 random bytes shown once at issue. Lookup is by key id, then a
constant-time comparison of the hashes. A plain SHA-256 is enough because the
secret has 256 bits of entropy (no dictionary to try), and it spares the
service a pepper that would have to be kept, shared and rotated.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from posflow.errors import PosflowError
from posflow.security.roles import (
    Action,
    Principal,
    Role,
    Target,
    authorize_audited,
    record_action,
)

__all__ = [
    "ApiKey",
    "IssuedKey",
    "KeyRecord",
    "hash_matches",
    "issue_key",
    "issue_key_as",
    "list_keys",
    "parse_key",
    "revoke_key",
    "revoke_key_as",
    "secret_hash",
]

_PREFIX = "pf"
_KEY = re.compile(r"^pf_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class ApiKey:
    """A key as presented by a client, split into its parts."""

    key_id: str
    secret: str


@dataclass(frozen=True)
class IssuedKey:
    key_id: str
    merchant_id: str | None
    token: str  # the only time the full key exists outside the client
    role: Role = Role.MERCHANT


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    merchant_id: str | None
    label: str
    created_at: datetime
    revoked_at: datetime | None
    role: Role = Role.MERCHANT


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_key(token: str) -> ApiKey | None:
    """The parts of a well-formed key, else None (never says which part was wrong)."""
    match = _KEY.match(token)
    return ApiKey(match.group(1), match.group(2)) if match else None


def hash_matches(secret: str, stored: bytes) -> bool:
    return hmac.compare_digest(secret_hash(secret), stored)


def issue_key(
    conn: psycopg.Connection[Any],
    merchant_id: str | None,
    label: str = "",
    *,
    role: Role = Role.MERCHANT,
    created_by: str = "",
) -> IssuedKey:
    """Create a key; the returned token is not stored anywhere.

    A merchant key (``Role.MERCHANT``) is bound to ``merchant_id``; a staff key
    (support, finance, security) is bound to no merchant and reads what its role allows.
    """
    if role is Role.MERCHANT:
        if merchant_id is None or not merchant_id.strip():
            raise PosflowError("a merchant key needs a merchant id", fix="pass --merchant M")
    elif merchant_id is not None:
        raise PosflowError(
            f"a {role} key is not bound to a merchant (got --merchant {merchant_id})",
            fix="leave out --merchant for staff roles; their access comes from the role",
        )
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO merchant_api_keys (key_id, merchant_id, secret_sha256, label, role,"
        " created_by) VALUES (%s, %s, %s, %s, %s, %s)",
        [key_id, merchant_id, secret_hash(secret), label, role.value, created_by],
    )
    return IssuedKey(key_id, merchant_id, f"{_PREFIX}_{key_id}_{secret}", role)


def revoke_key(conn: psycopg.Connection[Any], key_id: str) -> KeyRecord:
    """Revoke a key (idempotent: a revoked key keeps its first revocation time)."""
    row = conn.execute(
        """
        UPDATE merchant_api_keys SET revoked_at = coalesce(revoked_at, now())
         WHERE key_id = %s
        RETURNING key_id, merchant_id, label, created_at, revoked_at, role
        """,
        [key_id],
    ).fetchone()
    if row is None:
        raise PosflowError(
            f"no API key with id {key_id!r}",
            fix="list the merchant's keys with `posflow api keys list --merchant M`",
        )
    return _record(row)


def _record(row: tuple[Any, ...]) -> KeyRecord:
    key_id, merchant_id, label, created_at, revoked_at, role = row
    return KeyRecord(key_id, merchant_id, label, created_at, revoked_at, Role(role))


def list_keys(
    conn: psycopg.Connection[Any], merchant_id: str | None = None, *, role: Role | None = None
) -> list[KeyRecord]:
    """Keys of a merchant, or of a role (staff keys: ``role=Role.FINANCE``), oldest first."""
    rows = conn.execute(
        "SELECT key_id, merchant_id, label, created_at, revoked_at, role FROM merchant_api_keys"
        " WHERE (%(m)s::text IS NULL OR merchant_id = %(m)s)"
        " AND (%(r)s::text IS NULL OR role = %(r)s) ORDER BY created_at, key_id",
        {"m": merchant_id, "r": role.value if role else None},
    ).fetchall()
    return [_record(row) for row in rows]


def issue_key_as(
    conn: psycopg.Connection[Any],
    operator: Principal,
    merchant_id: str | None,
    label: str = "",
    *,
    role: Role = Role.MERCHANT,
    source: str,
) -> IssuedKey:
    """:func:`issue_key` on behalf of ``operator``: authorised (a refusal is recorded), and
    the key and its audit record written in one transaction. ``conn`` is autocommit."""
    target = Target("api-key", "new", merchant_id)
    authorize_audited(conn, operator, Action.KEY_ISSUE, target, source=source)
    with conn.transaction():
        issued = issue_key(conn, merchant_id, label, role=role, created_by=operator.id)
        record_action(
            conn, operator, Action.KEY_ISSUE, f"api-key:{issued.key_id}", source=source,
            detail={"key_role": role.value, "merchant": merchant_id, "label": label},
        )  # fmt: skip
    return issued


def revoke_key_as(
    conn: psycopg.Connection[Any], operator: Principal, key_id: str, *, source: str
) -> KeyRecord:
    """:func:`revoke_key` on behalf of ``operator``: authorised (a refusal is recorded), and
    the revocation and its audit record written in one transaction. ``conn`` is autocommit."""
    target = Target("api-key", key_id)
    authorize_audited(conn, operator, Action.KEY_REVOKE, target, source=source)
    with conn.transaction():
        rec = revoke_key(conn, key_id)
        record_action(
            conn, operator, Action.KEY_REVOKE, target, source=source,
            detail={"key_role": rec.role.value, "merchant": rec.merchant_id},
        )  # fmt: skip
    return rec
