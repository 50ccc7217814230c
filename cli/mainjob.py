"""The main job (`posflow demo`, `make demo`): the whole pipeline, supervised, with a live view.

Steps: the local stack up, the database migrated, a demo fleet registered
(database and MQTT accounts), then every service started as its own
supervised process exactly as an operator would run it alone (`posflow
ingest`, `posflow streams worker`, `posflow settlement worker`, `posflow
alerts run`, `posflow api`), and a simulated fleet publishing over MQTT.
The console shows what each stage really did, read from the services'
``/metrics`` and from the database. Ctrl-C (or ``--duration``) stops the
simulator first, lets the pipeline drain, stops every service with SIGTERM
and prints a summary.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from cli.console import Snapshot, Stage, Watcher, render
from cli.harness import count_rows, posflow_command
from cli.supervisor import ServiceSpec, Supervisor
from posflow.errors import PosflowError
from posflow.feedclient import FeedClient
from posflow.settings import Settings
from posflow.storage.databases import create_database
from posflow.topics import topic_names

__all__ = ["MainJobOptions", "Summary", "run_main"]

_DEMO_ACTOR = "posflow-demo"  # who the audit trail names for the demo's keys


@dataclass(frozen=True)
class MainJobOptions:
    terminals: int = 2000
    scenario: str = "demo"
    duration_s: float | None = None
    drain_s: float = 20.0
    refresh_s: float = 1.0
    fleet_id: str = "demo"
    merchants: int | None = None  # default: one per ten terminals
    txn_scale: float = 1.0  # x the realistic payment rates
    always_open: bool = False  # every shop at its peak hour, whatever the local time
    log_dir: Path | None = None  # default: <stack dir>/logs/mainjob

    @property
    def merchant_count(self) -> int:
        return self.merchants or max(1, self.terminals // 10)

    def fleet_args(self) -> list[str]:
        """The fleet's options, the same for `posflow fleet register` and `simulate`."""
        return [
            "--fleet", self.fleet_id,
            "--terminals", str(self.terminals),
            "--merchants", str(self.merchant_count),
        ]  # fmt: skip


@dataclass
class Summary:
    seconds: float
    stages: dict[str, float]
    alerts_by_rule: dict[str, int]
    online: int
    offline: int
    restarts: dict[str, int]
    events: list[str] = field(default_factory=list)
    published: float = 0.0
    reached_kafka: float = 0.0
    lost: float = 0.0  # readings and payments published, neither stored nor dead-lettered
    lost_before_kafka: float = 0.0  # from the counters: MQTT -> bridge -> Kafka
    expected_rows: int = 0  # telemetry + payments published, less expected dead letters
    stored_rows: int = 0  # the fleet's rows in the telemetry and transactions tables
    expected_dead_letters: int = 0
    alerts_pending: dict[str, int] = field(default_factory=dict)
    feed_events: int = 0
    feed_merchant: str = ""

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


def stages_for(settings: Settings) -> list[Stage]:
    """What the console counts, stage by stage, from each service's /metrics."""
    s = settings.services
    return [
        Stage("published (MQTT)", "simulate", s.simulator, "posflow_sim_published"),
        Stage("received from MQTT", "ingest", s.ingest, "posflow_ingest_received"),
        Stage("records to Kafka", "ingest", s.ingest, "posflow_ingest_produced"),
        Stage(
            "payments to Kafka",
            "ingest",
            s.ingest,
            "posflow_ingest_produced",
            {"topic": topic_names(settings.kafka).txn},
        ),
        Stage("dead-lettered", "ingest", s.ingest, "posflow_ingest_dead_lettered"),
        Stage("health events", "streams", s.streams, "posflow_streams_events"),
        Stage("health rows written", "streams", s.streams, "posflow_streams_sink_rows"),
        Stage("raw rows stored", "sink", s.rawsink, "posflow_rawsink_rows"),
        Stage("ledger entries", "settlement", s.settlement, "posflow_settlement_ledger_writes"),
        Stage("cash-flow events", "settlement", s.settlement, "posflow_settlement_cashflow_events"),
        Stage("alert evaluations", "alerts", s.alerts, "posflow_alerts_evaluations"),
        Stage("cash-flow events to clients", "api", s.api, "posflow_api_events_delivered"),
    ]


def service_specs(settings: Settings, options: MainJobOptions, log_dir: Path) -> list[ServiceSpec]:
    """Each service as an operator runs it alone; all configured by the same settings."""
    s = settings.services
    sim_args = [
        "simulate",
        *options.fleet_args(),
        "--summary-json",
        str(sim_counts_path(log_dir)),
        "--scenario",
        options.scenario,
        "--no-register",  # registered once by the main job before the services start
        "--txn-scale",
        f"{options.txn_scale:g}",
        "--always-open" if options.always_open else "--opening-hours",
        "--duration",
        # The main job stops the simulator itself when its own duration ends.
        f"{(options.duration_s or 7 * 24 * 3600) + 60:g}",
    ]
    return [
        ServiceSpec("ingest", ["ingest"], s.ingest),
        ServiceSpec("streams", ["streams", "worker"], s.streams),
        ServiceSpec("sink", ["streams", "sink"], s.rawsink),
        ServiceSpec("settlement", ["settlement", "worker"], s.settlement),
        ServiceSpec("alerts", ["alerts", "run"], s.alerts),
        ServiceSpec("api", ["api"], s.api),
        ServiceSpec("webhooks", ["api", "webhooks", "deliver"], None),
        # The terminals start publishing once the bridge's subscription is in place.
        ServiceSpec(
            "simulate",
            sim_args,
            s.simulator,
            restart=options.duration_s is None,
            after=("ingest",),
        ),
    ]


def _grafana_up(url: str) -> bool:
    """Grafana answers its health endpoint (the console shows its address only then)."""
    import httpx

    try:
        return httpx.get(f"{url.rstrip('/')}/api/health", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def sim_counts_path(log_dir: Path) -> Path:
    """Where the simulator writes its final counts (read for the loss check)."""
    return log_dir / "simulate.counts.json"


def _cli(args: Sequence[str], what: str) -> str:
    done = subprocess.run(
        posflow_command(*args),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise PosflowError(
            f"{what} failed (posflow {' '.join(args)})",
            fix="see the message below; the stack's state is in `posflow stack status`",
            detail=(done.stderr or done.stdout)[-2000:],
        )
    return done.stdout


def _prepare(settings: Settings, options: MainJobOptions, say: Callable[[str], None]) -> None:
    import psycopg

    from posflow.stack import Stack
    from posflow.storage.setup import prepare_database

    say("starting the local stack (installs what is missing on first use)")
    Stack(settings).up(None, progress=lambda line: say(f"  {line}"))
    _create_database(settings, say)
    say("migrating the database")
    with psycopg.connect(settings.postgres.dsn(), autocommit=True) as conn:
        path = prepare_database(conn, settings.storage)
    say(f"  storage path: {path}")
    say(f"registering the fleet {options.fleet_id!r}: {options.terminals} terminals")
    say("  " + _cli(["fleet", "register", *options.fleet_args()], "registering the fleet").strip())


def _create_database(settings: Settings, say: Callable[[str], None]) -> None:
    """The configured database, created when the server has none of that name."""
    import psycopg

    pg = settings.postgres
    with psycopg.connect(pg.dsn(database="postgres"), autocommit=True) as admin:
        if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [pg.database]).fetchone():
            return
        try:
            create_database(admin, pg.database)
        except psycopg.errors.InsufficientPrivilege:
            raise PosflowError(
                f"database {pg.database!r} does not exist and user {pg.user!r} may not create it",
                fix="create it once (CREATE DATABASE ... OWNER ...) or grant CREATEDB",
            ) from None
    say(f"  created database {pg.database}")


def _featured(
    settings: Settings, options: MainJobOptions, say: Callable[[str], None]
) -> FeedClient:
    """The fleet's largest merchant open for at least another half hour (its balance moves
    while the console watches; the largest of all when none is open, or with
    ``always_open``), with a merchant key and an API key for its live feed."""
    import psycopg

    from alerts.facts import Merchant

    with psycopg.connect(settings.postgres.dsn(), connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT m.merchant_id, m.timezone, m.opening_hours, count(*) FROM merchants m"
            " JOIN terminals t USING (merchant_id) WHERE m.merchant_id LIKE %s"
            " GROUP BY 1, 2, 3 ORDER BY count(*) DESC, 1",
            [f"M-{options.fleet_id}-%"],
        ).fetchall()
    if not rows:
        raise PosflowError(
            f"fleet {options.fleet_id!r} has no terminals in the database",
            fix="see `posflow fleet register --help`",
        )
    now = time.time()
    open_now = [
        str(mid)
        for mid, tz, hours, _n in rows
        if (left := Merchant(str(mid), timezone=str(tz), opening_hours=hours or {})
            .minutes_to_close(now)) is not None and left >= 30
    ]  # fmt: skip
    merchant = str(rows[0][0]) if options.always_open or not open_now else open_now[0]
    token = _issue_keys(settings, merchant)
    say(f"  live feed of merchant {merchant} through the merchant API (SSE)")
    host = settings.services.bind_host
    return FeedClient(f"http://{host}:{settings.services.api}", merchant, token)


def _issue_keys(settings: Settings, merchant: str) -> str:
    """The merchant's key (unless it has one from an earlier run) and a new API key for the
    console's feed, issued and audited as `posflow keys issue` / `api keys issue` do."""
    from posflow.cli_support import cli_source, connect
    from posflow.security.apikeys import issue_key_as
    from posflow.security.keys import (
        is_merchant_active,
        issue_merchant_key,
        master_key_from_settings,
    )
    from posflow.security.roles import Principal, Role

    operator, source = Principal(_DEMO_ACTOR, Role.SECURITY_ADMIN), cli_source()
    with connect(settings) as conn:
        if not is_merchant_active(conn, merchant):
            provider = master_key_from_settings(settings)
            issue_merchant_key(conn, provider, merchant, actor=operator, source=source)
        issued = issue_key_as(conn, operator, merchant, "posflow demo console", source=source)
    return issued.token


def run_main(settings: Settings, options: MainJobOptions, console: Console) -> Summary:
    """Run the whole pipeline until ``options.duration_s`` passes or Ctrl-C; return a summary."""
    say = lambda line: console.print(line, highlight=False)  # noqa: E731
    _prepare(settings, options, say)
    feed = _featured(settings, options, say)
    stages = stages_for(settings)
    log_dir = options.log_dir or Path(settings.stack.dir) / "logs" / "mainjob"
    events: list[str] = []

    def event(text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        events.append(f"{stamp} {text}")

    log_dir.mkdir(parents=True, exist_ok=True)
    sim_counts_path(log_dir).unlink(missing_ok=True)
    sup = Supervisor(service_specs(settings, options, log_dir), log_dir=log_dir, on_event=event)
    watcher = Watcher(stages, settings.postgres.dsn(), feed.merchant_id, fleet=options.fleet_id)
    host = settings.services.bind_host
    addresses = {
        "merchant API": f"http://{host}:{settings.services.api}/docs",
        "Prometheus": f"http://{settings.prometheus.host}:{settings.prometheus.port}",
        "logs": str(log_dir),
    }
    if _grafana_up(settings.grafana.url):
        addresses["Grafana"] = (
            f"{settings.grafana.url.rstrip('/')}/dashboards/f/{settings.grafana.folder_uid}"
        )
    stop_requested = False

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    snap: Snapshot | None = None
    sup.start()
    event("services started: " + ", ".join(sup.services))
    feed.start()
    try:
        with Live(console=console, refresh_per_second=2, transient=False) as live:
            while not stop_requested:
                elapsed = time.monotonic() - started
                if options.duration_s is not None and elapsed >= options.duration_s:
                    break
                sup.poll()
                if sup.finished("simulate"):
                    break
                snap = watcher.snapshot()
                live.update(
                    _frame(
                        snap,
                        stages=stages,
                        addresses=addresses,
                        events=events,
                        watcher=watcher,
                        sup=sup,
                        elapsed=elapsed,
                        feed=feed,
                    )
                )
                time.sleep(options.refresh_s)
    except KeyboardInterrupt:
        event("Ctrl-C: stopping")
    finally:
        signal.signal(signal.SIGTERM, previous)
        summary = _finish(
            sup,
            watcher=watcher,
            options=options,
            events=events,
            started=started,
            console=console,
            log_dir=log_dir,
        )
        feed.stop()
        summary.feed_events, summary.feed_merchant = feed.events, feed.merchant_id
        console.print(feed.line(), highlight=False)
        watcher.close()
    return summary


def _frame(
    snap: Snapshot,
    *,
    stages: list[Stage],
    addresses: dict[str, str],
    events: list[str],
    watcher: Watcher,
    sup: Supervisor,
    elapsed: float,
    feed: FeedClient,
) -> Any:
    states = {
        name: (f"pid {sup.pid(name)}" if sup.pid(name) else "down")
        + (f", {sup.restarts(name)} restarts" if sup.restarts(name) else "")
        for name in sup.services
    }
    merged = [*events[-4:], *watcher.events][-8:]
    return render(
        snap,
        stages,
        title=f"posflow - the whole pipeline, {elapsed:,.0f} s  (Ctrl-C stops it cleanly)",
        addresses=addresses,
        events=merged,
        merchant_id=watcher.merchant_id,
        services=states,
        feed=feed.line(),
    )


def _finish(
    sup: Supervisor,
    *,
    watcher: Watcher,
    options: MainJobOptions,
    events: list[str],
    started: float,
    console: Console,
    log_dir: Path,
) -> Summary:
    # The simulator first, so the pipeline can drain what it already published.
    sim = sup.services["simulate"]
    if sim.proc is not None and sim.proc.poll() is None:
        sim.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            sim.proc.wait(timeout=15)
    console.print("draining the pipeline ...", highlight=False)
    snap = _drain(watcher, options.drain_s)
    counts = _sim_counts(log_dir)
    rows = None
    if counts is not None:
        # This run's rows only: the same fleet may have run on this database before.
        run_start = datetime.now(UTC) - timedelta(seconds=time.monotonic() - started)
        rows = count_rows(watcher.dsn, options.fleet_id, counts, timeout_s=options.drain_s,
                          still_s=2.0, since=run_start)  # fmt: skip
    sup.stop()
    published = snap.stage_totals.get("published (MQTT)", 0.0)
    received = snap.stage_totals.get("received from MQTT", 0.0)
    to_kafka = snap.stage_totals.get("records to Kafka", 0.0)  # dead letters included
    # Lost between the terminals and the bridge, and inside the bridge (each message it
    # received is one Kafka record: its topic's or a dead letter). The broker may also hand
    # the bridge retained status messages of earlier runs, so "received" can exceed
    # "published": that is not negative loss.
    lost_before_kafka = max(0.0, published - received) + max(0.0, received - to_kafka)
    if counts is not None:
        sent = counts["published"]
        published = float(sum(sent.values()))
    summary = Summary(
        seconds=round(time.monotonic() - started, 1),
        stages={st.name: snap.stage_totals.get(st.name, 0.0) for st in watcher.stages},
        alerts_by_rule=dict(snap.alerts_by_rule),
        online=snap.online,
        offline=snap.offline,
        restarts={name: sup.restarts(name) for name in sup.services},
        events=list(events),
        published=published,
        reached_kafka=to_kafka,
        # End to end: what the terminals sent against what the database holds. Without
        # the simulator's final counts (it crashed), the counters' view up to Kafka.
        lost=float(rows.lost) if rows is not None else lost_before_kafka,
        lost_before_kafka=lost_before_kafka,
        expected_rows=rows.expected if rows is not None else 0,
        stored_rows=max(0, rows.stored) if rows is not None else 0,
        expected_dead_letters=int(counts["expected_dead_letters"]) if counts else 0,
        alerts_pending=dict(snap.alerts_pending),
    )
    _print_summary(summary, console)
    return summary


def _sim_counts(log_dir: Path) -> dict[str, Any] | None:
    """The simulator's final counts, or None when it did not finish cleanly."""
    try:
        data: dict[str, Any] = json.loads(sim_counts_path(log_dir).read_text())
    except (OSError, ValueError):
        return None
    return data


def _drain(watcher: Watcher, drain_s: float) -> Snapshot:
    """Snapshots until every stage's total stops moving (or ``drain_s`` passes)."""
    deadline = time.monotonic() + drain_s
    snap = watcher.snapshot()
    while time.monotonic() < deadline:
        time.sleep(2.0)
        nxt = watcher.snapshot()
        if nxt.stage_totals == snap.stage_totals:
            return nxt
        snap = nxt
    return snap


def _print_summary(summary: Summary, console: Console) -> None:
    table = Table(title=f"posflow summary after {summary.seconds:,.0f} s")
    table.add_column("stage")
    table.add_column("total", justify="right")
    for name, value in summary.stages.items():
        table.add_row(name, f"{value:,.0f}")
    console.print(table)
    alerts = ", ".join(f"{rule} {n}" for rule, n in sorted(summary.alerts_by_rule.items()))
    console.print(f"alerts fired: {alerts or 'none'}", highlight=False)
    if summary.alerts_pending:
        pending = ", ".join(f"{r} {n}" for r, n in sorted(summary.alerts_pending.items()))
        console.print(f"alerts pending (within their `for`): {pending}", highlight=False)
    console.print(
        f"terminals online {summary.online:,}, offline {summary.offline:,}", highlight=False
    )
    restarts = {k: v for k, v in summary.restarts.items() if v}
    console.print(f"service restarts: {restarts or 'none'}", highlight=False)
    console.print(
        "the local stack keeps running (its data too): stop it with `posflow stack down`",
        highlight=False,
    )
    console.print(
        f"published {summary.published:,.0f}, reached Kafka (incl. dead letters)"
        f" {summary.reached_kafka:,.0f}; readings and payments expected in the database"
        f" {summary.expected_rows:,} (after {summary.expected_dead_letters:,} expected dead"
        f" letters), stored {summary.stored_rows:,}; lost {summary.lost:,.0f}",
        highlight=False,
    )
