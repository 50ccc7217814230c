"""Who is calling: an API key becomes a :class:`Principal` with a scope.

Today every key belongs to one merchant and may read only that merchant's
data. The security work adds roles (support, finance) that read several
merchants; they only change how a Principal is built, not the routes, which
ask ``principal.can_read(merchant_id)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from psycopg_pool import AsyncConnectionPool

from api.keys import hash_matches, parse_key
from api.problems import Problem

__all__ = ["Authenticator", "Principal", "not_found_for"]

_WWW = {"WWW-Authenticate": 'Bearer realm="posflow"'}


@dataclass(frozen=True)
class Principal:
    key_id: str
    merchants: frozenset[str]
    roles: frozenset[str] = field(default_factory=lambda: frozenset({"merchant"}))

    def can_read(self, merchant_id: str) -> bool:
        return merchant_id in self.merchants


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthorized", "Unauthorized", detail, headers=dict(_WWW))


def not_found_for(merchant_id: str) -> Problem:
    """Another merchant's data looks exactly like a merchant that does not exist.

    404 rather than 403: a key cannot learn which merchant ids exist.
    """
    return Problem(
        404,
        "not-found",
        "Not found",
        f"merchant {merchant_id!r} not found for this API key",
    )


class Authenticator:
    """Checks ``Authorization: Bearer pf_<key_id>_<secret>`` against merchant_api_keys."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise _unauthorized("missing Authorization header: send 'Bearer <API key>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("Authorization header must be 'Bearer <API key>'")
        key = parse_key(token.strip())
        if key is None:
            raise _unauthorized("malformed API key: expected pf_<key id>_<secret>")
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT merchant_id, secret_sha256, revoked_at FROM merchant_api_keys"
                " WHERE key_id = %s",
                [key.key_id],
            )
            row = await cur.fetchone()
        # Same answer for an unknown id and a wrong secret: nothing to probe.
        if row is None or not hash_matches(key.secret, bytes(row[1])):
            raise _unauthorized("unknown API key")
        if row[2] is not None:
            raise _unauthorized(f"API key {key.key_id} was revoked")
        return Principal(key_id=key.key_id, merchants=frozenset({str(row[0])}))
