"""Storage benchmarks: the writers, and TimescaleDB against plain PostgreSQL.

Runs against the local stack's PostgreSQL (`posflow stack up`), in fresh
databases created for the run and dropped after it. Every loop is bounded in
count and in time.

Default (the writers, one database on the cluster's default storage path, or
``--path``): telemetry rows/s through ``TelemetryWriter`` (batched binary COPY)
and ledger transactions/s through ``LedgerWriter``. ``bench_rawsink.py
--baseline`` runs this mode and reads its ``telemetry:`` line.

``--compare`` (issue 15: the same run, the same rows, both storage paths):

insert
    The same validated telemetry envelopes through ``TelemetryWriter`` into a
    TimescaleDB database (hypertable, rollups by continuous aggregates) and a
    plain one (daily partitions, the writer upserts the 1-minute rollup), in
    rounds that alternate which path goes first. Rows/s, and CPU seconds of the
    PostgreSQL backend per 1,000 rows (``/proc/<pg_backend_pid()>/stat``); on
    TimescaleDB also the refresh of ``telemetry_1m`` over the round's rows (the
    work the plain writer does inline). Then the ledger on each path.
compression
    One simulated day of ``--day-terminals`` terminals' telemetry (a reading every
    30 s), generated in SQL with the simulator's value models, into TimescaleDB;
    every chunk compressed; bytes before/after and which columns take the space.
    Variants of the compression settings (``--variants``) on copies of the data.
dashboard
    The fleet dashboard's SQL panels (dashboards/json/fleet.json, macros expanded
    for the last 24 h as Grafana's datasource does, its TimescaleDB switch on or
    off with the database) over 24 h of ``--fleet`` terminals on both paths: each
    panel once, then ``--runs`` timed runs of the heaviest -> p50/p95, and its
    ``EXPLAIN (ANALYZE, BUFFERS)``. Results are streamed the way a client reads
    them (``COPY (query) TO STDOUT``), so row transfer is in the time.

Usage:
  .venv/bin/python benchmarks/bench_storage.py --rows 200000 --batch 5000 --ledger 20000
  .venv/bin/python benchmarks/bench_storage.py --compare
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import envelope
from dashboards.macros import TimeRange, expand
from posflow.contracts import IngestEnvelope
from posflow.settings import PostgresSettings, Settings
from posflow.storage import StoragePath, detect_path, ensure_partitions, migrate
from posflow.storage.databases import create_database, drop_database
from posflow.storage.ledger import LedgerEntry, LedgerWriter
from posflow.storage.writers import TelemetryWriter
from simulator.fleet import CITIES
from tests.unit import samples

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 300
PATHS: tuple[StoragePath, StoragePath] = ("timescaledb", "plain")
CLK_TCK = os.sysconf("SC_CLK_TCK")
Conn = psycopg.Connection[tuple[Any, ...]]


# --- common ------------------------------------------------------------------------------


class Deadline:
    """The whole run's time budget; every loop asks it before another step."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


def backend_cpu_s(conn: Conn) -> float:
    """User + system CPU seconds of this connection's PostgreSQL backend so far."""
    pid = conn.info.backend_pid
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


@dataclass
class Databases:
    """Databases made for the run, dropped at its end (also on failure)."""

    base: Settings
    made: list[str] = field(default_factory=list)

    def create(self, path: StoragePath | None, label: str) -> tuple[PostgresSettings, StoragePath]:
        name = f"bench_{label}_{secrets.token_hex(3)}"
        with psycopg.connect(self.base.postgres.dsn(), autocommit=True) as admin:
            chosen = create_database(admin, name, path=path)
        self.made.append(name)
        pg = PostgresSettings(**{**self.base.postgres.model_dump(), "database": name})
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            migrate(conn)
            ensure_partitions(conn)  # nothing to do on TimescaleDB
            if detect_path(conn) == "timescaledb":
                # TimescaleDB's scheduler would refresh the aggregates in the middle of a
                # measurement (and its runs fail here, see jobs.py): the benchmark refreshes
                # when it means to.
                conn.execute(
                    "SELECT alter_job(job_id, scheduled => false)"
                    " FROM timescaledb_information.jobs WHERE job_id >= 1000"
                )
        return pg, chosen

    def drop_all(self) -> None:
        with psycopg.connect(self.base.postgres.dsn(), autocommit=True) as admin:
            for name in self.made:
                drop_database(admin, name)
        self.made.clear()


def _envelopes(count: int, terminals: int) -> list[IngestEnvelope]:
    now = datetime.now(UTC)
    out = []
    for i in range(count):
        terminal = f"T-{i % terminals:05d}"
        body = samples.telemetry(
            merchant_id="M-0001",
            terminal_id=terminal,
            seq=i,
            ts=(now - timedelta(seconds=(count - i) // terminals)).isoformat(),
        )
        out.append(envelope("telemetry", body, received_at=now, mqtt_mid=i % 65535 + 1))
    return out


def _ledger_entries(count: int, merchants: int) -> list[LedgerEntry]:
    now = datetime.now(UTC)
    return [
        LedgerEntry(
            txn_id=f"tx-{i}",
            merchant_id=f"M-{i % merchants:04d}",
            terminal_id=f"T-{i % (merchants * 10):05d}",
            txn_type="sale",
            currency="EUR",
            gross_minor=1000 + i % 5000,
            fee_minor=(1000 + i % 5000) // 100 + 10,
            net_minor=(1000 + i % 5000) - ((1000 + i % 5000) // 100 + 10),
            occurred_at=now,
            body={"txn_id": f"tx-{i}", "amount_minor": 1000 + i % 5000},
        )
        for i in range(count)
    ]


@dataclass
class WriteResult:
    rows: int
    seconds: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_1k(self) -> float:
        return self.cpu_s / self.rows * 1000 if self.rows else 0.0


def write_telemetry(
    writer: TelemetryWriter, conn: Conn, envelopes: Sequence[IngestEnvelope], batch: int
) -> WriteResult:
    cpu0 = backend_cpu_s(conn)
    started = time.monotonic()
    written = 0
    for i in range(0, len(envelopes), batch):
        written += writer.write(envelopes[i : i + batch])
        if time.monotonic() - started > TIME_LIMIT_S:
            break
    seconds = time.monotonic() - started
    return WriteResult(written, seconds, backend_cpu_s(conn) - cpu0)


def write_ledger(conn: Conn, entries: Sequence[LedgerEntry], batch: int) -> WriteResult:
    ledger = LedgerWriter(conn, consumer_group="bench")
    cpu0 = backend_cpu_s(conn)
    started = time.monotonic()
    applied = 0
    for n, i in enumerate(range(0, len(entries), batch)):
        result = ledger.write(entries[i : i + batch], offsets={("pos.txn.v1", n % 6): i})
        applied += result.applied
        if time.monotonic() - started > TIME_LIMIT_S:
            break
    seconds = time.monotonic() - started
    return WriteResult(applied, seconds, backend_cpu_s(conn) - cpu0)


# --- default mode: the writers on one path --------------------------------------------------


def run_writers(args: argparse.Namespace, dbs: Databases) -> None:
    pg, path = dbs.create(args.path, "w")
    print(
        f"# bench_storage {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
        f"path={path}, db={pg.database}"
    )
    envelopes = _envelopes(args.rows, args.terminals)
    with psycopg.connect(pg.dsn()) as conn:
        writer = TelemetryWriter(conn, path)
        result = write_telemetry(writer, conn, envelopes, args.batch)
        replay_started = time.monotonic()
        replayed = writer.write(envelopes[: args.batch])
        replay_s = time.monotonic() - replay_started
    print(
        f"telemetry: {result.rows} rows in {result.seconds:.2f} s = {result.rate:,.0f} rows/s "
        f"(batch {args.batch}, {args.terminals} terminals, rollups "
        f"{'by writer' if path == 'plain' else 'by continuous aggregates'}); "
        f"replaying one batch inserted {replayed} rows in {replay_s * 1000:.0f} ms; "
        f"backend CPU {result.cpu_per_1k * 1000:.1f} ms per 1,000 rows"
    )
    entries = _ledger_entries(args.ledger, args.merchants)
    with psycopg.connect(pg.dsn()) as conn:
        ledger = write_ledger(conn, entries, args.ledger_batch)
    print(
        f"ledger: {ledger.rows} transactions in {ledger.seconds:.2f} s = "
        f"{ledger.rate:,.0f} txn/s (batch {args.ledger_batch}, {args.merchants} merchants, "
        "balances + cash-flow events + Kafka offsets in the same database transaction, "
        "synchronous_commit=on)"
    )


# --- part 1: insert rate, both paths --------------------------------------------------------


def _refresh_1m(conn: Conn, envelopes: Sequence[IngestEnvelope]) -> WriteResult:
    """Materialise telemetry_1m over the minutes these rows fall in (autocommit conn)."""
    first = min(e.payload.ts for e in envelopes)
    last = max(e.payload.ts for e in envelopes)
    start = first.replace(second=0, microsecond=0)
    end = last.replace(second=0, microsecond=0) + timedelta(minutes=1)
    cpu0 = backend_cpu_s(conn)
    started = time.monotonic()
    conn.execute("CALL refresh_continuous_aggregate('telemetry_1m', %s, %s)", [start, end])
    return WriteResult(len(envelopes), time.monotonic() - started, backend_cpu_s(conn) - cpu0)


def part_insert(args: argparse.Namespace, dbs: Databases, deadline: Deadline) -> None:
    print("\n## 1. Telemetry insert rate, TimescaleDB hypertable vs plain partitioned table\n")
    targets = {path: dbs.create(path, f"ins_{path[:2]}")[0] for path in PATHS}
    built = time.monotonic()
    envelopes = _envelopes(args.rows * args.rounds + args.batch, args.terminals)
    print(
        f"{len(envelopes):,} envelopes ({args.terminals:,} terminals, validated by the "
        f"contract) built in {time.monotonic() - built:.1f} s before any clock starts; "
        f"batch {args.batch:,}; {args.rounds} rounds of {args.rows:,} rows per path, "
        "each round its own rows (later timestamps), the same rows on both paths.\n"
    )
    conns = {path: psycopg.connect(targets[path].dsn()) for path in PATHS}
    refresh_conn = psycopg.connect(targets["timescaledb"].dsn(), autocommit=True)
    try:
        writers = {path: TelemetryWriter(conns[path], path) for path in PATHS}
        for path in PATHS:  # warm-up: staging table, plans, catalog caches
            writers[path].write(envelopes[: args.batch])
        results: dict[StoragePath, list[WriteResult]] = {p: [] for p in PATHS}
        refreshes: list[WriteResult] = []
        print(
            "| round | order | TimescaleDB rows/s | plain rows/s | TimescaleDB / plain "
            "| backend CPU ms / 1,000 rows (TimescaleDB / plain) "
            "| TimescaleDB + refresh of telemetry_1m: rows/s, CPU ms / 1,000 rows |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in range(args.rounds):
            if deadline.passed():
                print(f"(time budget spent: stopped after {r} rounds)")
                break
            rows = envelopes[args.batch + r * args.rows : args.batch + (r + 1) * args.rows]
            order = PATHS if r % 2 == 0 else PATHS[::-1]
            for path in order:
                results[path].append(write_telemetry(writers[path], conns[path], rows, args.batch))
            refreshes.append(_refresh_1m(refresh_conn, rows))
            ts, plain, ref = results["timescaledb"][-1], results["plain"][-1], refreshes[-1]
            both = WriteResult(ts.rows, ts.seconds + ref.seconds, ts.cpu_s + ref.cpu_s)
            print(
                f"| {r + 1} | {' then '.join(order)} | {ts.rate:,.0f} | {plain.rate:,.0f} "
                f"| {ts.rate / plain.rate:.0%} "
                f"| {ts.cpu_per_1k * 1000:.1f} / {plain.cpu_per_1k * 1000:.1f} "
                f"| {both.rate:,.0f}, {both.cpu_per_1k * 1000:.1f} |"
            )
        ts_rates = [x.rate for x in results["timescaledb"]]
        plain_rates = [x.rate for x in results["plain"]]
        if ts_rates:
            ts_cpu = statistics.median(x.cpu_per_1k for x in results["timescaledb"]) * 1000
            plain_cpu = statistics.median(x.cpu_per_1k for x in results["plain"]) * 1000
            with_ref = [
                WriteResult(t.rows, t.seconds + f.seconds, t.cpu_s + f.cpu_s)
                for t, f in zip(results["timescaledb"], refreshes, strict=True)
            ]
            ratio = statistics.median(ts_rates) / statistics.median(plain_rates)
            print(
                f"| **median** | | **{statistics.median(ts_rates):,.0f}** "
                f"| **{statistics.median(plain_rates):,.0f}** | **{ratio:.0%}** "
                f"| **{ts_cpu:.1f} / {plain_cpu:.1f}** "
                f"| {statistics.median(x.rate for x in with_ref):,.0f}, "
                f"{statistics.median(x.cpu_per_1k for x in with_ref) * 1000:.1f} |"
            )
            print(
                f"\nTarget TimescaleDB >= 80% of plain: {'MET' if ratio >= 0.8 else 'MISSED'} "
                f"({ratio:.0%} of plain by median rows/s; PostgreSQL CPU per row on "
                f"TimescaleDB is {ts_cpu / plain_cpu:.0%} of plain's)"
            )
        replayed = {p: writers[p].write(envelopes[: args.batch]) for p in PATHS}
        print(f"Replaying the warm-up batch inserted {replayed} rows.")
        if args.ledger and not deadline.passed():
            entries = _ledger_entries(args.ledger, args.merchants)
            line = []
            for path in PATHS:
                with psycopg.connect(targets[path].dsn()) as conn:
                    led = write_ledger(conn, entries, args.ledger_batch)
                line.append(
                    f"{path} {led.rate:,.0f} txn/s ({led.cpu_per_1k * 1000:.0f} ms CPU per 1,000)"
                )
            print(
                f"Ledger, {args.ledger:,} transactions in batches of {args.ledger_batch}: "
                + "; ".join(line)
            )
    finally:
        for c in (*conns.values(), refresh_conn):
            c.close()


# --- simulated telemetry in SQL ---------------------------------------------------------------


def _cities_sql(day: datetime) -> str:
    """The simulator's cities as a VALUES list: index, lat, lon, ambient, carriers, UTC offset."""
    rows = []
    for n, city in enumerate(CITIES):
        offset = ZoneInfo(city.timezone).utcoffset(day + timedelta(hours=12))
        hours = offset.total_seconds() / 3600 if offset is not None else 0.0
        carriers = ", ".join("'" + c.replace("'", "''") + "'" for c in city.carriers)
        rows.append(
            f"({n}, {city.lat}::float8, {city.lon}::float8, {city.ambient_c}::float8, "
            f"ARRAY[{carriers}], {hours}::float8)"
        )
    return "(VALUES " + ", ".join(rows) + ") AS city (n, lat, lon, ambient, carriers, utc_h)"


# Per terminal (from a hash of its number, so both paths get the same fleet): the
# simulator's mix of models (countertop 50%, portable 30%, smartpos 20%) and networks
# (LTE 55%, 5G 15%, 3G 5%, Wi-Fi 20%, Ethernet 5%; a portable is never on Ethernet), its
# base signal (a gauss around the network's mean, clamped to the simulator's range),
# battery capacity (0.55-1.0), one of the simulator's cities, a position near the
# merchant, the first report's phase within the period, opening hours (local 08-10 to
# 18-20), about 2.4 terminals per merchant.
_FLEET_SQL = """
fleet AS MATERIALIZED (
    SELECT i,
           'T-sim-' || lpad(i::text, 6, '0') AS terminal_id,
           'M-sim-' || lpad((i * 5 / 12 + 1)::text, 5, '0') AS merchant_id,
           CASE WHEN u[1] < 0.5 THEN 'countertop' WHEN u[1] < 0.8 THEN 'portable'
                ELSE 'smartpos' END AS model,
           CASE WHEN u[2] < 0.55 OR (u[2] >= 0.95 AND u[1] BETWEEN 0.5 AND 0.8) THEN 'lte'
                WHEN u[2] < 0.70 THEN '5g' WHEN u[2] < 0.75 THEN '3g'
                WHEN u[2] < 0.95 THEN 'wifi' ELSE 'ethernet' END AS network,
           u[3] AS phase, (u[4] + u[11] + u[12] - 1.5) * 2 AS base_gauss,
           0.55 + 0.45 * greatest(u[5], u[6]) AS cap,
           (floor(u[7] * {cities}))::int AS city_n, u[8] AS open_u, u[9] AS pos_u,
           u[10] AS start_u
      FROM generate_series(1, %(terminals)s) AS i
     CROSS JOIN LATERAL (
           SELECT array_agg((hashint4(i * 16 + j) & 1048575) / 1048576::float8 ORDER BY j) AS u
             FROM generate_series(1, 12) AS j) AS h
),
terminal AS MATERIALIZED (
    SELECT f.*, city.carriers[1 + (f.i %% cardinality(city.carriers))] AS carrier,
           round((city.lat + (f.pos_u - 0.5) * 0.16)::numeric, 6)::float8 AS lat,
           round((city.lon + (f.pos_u * 7 - floor(f.pos_u * 7) - 0.5) * 0.2)::numeric, 6)::float8
               AS lon,
           city.ambient, city.utc_h,
           8 + 2 * f.open_u AS open_h, 18 + 2 * f.open_u AS close_h,
           CASE f.network
                WHEN 'lte' THEN least(-75, greatest(-101, -88 + 5 * f.base_gauss))
                WHEN '5g' THEN least(-75, greatest(-101, -87 + 5 * f.base_gauss))
                WHEN '3g' THEN least(-65, greatest(-86, -77 + 5 * f.base_gauss))
                WHEN 'wifi' THEN least(-45, greatest(-70, -57 + 5 * f.base_gauss))
                ELSE 0 END AS base_dbm,
           greatest(0, 100 - 8 / f.cap * 10) AS close_level,
           CASE WHEN f.cap >= 0.8 THEN 'good' WHEN f.cap >= 0.65 THEN 'fair'
                ELSE 'poor' END AS battery_health
      FROM fleet AS f JOIN {cities_values} ON city.n = f.city_n
)"""

# One reading per terminal every %(step)s seconds from %(start)s. Battery: docked models
# charge at 25 %%/h to full and stay there; portables leave the dock while the shop is
# open and drain (2 + 6) %%/h divided by the cell's capacity, then charge at 25 %%/h
# (simulator/behaviour.py). Signal: around the terminal's base within +-5 dB, a slow
# swing plus per-reading noise of ~1 dB (the simulator's Ornstein-Uhlenbeck drift moves
# ~1.6 dB per 30 s step); RSRP/RSSI/SINR derived as in simulator/engine.py. Temperature:
# the city's ambient + 5 charging / + 2 not, gauss(0, 0.8), 0.1 degree steps. GPS
# accuracy uniform 5-30 m, 0.1 m steps. received_at: 15-165 ms after ts, microseconds.
# seq: +1 or +2 per reading (payments share the counter). The signal's noise is a hash
# of (terminal, reading), so every path gets the same values; the rest uses random()
# after setseed(). OFFSET 0 keeps each lateral computed once per row.
_TELEMETRY_SQL = """
WITH {fleet}
INSERT INTO {table} (ts, terminal_id, merchant_id, seq, received_at, battery_level_pct,
    charging, battery_temp_c, battery_health, signal_type, signal_dbm, rssi_dbm, rsrp_dbm,
    sinr_db, wifi_rssi_dbm, carrier, printer_paper, lat, lon, accuracy_m, app_version,
    firmware_version, uptime_s, tamper)
SELECT %(start)s::timestamptz + make_interval(secs => r.run_s) AS ts,
       t.terminal_id, t.merchant_id,
       2 * k + (random() < 0.5)::int AS seq,
       %(start)s::timestamptz + make_interval(secs => r.run_s + 0.015 + random() * 0.15),
       floor(b.level)::smallint,
       b.charging,
       (round((t.ambient + CASE WHEN b.charging THEN 5 ELSE 2 END
               + 1.6 * (random() + random() + random() - 1.5)) * 10) / 10)::real,
       t.battery_health,
       t.network,
       CASE WHEN t.network <> 'ethernet' THEN r.sig END::smallint,
       CASE WHEN t.network IN ('lte', '5g') THEN r.sig + 22
            WHEN t.network = '3g' THEN r.sig END::smallint,
       CASE WHEN t.network IN ('lte', '5g') THEN r.sig END::smallint,
       CASE WHEN t.network IN ('lte', '5g')
            THEN (round(least(40, greatest(-20, (r.sig + 125) / 2.5)) * 10) / 10) END::real,
       CASE WHEN t.network = 'wifi' THEN r.sig END::smallint,
       CASE WHEN t.network IN ('lte', '5g', '3g') THEN t.carrier END,
       'ok', t.lat, t.lon,
       (round((5 + 25 * random()) * 10) / 10)::real,
       '4.3.2', 'fw-2026.09',
       3600 + floor(r.run_s)::bigint,
       false
  FROM generate_series(0, %(readings)s - 1) AS k
 CROSS JOIN LATERAL (SELECT * FROM terminal WHERE k >= 0) AS t  -- time order, as they arrive
 CROSS JOIN LATERAL (
       SELECT q.run_s,
              q.x - 24 * floor(q.x / 24) AS hour,
              round(least(t.base_dbm + 5, greatest(t.base_dbm - 5,
                  t.base_dbm + 2 * sin(k / 37.0 + 6.283 * t.phase)
                  + 2 * ((hashint8(t.i * 1000003::bigint + k) & 1048575) / 1048576::float8
                         + (hashint8(t.i * 3000009::bigint + k) & 1048575) / 1048576::float8
                         + (hashint8(t.i * 7000021::bigint + k) & 1048575) / 1048576::float8
                         - 1.5))))::int AS sig
         FROM (SELECT (t.phase + k) * %(step)s AS run_s,
                      (t.phase + k) * %(step)s / 3600.0 + t.utc_h + 48 AS x) AS q
       OFFSET 0) AS r
 CROSS JOIN LATERAL (
       SELECT l.level, l.docked AND l.level < 100 AS charging
         FROM (SELECT CASE WHEN t.model <> 'portable'
                               THEN least(100, 85 + 15 * t.start_u + 25 * r.run_s / 3600.0)
                           WHEN r.hour < t.open_h
                               THEN least(100, t.close_level + 25 * (r.hour + 24 - t.close_h))
                           WHEN r.hour < t.close_h
                               THEN greatest(0, 100 - 8 / t.cap * (r.hour - t.open_h))
                           ELSE least(100, t.close_level + 25 * (r.hour - t.close_h))
                      END AS level,
                      t.model <> 'portable' OR r.hour < t.open_h OR r.hour >= t.close_h
                          AS docked) AS l
       OFFSET 0) AS b
"""


def telemetry_sql(table: str, day: datetime) -> sql.Composed:
    fleet = _FLEET_SQL.format(cities=len(CITIES), cities_values=_cities_sql(day))
    return sql.SQL(_TELEMETRY_SQL.format(fleet=fleet, table="{table}")).format(
        table=sql.Identifier(table)
    )


def _timed(conn: Conn, query: sql.Composable | str, params: Any = None) -> tuple[float, float]:
    """(wall seconds, backend CPU seconds) of one statement."""
    cpu0 = backend_cpu_s(conn)
    started = time.monotonic()
    conn.execute(query, params)  # type: ignore[arg-type]
    return time.monotonic() - started, backend_cpu_s(conn) - cpu0


# --- part 2: compression ------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    chunk: str
    segmentby: str
    orderby: str


VARIANTS = {
    "current": Variant("current (migration 0002/0010)", "2 hours", "terminal_id",
                       "ts DESC, seq DESC"),
    "day-chunks": Variant("1-day chunks", "1 day", "terminal_id", "ts DESC, seq DESC"),
    "merchant": Variant("segment by merchant", "2 hours", "merchant_id",
                        "terminal_id, ts DESC, seq DESC"),
    "merchant-day": Variant("segment by merchant, 1-day chunks", "1 day", "merchant_id",
                            "terminal_id, ts DESC, seq DESC"),
    "ts-only": Variant("order by ts only", "2 hours", "terminal_id", "ts DESC"),
}  # fmt: skip


def _compress_all(conn: Conn, table: str) -> tuple[int, float, float]:
    chunks = [
        str(r[0])
        for r in conn.execute("SELECT show_chunks(%s::regclass)::text", [table]).fetchall()
    ]
    cpu0 = backend_cpu_s(conn)
    started = time.monotonic()
    for chunk in chunks:
        conn.execute("SELECT compress_chunk(%s::regclass, if_not_compressed => true)", [chunk])
    return len(chunks), time.monotonic() - started, backend_cpu_s(conn) - cpu0


def _compression_stats(conn: Conn, table: str) -> dict[str, int]:
    row = conn.execute(
        "SELECT before_compression_table_bytes, before_compression_index_bytes,"
        " before_compression_toast_bytes, before_compression_total_bytes,"
        " after_compression_table_bytes, after_compression_index_bytes,"
        " after_compression_toast_bytes, after_compression_total_bytes,"
        " number_compressed_chunks"
        " FROM hypertable_compression_stats(%s::regclass)",
        [table],
    ).fetchone()
    keys = ("b_table", "b_index", "b_toast", "b_total", "a_table", "a_index", "a_toast",
            "a_total", "chunks")  # fmt: skip
    return {k: int(str(v or 0)) for k, v in zip(keys, row or (), strict=True)}


def _column_bytes(conn: Conn, table: str) -> list[tuple[str, int]]:
    """Bytes each column takes in the compressed chunks (pg_column_size of its batches)."""
    chunks = [
        str(r[0])
        for r in conn.execute(
            "SELECT format('%%I.%%I', cc.schema_name, cc.table_name)"
            " FROM _timescaledb_catalog.hypertable h"
            " JOIN _timescaledb_catalog.chunk c ON c.hypertable_id = h.id"
            " JOIN _timescaledb_catalog.chunk cc ON cc.id = c.compressed_chunk_id"
            " WHERE h.table_name = %s",
            [table],
        ).fetchall()
    ]
    if not chunks:
        return []
    cols = [
        str(r[0])
        for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
            " AND NOT attisdropped ORDER BY attnum",
            [chunks[0]],
        ).fetchall()
    ]
    sums = sql.SQL(", ").join(
        sql.SQL("coalesce(sum(pg_column_size({})), 0)").format(sql.Identifier(c)) for c in cols
    )
    totals = dict.fromkeys(cols, 0)
    for chunk in chunks:  # names from TimescaleDB's catalog
        got = conn.execute(sql.SQL("SELECT {} FROM {}").format(sums, sql.SQL(chunk))).fetchone()
        for c, v in zip(cols, got or (), strict=True):
            totals[c] += int(str(v))
    return sorted(totals.items(), key=lambda x: -x[1])


def _mb(n: int) -> str:
    return f"{n / 1024 / 1024:,.1f} MB"


def part_compression(args: argparse.Namespace, dbs: Databases, deadline: Deadline) -> None:
    print("\n## 2. Compression of one simulated day on TimescaleDB\n")
    pg, _ = dbs.create("timescaledb", "comp")
    day = (datetime.now(UTC) - timedelta(days=2)).replace(hour=0, minute=0, second=0,
                                                          microsecond=0)  # fmt: skip
    readings = 86400 // 30
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("SELECT setseed(0.15)")
        gen_s, gen_cpu = _timed(
            conn,
            telemetry_sql("telemetry", day),
            {"terminals": args.day_terminals, "start": day, "step": 30, "readings": readings},
        )
        rows = int(str((conn.execute("SELECT count(*) FROM telemetry").fetchone() or [0])[0]))
        conn.execute("ANALYZE telemetry")
        print(
            f"{rows:,} rows ({args.day_terminals:,} terminals x {readings:,} readings, every "
            f"30 s, {day:%Y-%m-%d} UTC), generated in SQL (generate_series, the simulator's "
            f"value models) in {gen_s:.0f} s ({rows / gen_s:,.0f} rows/s, backend CPU "
            f"{gen_cpu:.0f} s)."
        )
        sample = conn.execute(
            "SELECT terminal_id, signal_type, battery_level_pct, charging, signal_dbm,"
            " battery_temp_c, accuracy_m FROM telemetry"
            " WHERE terminal_id = 'T-sim-000007' ORDER BY ts LIMIT 3 OFFSET 1200"
        ).fetchall()
        print(f"A sample (T-sim-000007 around 10:00 UTC): {sample}\n")

        variants = [v for v in args.variants.split(",") if v]
        results: list[tuple[Variant, dict[str, int], float, str]] = []
        for key in variants:
            if deadline.left() < 120:
                print(f"(time budget: variant {key} skipped)")
                continue
            v = VARIANTS[key]
            table = f"telemetry_{key.replace('-', '_')}"
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {} (LIKE telemetry INCLUDING DEFAULTS INCLUDING CONSTRAINTS"
                    " INCLUDING INDEXES)"
                ).format(sql.Identifier(table))
            )
            conn.execute(
                "SELECT create_hypertable(%s::regclass, by_range('ts', %s::interval))",
                [table, v.chunk],
            )
            conn.execute(
                sql.SQL(
                    "ALTER TABLE {} SET (timescaledb.compress, timescaledb.compress_segmentby = {},"
                    " timescaledb.compress_orderby = {})"
                ).format(sql.Identifier(table), sql.Literal(v.segmentby), sql.Literal(v.orderby))
            )
            # The first --variant-terminals terminals' whole day, in time order as it arrives.
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} SELECT * FROM telemetry WHERE terminal_id <= %s ORDER BY ts"
                ).format(sql.Identifier(table)),
                [f"T-sim-{args.variant_terminals:06d}"],
            )
            _, secs, _ = _compress_all(conn, table)
            stats = _compression_stats(conn, table)
            results.append((v, stats, secs, f"{args.variant_terminals:,} terminals, 24 h"))
            conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))

        size_before = int(
            str((conn.execute("SELECT hypertable_size('telemetry')").fetchone() or [0])[0])
        )
        chunks, comp_s, comp_cpu = _compress_all(conn, "telemetry")
        main = _compression_stats(conn, "telemetry")
        size_after = int(
            str((conn.execute("SELECT hypertable_size('telemetry')").fetchone() or [0])[0])
        )
        columns = _column_bytes(conn, "telemetry")
        print(
            f"compress_chunk on all {chunks} chunks of show_chunks('telemetry'): {comp_s:.0f} s "
            f"(backend CPU {comp_cpu:.0f} s). hypertable_size: {_mb(size_before)} before, "
            f"{_mb(size_after)} after.\n"
        )
        print("| | before | after | ratio |")
        print("|---|---|---|---|")
        for label, key in (("heap", "table"), ("indexes", "index"), ("TOAST", "toast"),
                           ("**total**", "total")):  # fmt: skip
            b, a = main[f"b_{key}"], main[f"a_{key}"]
            print(f"| {label} | {_mb(b)} | {_mb(a)} | {b / a if a else 0:.1f}x |")
        total_ratio = main["b_total"] / main["a_total"] if main["a_total"] else 0.0
        print(
            f"\nTarget >= 10x: {'MET' if total_ratio >= 10 else 'MISSED'} "
            f"({total_ratio:.1f}x total bytes, hypertable_compression_stats; "
            f"{main['b_total'] / rows:.0f} -> {main['a_total'] / rows:.1f} bytes per row)\n"
        )
        if columns:
            total = sum(b for _, b in columns)
            print("Where the compressed bytes are (pg_column_size over the compressed batches):\n")
            print("| column | bytes | share | bytes per row |")
            print("|---|---|---|---|")
            for name, b in columns:
                print(f"| {name} | {_mb(b)} | {b / total:.1%} | {b / rows:.2f} |")
        if results:
            print(
                "\nCompression settings tried (copies of the same rows, compressed the same way):\n"
            )
            print("| setting | chunk | segmentby | orderby | rows | before | after | ratio |")
            print("|---|---|---|---|---|---|---|---|")
            print(
                f"| {VARIANTS['current'].name}, the table above | 2 hours | terminal_id "
                f"| ts DESC, seq DESC | {args.day_terminals:,} terminals, 24 h "
                f"| {_mb(main['b_total'])} | {_mb(main['a_total'])} | {total_ratio:.1f}x |"
            )
            for v, stats, _secs, span in results:
                ratio = stats["b_total"] / stats["a_total"] if stats["a_total"] else 0.0
                print(
                    f"| {v.name} | {v.chunk} | {v.segmentby} | {v.orderby} | {span} "
                    f"| {_mb(stats['b_total'])} | {_mb(stats['a_total'])} | {ratio:.1f}x |"
                )


# --- part 3: the fleet dashboard -----------------------------------------------------------------


_FLEET_STATIC_SQL = """
WITH {fleet}
, m AS (
    INSERT INTO merchants (merchant_id, name, category, lat, lon)
    SELECT merchant_id, 'Merchant ' || merchant_id, 'retail', min(lat), min(lon)
      FROM terminal GROUP BY merchant_id
    RETURNING 1
), t AS (
    INSERT INTO terminals (terminal_id, merchant_id, model, lat, lon)
    SELECT terminal_id, merchant_id, model, lat, lon FROM terminal
    RETURNING 1
)
INSERT INTO terminal_state (terminal_id, merchant_id, online, last_seen, battery_level_pct,
    charging, signal_type, signal_dbm, carrier, printer_paper, lat, lon, app_version,
    firmware_version, health_score)
SELECT terminal_id, merchant_id, (i %% 40) <> 0, now() - make_interval(secs => phase * 30),
       (40 + 60 * start_u)::int, model <> 'portable', network,
       CASE WHEN network <> 'ethernet' THEN round(base_dbm) END, carrier, 'ok',
       lat, lon,
       CASE WHEN i %% 20 = 0 THEN '4.3.1' WHEN i %% 97 = 0 THEN '4.2.0' ELSE '4.3.2' END,
       'fw-2026.09',
       CASE WHEN (i %% 40) = 0 THEN 0 WHEN i %% 13 = 0 THEN 40 + (i %% 30) ELSE 80 + (i %% 21) END
  FROM terminal
"""

_ALERTS_SQL = """
INSERT INTO alerts (alert_id, rule, severity, subject_kind, subject_id, merchant_id, state,
                    summary, started_at, fired_at)
SELECT 'A-' || terminal_id, CASE WHEN online THEN 'low_health' ELSE 'terminal_offline' END,
       CASE WHEN NOT online THEN 'critical' WHEN health_score < 50 THEN 'warning'
            ELSE 'info' END,
       'terminal', terminal_id, merchant_id, 'firing', 'bench', now() - interval '1 hour',
       now() - interval '55 minutes'
  FROM terminal_state WHERE NOT online OR health_score < 60
"""

# One health window per terminal every %(step)s s over the range (the workers close one
# per 60 s; the reduction is stated in the output). Scores and details as streams/score.py
# and streams/window.py write them.
_HEALTH_SQL = """
INSERT INTO terminal_health (window_start, window_end, terminal_id, merchant_id, score,
    signal_score, battery_score, txn_score, printer_score, details)
SELECT w, w + interval '60 seconds', s.terminal_id, s.merchant_id, sc.score, sc.sig, sc.bat,
       sc.txn, 100,
       jsonb_build_object(
           'final', true,
           'reasons', CASE WHEN sc.score >= 70 THEN '[]'::jsonb
                           WHEN sc.sig < 70 THEN jsonb_build_array(
                               format('weak signal (%%s, %%s dBm)', s.signal_type,
                                      s.signal_dbm - 12))
                           ELSE jsonb_build_array(format('battery (%%s%%%%)', sc.bat / 4)) END,
           'samples', 2, 'signal_avg_dbm', s.signal_dbm + round((random() * 4 - 2)::numeric, 1),
           'signal_min_dbm', s.signal_dbm - 2, 'signal_type', s.signal_type, 'dropouts', 0,
           'battery_level_pct', s.battery_level_pct, 'charging', s.charging,
           'battery_temp_c', round((22 + random() * 4)::numeric, 1),
           'drain_pct_per_hour', NULL, 'txn', (random() * 3)::int, 'approved', 1,
           'declined', 0, 'failed', 0, 'decline_rate', 0, 'error_rate', 0,
           'auth_p95_ms', 400 + (random() * 800)::int, 'printer_paper', 'ok', 'late', 0)
  FROM terminal_state AS s
 CROSS JOIN generate_series(%(start)s::timestamptz, %(end)s::timestamptz - interval '1 second',
                            make_interval(secs => %(step)s)) AS w
 CROSS JOIN LATERAL (
       SELECT greatest(0, least(100, s.health_score + (random() * 10)::int - 5)) AS score,
              greatest(0, least(100, s.health_score + (random() * 20)::int - 5)) AS sig,
              greatest(0, least(100, 95 + (random() * 10)::int - 5)) AS bat,
              100 AS txn) AS sc
"""

# The rollup rows the plain writer upserts for one reading per terminal per bucket.
_ROLLUP_SQL = """
INSERT INTO telemetry_rollup_1m (bucket, terminal_id, merchant_id, samples, battery_samples,
    battery_sum, battery_min, battery_max, signal_samples, signal_sum, signal_min_dbm,
    signal_max_dbm, charging_samples)
SELECT date_trunc('minute', ts, 'UTC'), terminal_id, merchant_id, 1, 1, battery_level_pct,
       battery_level_pct, battery_level_pct, (signal_dbm IS NOT NULL)::int,
       coalesce(signal_dbm, 0), signal_dbm, signal_dbm, charging::int
  FROM bench_readings
"""


@dataclass
class Panel:
    title: str
    raw_sql: str


def fleet_panels() -> list[Panel]:
    board = json.loads((ROOT / "dashboards" / "json" / "fleet.json").read_text())
    return [
        Panel(p["title"], t["rawSql"])
        for p in board["panels"]
        for t in p.get("targets", [])
        if "rawSql" in t
    ]


def stream_query(conn: Conn, query: str) -> tuple[float, int]:
    """Run ``query`` as a client reading every row would; (seconds, rows received)."""
    rows = 0
    started = time.monotonic()
    with conn.cursor() as cur, cur.copy(f"COPY ({query}) TO STDOUT".encode()) as copy:
        for data in copy:
            rows += bytes(data).count(b"\n")  # one line per row in COPY's text format
    return time.monotonic() - started, rows


def _pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 1)))
    return ordered[min(rank, len(ordered)) - 1]


def _fill_fleet(
    conn: Conn, path: StoragePath, args: argparse.Namespace, start: datetime, end: datetime
) -> dict[str, float]:
    """The dashboard's tables over [start, end) for ``args.fleet`` terminals; seconds each."""
    took: dict[str, float] = {}
    fleet = _FLEET_SQL.format(cities=len(CITIES), cities_values=_cities_sql(start))
    params = {"terminals": args.fleet}
    conn.execute("SELECT setseed(0.25)")
    took["terminals"] = _timed(conn, _FLEET_STATIC_SQL.format(fleet=fleet), params)[0]
    conn.execute(_ALERTS_SQL)
    took["terminal_health"] = _timed(
        conn, _HEALTH_SQL, {"start": start, "end": end, "step": args.health_step}
    )[0]
    # Telemetry: one reading per terminal every --telemetry-step s. The heatmaps read
    # fleet_battery_1m / fleet_signal_1m (migration 0011): on TimescaleDB continuous
    # aggregates over the raw rows (refreshed below, with telemetry_1m); on plain views
    # over the rollup the writer keeps (filled with what the writer would upsert for
    # these readings).
    readings = int((end - start).total_seconds() // args.telemetry_step)
    tparams = {"terminals": args.fleet, "start": start, "step": args.telemetry_step,
               "readings": readings}  # fmt: skip
    if path == "timescaledb":
        took["telemetry"] = _timed(conn, telemetry_sql("telemetry", start), tparams)[0]
        for view in ("telemetry_1m", "fleet_battery_1m", "fleet_signal_1m"):
            took[f"refresh {view}"] = _timed(
                conn,
                f"CALL refresh_continuous_aggregate('{view}', %s, %s)",
                [start, end.replace(second=0, microsecond=0)],
            )[0]
    else:
        conn.execute("CREATE UNLOGGED TABLE bench_readings (LIKE telemetry INCLUDING DEFAULTS)")
        took["telemetry"] = _timed(conn, telemetry_sql("bench_readings", start), tparams)[0]
        took["telemetry_rollup_1m"] = _timed(conn, _ROLLUP_SQL)[0]
        conn.execute("DROP TABLE bench_readings")
    started = time.monotonic()
    conn.execute("ANALYZE")
    took["analyze"] = time.monotonic() - started
    return took


def part_dashboard(args: argparse.Namespace, dbs: Databases, deadline: Deadline) -> None:
    print(f"\n## 3. Fleet dashboard over 24 h of {args.fleet:,} terminals\n")
    end = datetime.now(UTC).replace(microsecond=0)
    start = end - timedelta(hours=24)
    time_range = TimeRange(start, end)  # 1,000 data points, the datasource's 1m minimum
    panels = fleet_panels()
    targets = {path: dbs.create(path, f"dash_{path[:2]}")[0] for path in PATHS}
    print(
        f"Range {start:%Y-%m-%d %H:%M} to {end:%H:%M} UTC ($__interval "
        f"{time_range.interval.total_seconds():.0f} s). Data, generated in SQL: terminals, "
        f"merchants, terminal_state and alerts for {args.fleet:,} terminals; "
        f"terminal_health one window per terminal every {args.health_step} s; telemetry one "
        f"reading per terminal every {args.telemetry_step} s "
        f"({args.fleet * 86400 // args.health_step:,} health rows, "
        f"{args.fleet * 86400 // args.telemetry_step:,} readings).\n"
    )
    print("| step | " + " | ".join(f"{p} (s)" for p in PATHS) + " |")
    print("|---|---|---|")
    fills: dict[StoragePath, dict[str, float]] = {}
    for path in PATHS:
        with psycopg.connect(targets[path].dsn(), autocommit=True) as conn:
            fills[path] = _fill_fleet(conn, path, args, start, end)
    for step in dict.fromkeys([*fills["timescaledb"], *fills["plain"]]):
        cells = [f"{fills[p][step]:.0f}" if step in fills[p] else "-" for p in PATHS]
        print(f"| {step} | " + " | ".join(cells) + " |")

    conns = {p: psycopg.connect(targets[p].dsn(), autocommit=True) for p in PATHS}
    # The panels are queried with the range ending when they run, as Grafana's "now-24h"
    # to "now" does (the fleet panel "Worst terminals" reads terminal_state when the range
    # ends now); the data ends when the fill started, minutes before.
    now = datetime.now(UTC).replace(microsecond=0)
    time_range = TimeRange(now - timedelta(hours=24), now)
    print(f"\nQueried with the range {time_range.start:%H:%M:%S} to {now:%H:%M:%S} UTC.")
    try:
        heaviest = _each_panel_once(conns, panels, time_range)
        _time_heaviest(args, conns, heaviest, time_range, deadline)
        _worst_in_the_past(conns, panels, TimeRange(start, end - timedelta(hours=1)))
        for text in args.extra_query:
            label, _, query_sql = text.partition("=")
            cells = []
            for path in PATHS:
                query = expand(query_sql, time_range, timescaledb=path == "timescaledb")
                runs = [stream_query(conns[path], query) for _ in range(5)]
                cells.append(
                    f"{path} p50 {_pct([r[0] for r in runs], 0.5) * 1000:,.0f} ms "
                    f"({runs[0][1]:,} rows, 5 runs)"
                )
            print(f"\nAlternative {label}: " + "; ".join(cells))
    finally:
        for c in conns.values():
            c.close()


def _worst_in_the_past(
    conns: dict[StoragePath, Conn], panels: list[Panel], time_range: TimeRange
) -> None:
    """ "Worst terminals" over a range that ends before now: it probes every terminal."""
    panel = next((p for p in panels if p.title.startswith("Worst terminals")), None)
    if panel is None:
        return
    cells = []
    for path in PATHS:
        query = expand(panel.raw_sql, time_range, timescaledb=path == "timescaledb")
        runs = [stream_query(conns[path], query)[0] for _ in range(10)]
        cells.append(
            f"{path} p50 {_pct(runs, 0.5) * 1000:,.0f} ms, p95 {_pct(runs, 0.95) * 1000:,.0f} ms"
        )
    print(
        f"\n{panel.title} over a range ending an hour before the data's end "
        "(every terminal probed), 10 runs: " + "; ".join(cells)
    )


def _each_panel_once(
    conns: dict[StoragePath, Conn], panels: list[Panel], time_range: TimeRange
) -> Panel:
    print("\nEach panel once (seconds, all rows streamed to the client; rows returned):\n")
    print("| panel | " + " | ".join(PATHS) + " |")
    print("|---|---|---|")
    once: dict[str, float] = {}
    for panel in panels:
        cells = []
        for path in PATHS:
            query = expand(panel.raw_sql, time_range, timescaledb=path == "timescaledb")
            secs, rows = stream_query(conns[path], query)
            once[panel.title] = max(once.get(panel.title, 0.0), secs)
            cells.append(f"{secs:.3f} ({rows:,} rows)")
        print(f"| {panel.title} | " + " | ".join(cells) + " |")
    heaviest = max(panels, key=lambda p: once[p.title])
    print(f"\nHeaviest: **{heaviest.title}**.\n")
    return heaviest


def _time_heaviest(
    args: argparse.Namespace,
    conns: dict[StoragePath, Conn],
    heaviest: Panel,
    time_range: TimeRange,
    deadline: Deadline,
) -> None:
    timings: dict[StoragePath, list[float]] = {p: [] for p in PATHS}
    per_path_budget = max(10.0, min(args.query_budget, deadline.left() / 2))
    queries = {
        p: expand(heaviest.raw_sql, time_range, timescaledb=p == "timescaledb") for p in PATHS
    }
    spent = dict.fromkeys(PATHS, 0.0)
    for n in range(args.runs):  # interleaved, so noise hits both paths
        for path in PATHS[:: 1 if n % 2 == 0 else -1]:
            if spent[path] <= per_path_budget:
                secs = stream_query(conns[path], queries[path])[0]
                timings[path].append(secs)
                spent[path] += secs
    print("| | " + " | ".join(PATHS) + " |")
    print("|---|---|---|")
    print("| runs | " + " | ".join(str(len(timings[p])) for p in PATHS) + " |")
    for label, q in (("p50", 0.5), ("p95", 0.95), ("max", 1.0)):
        cells = [f"{_pct(timings[p], q) * 1000:,.0f} ms" if timings[p] else "-" for p in PATHS]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if timings["timescaledb"]:
        p95 = _pct(timings["timescaledb"], 0.95)
        print(
            f"\nTarget p95 < 500 ms on TimescaleDB: {'MET' if p95 < 0.5 else 'MISSED'} "
            f"({p95 * 1000:,.0f} ms)"
        )
    for path in PATHS:
        print(f"\nEXPLAIN (ANALYZE, BUFFERS) of the heaviest on {path}:\n\n```")
        for (line,) in conns[path].execute(f"EXPLAIN (ANALYZE, BUFFERS) {queries[path]}"):
            print(line)
        print("```")


# --- main -------------------------------------------------------------------------------------


@contextmanager
def _databases(base: Settings) -> Iterator[Databases]:
    dbs = Databases(base)
    try:
        yield dbs
    finally:
        dbs.drop_all()


PARTS: dict[str, Callable[[argparse.Namespace, Databases, Deadline], None]] = {
    "insert": part_insert,
    "compression": part_compression,
    "dashboard": part_dashboard,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="telemetry rows (a round's)")
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--terminals", type=int, default=2_000)
    parser.add_argument("--ledger", type=int, default=20_000)
    parser.add_argument("--ledger-batch", type=int, default=500)
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--path", choices=PATHS, default=None, help="writers mode: the path")
    parser.add_argument("--compare", action="store_true", help="both paths (issue 15)")
    parser.add_argument("--parts", default="insert,compression,dashboard")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--day-terminals", type=int, default=2_000)
    parser.add_argument("--variants", default="current,day-chunks,merchant-day")
    parser.add_argument("--variant-terminals", type=int, default=200)
    parser.add_argument("--fleet", type=int, default=50_000)
    parser.add_argument("--health-step", type=int, default=3600, help="seconds")
    parser.add_argument("--telemetry-step", type=int, default=3600, help="seconds")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--query-budget", type=float, default=60, help="s per path")
    parser.add_argument("--extra-query", action="append", default=[], help="label=SQL")
    parser.add_argument("--budget", type=float, default=15 * 60, help="s for the whole run")
    args = parser.parse_args()

    base = Settings()
    deadline = Deadline(args.budget)
    started = time.monotonic()
    with _databases(base) as dbs:
        if not args.compare:
            run_writers(args, dbs)
            return
        with psycopg.connect(base.postgres.dsn()) as conn:
            version = conn.execute(
                "SELECT current_setting('server_version'), (SELECT default_version FROM"
                " pg_available_extensions WHERE name = 'timescaledb')"
            ).fetchone()
        print(
            f"# bench_storage --compare {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
            f"{os.cpu_count()} cores, PostgreSQL {version[0] if version else '?'}, "
            f"TimescaleDB {version[1] if version else '?'}; load average before: "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        for part in args.parts.split(","):
            if deadline.passed():
                print(f"\n(time budget spent: part {part} skipped)")
                continue
            part_started = time.monotonic()
            PARTS[part](args, dbs, deadline)
            print(f"\n({part}: {time.monotonic() - part_started:.0f} s)")
            dbs.drop_all()
    print(
        f"\n(total {time.monotonic() - started:.0f} s; load average after: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; databases dropped)"
    )


if __name__ == "__main__":
    main()
