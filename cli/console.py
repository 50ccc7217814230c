"""The main job's live console: what flows through each stage, the fleet, alerts, a balance.

Everything shown is read from where an operator would read it: each service's
``/metrics`` (rates are differences between two scrapes) and the database
(terminal state, alerts, balances). Nothing is computed from the simulator's
own idea of what it sent, so the console shows what the pipeline really did.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

__all__ = ["Snapshot", "Stage", "Watcher", "counter_totals", "render"]


@dataclass(frozen=True)
class Stage:
    """A pipeline stage as the console shows it: a service's counter, read from /metrics."""

    name: str
    service: str
    port: int
    counter: str  # metric family name without ``_total``
    labels: Mapping[str, str] = field(default_factory=dict)  # only samples with these labels


@dataclass
class Snapshot:
    at: float
    stage_totals: dict[str, float]
    stage_rates: dict[str, float]
    online: int = 0
    offline: int = 0
    health_buckets: dict[str, int] = field(default_factory=dict)
    open_alerts: list[tuple[str, str, str, str]] = field(default_factory=list)
    alerts_by_rule: dict[str, int] = field(default_factory=dict)  # fired (firing or later)
    alerts_pending: dict[str, int] = field(default_factory=dict)  # waiting out their `for`
    balance: list[tuple[str, int, int, int, int]] = field(default_factory=list)
    db_error: str | None = None


def counter_totals(
    text: str, wanted: Sequence[tuple[str, Mapping[str, str]]]
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Sum of each wanted counter's samples (matching the label filter) in a /metrics text."""
    totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    by_name: dict[str, list[Mapping[str, str]]] = {}
    for name, labels in wanted:
        by_name.setdefault(name, []).append(labels)
        totals[(name, tuple(sorted(labels.items())))] = 0.0
    for family in text_string_to_metric_families(text):
        filters = by_name.get(family.name)
        if filters is None:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            for labels in filters:
                if all(sample.labels.get(k) == v for k, v in labels.items()):
                    totals[(family.name, tuple(sorted(labels.items())))] += sample.value
    return totals


class Watcher:
    """Takes snapshots: scrapes the stages' metrics and queries the database."""

    def __init__(
        self,
        stages: Sequence[Stage],
        dsn: str,
        merchant_id: str | None = None,
        *,
        fleet: str | None = None,
    ) -> None:
        self.stages = list(stages)
        self.dsn = dsn
        self.merchant_id = merchant_id
        # Terminals and merchants of one simulated fleet (ids "T-<fleet>-..." / "M-<fleet>-...");
        # None: everything in the database.
        self.fleet = fleet
        self.http = httpx.Client(timeout=2.0)
        self.previous: Snapshot | None = None
        self.events: deque[str] = deque(maxlen=8)
        self._open: dict[str, tuple[str, str, str]] | None = None  # id -> rule, subject, state
        # A restarted service's counters start again from 0: what it had counted before is
        # carried here so totals keep growing (as Prometheus's rate() treats a reset).
        self._raw: dict[str, float] = {}
        self._carried: dict[str, float] = {}

    def close(self) -> None:
        self.http.close()

    def scrape(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        by_port: dict[int, list[Stage]] = {}
        for stage in self.stages:
            by_port.setdefault(stage.port, []).append(stage)
        for port, stages in by_port.items():
            try:
                text = self.http.get(f"http://127.0.0.1:{port}/metrics").text
            except httpx.HTTPError:
                continue  # not up (yet, or restarting): the stage shows its last total
            found = counter_totals(text, [(s.counter, s.labels) for s in stages])
            for s in stages:
                raw = found[(s.counter, tuple(sorted(s.labels.items())))]
                if raw < self._raw.get(s.name, 0.0):  # the service restarted
                    self._carried[s.name] = self._carried.get(s.name, 0.0) + self._raw[s.name]
                self._raw[s.name] = raw
                totals[s.name] = raw + self._carried.get(s.name, 0.0)
        return totals

    def snapshot(self) -> Snapshot:
        now = time.monotonic()
        totals = self.scrape()
        prev = self.previous
        if prev is not None:
            for name, value in prev.stage_totals.items():
                totals.setdefault(name, value)
        rates = {}
        if prev is not None and now > prev.at:
            rates = {
                name: max(0.0, (value - prev.stage_totals.get(name, 0.0)) / (now - prev.at))
                for name, value in totals.items()
            }
        snap = Snapshot(at=now, stage_totals=totals, stage_rates=rates)
        try:
            self._query(snap)
        except psycopg.Error as exc:
            snap.db_error = str(exc).splitlines()[0]
        self.previous = snap
        return snap

    def _query(self, snap: Snapshot) -> None:
        with psycopg.connect(self.dsn, connect_timeout=3) as conn:
            terminals = f"T-{self.fleet}-%" if self.fleet else "%"
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE online), count(*) FILTER (WHERE NOT online)"
                " FROM terminal_state WHERE terminal_id LIKE %s",
                [terminals],
            ).fetchone()
            snap.online, snap.offline = (int(row[0]), int(row[1])) if row else (0, 0)
            for bucket, n in conn.execute(
                """
                SELECT CASE WHEN health_score >= 80 THEN 'healthy (80-100)'
                            WHEN health_score >= 50 THEN 'degraded (50-79)'
                            WHEN health_score IS NULL THEN 'no score yet'
                            ELSE 'unhealthy (0-49)' END, count(*)
                  FROM terminal_state WHERE terminal_id LIKE %s GROUP BY 1
                """,
                [terminals],
            ).fetchall():
                snap.health_buckets[str(bucket)] = int(n)
            rows = conn.execute(
                """
                SELECT alert_id, rule, subject_id, state FROM alerts
                 WHERE state <> 'resolved' AND (%s OR subject_id LIKE %s OR merchant_id LIKE %s)
                 ORDER BY started_at DESC LIMIT 500
                """,
                [self.fleet is None, terminals, f"M-{self.fleet}-%"],
            ).fetchall()
            snap.open_alerts = [(str(a), str(r), str(s), str(st)) for a, r, s, st in rows]
            for rule, fired, n in conn.execute(
                "SELECT rule, fired_at IS NOT NULL, count(*) FROM alerts"
                " WHERE %s OR subject_id LIKE %s OR merchant_id LIKE %s GROUP BY 1, 2",
                [self.fleet is None, terminals, f"M-{self.fleet}-%"],
            ):
                into = snap.alerts_by_rule if fired else snap.alerts_pending
                into[str(rule)] = int(n)
            if self.merchant_id is None and self.fleet is not None:
                # The fleet's busiest merchant so far: its balance is the one that moves.
                found = conn.execute(
                    "SELECT merchant_id FROM merchant_cashflow_seq WHERE merchant_id LIKE %s"
                    " ORDER BY last_seq DESC, merchant_id LIMIT 1",
                    [f"M-{self.fleet}-%"],
                ).fetchone()
                self.merchant_id = str(found[0]) if found else None
            if self.merchant_id is not None:
                snap.balance = [
                    (str(c).strip(), int(p), int(a), int(o), int(seq or 0))
                    for c, p, a, o, seq in conn.execute(
                        """
                        SELECT b.currency, b.pending_minor, b.available_minor, b.paid_out_minor,
                               s.last_seq
                          FROM merchant_balances b
                          LEFT JOIN merchant_cashflow_seq s USING (merchant_id)
                         WHERE b.merchant_id = %s ORDER BY b.currency
                        """,
                        [self.merchant_id],
                    )
                ]
        self._alert_events(snap)

    def _alert_events(self, snap: Snapshot) -> None:
        current = {a[0]: (a[1], a[2], a[3]) for a in snap.open_alerts}
        if self._open is not None:
            for alert_id, (rule, subject, state) in current.items():
                before = self._open.get(alert_id)
                if before is None or before[2] != state:
                    self.events.append(f"alert {state}: {rule} on {subject}")
            for alert_id in sorted(self._open.keys() - current.keys()):
                rule, subject, state = self._open[alert_id]
                # A pending alert whose condition cleared within its `for` never fired.
                done = "dropped (cleared within its `for`)" if state == "pending" else "resolved"
                self.events.append(f"alert {done}: {rule} on {subject}")
        self._open = current


def _money(minor: int) -> str:
    sign = "-" if minor < 0 else ""
    return f"{sign}{abs(minor) // 100:,}.{abs(minor) % 100:02d}"


def render(
    snap: Snapshot,
    stages: Sequence[Stage],
    *,
    title: str,
    addresses: Mapping[str, str],
    events: Sequence[str],
    merchant_id: str | None,
    services: Mapping[str, Any],
    feed: str | None = None,
) -> RenderableType:
    """One frame of the console."""
    flow = Table(title="messages through each stage", expand=True)
    flow.add_column("stage")
    flow.add_column("service")
    flow.add_column("per second", justify="right")
    flow.add_column("total", justify="right")
    for stage in stages:
        flow.add_row(
            stage.name,
            stage.service,
            f"{snap.stage_rates.get(stage.name, 0.0):,.0f}",
            f"{snap.stage_totals.get(stage.name, 0.0):,.0f}",
        )

    fleet = Table(title="fleet", expand=True)
    fleet.add_column("")
    fleet.add_column("terminals", justify="right")
    fleet.add_row("online", f"{snap.online:,}")
    fleet.add_row("offline", f"{snap.offline:,}")
    for bucket in ("healthy (80-100)", "degraded (50-79)", "unhealthy (0-49)", "no score yet"):
        if bucket in snap.health_buckets:
            fleet.add_row(bucket, f"{snap.health_buckets[bucket]:,}")

    alerts = Table(title=f"open alerts ({len(snap.open_alerts)})", expand=True)
    alerts.add_column("rule")
    alerts.add_column("subject")
    alerts.add_column("state")
    for _, rule, subject, state in snap.open_alerts[:8]:
        alerts.add_row(rule, subject, state)

    money = Table(title=f"merchant {merchant_id or '-'}", expand=True)
    money.add_column("currency")
    money.add_column("pending", justify="right")
    money.add_column("available", justify="right")
    money.add_column("paid out", justify="right")
    money.add_column("events", justify="right")
    for currency, pending, available, paid, seq in snap.balance:
        money.add_row(currency, _money(pending), _money(available), _money(paid), f"{seq:,}")

    grid = Table.grid(expand=True)
    grid.add_column(ratio=1)
    grid.add_column(ratio=1)
    grid.add_row(flow, fleet)
    grid.add_row(alerts, Group(money, Text(feed or "", style="green")))

    procs = Text("  ".join(f"{name}: {state}" for name, state in services.items()), style="dim")
    where = Text("  ".join(f"{k} {v}" for k, v in addresses.items()), style="cyan")
    log = Text("\n".join(events) if events else "(no events yet)")
    parts: list[RenderableType] = [grid, procs, where, Panel(log, title="events")]
    if snap.db_error:
        parts.append(Text(f"database: {snap.db_error}", style="red"))
    return Panel(Group(*parts), title=title)
