"""The permission matrix, tested in full: every role against every protected action."""

from __future__ import annotations

import pytest

from posflow.errors import PosflowError
from posflow.security.roles import (
    PERMISSIONS,
    AccessDeniedError,
    Action,
    Principal,
    Role,
    Target,
    authorize,
)

# The matrix as the issue states it, written out independently of roles.py.
EXPECTED: dict[Role, set[Action]] = {
    Role.SUPPORT_AGENT: {Action.FLEET_READ, Action.ALERT_READ, Action.ALERT_ACKNOWLEDGE},
    Role.SUPPORT_LEAD: {
        Action.FLEET_READ,
        Action.ALERT_READ,
        Action.ALERT_ACKNOWLEDGE,
        Action.SILENCE_MANAGE,
        Action.RULE_CHANGE,
    },
    Role.FINANCE: {Action.MERCHANT_READ, Action.PAYOUT_READ, Action.PAYOUT_CREATE},
    Role.MERCHANT: {Action.MERCHANT_READ, Action.PAYOUT_READ},
    Role.SECURITY_ADMIN: {
        Action.KEY_ISSUE,
        Action.KEY_ROTATE,
        Action.KEY_REVOKE,
        Action.CERT_ISSUE,
        Action.CERT_REVOKE,
        Action.AUDIT_READ,
    },
}


def _principal(role: Role) -> Principal:
    return Principal(f"{role}-1", role, merchant_id="M-1" if role is Role.MERCHANT else None)


def test_matrix_covers_every_role_and_action() -> None:
    assert set(PERMISSIONS) == set(Role)
    assert {k: set(v) for k, v in PERMISSIONS.items()} == EXPECTED


@pytest.mark.parametrize("action", list(Action), ids=str)
@pytest.mark.parametrize("role", list(Role), ids=str)
def test_each_role_is_allowed_exactly_its_actions(role: Role, action: Action) -> None:
    principal = _principal(role)
    target = Target("merchant", "M-1", merchant_id="M-1")  # the merchant's own data
    if action in EXPECTED[role]:
        authorize(principal, action, target)
    else:
        with pytest.raises(AccessDeniedError) as denied:
            authorize(principal, action, target)
        message = str(denied.value)
        assert f"may not {action.value}" in message
        assert str(role) in message
        assert denied.value.action is action


@pytest.mark.parametrize("action", sorted(EXPECTED[Role.MERCHANT]), ids=str)
def test_merchant_never_reaches_another_merchants_data(action: Action) -> None:
    merchant = Principal("key-abc", Role.MERCHANT, merchant_id="M-1")
    with pytest.raises(AccessDeniedError, match="belongs to another merchant"):
        authorize(merchant, action, Target("merchant", "M-2", merchant_id="M-2"))
    with pytest.raises(AccessDeniedError, match="only on its own merchant"):
        authorize(merchant, action, None)


def test_finance_reads_any_merchant() -> None:
    authorize(_principal(Role.FINANCE), Action.MERCHANT_READ, Target("merchant", "M-9", "M-9"))


def test_merchant_principal_needs_its_merchant() -> None:
    with pytest.raises(PosflowError, match="no merchant_id"):
        Principal("key-abc", Role.MERCHANT)


def test_denial_message_names_principal_action_target_and_allowed() -> None:
    with pytest.raises(AccessDeniedError) as denied:
        authorize(_principal(Role.SUPPORT_AGENT), Action.RULE_CHANGE, Target("rule", "battery"))
    assert str(denied.value) == (
        "access denied: support_agent 'support_agent-1' may not rule.change on rule:battery: "
        "support_agent may: alert.acknowledge, alert.read, fleet.read"
    )
