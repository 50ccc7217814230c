"""The hash-chained audit trail on a real PostgreSQL: tampering and deletion are named."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import typer
from typer.testing import CliRunner

from posflow.errors import PosflowError
from posflow.security.audit import GENESIS, chain_hash, record, records, verify
from posflow.security.cli import register
from posflow.settings import PostgresSettings
from posflow.storage import migrate


@pytest.fixture
def conn(pg: PostgresSettings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
        yield conn


def _five(conn: psycopg.Connection[Any]) -> None:
    for i, action in enumerate(
        ["alert.acknowledge", "silence.manage", "rule.change", "payout.create", "cert.issue"]
    ):
        record(
            conn,
            actor=f"user{i}",
            role="support_lead",
            action=action,
            target=f"alert:A-{i}",
            source="api:10.0.0.1",
            detail={"note": f"step {i}", "amount_minor": 1250 * i, "currency": "EUR"},
        )


def _cli_verify(pg: PostgresSettings) -> tuple[int, str]:
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(
        app, ["audit", "verify"], env={"POSFLOW_POSTGRES__DATABASE": pg.database}
    )
    if isinstance(result.exception, PosflowError):
        return 1, str(result.exception)
    return result.exit_code, result.output


def test_intact_chain_verifies_and_links_each_record(
    conn: psycopg.Connection[Any], pg: PostgresSettings
) -> None:
    _five(conn)
    rows = records(conn)
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0].prev_hash == GENESIS
    for prev, cur in itertools.pairwise(rows):
        assert cur.prev_hash == prev.hash
        assert cur.hash == chain_hash(prev.hash, cur.body())
    result = verify(conn)
    assert (result.ok, result.checked, result.head_seq) == (True, 5, 5)
    assert _cli_verify(pg) == (0, "audit trail intact: 5 records, head #5\n")


def test_altered_record_is_named(conn: psycopg.Connection[Any], pg: PostgresSettings) -> None:
    _five(conn)
    conn.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 3")
    result = verify(conn)
    assert (result.ok, result.broken_seq, result.checked) == (False, 3, 2)
    assert "record #3 was altered" in result.reason
    code, message = _cli_verify(pg)
    assert code == 1
    assert message.startswith("audit trail broken at record #3: record #3 was altered")


def test_altered_and_rehashed_record_breaks_the_next_link(conn: psycopg.Connection[Any]) -> None:
    _five(conn)
    row = records(conn)[1]  # record #2
    body = {**row.body(), "outcome": "refused"}
    conn.execute(
        "UPDATE audit_log SET outcome = 'refused', hash = %s WHERE seq = 2",
        [chain_hash(row.prev_hash, body)],
    )
    result = verify(conn)
    assert (result.ok, result.broken_seq) == (False, 3)
    assert "does not link to record #2" in result.reason


def test_deleted_record_is_named(conn: psycopg.Connection[Any], pg: PostgresSettings) -> None:
    _five(conn)
    conn.execute("DELETE FROM audit_log WHERE seq = 4")
    result = verify(conn)
    assert (result.ok, result.broken_seq) == (False, 4)
    assert "record #4 is missing (deleted): the chain jumps from #3 to #5" in result.reason
    code, message = _cli_verify(pg)
    assert (code, message.split(":")[0]) == (1, "audit trail broken at record #4")


def test_deleted_newest_record_is_caught_by_the_chain_head(conn: psycopg.Connection[Any]) -> None:
    _five(conn)
    conn.execute("DELETE FROM audit_log WHERE seq = 5")
    result = verify(conn)
    assert (result.ok, result.broken_seq) == (False, 5)
    assert "the chain head says #5 but the log ends at #4" in result.reason


def test_concurrent_writers_never_fork_the_chain(
    conn: psycopg.Connection[Any], pg: PostgresSettings
) -> None:
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            with psycopg.connect(pg.dsn(), autocommit=True) as own:
                for i in range(25):
                    record(
                        own,
                        actor=f"w{n}",
                        role="finance",
                        action="payout.create",
                        target=f"payout:P-{n}-{i}",
                        source=f"worker-{n}",
                    )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    rows = records(conn, limit=1000)
    assert [r.seq for r in rows] == list(range(1, 101))
    assert len({r.prev_hash for r in rows}) == 100  # no two records share a parent: no fork
    assert verify(conn).ok


def test_card_data_is_redacted_and_secret_fields_are_refused(
    conn: psycopg.Connection[Any],
) -> None:
    rec = record(
        conn,
        actor="erin",
        role="support_agent",
        action="alert.acknowledge",
        target="alert:A-1",
        source="api:10.0.0.9",
        detail={"note": "customer read out 4111 1111 1111 1111 on the phone"},
    )
    stored = records(conn, limit=1)[0]
    assert stored.detail == {"note": "customer read out [REDACTED-PAN] on the phone"}
    assert stored.hash == rec.hash
    for bad in ({"webhook_secret": "x"}, {"password": "x"}, {"nested": {"api_key": "k"}}):
        with pytest.raises(PosflowError, match="named like a secret"):
            record(conn, actor="a", role="r", action="x", target="t", source="s", detail=bad)
    assert verify(conn).checked == 1  # nothing of the refused ones was written


def test_record_inside_a_rolled_back_transaction_leaves_no_trace(
    conn: psycopg.Connection[Any],
) -> None:
    _five(conn)

    def failing_change() -> None:
        with conn.transaction():
            record(conn, actor="a", role="r", action="x", target="t", source="s")
            raise RuntimeError("the change it records failed")

    with pytest.raises(RuntimeError):
        failing_change()
    result = verify(conn)
    assert (result.ok, result.head_seq) == (True, 5)
