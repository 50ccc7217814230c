"""Roles and the audit trail on the alert engine (real engine subprocess, Kafka, PostgreSQL).

One `posflow alerts run` for the module, on its own topic prefix, database and port.
Every role (and no key) against every protected alerts action over HTTP, and through
the CLI for ack and silence; each call's audit record is checked field by field;
rule reloads (file change, bad file, HTTP) are recorded with the file's hash; the
chain verifies at the end.
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from psycopg import sql

from posflow.security.apikeys import issue_key
from posflow.security.keys import LocalMasterKey, issue_merchant_key
from posflow.security.roles import Principal, Role
from posflow.settings import KafkaSettings, PostgresSettings, Settings
from posflow.stack import Stack, ensure_topics
from posflow.storage.databases import create_database
from posflow.storage.migrate import migrate
from tests.conftest import ROOT, free_port, unique

RULES = """
rules:
  - name: test_paper_out
    severity: info
    scope: terminal
    when: [{fact: printer_paper, op: eq, value: out}]
    for: 1h
    annotations: {summary: "{terminal_id} paper out"}
"""
SOURCE = "alerts-api:127.0.0.1"
CLIENT = f"cli:{getpass.getuser()}@{socket.gethostname()}"
ROLES: list[Role | None] = [*Role, None]  # None: no key at all


def _rid(role: Role | None) -> str:
    return role.value if role else "no-key"


@dataclass
class Engine:
    """The running engine, its database and a key per role."""

    base: str
    dsn: str
    env: dict[str, str]
    rules: Path
    prefix: str
    log: Path
    keys: dict[Role, str] = field(default_factory=dict)
    firing: list[str] = field(default_factory=list)  # alert ids, one per test that acks

    def key_id(self, role: Role | None) -> str | None:
        return None if role is None else self.keys[role].split("_")[1]

    def call(
        self, method: str, path: str, role: Role | None, body: dict[str, Any] | None = None
    ) -> httpx.Response:
        headers = {} if role is None else {"Authorization": f"Bearer {self.keys[role]}"}
        return httpx.request(
            method, self.base + path, headers=headers, json=body, timeout=15
        )  # fmt: skip

    def rows(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn) as conn:
            return conn.execute(query.encode(), params).fetchall()

    def head(self) -> int:
        return int(self.rows("SELECT seq FROM audit_chain_head")[0][0])

    def audit_after(self, seq: int) -> list[dict[str, Any]]:
        names = ("seq", "actor", "role", "action", "target", "source", "outcome", "detail")
        rows = self.rows(
            "SELECT seq, actor, role, action, target, source, outcome, detail FROM audit_log"
            " WHERE seq > %s ORDER BY seq",
            seq,
        )
        return [dict(zip(names, r, strict=True)) for r in rows]

    def cli(self, *args: str, role: Role | None) -> subprocess.CompletedProcess[str]:
        env = {**self.env}
        env.pop("POSFLOW_STAFF_KEY", None)
        if role is not None:
            env["POSFLOW_STAFF_KEY"] = self.keys[role]
        return subprocess.run(
            [sys.executable, "-m", "cli", *args],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip


async def _integrity(settings: Settings, prefix: str, merchants: list[str]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all")
    await producer.start()
    try:
        for i, m in enumerate(merchants):
            event = {"merchant_id": m, "txn_id": f"tx-{i}", "kind": "txn_id_reused"}
            await producer.send_and_wait(
                f"{prefix}.integrity.v1", json.dumps(event).encode(), key=m.encode()
            )
    finally:
        await producer.stop()


ACK_CASES = len(ROLES) * 2  # HTTP and CLI


@pytest.fixture(scope="module")
def engine(
    settings: Settings, stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    tmp = tmp_path_factory.mktemp("alerts-security")
    name = unique("t_alsec").replace("-", "_")
    with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
        create_database(admin, name)
    pg = PostgresSettings(**{**settings.postgres.model_dump(), "database": name})
    prefix = unique("as").replace("-", "")
    test_settings = settings.model_copy(
        update={
            "kafka": KafkaSettings(**{**settings.kafka.model_dump(), "topic_prefix": prefix}),
            "postgres": pg,
        }
    )
    asyncio.run(ensure_topics(test_settings))
    rules = tmp / "rules.yaml"
    rules.write_text(RULES)
    port = free_port()
    env = {
        **os.environ,
        "POSFLOW_KAFKA__TOPIC_PREFIX": prefix,
        "POSFLOW_POSTGRES__DATABASE": name,
        "POSFLOW_SERVICES__ALERTS": str(port),
        "POSFLOW_ALERTS__RULES_FILE": str(rules),
        "POSFLOW_ALERTS__TICK_S": "0.2",
        "POSFLOW_ALERTS__RELOAD_POLL_S": "0.3",
        "POSFLOW_ALERTS__LOG_NOTIFICATIONS": "false",
    }
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
    log = tmp / "engine.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "alerts", "run"],
            env=env, cwd=ROOT, stdout=out, stderr=out,
        )  # fmt: skip
    eng = Engine(f"http://127.0.0.1:{port}", pg.dsn(), env, rules, prefix, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{eng.base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "engine not ready in 60 s:\n" + log.read_text()
            time.sleep(0.3)
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            for role in Role:
                if role is Role.MERCHANT:
                    merchant = unique("MK")
                    conn.execute(
                        "INSERT INTO merchants (merchant_id, name) VALUES (%s, %s)",
                        [merchant, "shop"],
                    )
                    issue_merchant_key(
                        conn, LocalMasterKey(secrets.token_bytes(32)), merchant,
                        actor=Principal("test-admin", Role.SECURITY_ADMIN), source="test",
                    )  # fmt: skip
                    eng.keys[role] = issue_key(conn, merchant, "shop").token
                else:
                    eng.keys[role] = issue_key(conn, None, f"{role.value}-person", role=role).token
        merchants = [unique("MI") for _ in range(ACK_CASES)]
        asyncio.run(_integrity(test_settings, prefix, merchants))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = eng.rows(
                "SELECT alert_id, subject_id FROM alerts"
                " WHERE state = 'firing' AND rule = 'ledger_integrity'"
            )
            if len(rows) == ACK_CASES:
                break
            time.sleep(0.3)
        by_merchant = {s: a for a, s in rows}
        assert sorted(by_merchant) == sorted(merchants), log.read_text()[-3000:]
        eng.firing = [by_merchant[m] for m in merchants]
        yield eng
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


# What each role gets per action (HTTP status).
ACTIONS = ("list_alerts", "list_silences", "get_rules", "ack", "silence", "unsilence", "reload")
READS = ("list_alerts", "list_silences", "get_rules")
ALLOWED: dict[Role, set[str]] = {
    Role.SUPPORT_AGENT: {*READS, "ack"},
    Role.SUPPORT_LEAD: set(ACTIONS),
    Role.FINANCE: set(),
    Role.MERCHANT: set(),
    Role.SECURITY_ADMIN: set(),
}
ACTION_NAME = {
    "list_alerts": "alert.read",
    "list_silences": "alert.read",
    "get_rules": "alert.read",
    "ack": "alert.acknowledge",
    "silence": "silence.manage",
    "unsilence": "silence.manage",
    "reload": "rule.change",
}


def _expected_status(role: Role | None, action: str) -> int:
    if role is None:
        return 401
    if action not in ALLOWED[role]:
        return 403
    return 201 if action == "silence" else 200


def _new_silence(eng: Engine) -> str:
    r = eng.call("POST", "/silences", Role.SUPPORT_LEAD, {"matchers": {"rule": unique("x")}})
    assert r.status_code == 201, r.text
    return str(r.json()["silence_id"])


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("role", ROLES, ids=_rid)
def test_every_role_against_every_alerts_action_over_http(
    engine: Engine, role: Role | None, action: str
) -> None:
    alert_id = engine.firing[ROLES.index(role)]
    silence_id = _new_silence(engine) if action == "unsilence" else None
    rules_target = f"rules:{engine.rules}"
    request, target = {
        "list_alerts": (("GET", "/alerts", None), "alerts:*"),
        "list_silences": (("GET", "/silences", None), "silences:*"),
        "get_rules": (("GET", "/rules", None), rules_target),
        "ack": (("POST", f"/alerts/{alert_id}/ack", {}), f"alert:{alert_id}"),
        "silence": (
            ("POST", "/silences", {"matchers": {"rule": "test_paper_out"}, "duration": "5m"}),
            "silence:new",
        ),
        "unsilence": (("DELETE", f"/silences/{silence_id}", None), f"silence:{silence_id}"),
        "reload": (("POST", "/rules/reload", {}), rules_target),
    }[action]
    silences_before = engine.rows("SELECT count(*) FROM alert_silences")[0][0]
    seq = engine.head()

    method, path, body = request
    r = engine.call(method, path, role, body)
    status = _expected_status(role, action)
    assert r.status_code == status, r.text
    audit = engine.audit_after(seq)
    key_id = engine.key_id(role)
    actor = "anonymous" if key_id is None else f"api-key:{key_id}"
    role_name = "none" if role is None else role.value

    if status >= 400:
        assert r.headers["content-type"] == "application/problem+json"
        problem = r.json()
        assert problem["status"] == status
        assert problem["instance"] == path
        if status == 401:
            assert problem["detail"].startswith("missing Authorization header")
            assert r.headers["www-authenticate"] == 'Bearer realm="posflow"'
        else:
            assert problem["detail"].startswith(f"access denied: {role} '{actor}' may not")
        assert [(a["actor"], a["role"], a["action"], a["target"], a["source"], a["outcome"])
                for a in audit] == [
            (actor, role_name, ACTION_NAME[action], target, SOURCE, "refused")
        ]  # fmt: skip
        assert audit[0]["detail"]["status"] == status
        # Nothing changed.
        if action == "ack":
            assert engine.rows("SELECT state FROM alerts WHERE alert_id = %s", alert_id) == [
                ("firing",)
            ]
        if action == "silence":
            assert engine.rows("SELECT count(*) FROM alert_silences")[0][0] == silences_before
        return

    assert role is not None
    label = "shop" if role is Role.MERCHANT else f"{role.value}-person"
    if action in READS:
        assert audit == []  # reads are not administrative actions: nothing recorded
        return
    assert len(audit) == 1, audit
    rec = audit[0]
    if action == "silence":
        silence_id = r.json()["silence_id"]
        target = f"silence:{silence_id}"
    got = (rec["actor"], rec["role"], rec["action"], rec["target"], rec["source"], rec["outcome"])
    assert got == (actor, role.value, ACTION_NAME[action], target, SOURCE, "ok")
    assert rec["detail"]["key_label"] == label
    by = f"{actor} ({label})"
    if action == "ack":
        assert rec["detail"]["rule"] == "ledger_integrity"
        assert rec["detail"]["state_before"] == "firing"
        assert engine.rows(
            "SELECT state, acknowledged_by FROM alerts WHERE alert_id = %s", alert_id
        ) == [("acknowledged", by)]
    elif action == "silence":
        assert rec["detail"]["matchers"] == ["rule=test_paper_out"]
        assert rec["detail"]["duration_s"] == 300
        assert engine.rows(
            "SELECT created_by FROM alert_silences WHERE silence_id = %s", silence_id
        ) == [(by,)]
    elif action == "unsilence":
        rows = engine.rows("SELECT ends_at <= now() FROM alert_silences WHERE silence_id = %s",
                           silence_id)  # fmt: skip
        assert rows == [(True,)]
    elif action == "reload":
        sha = hashlib.sha256(engine.rules.read_bytes()).hexdigest()
        assert rec["detail"]["file_sha256"] == sha
        assert rec["detail"]["changed"] is False
        assert r.json()["file_sha256"] == sha


@pytest.mark.parametrize("role", ROLES, ids=_rid)
def test_cli_ack_and_silence_are_authorised_and_audited_like_http(
    engine: Engine, role: Role | None
) -> None:
    alert_id = engine.firing[len(ROLES) + ROLES.index(role)]
    key_id = engine.key_id(role)
    actor = "anonymous" if key_id is None else f"api-key:{key_id}"

    seq = engine.head()
    ack = engine.cli("alerts", "ack", alert_id, role=role)
    ack_audit = engine.audit_after(seq)
    seq = engine.head()
    sil = engine.cli("alerts", "silence", "-m", "rule=test_paper_out", "--for", "10m", role=role)
    sil_audit = engine.audit_after(seq)

    if role is None:
        # No key: the CLI says so before calling; nothing reached the engine.
        for out in (ack, sil):
            assert out.returncode == 1
            assert out.stderr.startswith("posflow: error: no staff API key")
            assert len(out.stderr.strip().splitlines()) == 1
        assert ack_audit == sil_audit == []
        bad = {**engine.env, "POSFLOW_STAFF_KEY": "pf_0123456789abcdef_" + "A" * 43}
        out = subprocess.run(
            [sys.executable, "-m", "cli", "alerts", "ack", alert_id],
            env=bad, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 1
        assert out.stderr.strip() == (
            f"posflow: error: POST /alerts/{alert_id}/ack: HTTP 401: unknown API key"
        )
        [rec] = engine.audit_after(seq)
        assert (rec["actor"], rec["role"], rec["action"], rec["target"], rec["source"],
                rec["outcome"]) == ("api-key:0123456789abcdef", "none", "alert.acknowledge",
                                    f"alert:{alert_id}", SOURCE, "refused")  # fmt: skip
        assert rec["detail"]["client"] == CLIENT
        return

    for out, allowed, audit, action, planned in (
        (ack, "ack" in ALLOWED[role], ack_audit, "alert.acknowledge", f"alert:{alert_id}"),
        (sil, "silence" in ALLOWED[role], sil_audit, "silence.manage", "silence:new"),
    ):
        assert len(audit) == 1, audit
        rec = audit[0]
        target = planned
        if allowed:
            assert out.returncode == 0, out.stderr
            if action == "silence.manage":
                target = f"silence:{out.stdout.split()[1]}"
            assert rec["outcome"] == "ok"
        else:
            assert out.returncode == 1
            assert out.stderr.startswith("posflow: error: ")
            assert "HTTP 403: access denied" in out.stderr
            assert len(out.stderr.strip().splitlines()) == 1
            assert rec["outcome"] == "refused"
        assert (rec["actor"], rec["role"], rec["action"], rec["target"], rec["source"]) == (
            actor, role.value, action, target, SOURCE,
        )  # fmt: skip
        assert rec["detail"]["client"] == CLIENT
    if "ack" in ALLOWED[role]:
        assert ack.stdout.startswith(f"acknowledged {alert_id} (ledger_integrity ")
        assert engine.rows("SELECT state FROM alerts WHERE alert_id = %s", alert_id) == [
            ("acknowledged",)
        ]
    else:
        assert engine.rows("SELECT state FROM alerts WHERE alert_id = %s", alert_id) == [
            ("firing",)
        ]


def _wait_audit(engine: Engine, seq: int, actor: str, seconds: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = [a for a in engine.audit_after(seq) if a["actor"] == actor]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no audit record by {actor}:\n" + engine.log.read_text()[-2000:])


def test_rules_file_reloads_are_recorded_with_the_file_hash(engine: Engine) -> None:
    old = hashlib.sha256(engine.rules.read_bytes()).hexdigest()
    target = f"rules:{engine.rules}"

    seq = engine.head()
    engine.rules.write_text(RULES.replace("for: 1h", "for: 2h"))
    new = hashlib.sha256(engine.rules.read_bytes()).hexdigest()
    rec = _wait_audit(engine, seq, "system:file-reload")
    assert (rec["role"], rec["action"], rec["target"], rec["outcome"]) == (
        "system", "rule.change", target, "ok",
    )  # fmt: skip
    assert rec["source"] == f"system:{socket.gethostname()}"
    assert rec["detail"] == {
        "file_sha256": new, "previous_sha256": old, "changed": True, "rules": 16,
    }  # fmt: skip

    seq = engine.head()
    engine.rules.write_text(RULES.replace("op: eq", "op: below"))
    bad = hashlib.sha256(engine.rules.read_bytes()).hexdigest()
    rec = _wait_audit(engine, seq, "system:file-reload")
    assert (rec["action"], rec["outcome"]) == ("rule.change", "failed")
    assert rec["detail"]["file_sha256"] == bad
    assert rec["detail"]["in_effect_sha256"] == new
    assert "rule 'test_paper_out' field 'when.0.op'" in rec["detail"]["reason"]

    # The bad file through the API: 422 problem, recorded as failed for the lead.
    seq = engine.head()
    r = engine.call("POST", "/rules/reload", Role.SUPPORT_LEAD, {})
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    assert "the last good rules stay in effect" in r.json()["detail"]
    [rec] = engine.audit_after(seq)
    assert (rec["actor"], rec["outcome"]) == (
        f"api-key:{engine.key_id(Role.SUPPORT_LEAD)}", "failed",
    )  # fmt: skip
    assert engine.call("GET", "/rules", Role.SUPPORT_AGENT).json()["file_sha256"] == new

    seq = engine.head()
    engine.rules.write_text(RULES)  # back to the original
    rec = _wait_audit(engine, seq, "system:file-reload")
    assert rec["detail"]["file_sha256"] == old
    assert rec["outcome"] == "ok"


def test_unknown_alert_and_silence_answer_404_and_are_recorded_as_failed(
    engine: Engine,
) -> None:
    seq = engine.head()
    r = engine.call("POST", "/alerts/nope/ack", Role.SUPPORT_AGENT, {})
    assert r.status_code == 404
    assert r.json()["detail"] == "no firing alert nope"
    r = engine.call("DELETE", "/silences/nope", Role.SUPPORT_LEAD)
    assert r.status_code == 404
    got = [(a["action"], a["target"], a["outcome"]) for a in engine.audit_after(seq)]
    assert got == [
        ("alert.acknowledge", "alert:nope", "failed"),
        ("silence.manage", "silence:nope", "failed"),
    ]
    # A bad body names the field, after authorisation.
    r = engine.call("POST", "/silences", Role.SUPPORT_LEAD, {"matchers": {}})
    assert r.status_code == 400
    assert r.json()["errors"] == [
        {"in": "body", "name": "matchers", "detail": "a non-empty object of label -> value"}
    ]


def test_a_revoked_staff_key_is_refused_with_401_and_recorded(engine: Engine) -> None:
    with psycopg.connect(engine.dsn, autocommit=True) as conn:
        token = issue_key(conn, None, "leaver", role=Role.SUPPORT_LEAD).token
        key_id = token.split("_")[1]
        conn.execute("UPDATE merchant_api_keys SET revoked_at = now() WHERE key_id = %s", [key_id])
    seq = engine.head()
    r = httpx.get(f"{engine.base}/alerts", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401
    assert r.json()["detail"] == f"API key {key_id} was revoked"
    [rec] = engine.audit_after(seq)
    assert (rec["actor"], rec["role"], rec["action"], rec["outcome"]) == (
        f"api-key:{key_id}", "none", "alert.read", "refused",
    )  # fmt: skip


def test_the_audit_chain_verifies_after_all_of_it(engine: Engine) -> None:
    actions = {r[0] for r in engine.rows("SELECT DISTINCT action FROM audit_log")}
    assert {"alert.acknowledge", "silence.manage", "rule.change", "alert.read"} <= actions
    out = subprocess.run(
        [sys.executable, "-m", "cli", "audit", "verify"],
        env=engine.env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("audit trail intact: ")
    checked = int(out.stdout.split()[3])
    assert checked == engine.head() > 60
