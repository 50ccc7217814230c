"""Who is calling: an API key becomes a :class:`Principal` with a role.

One check for every HTTP API and command that takes an API key: the merchant API,
the alert engine's API and the money-moving settlement commands.

A merchant key (role ``merchant``) is bound to its merchant; staff keys
(``support_agent``, ``support_lead``, ``finance``, ``security_admin``) are bound to
none. What a principal may do is decided by the one permission matrix,
``posflow.security.roles`` (see :mod:`api.access`), never here.

A merchant key is accepted only while its merchant is active: the merchant has a
usable merchant key (``posflow.security.keys.is_merchant_active``). Revoking the
merchant key (crypto-shredding) therefore invalidates every API key of the merchant
from the next request on, and ends its open streams at their next re-check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg_pool import AsyncConnectionPool

from posflow.security import roles
from posflow.security.apikeys import hash_matches, parse_key
from posflow.security.problems import Problem

__all__ = ["Authenticator", "Principal", "not_found_for"]

_WWW = {"WWW-Authenticate": 'Bearer realm="posflow"'}


@dataclass(frozen=True)
class Principal:
    key_id: str
    role: roles.Role
    merchant_id: str | None = None  # set for (and only for) Role.MERCHANT
    label: str = ""

    @property
    def actor(self) -> str:
        """How the audit trail names this caller."""
        return f"api-key:{self.key_id}"

    @property
    def security(self) -> roles.Principal:
        return roles.Principal(self.actor, self.role, self.merchant_id)


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


# The merchant-active predicate is posflow.security.keys.is_merchant_active's (an active
# version with its wrapped seed), evaluated in the key lookup: one round trip, async.
# tests/integration/test_api_roles.py checks both agree in every key state.
_LOOKUP = """
SELECT k.merchant_id, k.secret_sha256, k.revoked_at, k.role, k.label,
       k.merchant_id IS NULL OR EXISTS (
           SELECT 1 FROM merchant_keys mk WHERE mk.merchant_id = k.merchant_id
              AND mk.status = 'active' AND mk.wrapped_seed IS NOT NULL) AS merchant_active,
       EXISTS (SELECT 1 FROM merchant_keys mk WHERE mk.merchant_id = k.merchant_id
                  AND mk.status = 'revoked') AS merchant_revoked
  FROM merchant_api_keys k
 WHERE k.key_id = %s
"""


def _refusal(key_id: str, row: tuple[Any, ...]) -> str | None:
    """Why a key that matched its hash is not accepted (None: it is)."""
    merchant_id, _, revoked_at, _, _, active, merchant_revoked = row
    if revoked_at is not None:
        return f"API key {key_id} was revoked"
    if not active:
        if merchant_revoked:
            return (
                f"merchant {merchant_id!r} was revoked (its merchant key was revoked): "
                "its API keys are no longer valid"
            )
        return f"merchant {merchant_id!r} is not active (it has no merchant key)"
    return None


class Authenticator:
    """Checks ``Authorization: Bearer pf_<key_id>_<secret>`` against merchant_api_keys."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def _lookup(self, key_id: str) -> tuple[Any, ...] | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(_LOOKUP, [key_id])
            return await cur.fetchone()

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise _unauthorized("missing Authorization header: send 'Bearer <API key>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("Authorization header must be 'Bearer <API key>'")
        key = parse_key(token.strip())
        if key is None:
            raise _unauthorized("malformed API key: expected pf_<key id>_<secret>")
        row = await self._lookup(key.key_id)
        # Same answer for an unknown id and a wrong secret: nothing to probe.
        if row is None or not hash_matches(key.secret, bytes(row[1])):
            raise _unauthorized("unknown API key")
        refused = _refusal(key.key_id, row)
        if refused is not None:
            raise _unauthorized(refused)
        merchant_id = None if row[0] is None else str(row[0])
        return Principal(key.key_id, roles.Role(row[3]), merchant_id, str(row[4]))

    async def recheck(self, principal: Principal) -> str | None:
        """Why an authenticated key is no longer accepted (revoked since), or None."""
        row = await self._lookup(principal.key_id)
        if row is None:
            return f"API key {principal.key_id} no longer exists"
        return _refusal(principal.key_id, row)
