"""End to end: a terminal's MQTT publish of an approved payment -> the SSE event at the merchant.

The real path, every service as its own process (as deployed), with its own
ports, Kafka topic prefix, consumer group and database:

  terminals (paho, one account each, Transaction payloads through posflow.contracts)
    -> Mosquitto (a broker of this run: own port, password file and the stack's ACL)
    -> `posflow ingest` -> Kafka <prefix>.txn.v1
    -> `posflow settlement worker` -> ledger + cashflow_events + NOTIFY (one transaction)
    -> `posflow api` -> one SSE client per merchant (merchant key + API key issued)

The broker is this run's own so that other people's terminals on the shared
broker cannot reach this run's bridge (the bridge subscribes to every merchant).

Latency per payment = SSE receive time at the client - the publisher's clock just
before ``publish`` (kept in a side table by txn id; the payload's ``ts`` is the same
instant). Stages from the database: ``received_at`` (bridge got it from MQTT),
``recorded_at`` (the settlement transaction that wrote the event *started*). All
clocks are this machine's. The first ``--warmup`` seconds are left out of the
figures; every payment counts for ``missing``.

Usage:
  .venv/bin/python benchmarks/bench_payment_to_sse.py --rate 1000 --seconds 25 --merchants 50
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import psycopg
from aiokafka.admin import AIOKafkaAdminClient
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import percentile_ms, read_sse_ids, stop_processes, wait_ready
from posflow.contracts import Transaction
from posflow.security.apikeys import issue_key
from posflow.security.keys import LocalMasterKey, issue_merchant_key
from posflow.security.roles import Principal, Role
from posflow.settings import KafkaSettings, Settings
from posflow.stack import ensure_topics
from posflow.stack.mosquitto import mosquitto_password_hash, render_acl, render_config
from posflow.storage import migrate
from posflow.storage.databases import create_database, drop_database
from posflow.topics import pipeline_topics
from tests.conftest import free_port

POSFLOW = str(Path(sys.executable).with_name("posflow"))
PLAN = '{"default": {"percent": "1.4", "fixed_minor": 10}}'
TIME_LIMIT_S = 300


def _stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (
        f"p50 {percentile_ms(values, 0.5):7.1f} ms  p99 {percentile_ms(values, 0.99):7.1f} ms  "
        f"max {max(values) * 1000:7.1f} ms  mean {statistics.fmean(values) * 1000:6.1f} ms"
    )


# -- the broker of this run ------------------------------------------------------------


def start_broker(
    tmp: Path, port: int, service: tuple[str, str], terminals: dict[str, str]
) -> subprocess.Popen[bytes]:
    (tmp / "data").mkdir()
    users = {service[0]: service[1], **terminals}
    (tmp / "passwd").write_text(
        "".join(f"{u}:{mosquitto_password_hash(p)}\n" for u, p in users.items())
    )
    (tmp / "acl").write_text(render_acl(service[0]))
    (tmp / "mosquitto.conf").write_text(
        render_config(
            host="127.0.0.1", port=port, directory=tmp, max_connections=-1,
            max_queued_messages=100_000, max_inflight_messages=1000,
        )
    )  # fmt: skip
    for path in (tmp, tmp / "data", tmp / "passwd", tmp / "acl", tmp / "mosquitto.conf"):
        path.chmod(0o700 if path.is_dir() else 0o600)
        if os.geteuid() == 0:  # mosquitto started as root drops to its own account
            shutil.chown(path, "mosquitto", "mosquitto")
    proc = subprocess.Popen(
        ["/usr/sbin/mosquitto", "-c", str(tmp / "mosquitto.conf")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the benchmark's Mosquitto did not listen in 15 s")


# -- terminals (a process of their own) ------------------------------------------------


def publisher(plan: dict[str, Any], ready: Any, go: Any, out: Any) -> None:
    """Connect every terminal, then publish `total` sales at `rate`/s round-robin (QoS 1)."""
    port, terminals, owner = plan["port"], plan["terminals"], plan["owner"]
    rate, total, run = plan["rate"], plan["total"], plan["run"]
    clients = []
    for terminal, password in terminals.items():
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=terminal, protocol=mqtt.MQTTv5)
        c.username_pw_set(terminal, password)
        c.connect("127.0.0.1", port)
        c.loop_start()
        clients.append((terminal, c))
    deadline = time.monotonic() + 30
    while not all(c.is_connected() for _, c in clients) and time.monotonic() < deadline:
        time.sleep(0.05)
    ready.set()
    go.wait(60)
    sent: dict[str, float] = {}
    seqs = dict.fromkeys(terminals, 0)
    behind = 0.0
    infos = []
    started = time.monotonic()
    for i in range(total):
        due = started + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            behind = max(behind, -delay)
        terminal, client = clients[i % len(clients)]
        merchant = owner[terminal]
        seqs[terminal] += 1
        txn_id = f"{run}-{i:07d}"
        at = time.time()
        payload = Transaction(
            v=1, kind="txn", merchant_id=merchant, terminal_id=terminal,
            ts=datetime.fromtimestamp(at, UTC), seq=seqs[terminal], txn_id=txn_id,
            type="sale", amount_minor=1000 + i % 5000, currency="EUR", status="approved",
            auth_latency_ms=300, scheme="visa", entry_mode="contactless", card_last4="4242",
        )  # fmt: skip
        infos.append(
            client.publish(f"pos/v1/{merchant}/{terminal}/txn", payload.model_dump_json(), qos=1)
        )
        sent[txn_id] = at
    publish_s = time.monotonic() - started
    unacked = 0
    for info in infos:
        try:
            info.wait_for_publish(10)
        except (RuntimeError, ValueError):
            unacked += 1
    for _, c in clients:
        c.disconnect()
    for _, c in clients:
        c.loop_stop()
    out.put((sent, behind, unacked, publish_s))


# -- the merchants' SSE clients --------------------------------------------------------


async def collect(
    base: str, keys: dict[str, str], want: dict[str, int], limit_s: float, started: Any
) -> dict[tuple[str, int], float]:
    got: dict[tuple[str, int], float] = {}
    tasks = [
        asyncio.create_task(read_sse_ids(base, m, k, want[m], got, timeout_s=60))
        for m, k in keys.items()
    ]
    await asyncio.sleep(1.0)  # streams open
    started.set()
    done, pending = await asyncio.wait(tasks, timeout=limit_s)
    for t in pending:
        t.cancel()
    for t in done:
        if t.exception() is not None:
            print(f"SSE client failed: {t.exception()!r}")
    return got


# -- services --------------------------------------------------------------------------


def metric(url: str, name: str) -> str:
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return "?"
    return " ".join(line.split()[-1] for line in text.splitlines() if line.startswith(name)) or "?"


def main() -> int:  # noqa: PLR0912 - one linear script, setup to teardown
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=1000, help="payments per second")
    parser.add_argument("--seconds", type=float, default=25)
    parser.add_argument("--merchants", type=int, default=50)
    parser.add_argument("--terminals-per-merchant", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=2, help="seconds left out of figures")
    parser.add_argument("--poll-ms", type=int, default=None, help="POSFLOW_SETTLEMENT__POLL_MS")
    parser.add_argument("--linger-ms", type=int, default=None, help="POSFLOW_INGEST__LINGER_MS")
    parser.add_argument("--max-records", type=int, default=None, help="settlement batch size")
    args = parser.parse_args()
    total = int(args.rate * args.seconds)
    assert 0 < args.seconds <= TIME_LIMIT_S  # noqa: S101 - bounded run

    base = Settings()
    run = secrets.token_hex(3)
    prefix, db = f"e2e{run}", f"bench_e2e_{run}"
    merchants = [f"M-{run}-{i:03d}" for i in range(args.merchants)]
    terminals = {
        f"T-{run}-{m}-{t}": secrets.token_urlsafe(12)
        for m in range(args.merchants)
        for t in range(args.terminals_per_merchant)
    }
    owner = {t: merchants[int(t.split("-")[2])] for t in terminals}
    ports = {name: free_port() for name in ("mqtt", "ingest", "settlement", "api")}
    kafka = KafkaSettings(**{**base.kafka.model_dump(), "topic_prefix": prefix})
    topics = [t.name for t in pipeline_topics(kafka)]
    tmp = Path(tempfile.mkdtemp(prefix=f"posflow-e2e-{run}-"))
    admin_dsn = base.postgres.dsn()
    procs: list[subprocess.Popen[bytes]] = []
    svc = (base.mosquitto.service_user, base.mosquitto.service_password.get_secret_value())
    try:
        procs.append(start_broker(tmp, ports["mqtt"], svc, terminals))
        asyncio.run(ensure_topics(base.model_copy(update={"kafka": kafka})))
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            create_database(admin, db)
        dsn = base.postgres.dsn(database=db)
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn)
            provider = LocalMasterKey(secrets.token_bytes(32))
            admin_principal = Principal("bench", Role.SECURITY_ADMIN)
            keys = {}
            for m in merchants:
                conn.execute(
                    "INSERT INTO merchants (merchant_id, name, fee_plan, settlement_rule)"
                    " VALUES (%s, 'bench', %s::jsonb, '{\"kind\": \"instant\"}'::jsonb)",
                    [m, PLAN],
                )
                issue_merchant_key(conn, provider, m, actor=admin_principal, source="bench")
                keys[m] = issue_key(conn, m, "bench").token
        env = {
            **os.environ,
            "POSFLOW_POSTGRES__DATABASE": db,
            "POSFLOW_KAFKA__TOPIC_PREFIX": prefix,
            "POSFLOW_MOSQUITTO__PORT": str(ports["mqtt"]),
            "POSFLOW_INGEST__CLIENT_ID": f"bench-e2e-{run}",
            "POSFLOW_INGEST__SHARE_GROUP": f"e2e{run}",
            "POSFLOW_SETTLEMENT__GROUP": f"bench-e2e-{run}",
            "POSFLOW_SERVICES__INGEST": str(ports["ingest"]),
            "POSFLOW_SERVICES__SETTLEMENT": str(ports["settlement"]),
            "POSFLOW_SERVICES__API": str(ports["api"]),
            "POSFLOW_API__RATE_BURST": "100000",
            "POSFLOW_LOG_LEVEL": "WARNING",
        }
        if args.poll_ms is not None:
            env["POSFLOW_SETTLEMENT__POLL_MS"] = str(args.poll_ms)
        if args.linger_ms is not None:
            env["POSFLOW_INGEST__LINGER_MS"] = str(args.linger_ms)
        if args.max_records is not None:
            env["POSFLOW_SETTLEMENT__MAX_RECORDS"] = str(args.max_records)
        logs = {n: (tmp / f"{n}.log").open("wb") for n in ("ingest", "settlement", "api")}
        for name, argv in (
            ("ingest", ["ingest"]),
            ("settlement", ["settlement", "worker"]),
            ("api", ["api"]),
        ):
            procs.append(
                subprocess.Popen([POSFLOW, *argv], env=env, stdout=logs[name], stderr=logs[name])
            )
        wait_ready("ingest", f"http://127.0.0.1:{ports['ingest']}/readyz", procs[1])
        wait_ready("settlement", f"http://127.0.0.1:{ports['settlement']}/readyz", procs[2])
        api = f"http://127.0.0.1:{ports['api']}"
        wait_ready("api", api + "/readyz", procs[3])

        want = dict.fromkeys(merchants, 0)
        names = list(terminals)
        for i in range(total):
            want[owner[names[i % len(names)]]] += 1
        ctx = mp.get_context("spawn")
        ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
        pub = ctx.Process(
            target=publisher,
            args=(
                {
                    "port": ports["mqtt"],
                    "terminals": terminals,
                    "owner": owner,
                    "rate": args.rate,
                    "total": total,
                    "run": run,
                },
                ready,
                go,
                out,
            ),
        )
        pub.start()
        if not ready.wait(60):
            raise SystemExit("the terminals did not connect in 60 s")
        load_before = os.getloadavg()

        async def measure() -> dict[tuple[str, int], float]:
            streams_open = asyncio.Event()
            task = asyncio.create_task(collect(api, keys, want, args.seconds + 60, streams_open))
            await streams_open.wait()
            go.set()
            return await task

        got = asyncio.run(measure())
        sent, behind, unacked, pub_s = out.get(timeout=60)
        pub.join(30)
        load_after = os.getloadavg()
        with psycopg.connect(dsn) as conn:
            rows = conn.execute(
                "SELECT merchant_id, seq, txn_id, received_at, recorded_at FROM cashflow_events"
                " WHERE kind = 'sale'"
            ).fetchall()
            ledger = conn.execute("SELECT count(*) FROM ledger_entries").fetchone()
        stage: dict[str, list[float]] = {k: [] for k in ("e2e", "mqtt_ingest", "ingest_tx",
                                                          "tx_sse")}  # fmt: skip
        e2e_all = []
        first = min(sent.values())
        for m, seq, txn_id, received_at, recorded_at in rows:
            key = (m, int(seq))
            if txn_id not in sent or key not in got:
                continue
            pub_at, sse_at = sent[txn_id], got[key]
            e2e_all.append(sse_at - pub_at)
            if pub_at - first < args.warmup:
                continue
            stage["e2e"].append(sse_at - pub_at)
            stage["mqtt_ingest"].append(received_at.timestamp() - pub_at)
            stage["ingest_tx"].append(recorded_at.timestamp() - received_at.timestamp())
            stage["tx_sse"].append(sse_at - recorded_at.timestamp())
        received = sum(1 for m, s, t, _, _ in rows if t in sent and (m, int(s)) in got)
        settlement_metrics = f"http://127.0.0.1:{ports['settlement']}/metrics"
        print(
            f"rate={args.rate}/s seconds={args.seconds} merchants={args.merchants}"
            f" terminals={len(terminals)} warmup={args.warmup}s poll_ms={args.poll_ms}"
            f" linger_ms={args.linger_ms} max_records={args.max_records}"
        )
        print(f"  load average before / after   {load_before} / {load_after}")
        print(f"  published                     {len(sent)} in {pub_s:.1f} s"
              f" (publisher max behind {behind * 1000:.0f} ms, unacked {unacked})")  # fmt: skip
        print(f"  ledger rows / sale events     {ledger[0] if ledger else '?'} / {len(rows)}")
        print(f"  received over SSE             {received}")
        print(f"  missing                       {len(sent) - received}")
        print(f"  publish -> SSE (all)          {_stats(e2e_all)}")
        print(f"  publish -> SSE (after warmup) {_stats(stage['e2e'])}")
        print(f"    publish -> ingest received  {_stats(stage['mqtt_ingest'])}")
        print(f"    ingest -> settlement tx     {_stats(stage['ingest_tx'])}")
        print(f"    settlement tx -> SSE        {_stats(stage['tx_sse'])}")
        batches = metric(settlement_metrics, "posflow_settlement_batch_seconds_count")
        batch_s = metric(settlement_metrics, "posflow_settlement_batch_seconds_sum")
        try:
            mean_ms = f"{float(batch_s) / float(batches) * 1000:.1f} ms"
        except ValueError:
            mean_ms = "?"
        print(f"  settlement batches            {batches} (mean read+write {mean_ms})")
        if len(sent) != received:
            for name in logs:
                tail = (tmp / f"{name}.log").read_text(errors="replace").splitlines()[-5:]
                print(f"  {name} log tail:", *tail, sep="\n    ")
        return 0 if len(sent) == received == total else 1
    finally:
        stop_processes(procs[1:])
        stop_processes(procs[:1])

        async def drop_topics() -> None:
            client = AIOKafkaAdminClient(bootstrap_servers=base.kafka.bootstrap)
            await client.start()
            try:
                await client.delete_topics(topics)
            finally:
                await client.close()

        try:
            asyncio.run(drop_topics())
        except Exception as exc:  # cleanup goes on
            print(f"could not delete topics {topics}: {exc}")
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            drop_database(admin, db)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
