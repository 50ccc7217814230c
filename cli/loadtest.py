"""`posflow loadtest`: ramp a fleet up, drive it, account for every message, report.

The pipeline under test (an ingest bridge and a health worker) runs as subprocesses
on topics of the run's own prefix, so the accounting reads back exactly this run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from cli.costtable import (
    cost_markdown,
    cost_table,
    messages_handled,
    metrics_text,
    proc_usage,
    until_handled_still,
)
from cli.harness import Pipeline, count_rows
from posflow.settings import KafkaSettings, PostgresSettings, Settings
from posflow.stack import Stack, ensure_topics
from posflow.storage.databases import create_database
from posflow.topics import topic_names
from simulator.accounting import KafkaSeen, Recorder, expected_rows, percentiles, reconcile
from simulator.engine import Run
from simulator.fleet import build_fleet
from simulator.metrics import SimMetrics
from simulator.procstat import backends_of, sample
from simulator.register import register_fleet
from simulator.runner import drive
from simulator.scenarios import Scenario, load_scenario
from simulator.service import serve_metrics
from simulator.transport import TransportStats

__all__ = ["LoadTestOptions", "read_back", "run_loadtest"]


@dataclass(frozen=True)
class LoadTestOptions:
    terminals: int
    duration_s: float
    ramp_per_s: float
    telemetry_s: int = 10
    txn_scale: float = 1.0
    max_real: int = 19_000
    gateways: int = 8
    scenario: str | None = None
    out_dir: Path = Path("docs/benchmarks")
    name: str = "loadtest"
    command: str = ""
    readback_s: float = 120.0
    fleet: str = "lt"
    keep_database: bool = False
    alerts: bool = True  # `posflow alerts run` in the pipeline (a stage of the cost table)


async def read_back(
    kafka: KafkaSettings, ours: set[str], expected: int, seconds: float
) -> KafkaSeen:
    """Everything on the prefix's terminal and dead-letter topics, until ``expected`` or quiet."""
    names = topic_names(kafka)
    kinds = {names.of_kind(kind): kind for kind in ("telemetry", "txn", "status")}
    dead_topic = names.deadletter
    topics = [*kinds, dead_topic]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 << 20,
    )
    await consumer.start()
    seen = KafkaSeen()
    try:
        await consumer._client.force_metadata_update()
        parts = [
            TopicPartition(t, n) for t in topics for n in consumer.partitions_for_topic(t) or ()
        ]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        deadline = time.monotonic() + seconds
        quiet_since = time.monotonic()
        count = 0
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=20_000)
            got = 0
            for tp, records in batches.items():
                for r in records:
                    if r.value is None:
                        continue
                    got += 1
                    if tp.topic == dead_topic:
                        seen.add_dead(r.value, r.timestamp, ours)
                    else:
                        seen.add_valid(kinds[tp.topic], r.value, r.timestamp, ours)
            count += got
            now = time.monotonic()
            if got:
                quiet_since = now
            matched = len(seen.valid) + len(seen.dead) + sum(seen.dead_unmatched.values())
            if matched >= expected and now - quiet_since > 2:
                break
            if now - quiet_since > 15:
                break
    finally:
        await consumer.stop()
    return seen


def _sink_latency(port: int) -> dict[str, Any]:
    """Terminal timestamp -> raw row committed, from the sink's histogram (bucket bounds)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = metrics_text(port)
    except OSError as exc:
        return {"error": str(exc)}
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "posflow_rawsink_end_to_end_seconds_bucket" and (
                s.labels.get("since") == "terminal"
            ):
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    total = buckets.get(float("inf"), 0.0)
    out: dict[str, Any] = {"n": int(total)}
    for name, q in (("p50_le", 0.5), ("p95_le", 0.95), ("p99_le", 0.99)):
        bound = next((le for le in sorted(buckets) if total and buckets[le] >= q * total), None)
        out[name] = None if bound is None else (bound * 1000 if bound != float("inf") else "inf")
    return out


def _db_stats(settings: Settings, terminals: list[str], rec: Recorder) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with psycopg.connect(settings.postgres.dsn(), autocommit=True) as conn:

        def count(sql: bytes) -> int | None:
            try:
                row = conn.execute(sql, (terminals,)).fetchone()
            except psycopg.errors.UndefinedTable:
                return None
            return int(row[0]) if row else 0

        out["terminal_state_rows"] = count(
            b"SELECT count(*) FROM terminal_state WHERE terminal_id = ANY(%s)"
        )
        out["terminal_health_rows"] = count(
            b"SELECT count(*) FROM terminal_health WHERE terminal_id = ANY(%s)"
        )
        out["telemetry_rows"] = count(b"SELECT count(*) FROM telemetry WHERE terminal_id = ANY(%s)")
        out["transactions_rows"] = count(
            b"SELECT count(*) FROM transactions WHERE terminal_id = ANY(%s)"
        )
        out["ledger_entries_rows"] = count(
            b"SELECT count(*) FROM ledger_entries WHERE terminal_id = ANY(%s)"
        )
        latencies: list[float] = []
        try:
            rows = conn.execute(
                b"SELECT c.txn_id, extract(epoch FROM c.recorded_at) FROM cashflow_events c"
                b" JOIN ledger_entries l USING (txn_id) WHERE l.terminal_id = ANY(%s)",
                (terminals,),
            ).fetchall()
            sent = rec.publish_times({str(t).rsplit(":", 1)[0] for t, _ in rows})
            for txn_id, at in rows:
                terminal, seq = str(txn_id).rsplit(":", 1)  # txn ids are "<terminal>:<seq>"
                published = sent.get((terminal, int(seq)))
                if published is not None:
                    latencies.append((float(at) - published) * 1000)
        except psycopg.errors.UndefinedTable:
            pass
        out["latency_payment_to_cashflow_ms"] = percentiles(latencies)
    return out


def _markdown(report: dict[str, Any]) -> str:
    a = report["accounting"]
    c = report["connections"]
    db = report["database"]
    sent_kinds = ", ".join(f"{k} {v:,}" for k, v in a["sent_by_kind"].items())
    rows = [
        ("terminals", f"{report['terminals']:,} ({c['real']:,} own connections, "
                      f"{c['multiplexed']:,} over {c['gateways']} gateways)"),
        ("duration", f"{report['duration_s']:.0f} s (ramp {report['ramp_per_s']:.0f}/s)"),
        ("sent", f"{a['sent']:,} ({sent_kinds})"),
        ("in Kafka (valid)", f"{a['in_kafka_valid']:,}"),
        ("of which from earlier runs (retained status)", f"{a['in_kafka_not_this_run']:,}"),
        ("delivered (matched by terminal, seq)", f"{a['delivered']:,}"),
        ("dead letters expected",
         f"{a['dead_letters_expected']:,} {a['dead_letters_expected_by_reason']}"),
        ("dead letters unexpected", f"{a['dead_letters_unexpected']:,}"),
        ("**lost**", f"**{a['lost']:,}**"),
        ("pipeline processes that died", str(report["pipeline_exited_during_run"] or "none")),
        ("duplicates expected / unexpected",
         f"{a['duplicates_expected']:,} / {a['duplicates_unexpected']:,}"),
        ("publish -> Kafka latency ms", str(a["latency_publish_to_kafka_ms"])),
        ("payment -> cash-flow event ms", str(db["latency_payment_to_cashflow_ms"])),
        ("readings + payments expected in the database / stored",
         f"{db.get('expected_rows', 0):,} / {db.get('stored_rows', 0):,}"),
        ("**lost before the database**", f"**{db.get('lost_before_database', 0):,}**"),
        ("publish -> database ms (histogram bucket bounds)",
         str(db.get("latency_publish_to_database_ms"))),
        ("throughput msgs/s", str(report["throughput"])),
        ("database rows", str({k: v for k, v in db.items() if k.endswith("rows")})),
    ]  # fmt: skip
    lines = [
        f"# Load test {report['name']}",
        "",
        f"- date: {report['date']}",
        f"- machine: {report['machine']}",
        f"- command: `{report['command']}`",
        "",
        "| what | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "## Processes (CPU % of one core over the run, memory)",
        "",
        "| process | CPU % | RSS end MB | RSS peak MB |",
        "|---|---|---|---|",
    ]
    for name, p in report["processes"].items():
        cpu, end, peak = p["cpu_pct_of_one_core"], p["rss_mb_end"], p["rss_mb_peak"]
        lines.append(f"| {name} | {cpu} | {end} | {peak} |")
    lines += ["", *cost_markdown(report["cost"])]
    lines += ["## Transport", "", f"```\n{json.dumps(report['transport'], indent=1)}\n```", ""]
    return "\n".join(lines)


async def run_loadtest(
    settings: Settings, opts: LoadTestOptions, console: Console
) -> dict[str, Any]:
    """Run the load test in a database of its own (dropped afterwards unless kept)."""
    run_id = secrets.token_hex(3)
    database = f"posflow_lt_{run_id}"
    with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
        create_database(admin, database)
    try:
        return await _run(settings, opts, console, run_id, database)
    finally:
        if not opts.keep_database:
            with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'.encode())


async def _run(  # noqa: PLR0915 - one straight sequence of steps
    settings: Settings, opts: LoadTestOptions, console: Console, run_id: str, database: str
) -> dict[str, Any]:
    # Fixed ids (accounts are reused run after run); the topics and the database are the run's.
    name = opts.fleet
    prefix = f"lt{run_id}"
    lt_settings = settings.model_copy(
        update={
            "kafka": KafkaSettings(**{**settings.kafka.model_dump(), "topic_prefix": prefix}),
            "postgres": PostgresSettings(
                **{**settings.postgres.model_dump(), "database": database}
            ),
        }
    )
    t0 = time.time()
    fleet = build_fleet(opts.terminals, seed=settings.simulator.seed, name=name, at=t0)
    scenario: Scenario | None = load_scenario(opts.scenario) if opts.scenario else None
    console.print(f"fleet {name}: {len(fleet.merchants):,} merchants, {opts.terminals:,} terminals")
    t = time.monotonic()
    register_fleet(lt_settings, fleet)
    console.print(f"registered in PostgreSQL and Mosquitto in {time.monotonic() - t:.1f} s")
    await ensure_topics(lt_settings)
    pipeline = Pipeline(settings, prefix, run_id, database=database)
    # Payments -> ledger -> cash-flow events, when the settlement worker is there.
    # and the raw sink: every reading and payment must end as a row in the database.
    pipeline.start(settlement=importlib.util.find_spec("streams.settlement") is not None, sink=True,
                   alerts=opts.alerts)  # fmt: skip
    console.print(f"pipeline up: {pipeline.pids()} (topics {prefix}.*)")
    stack = Stack(settings)
    groups: dict[str, list[int]] = {"simulator": [os.getpid()]}
    groups.update({n: [p] for n, p in pipeline.pids().items()})
    for svc in (stack.mosquitto, stack.kafka, stack.postgres):
        pid = svc.process.pid()
        if pid is not None:
            # PostgreSQL: this run's backends and the server's own processes, not others'.
            groups[svc.name] = backends_of(pid, database) if svc.name == "postgres" else [pid]
    before = {n: sample(p) for n, p in groups.items()}
    handled_before = {n: messages_handled(port) for n, port in pipeline.ports.items()}
    peaks: dict[str, float] = {}

    ids = {t.index: t.terminal_id for t in fleet.terminals}
    rec = Recorder(ids)
    # The same /metrics as `posflow simulate`, on its port if free (no error if taken).
    metrics = SimMetrics(terminals_total=opts.terminals)
    metrics_http = await serve_metrics(settings, metrics, lambda: True, required=False)
    run = Run(fleet, t0=t0, duration_s=opts.duration_s, telemetry_s=opts.telemetry_s,
              txn_scale=opts.txn_scale, ramp_per_s=opts.ramp_per_s, scenario=scenario)  # fmt: skip
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn())  # fmt: skip
    try:
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("load", total=opts.duration_s, info="")

            def progress(at: float, st: TransportStats, connected: int, queued: int) -> None:
                for n, pids in groups.items():
                    s = sample(pids)
                    if s is not None:
                        peaks[n] = max(peaks.get(n, 0.0), s.rss_mb)
                active = min(opts.terminals, int(at * opts.ramp_per_s) + 1)
                bar.update(task, completed=at, info=(
                    f"terminals {active:,}/{opts.terminals:,} connected {connected:,} "
                    f"sent {st.published:,} acked {st.acked:,} queued {queued:,}"))  # fmt: skip

            result = await drive(
                settings, fleet, run, on_sent=rec, max_real=opts.max_real,
                gateways=opts.gateways, run_id=run_id, progress=progress, metrics=metrics,
            )  # fmt: skip
        after_run = {n: sample(p) for n, p in groups.items()}
        counts = metrics.counts()
        console.print(f"waiting for the raw sink: {expected_rows(counts):,} rows expected")
        rows = await asyncio.to_thread(
            count_rows, lt_settings.postgres.dsn(), name, counts,
            timeout_s=120, still_s=10,
        )  # fmt: skip
        # Every stage caught up (the health worker may lag the raw sink): then sample.
        await until_handled_still(pipeline.ports, still_s=5, timeout_s=120)
        # The stages' CPU and messages at the same instant, once they caught up (before the
        # read-back below adds its own load to Kafka); the simulator's over its run.
        settled = {n: sample(p) for n, p in groups.items()} | {"simulator": after_run["simulator"]}
        handled = {n: (messages_handled(port) or 0) - (handled_before.get(n) or 0)
                   for n, port in pipeline.ports.items()}  # fmt: skip
        expected = rec.total - rec.by_expect.get("dup", 0)
        console.print(f"published {rec.total:,}; reading Kafka back ({expected:,} expected)")
        t = time.monotonic()
        seen = await read_back(lt_settings.kafka, set(ids.values()), expected, opts.readback_s)
        console.print(f"read back in {time.monotonic() - t:.1f} s")
        db_stats = _db_stats(lt_settings, list(ids.values()), rec)
        db_stats["expected_rows"] = rows.expected
        db_stats["stored_rows"] = rows.stored
        db_stats["lost_before_database"] = rows.lost
        db_stats["latency_publish_to_database_ms"] = _sink_latency(pipeline.ports["sink"])
        died = pipeline.exited()  # any before the stop below is a failure of the run
    finally:
        pipeline.stop()
        if metrics_http is not None:
            await metrics_http.cleanup()
    accounting = reconcile(rec, seen)
    span_pub = max(rec.last_at - (rec.first_at or rec.last_at), 1e-9)
    span_kafka = max((seen.last_ms - (seen.first_ms or seen.last_ms)) / 1000, 1e-9)
    real = min(opts.max_real, opts.terminals)
    report: dict[str, Any] = {
        "name": opts.name,
        "fleet": name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores (shared), Linux; open-file hard limit 20000",
        "command": opts.command,
        "seed": settings.simulator.seed,
        "terminals": opts.terminals,
        "merchants": len(fleet.merchants),
        "duration_s": opts.duration_s,
        "ramp_per_s": opts.ramp_per_s,
        "telemetry_s": opts.telemetry_s,
        "scenario": opts.scenario,
        "connections": {
            "real": real,
            "multiplexed": opts.terminals - real,
            "gateways": opts.gateways if opts.terminals > real else 0,
            "peak_connected": result.peak_connected,
        },
        "accounting": accounting,
        "pipeline_exited_during_run": died,
        "throughput": {
            "published_msgs_per_s": round(rec.total / span_pub, 1),
            "kafka_msgs_per_s": round(
                (accounting["in_kafka_valid"] + accounting["dead_letters_expected"]) / span_kafka, 1
            ),
        },
        "database": db_stats,
        "transport": {
            "published": result.stats.published,
            "acked": result.stats.acked,
            "unacked_at_end": result.unacked,
            "queued_at_end": result.queued,
            "connects": result.stats.connects,
            "connect_failures": result.stats.connect_failures,
            "reconnects": result.stats.reconnects,
            "wills": result.stats.wills,
            "abandoned_in_flight": result.stats.abandoned,
            "errors": result.stats.errors,
            "wall_s": round(result.wall_s, 1),
        },
        "processes": proc_usage(before, after_run, peaks),
        "cost": cost_table(
            before, settled, handled, published=rec.total, telemetry=rec.by_kind["telemetry"]
        ),
    }
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    (opts.out_dir / f"{opts.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (opts.out_dir / f"{opts.name}.md").write_text(_markdown(report))
    return report
