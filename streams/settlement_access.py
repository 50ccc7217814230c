"""Who may move money from the command line: staff API keys, the role matrix, the audit trail.

The money-moving commands (``posflow payout``, ``posflow settlement set-plan``,
``posflow settlement release``, ``posflow settlement set-payout-account``) take the
operator's staff API key (``posflow api keys issue --role finance``) as ``--key`` or,
better (it stays out of the shell history and the process list), in
``POSFLOW_STAFF_KEY`` -- the same convention as ``posflow alerts``. The key is
checked by :class:`posflow.security.apiauth.Authenticator`, as in the merchant API (one
key store, one set of rules for revoked keys), the decision is
:func:`posflow.security.roles.authorize` (the one matrix), and:

- a refusal (no key, unknown or revoked key, a role without the action) is recorded
  on an **autocommit** connection before the command fails, so nothing rolls it back;
- a change is recorded by the caller **in the same transaction** as the change
  (:meth:`Operator.record`), so the trail and the money never disagree;
- a change refused by the business rules (more than available, an idempotency key
  reused for another amount) is recorded as ``failed`` on the autocommit connection.

The matrix has one money-moving action, ``payout.create`` (role ``finance``). Fee plans,
manual releases and payout accounts decide where and how much money goes, so they
need the same permission; each is recorded under its own action name
(``settlement.set_plan`` ...) with ``authorized_as: payout.create`` in the detail.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

from posflow.cli_support import STAFF_KEY_ENV, cli_source
from posflow.errors import PosflowError
from posflow.security.audit import Outcome, record
from posflow.security.roles import AccessDeniedError, Action, Target, authorize

__all__ = ["KEY_ENV", "Command", "Operator", "authenticate_operator", "record_autocommit"]

KEY_ENV = STAFF_KEY_ENV


@dataclass(frozen=True)
class Command:
    """A protected command: its audit name and the matrix action it needs."""

    name: str  # the audit trail's action
    needs: Action


PAYOUT = Command("payout.create", Action.PAYOUT_CREATE)
SET_PLAN = Command("settlement.set_plan", Action.PAYOUT_CREATE)
RELEASE = Command("settlement.release", Action.PAYOUT_CREATE)
SET_PAYOUT_ACCOUNT = Command("settlement.set_payout_account", Action.PAYOUT_CREATE)


@dataclass(frozen=True)
class Operator:
    """An authenticated operator allowed to run one command on one target."""

    actor: str  # api-key:<key id>
    role: str
    label: str
    command: Command
    target: Target
    source: str

    def detail(self, detail: Mapping[str, Any] | None) -> dict[str, Any]:
        full = dict(detail or {})
        if self.label:
            full["key_label"] = self.label
        if self.command.name != self.command.needs.value:
            full["authorized_as"] = self.command.needs.value
        return full

    def record(
        self,
        conn: psycopg.Connection[Any],
        detail: Mapping[str, Any] | None = None,
        outcome: Outcome = "ok",
    ) -> None:
        """Record the command in ``conn``'s current transaction (commits with the change)."""
        record(
            conn,
            actor=self.actor,
            role=self.role,
            action=self.command.name,
            target=str(self.target),
            source=self.source,
            outcome=outcome,
            detail=self.detail(detail),
        )


def record_autocommit(
    conn: psycopg.Connection[Any],
    *,
    actor: str,
    role: str,
    command: Command,
    target: Target,
    source: str,
    outcome: Outcome,
    detail: Mapping[str, Any],
) -> None:
    """Record a refusal or failure on an autocommit connection: committed at once."""
    if not conn.autocommit:
        raise PosflowError("refusals are recorded on an autocommit connection only")
    record(
        conn,
        actor=actor,
        role=role,
        action=command.name,
        target=str(target),
        source=source,
        outcome=outcome,
        detail=dict(detail),
    )


async def _authenticate(conninfo: str, token: str) -> Any:
    from psycopg_pool import AsyncConnectionPool

    from posflow.security.apiauth import Authenticator

    pool = AsyncConnectionPool(conninfo, min_size=1, max_size=1, open=False)
    await pool.open(wait=True, timeout=15)
    try:
        return await Authenticator(pool).authenticate(f"Bearer {token}")
    finally:
        await pool.close()


def _claimed_actor(token: str | None) -> str:
    from posflow.security.apikeys import parse_key

    key = parse_key(token.strip()) if token else None
    return f"api-key:{key.key_id}" if key is not None else "anonymous"


def authenticate_operator(
    conn: psycopg.Connection[Any],
    conninfo: str,
    token: str | None,
    command: Command,
    target: Target,
) -> Operator:
    """The operator behind ``token`` if its role may run ``command``; else a recorded refusal.

    ``conn`` is autocommit (the refusal must not roll back); the key is checked by the
    async :class:`~posflow.security.apiauth.Authenticator` on a connection of its own to
    ``conninfo``.
    Raises PosflowError (one line for the CLI) after recording the refusal.
    """
    from posflow.security.problems import Problem

    source = cli_source()

    def refuse(actor: str, role: str, reason: str, **extra: Any) -> PosflowError:
        record_autocommit(
            conn, actor=actor, role=role, command=command, target=target, source=source,
            outcome="refused", detail={"reason": reason, **extra},
        )  # fmt: skip
        return PosflowError(
            f"{command.name} on {target} refused: {reason}",
            fix=f"use a staff key of the finance role: export {KEY_ENV}=pf_... "
            "(from `posflow api keys issue --role finance`) or pass --key",
        )

    if not token:
        raise refuse("anonymous", "none", "no staff API key given")
    try:
        principal = asyncio.run(_authenticate(conninfo, token))
    except Problem as problem:
        raise refuse(_claimed_actor(token), "none", problem.detail) from None
    try:
        authorize(principal.security, command.needs, target)
    except AccessDeniedError as denied:
        extra = {"key_label": principal.label} if principal.label else {}
        why = str(denied)
        if command.name != command.needs.value:
            why += f" ({command.name} needs {command.needs.value})"
        raise refuse(principal.actor, principal.role.value, why, **extra) from None
    return Operator(principal.actor, principal.role.value, principal.label, command, target, source)
