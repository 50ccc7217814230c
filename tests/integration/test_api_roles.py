"""Roles and merchant revocation on the merchant feed API (real uvicorn, real PostgreSQL).

Every role against every API-protected action; refusals and staff reads in the
audit trail; a revoked merchant key invalidates the merchant's API keys.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from posflow.security.audit import records, verify
from posflow.security.keys import (
    is_merchant_active,
    issue_merchant_key,
    revoke_merchant_key,
    rotate_merchant_key,
)
from posflow.security.roles import Principal, Role
from tests.conftest import unique
from tests.integration.test_api import Api, SseReader, add_events, problem, start_api, stream

__all__ = ["start_api"]  # the fixture, shared with test_api.py

ADMIN = Principal("alice", Role.SECURITY_ADMIN)
ACTIONS = ("list", "balances", "transactions", "events", "stream")


def _call(api: Api, action: str, merchant: str, key: str) -> httpx.Response:
    if action == "list":
        return api.get("/v1/merchants", key)
    if action == "stream":
        with stream(api, merchant, key) as resp:
            if resp.status_code != 200:
                resp.read()  # an error's problem+json body
            streamed: httpx.Response = resp
            return streamed
    return api.get(f"/v1/merchants/{merchant}/{action}", key)


@pytest.fixture
def api(start_api: Any) -> Api:
    result: Api = start_api(sse_heartbeat_s=0.3, auth_recheck_s=0.3)
    return result


# What each role gets, per action on merchant A (a merchant key belongs to A; B is another).
EXPECTED: dict[Role, dict[str, int]] = {
    Role.MERCHANT: {"list": 403, **dict.fromkeys(ACTIONS[1:], 200)},
    Role.SUPPORT_AGENT: {"list": 200, **dict.fromkeys(ACTIONS[1:], 403)},
    Role.SUPPORT_LEAD: {"list": 200, **dict.fromkeys(ACTIONS[1:], 403)},
    Role.FINANCE: dict.fromkeys(ACTIONS, 200),
    Role.SECURITY_ADMIN: dict.fromkeys(ACTIONS, 403),
}


@pytest.mark.parametrize("role", list(Role), ids=[r.value for r in Role])
def test_every_role_against_every_protected_action(api: Api, role: Role) -> None:
    a, b = unique("m"), unique("m")
    api.activate(a)
    api.activate(b)
    add_events(api.conn, a, range(1, 3))
    add_events(api.conn, b, range(1, 3))
    key = api.key(a) if role is Role.MERCHANT else api.staff_key(role)
    key_id = key.split("_")[1]

    got = {action: _call(api, action, a, key).status_code for action in ACTIONS}
    assert got == EXPECTED[role]

    refused = [
        (r.actor, r.role, r.action, r.target, r.source, r.outcome)
        for r in records(api.conn, limit=50)
        if r.actor == f"api-key:{key_id}" and r.outcome == "refused"
    ]
    expected_refused = [
        ("list" if action == "list" else "read", action)
        for action in ACTIONS
        if EXPECTED[role][action] == 403
    ]
    assert refused == [
        (
            f"api-key:{key_id}",
            role.value,
            "merchant.read",
            "merchant:*" if what == "list" else f"merchant:{a}",
            "api:127.0.0.1",
            "refused",
        )
        for what, _ in expected_refused
    ]
    if role is Role.MERCHANT:
        # Another merchant: 404 like an unknown merchant, and the refusal is recorded.
        for action in ACTIONS[1:]:
            body = problem(_call(api, action, b, key), 404)
            assert body["detail"] == f"merchant {b!r} not found for this API key"
        others = [r for r in records(api.conn, target=f"merchant:{b}") if r.outcome == "refused"]
        assert [(r.actor, r.action) for r in others] == [(f"api-key:{key_id}", "merchant.read")] * 4
    forbidden = [action for action in ACTIONS if EXPECTED[role][action] == 403]
    for action in forbidden[:1]:
        body = problem(_call(api, action, a, key), 403)
        assert body["detail"].startswith(f"access denied: {role} 'api-key:{key_id}' may not")
    assert verify(api.conn).ok


def test_finance_lists_merchants_with_balances_support_without_money(api: Api) -> None:
    # Merchant ids sort after those other tests could leave: this database is the test's own.
    m1, m2, m3 = "M-1", "M-2", "M-3"
    for m in (m1, m2, m3):
        api.activate(m)
    api.conn.execute(
        "INSERT INTO merchant_balances (merchant_id, currency, pending_minor, available_minor,"
        " paid_out_minor) VALUES (%s,'EUR',1234,500,70), (%s,'USD',1,2,3), (%s,'EUR',9,8,7)",
        [m1, m1, m3],
    )
    api.conn.execute(
        "INSERT INTO terminals (terminal_id, merchant_id) VALUES ('T-1', %s), ('T-2', %s)",
        [m1, m1],
    )
    finance = api.staff_key(Role.FINANCE)
    page = api.get("/v1/merchants", finance, params={"limit": 2}).json()
    assert [
        (i["merchant_id"], i["name"], i["terminals"],
         [(b["currency"], b["pending_minor"], b["available_minor"], b["paid_out_minor"])
          for b in i["balances"]])
        for i in page["items"]
    ] == [
        (m1, "shop M-1", 2, [("EUR", 1234, 500, 70), ("USD", 1, 2, 3)]),
        (m2, "shop M-2", 0, []),
    ]  # fmt: skip
    assert page["next_after"] == m2
    rest = api.get("/v1/merchants", finance, params={"after": m2}).json()
    assert [(i["merchant_id"], i["balances"][0]["available_minor"]) for i in rest["items"]] == [
        (m3, 8)
    ]
    assert rest["next_after"] is None

    support = api.staff_key(Role.SUPPORT_AGENT)
    listed = api.get("/v1/merchants", support).json()
    assert [(i["merchant_id"], i["terminals"], i["balances"]) for i in listed["items"]] == [
        (m1, 2, None),
        (m2, 0, None),
        (m3, 0, None),
    ]
    # Finance reads any merchant's data; each staff read is in the audit trail.
    resp = api.get(f"/v1/merchants/{m3}/balances", finance)
    assert resp.json()["balances"][0]["pending_minor"] == 9
    finance_id = finance.split("_")[1]
    reads = [
        (r.action, r.target, r.outcome, r.source)
        for r in records(api.conn)
        if r.actor == f"api-key:{finance_id}"
    ]
    assert reads == [
        ("merchant.read", "merchant:*", "ok", "api:127.0.0.1"),
        ("merchant.read", "merchant:*", "ok", "api:127.0.0.1"),
        ("merchant.read", f"merchant:{m3}", "ok", "api:127.0.0.1"),
    ]


def test_revoked_merchant_key_invalidates_its_api_keys_and_ends_open_streams(api: Api) -> None:
    merchant, other = unique("m"), unique("m")
    key, other_key = api.key(merchant), api.key(other)
    add_events(api.conn, merchant, range(1, 3))
    path = f"/v1/merchants/{merchant}/balances"
    assert api.get(path, key).status_code == 200

    with stream(api, merchant, key) as resp:
        reader = SseReader(resp)
        assert [e[1] for e in reader.events(2)] == ["1", "2"]
        versions = revoke_merchant_key(
            api.conn, merchant, actor=ADMIN, source="cli:alice@host", reason="account closed"
        )
        # The open stream ends at its next re-check (0.3 s here), with the reason.
        (kind, _, data) = reader.events(1, timeout_s=5)[0]
    assert kind == "close"
    assert "was revoked" in data

    body = problem(api.get(path, key), 401)
    assert body["detail"] == (
        f"merchant {merchant!r} was revoked (its merchant key was revoked): "
        "its API keys are no longer valid"
    )
    assert problem(api.get(f"/v1/merchants/{merchant}/events/stream", key), 401)
    # Other merchants are untouched.
    assert api.get(f"/v1/merchants/{other}/balances", other_key).status_code == 200
    # The audit trail says who revoked it, when, from where, why.
    (rec,) = records(api.conn, target=f"merchant:{merchant}", action="key.revoke")
    assert (rec.actor, rec.role, rec.source, rec.outcome) == (
        "alice",
        "security_admin",
        "cli:alice@host",
        "ok",
    )
    assert rec.detail == {"versions": versions, "reason": "account closed"}
    assert verify(api.conn).ok


def test_api_accepts_a_merchant_exactly_when_is_merchant_active(api: Api) -> None:
    merchant = unique("m")
    api.conn.execute("INSERT INTO merchants (merchant_id, name) VALUES (%s, 'x')", [merchant])
    from posflow.security.apikeys import issue_key

    key = issue_key(api.conn, merchant, "t").token
    path = f"/v1/merchants/{merchant}/events"

    def state() -> tuple[bool, int]:
        return is_merchant_active(api.conn, merchant), api.get(path, key).status_code

    assert state() == (False, 401)  # never issued
    assert "has no merchant key" in api.get(path, key).json()["detail"]
    issue_merchant_key(api.conn, api.provider, merchant, actor=ADMIN, source="test")
    assert state() == (True, 200)
    rotate_merchant_key(api.conn, api.provider, merchant, actor=ADMIN, source="test")
    assert state() == (True, 200)
    revoke_merchant_key(api.conn, merchant, actor=ADMIN, source="test")
    assert state() == (False, 401)
    issue_merchant_key(api.conn, api.provider, merchant, actor=ADMIN, source="test")
    assert state() == (True, 200)  # a new merchant key (after the revocation) re-enables it
