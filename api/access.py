"""Authorisation of API calls: the role matrix, with refusals in the audit trail.

Every protected route asks :class:`Access` before it reads anything. The decision
is ``posflow.security.roles.authorize`` (the one matrix); a refusal goes through
``authorize_audited`` so the audit trail records who (``api-key:<key id>`` and its
role), what (the action), on what (the target), from where (``api:<client IP>``),
when, and the outcome ``refused``.

The audit functions are synchronous (psycopg), the API is async: they run in a
worker thread on one dedicated **autocommit** connection (a pool of one, which
replaces a connection the server dropped), so a refusal's record is committed on
its own and never rolled back with anything else. The record is
written before the refusal is answered. Staff reads of a merchant's data are
recorded too (outcome ``ok``, ``api.audit_staff_reads``); if that record cannot
be written the read is refused with 503: no audit, no access to money data.

Answers: a merchant key asking for another merchant gets 404 (as if the merchant
did not exist, nothing to probe); any other refusal is 403 naming what the role
may do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from enum import Enum
from typing import Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool

from api.pools import sync_pool
from posflow.security.apiauth import Principal, not_found_for
from posflow.security.problems import Problem
from posflow.security.roles import (
    AccessDeniedError,
    Action,
    Role,
    Target,
    authorize,
    authorize_audited,
    record_action,
)

__all__ = ["Access", "ListLevel", "merchant_target"]

log = logging.getLogger("posflow.api.access")

T = TypeVar("T")


class ListLevel(Enum):
    """What ``GET /v1/merchants`` shows a role."""

    WITH_BALANCES = "with_balances"  # merchant.read on any merchant (finance)
    DIRECTORY = "directory"  # fleet.read (support): ids, names, terminal counts, no money


def merchant_target(merchant_id: str) -> Target:
    return Target("merchant", merchant_id, merchant_id)


_ALL_MERCHANTS = Target("merchant", "*")


def _forbidden(denied: AccessDeniedError) -> Problem:
    return Problem(403, "forbidden", "Forbidden", str(denied))


class Access:
    """Decides, and records refusals (and staff reads) in the audit trail."""

    def __init__(self, conninfo: str, *, audit_staff_reads: bool) -> None:
        self.audit_staff_reads = audit_staff_reads
        # One audit writer per process (the chain serialises anyway); a connection found
        # broken when taken is replaced before the work runs on it.
        self._pool = sync_pool(
            conninfo, max_size=1, name="posflow-api-audit", check=ConnectionPool.check_connection
        )

    def open(self) -> None:
        self._pool.open(wait=False)

    def close(self) -> None:
        self._pool.close()

    def _run(self, work: Callable[[psycopg.Connection[tuple[Any, ...]]], T]) -> T:
        with self._pool.connection() as conn:
            return work(conn)

    async def _refuse(
        self, principal: Principal, action: Action, target: Target, source: str
    ) -> AccessDeniedError:
        """Record the refusal (authorize_audited raises after recording) and return it."""

        def audited(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
            authorize_audited(conn, principal.security, action, target, source=source)

        try:
            await asyncio.to_thread(self._run, audited)
        except AccessDeniedError as denied:
            return denied
        except (psycopg.Error, OSError) as exc:
            # Still refused; the trail could not take the record: say so loudly.
            log.exception(
                "audit trail unavailable (%s): refusal NOT recorded: %s may not %s on %s from %s",
                type(exc).__name__,
                principal.security,
                action.value,
                target,
                source,
            )
            try:
                authorize(principal.security, action, target)
            except AccessDeniedError as denied:
                return denied
        raise AssertionError(f"{principal.security} was refused, then allowed {action.value}")

    async def _record_ok(
        self, principal: Principal, action: Action, target: Target, source: str
    ) -> None:
        def write(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
            label = {"key_label": principal.label} if principal.label else {}
            record_action(conn, principal.security, action, target, source=source, detail=label)

        try:
            await asyncio.to_thread(self._run, write)
        except (psycopg.Error, OSError) as exc:
            log.exception("audit trail unavailable (%s): staff read refused", type(exc).__name__)
            raise Problem(
                503,
                "audit-unavailable",
                "Service unavailable",
                "the audit trail cannot record this access right now; retry later",
                headers={"Retry-After": "5"},
            ) from None

    async def merchant_read(self, principal: Principal, merchant_id: str, source: str) -> None:
        """May ``principal`` read this merchant's balances, history and events?"""
        target = merchant_target(merchant_id)
        try:
            authorize(principal.security, Action.MERCHANT_READ, target)
        except AccessDeniedError:
            denied = await self._refuse(principal, Action.MERCHANT_READ, target, source)
            if principal.role is Role.MERCHANT:
                raise not_found_for(merchant_id) from None
            raise _forbidden(denied) from None
        if principal.role is not Role.MERCHANT and self.audit_staff_reads:
            await self._record_ok(principal, Action.MERCHANT_READ, target, source)

    async def merchant_list(self, principal: Principal, source: str) -> ListLevel:
        """May ``principal`` list merchants, and with or without their balances?"""
        try:
            authorize(principal.security, Action.MERCHANT_READ, _ALL_MERCHANTS)
            level = ListLevel.WITH_BALANCES
        except AccessDeniedError:
            try:
                # A merchant key never lists: it may act on its own merchant only.
                if principal.role is Role.MERCHANT:
                    raise
                authorize(principal.security, Action.FLEET_READ, _ALL_MERCHANTS)
                level = ListLevel.DIRECTORY
            except AccessDeniedError:
                denied = await self._refuse(principal, Action.MERCHANT_READ, _ALL_MERCHANTS, source)
                raise _forbidden(denied) from None
        if self.audit_staff_reads:
            action = Action.MERCHANT_READ if level is ListLevel.WITH_BALANCES else Action.FLEET_READ
            await self._record_ok(principal, action, _ALL_MERCHANTS, source)
        return level
