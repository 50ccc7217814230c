"""Who may touch the alert engine: staff API keys, the role matrix, the audit trail.

The alert engine's HTTP API authenticates with the keys ``posflow api keys issue
--role ...`` creates (``Authorization: Bearer pf_<key id>_<secret>``), through
:class:`posflow.security.apiauth.Authenticator`, as the merchant API does: one key store,
one set of rules for revoked keys and revoked merchants. The decision is
:func:`posflow.security.roles.authorize` (the one matrix):

=================  ===========================  ==================================
endpoint           action                       roles
=================  ===========================  ==================================
GET /alerts        alert.read                   support_agent, support_lead
GET /silences      alert.read                   support_agent, support_lead
GET /rules         alert.read                   support_agent, support_lead
POST ack           alert.acknowledge            support_agent, support_lead
POST/DELETE        silence.manage               support_lead
/silences
POST /rules/reload rule.change                  support_lead
=================  ===========================  ==================================

Refusals (401 and 403) and failures (404) are recorded on a dedicated
**autocommit** connection, so nothing rolls them back; a successful change is
recorded by the caller in the same transaction as the change itself
(:meth:`alerts.store.AlertStore.write`). The source is ``alerts-api:<peer IP>``
(no proxy header is trusted); what a client says about itself
(``X-Posflow-Client``, e.g. the CLI's ``cli:user@host``) goes into the detail as
``client``, unverified.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from alerts.store import AuditEntry
from posflow.security.apiauth import Authenticator
from posflow.security.apiauth import Principal as KeyPrincipal
from posflow.security.apikeys import parse_key
from posflow.security.audit import Outcome
from posflow.security.problems import PROBLEM_JSON, Problem
from posflow.security.roles import AccessDeniedError, Action, Target, authorize

__all__ = ["CLIENT_HEADER", "AlertAccess", "Caller", "ProblemError"]

log = logging.getLogger("posflow.alerts.access")

CLIENT_HEADER = "X-Posflow-Client"
T = TypeVar("T")


class ProblemError(web.HTTPException):
    """An aiohttp exception carrying a problem+json body (raised from a handler)."""

    def __init__(self, problem: Problem, instance: str) -> None:
        self.status_code = problem.status
        super().__init__(
            body=json.dumps(problem.body(instance)).encode(),
            content_type=PROBLEM_JSON,
            headers=problem.headers,
        )


@dataclass(frozen=True)
class Caller:
    """An authenticated, authorised caller of one request."""

    principal: KeyPrincipal
    source: str
    client: str | None

    @property
    def name(self) -> str:
        """How alerts and silences name who acted: the key's actor and its label."""
        label = self.principal.label
        return f"{self.principal.actor} ({label})" if label else self.principal.actor

    def audit(
        self,
        action: Action,
        target: Target | str,
        detail: Mapping[str, Any] | None = None,
        outcome: Outcome = "ok",
    ) -> AuditEntry:
        full = dict(detail or {})
        if self.principal.label:
            full["key_label"] = self.principal.label
        if self.client:
            full["client"] = self.client
        return AuditEntry(
            actor=self.principal.actor,
            role=self.principal.role.value,
            action=action.value,
            target=str(target),
            source=self.source,
            outcome=outcome,
            detail=full,
        )


def _claimed_actor(authorization: str | None) -> str:
    """Who an unauthenticated caller claims to be: the key id if the key parses."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        key = parse_key(token.strip()) if scheme.lower() == "bearer" else None
        if key is not None:
            return f"api-key:{key.key_id}"
    return "anonymous"


class AlertAccess:
    """Authenticates, authorises and records refusals of the alert engine's API."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self.pool = AsyncConnectionPool(conninfo, min_size=1, max_size=4, open=False)
        self.auth = Authenticator(self.pool)
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self._lock = threading.Lock()

    async def open(self) -> None:
        await self.pool.open(wait=True, timeout=15)

    async def close(self) -> None:
        await self.pool.close()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _run(self, work: Callable[[psycopg.Connection[tuple[Any, ...]]], T]) -> T:
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._conn is None or self._conn.closed:
                        self._conn = psycopg.connect(self.conninfo, autocommit=True)
                    return work(self._conn)
                except psycopg.OperationalError:
                    if self._conn is not None:
                        self._conn.close()
                    self._conn = None
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")  # pragma: no cover

    async def record(self, entry: AuditEntry) -> None:
        """Record on the autocommit connection (a refusal or a failure: nothing to join)."""
        try:
            await asyncio.to_thread(self._run, entry.write)
        except (psycopg.Error, OSError) as exc:
            # The caller is refused anyway; say loudly that the trail missed it.
            log.exception(
                "audit trail unavailable (%s): NOT recorded: %s %s %s on %s from %s",
                type(exc).__name__,
                entry.actor,
                entry.outcome,
                entry.action,
                entry.target,
                entry.source,
            )

    async def check(self, request: web.Request, action: Action, target: Target) -> Caller:
        """The caller if it may take ``action`` on ``target``; else a recorded 401/403."""
        source = f"alerts-api:{request.remote or 'unknown'}"
        client = request.headers.get(CLIENT_HEADER)
        authorization = request.headers.get("Authorization")
        extra = {"client": client[:200]} if client else {}
        try:
            principal = await self.auth.authenticate(authorization)
        except Problem as problem:
            await self.record(
                AuditEntry(
                    actor=_claimed_actor(authorization),
                    role="none",
                    action=action.value,
                    target=str(target),
                    source=source,
                    outcome="refused",
                    detail={"reason": problem.detail, "status": problem.status, **extra},
                )
            )
            raise ProblemError(problem, request.path) from None
        caller = Caller(principal, source, client[:200] if client else None)
        try:
            authorize(principal.security, action, target)
        except AccessDeniedError as denied:
            await self.record(
                caller.audit(action, target, {"reason": str(denied), "status": 403}, "refused")
            )
            raise ProblemError(
                Problem(403, "forbidden", "Forbidden", str(denied)), request.path
            ) from None
        return caller
