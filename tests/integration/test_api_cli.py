"""`posflow api` and `posflow api keys ...` as a user runs them: real processes, real database."""

from __future__ import annotations

import base64
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg

from posflow.security.audit import records
from posflow.security.keys import LocalMasterKey, issue_merchant_key
from posflow.security.roles import Principal, Role
from posflow.settings import PostgresSettings
from posflow.storage import migrate
from tests.conftest import free_port, unique

POSFLOW = str(Path(sys.executable).with_name("posflow"))


MASTER = secrets.token_bytes(32)


def _env(pg: PostgresSettings, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "POSFLOW_POSTGRES__DATABASE": pg.database,
        "POSFLOW_SERVICES__API": str(port),
        "POSFLOW_SECURITY__MASTER_KEY": base64.b64encode(MASTER).decode(),
    }


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [POSFLOW, "api", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_keys_issue_list_revoke_and_serve_until_sigterm(pg: PostgresSettings) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
    port = free_port()
    env = _env(pg, port)
    merchant = unique("m")

    issued = _run(env, "keys", "issue", "--merchant", merchant, "--label", "pos-app")
    assert issued.returncode == 0, issued.stderr
    key = re.search(r"api key:  (pf_\S+)", issued.stdout)
    assert key is not None, issued.stdout
    key_id = key.group(1).split("_")[1]
    assert f"merchant {merchant!r} is not in the merchants table" in issued.stderr
    assert f"merchant {merchant!r} has no active merchant key" in issued.stderr
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO merchants (merchant_id, name) VALUES (%s, 'shop')", [merchant])
        issue_merchant_key(
            conn, LocalMasterKey(MASTER), merchant, actor=Principal("a", Role.SECURITY_ADMIN),
            source="test",
        )  # fmt: skip
    with psycopg.connect(pg.dsn()) as conn:
        stored = conn.execute(
            "SELECT merchant_id, label, secret_sha256 FROM merchant_api_keys WHERE key_id = %s",
            [key_id],
        ).fetchone()
    assert stored is not None
    assert stored[:2] == (merchant, "pos-app")
    assert key.group(1).split("_", 2)[2].encode() not in bytes(stored[2])  # only the hash

    listed = _run(env, "keys", "list", "--merchant", merchant)
    assert re.search(rf"^{key_id}\s+active\s+merchant\s+created .*pos-app$", listed.stdout, re.M), (
        listed.stdout
    )
    staff = _run(
        env, "keys", "issue", "--role", "support_agent", "--label", "desk", "--actor", "carol"
    )
    assert staff.returncode == 0, staff.stderr
    staff_key = re.search(r"api key:  (pf_\S+)", staff.stdout)
    assert staff_key is not None
    assert "role:     support_agent" in staff.stdout
    bad = _run(env, "keys", "issue", "--role", "finance", "--merchant", merchant)
    assert bad.returncode == 1
    assert "a finance key is not bound to a merchant" in bad.stderr
    listed = _run(env, "keys", "list", "--role", "support_agent")
    assert "support_agent" in listed.stdout
    assert "desk" in listed.stdout

    server = subprocess.Popen(
        [POSFLOW, "api"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.communicate()[1]
            assert time.monotonic() < deadline, "posflow api not ready in 30 s"
            time.sleep(0.1)
        auth = {"Authorization": f"Bearer {key.group(1)}"}
        resp = httpx.get(f"{base}/v1/merchants/{merchant}/balances", headers=auth)
        assert resp.json() == {"merchant_id": merchant, "balances": []}

        staff_auth = {"Authorization": f"Bearer {staff_key.group(1)}"}
        listing = httpx.get(f"{base}/v1/merchants", headers=staff_auth)
        assert listing.json()["items"] == [
            {"merchant_id": merchant, "name": "shop", "terminals": 0, "balances": None}
        ]
        assert (
            httpx.get(f"{base}/v1/merchants/{merchant}/balances", headers=staff_auth).status_code
            == 403
        )

        revoked = _run(env, "keys", "revoke", key_id)
        assert revoked.returncode == 0, revoked.stderr
        assert f"revoked {key_id} (merchant {merchant})" in revoked.stdout
        resp = httpx.get(f"{base}/v1/merchants/{merchant}/balances", headers=auth)
        assert resp.status_code == 401
        assert resp.json()["detail"] == f"API key {key_id} was revoked"
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    # uvicorn re-raises the signal after its graceful shutdown, as a SIGTERM'd process should.
    assert server.returncode in (0, -signal.SIGTERM), stderr
    assert "merchant feed API on http://127.0.0.1:" in stderr
    assert "Traceback" not in stderr

    missing = _run(env, "keys", "revoke", "0123456789abcdef")
    assert missing.returncode == 1
    assert "no API key with id '0123456789abcdef'" in missing.stderr
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        issued_log = [
            (r.actor, r.role, r.action, r.detail.get("key_role"))
            for r in records(conn, action="key.issue")
            if r.target.startswith("api-key:")
        ]
        assert issued_log[-1] == ("carol", "security_admin", "key.issue", "support_agent")
        (revoke_rec,) = records(conn, target=f"api-key:{key_id}", action="key.revoke")
        assert revoke_rec.outcome == "ok"
        assert revoke_rec.source.startswith("cli:")


def test_webhooks_add_list_replay_remove(pg: PostgresSettings) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
        merchant = unique("m")
        conn.execute("INSERT INTO merchants (merchant_id, name) VALUES (%s, 'shop')", [merchant])
        issue_merchant_key(
            conn, LocalMasterKey(MASTER), merchant, actor=Principal("a", Role.SECURITY_ADMIN),
            source="test",
        )  # fmt: skip
    env = _env(pg, free_port())
    added = _run(env, "webhooks", "add", "--merchant", merchant, "--url", "https://example.com/h")
    assert added.returncode == 0, added.stderr
    endpoint = re.search(r"endpoint:\s+(wh[0-9a-f]{16})", added.stdout)
    secret = re.search(r"signing secret: (whsec_\S+)", added.stdout)
    assert endpoint is not None
    assert secret is not None
    listed = _run(env, "webhooks", "list", "--merchant", merchant)
    assert f"{endpoint.group(1)}  {merchant}  active   delivered 0" in listed.stdout
    assert secret.group(1) not in listed.stdout
    replayed = _run(env, "webhooks", "replay", "--merchant", merchant, "--from-seq", "1")
    assert f"{endpoint.group(1)}: delivering again from seq 1" in replayed.stdout
    plain = _run(env, "webhooks", "add", "--merchant", merchant, "--url", "http://example.com/h")
    assert plain.returncode == 1
    assert "plain http" in plain.stderr
    removed = _run(env, "webhooks", "remove", endpoint.group(1))
    assert removed.returncode == 0, removed.stderr
    assert "no webhook endpoints" in _run(env, "webhooks", "list").stdout


def test_production_profile_refuses_to_start_with_dev_defaults(pg: PostgresSettings) -> None:
    env = {**_env(pg, free_port()), "POSFLOW_SECURITY__PROFILE": "production"}
    for args in ([], ["webhooks", "deliver"]):
        result = _run(env, *args)
        assert result.returncode == 1
        assert "the production profile refuses development defaults" in result.stderr
        assert "POSFLOW_POSTGRES__PASSWORD" in result.stderr
        assert "posflow-dev" not in result.stderr  # values are never shown
