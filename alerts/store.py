"""The engine's state in PostgreSQL: written per batch with the consumed offsets.

One transaction holds a batch's terminal facts, alert rows, silences, the
notification outbox rows and the next offsets, so after a crash the engine
reloads exactly the state that matches the offsets it resumes from: no record
is applied twice, no notification is lost or duplicated in the outbox.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from alerts.facts import Merchant
from alerts.lifecycle import Alert, Changes, Silence
from posflow.security.audit import Outcome, record
from posflow.storage.offsets import load_offsets, store_offsets

__all__ = ["AlertStore", "AuditEntry"]

Conn = psycopg.Connection[tuple[Any, ...]]


@dataclass(frozen=True)
class AuditEntry:
    """One audit record to write (``posflow.security.audit.record``'s arguments)."""

    actor: str
    role: str
    action: str
    target: str
    source: str
    outcome: Outcome = "ok"
    detail: dict[str, Any] = field(default_factory=dict)

    def write(self, conn: psycopg.Connection[Any]) -> None:
        record(conn, **vars(self))


# A batch's changed terminal facts: COPY into a session-local staging table, then one
# upsert. One INSERT per terminal (executemany, Jsonb through the standard library's
# json) was a fifth of the service's CPU (docs/benchmarks/alerts.md).
_FACTS_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS alert_facts_stage (terminal_id text, facts jsonb)"
    " ON COMMIT DELETE ROWS"
)
_COPY_FACTS = "COPY alert_facts_stage (terminal_id, facts) FROM STDIN"
_UPSERT_FACTS = (
    "INSERT INTO alert_terminal_facts (terminal_id, facts, updated_at)"
    " SELECT terminal_id, facts, now() FROM alert_facts_stage ON CONFLICT (terminal_id)"
    " DO UPDATE SET facts = EXCLUDED.facts, updated_at = now()"
)


def _write_facts(cur: psycopg.Cursor[Any], terminals: dict[str, dict[str, Any]]) -> None:
    cur.execute(_FACTS_STAGE)
    with cur.copy(_COPY_FACTS) as copy:
        for terminal, facts in terminals.items():
            copy.write_row((terminal, orjson.dumps(facts).decode()))
    cur.execute(_UPSERT_FACTS)


log = logging.getLogger("posflow.alerts")


def _ts(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


def _ep(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


class AlertStore:
    """The engine's tables, on one connection opened by :meth:`open` (not at construction:
    the service opens its connections when it runs)."""

    def __init__(self, conninfo: str, *, group: str, channels: list[str]) -> None:
        self.conninfo = conninfo
        self.group = group
        self.channels = channels
        self._conn: Conn | None = None

    @property
    def conn(self) -> Conn:
        if self._conn is None:
            raise RuntimeError("the alert store is not open (AlertStore.open() first)")
        return self._conn

    def open(self) -> None:
        if self._conn is None:
            self._conn = psycopg.connect(self.conninfo)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def load_offsets(self) -> dict[tuple[str, int], int]:
        return load_offsets(self.conn, self.group)

    def load_state(self) -> tuple[dict[str, dict[str, Any]], list[Alert], list[Silence]]:
        terminals = {
            str(t): dict(f)
            for t, f in self.conn.execute("SELECT terminal_id, facts FROM alert_terminal_facts")
        }
        alerts = [
            Alert(
                alert_id=r[0],
                rule=r[1],
                severity=r[2],
                subject_kind=r[3],
                subject_id=r[4],
                merchant_id=r[5],
                state=r[6],
                summary=r[7],
                labels=dict(r[8]),
                annotations=dict(r[9]),
                started_at=r[10].timestamp(),
                fired_at=_ep(r[11]),
                acknowledged_at=_ep(r[12]),
                acknowledged_by=r[13],
                notified=r[14],
                suppressed_by=r[15],
                last_event_at=_ep(r[16]),
                value=r[17],
            )
            for r in self.conn.execute(
                "SELECT alert_id, rule, severity, subject_kind, subject_id, merchant_id, state,"
                " summary, labels, annotations, started_at, fired_at, acknowledged_at,"
                " acknowledged_by, notified, suppressed_by, last_event_at, value"
                " FROM alerts WHERE state <> 'resolved'"
            )
        ]
        silences = [
            Silence(r[0], dict(r[1]), r[2].timestamp(), r[3].timestamp(), r[4], r[5])
            for r in self.conn.execute(
                "SELECT silence_id, matchers, starts_at, ends_at, created_by, comment"
                " FROM alert_silences WHERE ends_at > now()"
            )
        ]
        self.conn.commit()
        return terminals, alerts, silences

    def load_reference(self) -> tuple[dict[str, Merchant], dict[str, str]]:
        merchants = {
            str(r[0]): Merchant(str(r[0]), r[1] or "", r[2] or "UTC", dict(r[3] or {}), r[4], r[5])
            for r in self.conn.execute(
                "SELECT merchant_id, name, timezone, opening_hours, lat, lon FROM merchants"
            )
        }
        terminals = {
            str(t): str(m)
            for t, m in self.conn.execute("SELECT terminal_id, merchant_id FROM terminals")
        }
        self.conn.commit()
        return merchants, terminals

    def write(
        self,
        changes: Changes,
        offsets: dict[tuple[str, int], int],
        audit: list[AuditEntry] | None = None,
    ) -> None:
        """Everything of one batch, and the offsets after it, in one transaction.

        ``audit`` records (an acknowledgement, a silence, a rule change) commit or roll
        back together with the change they record.
        """
        if self.conn.info.transaction_status != TransactionStatus.IDLE:
            # A read left its implicit transaction open: this batch would become a
            # savepoint inside it, committed only when something commits that (and the
            # staging table, emptied at commit, would keep the previous batch's rows).
            log.error(
                "the alert store's connection was left inside a transaction (%s); "
                "ending it before writing the batch",
                self.conn.info.transaction_status.name,
            )
            if self.conn.info.transaction_status == TransactionStatus.INERROR:
                self.conn.rollback()
            else:
                self.conn.commit()  # only reads can be in it: every write comes here
        with self.conn.transaction(), self.conn.cursor() as cur:
            for entry in audit or ():
                entry.write(self.conn)
            if changes.terminals:
                _write_facts(cur, changes.terminals)
            if changes.dropped:
                cur.execute("DELETE FROM alerts WHERE alert_id = ANY(%s)", [list(changes.dropped)])
            if changes.alerts:
                cur.executemany(
                    "INSERT INTO alerts (alert_id, rule, severity, subject_kind, subject_id,"
                    " merchant_id, state, summary, labels, annotations, started_at, fired_at,"
                    " acknowledged_at, acknowledged_by, resolved_at, notified, suppressed_by,"
                    " last_event_at, value, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s,"
                    " %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now())"
                    " ON CONFLICT (alert_id) DO UPDATE SET state = EXCLUDED.state,"
                    " summary = EXCLUDED.summary, annotations = EXCLUDED.annotations,"
                    " fired_at = EXCLUDED.fired_at, acknowledged_at = EXCLUDED.acknowledged_at,"
                    " acknowledged_by = EXCLUDED.acknowledged_by,"
                    " resolved_at = EXCLUDED.resolved_at, notified = EXCLUDED.notified,"
                    " suppressed_by = EXCLUDED.suppressed_by,"
                    " last_event_at = EXCLUDED.last_event_at, value = EXCLUDED.value,"
                    " updated_at = now()",
                    [
                        (
                            a.alert_id,
                            a.rule,
                            a.severity,
                            a.subject_kind,
                            a.subject_id,
                            a.merchant_id,
                            a.state,
                            a.summary,
                            Jsonb(a.labels),
                            Jsonb(a.annotations),
                            _ts(a.started_at),
                            _ts(a.fired_at),
                            _ts(a.acknowledged_at),
                            a.acknowledged_by,
                            _ts(a.resolved_at),
                            a.notified,
                            a.suppressed_by,
                            _ts(a.last_event_at),
                            a.value,
                        )
                        for a in changes.alerts.values()
                    ],
                )
            if changes.silences:
                cur.executemany(
                    "INSERT INTO alert_silences (silence_id, matchers, starts_at, ends_at,"
                    " created_by, comment) VALUES (%s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (silence_id) DO UPDATE SET ends_at = EXCLUDED.ends_at",
                    [
                        (
                            s.silence_id,
                            Jsonb(s.matchers),
                            _ts(s.starts_at),
                            _ts(s.ends_at),
                            s.created_by,
                            s.comment,
                        )
                        for s in changes.silences.values()
                    ],
                )
            if changes.notifications:
                cur.executemany(
                    "INSERT INTO alert_notifications (notification_id, channel, alert_id, event,"
                    " payload, created_at) VALUES (%s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT DO NOTHING",
                    [
                        (
                            n.notification_id,
                            ch,
                            n.alert_id,
                            n.event,
                            Jsonb(n.payload),
                            _ts(n.created_at),
                        )
                        for n in changes.notifications
                        for ch in self.channels
                    ],
                )
            store_offsets(self.conn, self.group, offsets)
