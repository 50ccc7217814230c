"""`posflow api` and `posflow api keys ...` as a user runs them: real processes, real database."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg

from posflow.settings import PostgresSettings
from posflow.storage import migrate
from tests.conftest import free_port, unique

POSFLOW = str(Path(sys.executable).with_name("posflow"))


def _env(pg: PostgresSettings, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "POSFLOW_POSTGRES__DATABASE": pg.database,
        "POSFLOW_SERVICES__API": str(port),
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
    with psycopg.connect(pg.dsn()) as conn:
        stored = conn.execute(
            "SELECT merchant_id, label, secret_sha256 FROM merchant_api_keys WHERE key_id = %s",
            [key_id],
        ).fetchone()
    assert stored is not None
    assert stored[:2] == (merchant, "pos-app")
    assert key.group(1).split("_", 2)[2].encode() not in bytes(stored[2])  # only the hash

    listed = _run(env, "keys", "list", "--merchant", merchant)
    assert re.search(rf"^{key_id}\s+active\s+created .*pos-app$", listed.stdout, re.M), (
        listed.stdout
    )

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
