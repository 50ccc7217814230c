"""`posflow demo`: a short run of the pipeline as it stands, on the running stack.

Three demo terminals publish over MQTT with their own accounts; the ingest
bridge moves their messages into Kafka (bad ones into the dead-letter topic);
the storage writers put telemetry and payments into PostgreSQL; the merchant's
balance is read back. Everything it creates carries a fresh run id.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.table import Table

from ingest import Bridge
from posflow.contracts import IngestEnvelope, Transaction
from posflow.settings import IngestSettings, Settings
from posflow.stack import Stack
from posflow.storage.ledger import LedgerEntry, LedgerWriter
from posflow.storage.queries import run as run_query
from posflow.storage.setup import prepare_database
from posflow.storage.writers import TelemetryWriter, TransactionWriter

__all__ = ["run_demo"]


def _telemetry(merchant: str, terminal: str, seq: int, battery: int) -> dict[str, Any]:
    return {
        "v": 1, "kind": "telemetry", "merchant_id": merchant, "terminal_id": terminal,
        "ts": (datetime.now(UTC) - timedelta(seconds=30 - seq)).isoformat(), "seq": seq,
        "battery": {"level_pct": battery, "charging": False, "temperature_c": 31.0,
                    "health": "good"},
        "signal": {"type": "lte", "rssi_dbm": -70, "rsrp_dbm": -98, "sinr_db": 11.0,
                   "carrier": "Telstra"},
        "printer": {"paper": "ok"},
        "location": {"lat": -33.87, "lon": 151.21, "accuracy_m": 15.0},
        "app_version": "4.2.1", "firmware_version": "fw-2.8.0", "uptime_s": 3600 + seq,
        "tamper": False, "heartbeat_interval_s": 30,
    }  # fmt: skip


def _sale(merchant: str, terminal: str, txn_id: str, amount: int, seq: int) -> dict[str, Any]:
    return {
        "v": 1, "kind": "txn", "merchant_id": merchant, "terminal_id": terminal,
        "ts": datetime.now(UTC).isoformat(), "seq": seq, "txn_id": txn_id, "type": "sale",
        "amount_minor": amount, "tip_minor": 0, "currency": "AUD", "status": "approved",
        "auth_latency_ms": 412, "scheme": "visa", "entry_mode": "contactless",
        "card_last4": "4242",
    }  # fmt: skip


def _publish(
    settings: Settings, terminal: str, password: str, msgs: list[tuple[str, bytes]]
) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=terminal, protocol=mqtt.MQTTv5)
    client.username_pw_set(terminal, password)
    deadline = time.monotonic() + 10
    while True:  # the broker reloads its password file asynchronously
        try:
            client.connect(settings.mosquitto.host, settings.mosquitto.port)
            client.loop_start()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    while not client.is_connected() and time.monotonic() < deadline:
        time.sleep(0.05)
    for topic, payload in msgs:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()


async def _tail(settings: Settings, topics: list[str]) -> AIOKafkaConsumer:
    """A consumer positioned at the current end of the topics (this run's records follow)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap)
    await consumer.start()
    await consumer._client.force_metadata_update()
    parts = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()]
    consumer.assign(parts)
    await consumer.seek_to_end(*parts)
    for tp in parts:
        await consumer.position(tp)  # resolve now, before the run publishes anything
    return consumer


async def _collect(consumer: AIOKafkaConsumer, wanted: int, merchant: str) -> list[Any]:
    """This run's records (the merchant's), at most 30 s."""
    records: list[Any] = []
    try:
        deadline = time.monotonic() + 30
        while len(records) < wanted and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(r for r in batch if merchant.encode() in (r.value or b""))
    finally:
        await consumer.stop()
    return records


async def _run(settings: Settings, console: Console) -> None:
    run = secrets.token_hex(3)
    merchant = f"M-demo-{run}"
    terminals = {f"T-demo-{run}-{i}": secrets.token_urlsafe(12) for i in range(3)}
    prefix = settings.kafka.topic_prefix
    demo = settings.model_copy(
        update={
            "ingest": IngestSettings(
                client_id=f"posflow-demo-{run}", share_group=f"demo{run}",
                topic_filter=f"pos/v1/{merchant}/+/+",
            )
        }
    )  # fmt: skip
    console.print(f"[bold]1. Terminals[/bold]: {', '.join(terminals)} of merchant {merchant}")
    Stack(settings).mosquitto.set_users(terminals)

    console.print("[bold]2. Ingest bridge[/bold] starting (MQTT shared subscription -> Kafka)")
    topics = [f"{prefix}.{k}.v1" for k in ("telemetry", "txn", "deadletter")]
    tail = await _tail(settings, topics)
    bridge = Bridge(demo)
    await bridge.start()
    names = list(terminals)
    sent = 0
    for i, terminal in enumerate(names):
        msgs = [
            (f"pos/v1/{merchant}/{terminal}/telemetry",
             json.dumps(_telemetry(merchant, terminal, seq, 90 - 10 * i - seq)).encode())
            for seq in range(5)
        ]  # fmt: skip
        msgs.append(
            (f"pos/v1/{merchant}/{terminal}/txn",
             json.dumps(_sale(merchant, terminal, f"{terminal}-tx1", 1250 + 100 * i, 5)).encode())
        )  # fmt: skip
        if i == 0:
            broken = _sale(merchant, terminal, f"{terminal}-tx2", 990, 6)
            # A broken app sends a card number (a well-known test number).
            broken["card_token"] = "4111 1111 1111 1111"  # noqa: S105 - not a secret
            msgs.append((f"pos/v1/{merchant}/{terminal}/txn", json.dumps(broken).encode()))
            money = _sale(merchant, terminal, f"{terminal}-tx3", 990, 7)
            money["amount_minor"] = 9.9  # float money
            msgs.append((f"pos/v1/{merchant}/{terminal}/txn", json.dumps(money).encode()))
        await asyncio.to_thread(_publish, settings, terminal, terminals[terminal], msgs)
        sent += len(msgs)
    console.print(f"   {sent} MQTT messages published by the terminals (QoS 1)")
    records = await _collect(tail, sent, merchant)
    await bridge.stop()

    table = Table("Kafka topic", "key", "what")
    envelopes: list[IngestEnvelope] = []
    for record in records:
        body = json.loads(record.value)
        if record.topic.endswith("deadletter.v1"):
            what = f"[red]{body['reason']}[/red]: {body['message'][:60]}"
        else:
            envelopes.append(IngestEnvelope.from_json(record.value))
            what = f"{body['kind']} seq {body['payload']['seq']}"
        table.add_row(record.topic, (record.key or b"").decode(), what)
    console.print(table)
    dead = [json.loads(r.value) for r in records if r.topic.endswith("deadletter.v1")]
    for letter in dead:
        if letter["reason"] == "card_data":
            start = letter["payload_redacted"].find("card_token")
            excerpt = letter["payload_redacted"][start : start + 40]
            console.print(f"   the card number never left the bridge: …{excerpt}…")

    _store(settings, envelopes=envelopes, merchant=merchant, names=names, run=run, console=console)
    Stack(settings).mosquitto.remove_users(names)


def _store(
    settings: Settings,
    *,
    envelopes: list[IngestEnvelope],
    merchant: str,
    names: list[str],
    run: str,
    console: Console,
) -> None:
    console.print("[bold]3. Storage[/bold]: telemetry and payments into PostgreSQL")
    with psycopg.connect(settings.postgres.dsn(), autocommit=True) as conn:
        path = prepare_database(conn, settings.storage)
    with psycopg.connect(settings.postgres.dsn()) as conn:
        telemetry = [e for e in envelopes if e.kind.value == "telemetry"]
        txns = [e for e in envelopes if e.kind.value == "txn"]
        rows = TelemetryWriter(conn, path).write(telemetry)
        TransactionWriter(conn, path).write(txns)
        entries = []
        for e in txns:
            t = e.payload
            assert isinstance(t, Transaction)  # noqa: S101 - routed by kind above
            fee = t.amount_minor * 15 // 1000 + 10  # demo fee: 1.5% + 10 cents
            entries.append(
                LedgerEntry(
                    txn_id=t.txn_id, merchant_id=t.merchant_id, terminal_id=t.terminal_id,
                    txn_type=t.type, currency=t.currency, gross_minor=t.amount_minor,
                    fee_minor=fee, net_minor=t.amount_minor - fee, occurred_at=t.ts,
                    body=t.model_dump(mode="json"),
                )
            )  # fmt: skip
        result = LedgerWriter(conn, consumer_group=f"demo-{run}").write(entries, offsets={})
        again = LedgerWriter(conn, consumer_group=f"demo-{run}").write(entries, offsets={})
        balances = run_query(conn, "merchant_balances", merchant_id=merchant)
        minutes = run_query(
            conn, "terminal_telemetry_1m", terminal_id=names[0],
            start=datetime.now(UTC) - timedelta(hours=1),
            end=datetime.now(UTC) + timedelta(hours=1),
        )  # fmt: skip
    console.print(f"   storage path: {path}; {rows} telemetry rows written")
    console.print(
        f"   ledger: {result.applied} payments applied; written again: "
        f"{again.applied} applied, {again.duplicates} recognised as duplicates"
    )
    for b in balances:
        console.print(
            f"   balance of {merchant}: {b['currency']} pending {b['pending_minor'] / 100:.2f} "
            "(integer minor units in the database)"
        )
    for m in minutes:
        console.print(
            f"   {names[0]} at {m['bucket']:%H:%M}: battery avg {m['battery_avg']:.0f}% "
            f"(min {m['battery_min']}%), signal {m['signal_avg_dbm']:.0f} dBm"
        )


def run_demo(settings: Settings) -> None:
    console = Console()
    asyncio.run(_run(settings, console))
    p = settings.prometheus
    console.print(
        "\n[bold]Look at[/bold]:\n"
        f"  Prometheus   http://{p.host}:{p.port}/targets\n"
        f"  Kafka        kcat -b {settings.kafka.bootstrap} -t "
        f"{settings.kafka.topic_prefix}.deadletter.v1 -C -e\n"
        f"  PostgreSQL   psql 'host={settings.postgres.host} port={settings.postgres.port} "
        f"dbname={settings.postgres.database} user={settings.postgres.user}'"
        "  (password: POSFLOW_POSTGRES__PASSWORD)\n"
        "  Bridge       posflow ingest   (then /metrics on 127.0.0.1:9401)"
    )
