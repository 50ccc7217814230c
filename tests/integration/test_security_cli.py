"""`posflow pki | keys | audit` on a real database, each change in the audit trail."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import typer
from typer.testing import CliRunner

from posflow.errors import PosflowError
from posflow.security.audit import records, verify
from posflow.security.cli import register
from posflow.settings import PostgresSettings
from posflow.storage import migrate


@pytest.fixture
def conn(pg: PostgresSettings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
        conn.execute("INSERT INTO merchants (merchant_id, name) VALUES ('M-7', 'Kiosk')")
        yield conn


def _run(pg: PostgresSettings, tmp_path: Path, *args: str) -> str:
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(
        app,
        list(args),
        env={"POSFLOW_POSTGRES__DATABASE": pg.database, "POSFLOW_STACK__DIR": str(tmp_path)},
    )
    if result.exception is not None:
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


def test_pki_and_keys_commands_are_audited(
    conn: psycopg.Connection[Any], pg: PostgresSettings, tmp_path: Path
) -> None:
    out = _run(pg, tmp_path, "pki", "issue", "T-0193", "--actor", "alice")
    assert "issued T-0193 serial" in out
    assert (tmp_path / "pki" / "terminals" / "T-0193.key").stat().st_mode & 0o777 == 0o600
    assert "T-0193" in _run(pg, tmp_path, "pki", "list")
    out = _run(pg, tmp_path, "pki", "revoke", "T-0193", "--reason", "lost", "--actor", "alice")
    assert "not running" in out  # this stack directory has no broker: the CRL is read at start
    assert "key version 1 active" in _run(
        pg, tmp_path, "keys", "issue", "--merchant", "M-7", "--actor", "bob"
    )
    assert "key version 2 active" in _run(
        pg, tmp_path, "keys", "rotate", "--merchant", "M-7", "--actor", "bob"
    )
    with pytest.raises(PosflowError, match="--yes"):
        _run(pg, tmp_path, "keys", "revoke", "--merchant", "M-7")
    _run(
        pg,
        tmp_path,
        "keys",
        "revoke",
        "--merchant",
        "M-7",
        "--yes",
        "--actor",
        "bob",
        "--reason",
        "fraud",
    )
    assert "v2    revoked   created by bob revoked by bob" in _run(
        pg, tmp_path, "keys", "status", "--merchant", "M-7"
    )
    trail = [(r.actor, r.action, r.target, r.outcome) for r in records(conn)]
    assert trail == [
        ("alice", "cert.issue", "terminal:T-0193", "ok"),
        ("alice", "cert.revoke", "terminal:T-0193", "ok"),
        ("bob", "key.issue", "merchant:M-7", "ok"),
        ("bob", "key.rotate", "merchant:M-7", "ok"),
        ("bob", "key.revoke", "merchant:M-7", "ok"),
    ]
    assert all(r.source.startswith("cli:") for r in records(conn))
    assert verify(conn).ok
    assert "audit trail intact: 5 records" in _run(pg, tmp_path, "audit", "verify")
    assert "key.revoke merchant:M-7" in _run(pg, tmp_path, "audit", "tail", "-n", "1")


def test_the_positional_merchant_of_keys_still_works_with_a_deprecation_warning(
    conn: psycopg.Connection[Any], pg: PostgresSettings, tmp_path: Path
) -> None:
    out = _run(pg, tmp_path, "keys", "issue", "M-7", "--actor", "bob")
    assert "merchant M-7: key version 1 active" in out
    assert (
        "posflow: warning: `posflow keys issue M-7` is deprecated; "
        "use `posflow keys issue --merchant M-7`"
    ) in out
    assert "v1    active    created by bob" in _run(pg, tmp_path, "keys", "status", "M-7")
