"""Who may do what: the one permission matrix, and ``authorize``.

The HTTP API and the CLI call :func:`authorize` before every protected action; the
audited variant, :func:`authorize_audited`, also records a refusal in the audit trail,
and :func:`record_action` records what a principal did.
A merchant principal is bound to its own merchant: every action it may take must
name a target of that merchant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from posflow.errors import PosflowError

if TYPE_CHECKING:
    import psycopg

    from posflow.security.audit import AuditRecord, Outcome

__all__ = [
    "PERMISSIONS",
    "AccessDeniedError",
    "Action",
    "Principal",
    "Role",
    "Target",
    "authorize",
    "authorize_audited",
    "record_action",
]


class Role(StrEnum):
    SUPPORT_AGENT = "support_agent"
    SUPPORT_LEAD = "support_lead"
    FINANCE = "finance"
    MERCHANT = "merchant"
    # Keys and certificates need an owner too; none of the four business roles fits.
    SECURITY_ADMIN = "security_admin"


class Action(StrEnum):
    """Protected actions; the values are also the audit trail's action names."""

    FLEET_READ = "fleet.read"
    ALERT_READ = "alert.read"
    ALERT_ACKNOWLEDGE = "alert.acknowledge"
    SILENCE_MANAGE = "silence.manage"
    RULE_CHANGE = "rule.change"
    MERCHANT_READ = "merchant.read"  # balances, cash flow, transactions of a merchant
    PAYOUT_READ = "payout.read"
    PAYOUT_CREATE = "payout.create"
    KEY_ISSUE = "key.issue"
    KEY_ROTATE = "key.rotate"
    KEY_REVOKE = "key.revoke"
    CERT_ISSUE = "cert.issue"
    CERT_REVOKE = "cert.revoke"
    AUDIT_READ = "audit.read"


_SUPPORT = frozenset({Action.FLEET_READ, Action.ALERT_READ, Action.ALERT_ACKNOWLEDGE})

PERMISSIONS: Mapping[Role, frozenset[Action]] = {
    Role.SUPPORT_AGENT: _SUPPORT,
    Role.SUPPORT_LEAD: _SUPPORT | {Action.SILENCE_MANAGE, Action.RULE_CHANGE},
    Role.FINANCE: frozenset({Action.MERCHANT_READ, Action.PAYOUT_READ, Action.PAYOUT_CREATE}),
    Role.MERCHANT: frozenset({Action.MERCHANT_READ, Action.PAYOUT_READ}),
    Role.SECURITY_ADMIN: frozenset(
        {
            Action.KEY_ISSUE,
            Action.KEY_ROTATE,
            Action.KEY_REVOKE,
            Action.CERT_ISSUE,
            Action.CERT_REVOKE,
            Action.AUDIT_READ,
        }
    ),
}
"""The permission matrix: each role's actions, nothing else is allowed."""

# Roles whose every action is limited to targets of their own merchant.
_MERCHANT_SCOPED = frozenset({Role.MERCHANT})


@dataclass(frozen=True)
class Principal:
    """Who acts: a person, a service account or a merchant's API key."""

    id: str
    role: Role
    merchant_id: str | None = None  # required for Role.MERCHANT

    def __post_init__(self) -> None:
        if self.role in _MERCHANT_SCOPED and not self.merchant_id:
            raise PosflowError(
                f"principal {self.id!r} has role {self.role} but no merchant_id",
                fix="a merchant principal is always bound to its merchant",
            )

    def __str__(self) -> str:
        return f"{self.role} {self.id!r}"


@dataclass(frozen=True)
class Target:
    """What an action is on: ``Target("alert", "A-17")``; ``merchant_id`` scopes it."""

    kind: str
    id: str
    merchant_id: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}"


class AccessDeniedError(PosflowError):
    """A principal tried an action its role does not allow (HTTP 403)."""

    def __init__(self, principal: Principal, action: Action, target: Target | None, why: str):
        self.principal = principal
        self.action = action
        self.target = target
        on = f" on {target}" if target is not None else ""
        super().__init__(f"access denied: {principal} may not {action.value}{on}: {why}")


def authorize(principal: Principal, action: Action, target: Target | None = None) -> None:
    """Return if ``principal`` may take ``action`` on ``target``; raise AccessDeniedError if not."""
    allowed = PERMISSIONS.get(principal.role, frozenset())
    if action not in allowed:
        names = ", ".join(sorted(a.value for a in allowed)) or "nothing"
        raise AccessDeniedError(principal, action, target, f"{principal.role} may: {names}")
    if principal.role in _MERCHANT_SCOPED:
        if target is None or target.merchant_id is None:
            raise AccessDeniedError(
                principal, action, target, "a merchant may act only on its own merchant's data"
            )
        if target.merchant_id != principal.merchant_id:
            raise AccessDeniedError(
                principal,
                action,
                target,
                f"it belongs to another merchant (this principal is {principal.merchant_id!r})",
            )


def authorize_audited(
    conn: psycopg.Connection[tuple[object, ...]],
    principal: Principal,
    action: Action,
    target: Target | None,
    *,
    source: str,
) -> None:
    """:func:`authorize`, and a refusal is recorded in the audit trail before it is raised.

    Call it outside any transaction that the refusal will roll back (an autocommit
    connection), or the record of the refused access would roll back with it.
    """
    try:
        authorize(principal, action, target)
    except AccessDeniedError as denied:
        record_action(
            conn,
            principal,
            action,
            target if target is not None else "-",
            source=source,
            outcome="refused",
            detail={"reason": str(denied)},
        )
        raise


def record_action(
    conn: psycopg.Connection[Any],
    principal: Principal,
    action: Action,
    target: Target | str,
    *,
    source: str,
    outcome: Outcome = "ok",
    detail: Mapping[str, Any] | None = None,
) -> AuditRecord:
    """The audit record of ``action`` by ``principal`` (its id and role) on ``target``."""
    from posflow.security.audit import record

    return record(
        conn,
        actor=principal.id,
        role=principal.role.value,
        action=action.value,
        target=str(target),
        source=source,
        outcome=outcome,
        detail=detail,
    )
