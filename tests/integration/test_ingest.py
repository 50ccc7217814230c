"""The MQTT -> Kafka bridge on the real stack: order, dead letters, no loss."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from paho.mqtt.enums import CallbackAPIVersion

from ingest import Bridge
from posflow.settings import IngestSettings, KafkaSettings, ServicePorts, Settings
from posflow.stack import Stack, ensure_topics
from tests.conftest import ROOT, free_port, unique
from tests.unit import samples

# The bridge refuses clocks far from the time of receipt: payloads carry the run's time.
NOW = datetime.now(UTC).isoformat()


@pytest.fixture
async def isolated(settings: Settings, stack: Stack) -> Settings:
    """Settings with this test's own Kafka topics, MQTT merchant and client id."""
    prefix = unique("t").replace("-", "")
    merchant = unique("M")
    isolated = settings.model_copy(
        update={
            "kafka": KafkaSettings(
                **{**settings.kafka.model_dump(), "topic_prefix": prefix, "default_partitions": 3}
            ),
            "ingest": IngestSettings(
                client_id=unique("ingest"),
                share_group=unique("g"),
                topic_filter=f"pos/v1/{merchant}/+/+",
                retry_backoff_s=0.2,
                kafka_stall_s=2.0,
            ),
            "services": ServicePorts(ingest=free_port()),
        }
    )
    await ensure_topics(isolated)
    return isolated


def merchant_of(settings: Settings) -> str:
    return settings.ingest.topic_filter.split("/")[2]


@pytest.fixture
async def bridge(isolated: Settings) -> AsyncIterator[Bridge]:
    bridge = Bridge(isolated)
    await bridge.start()
    yield bridge
    await bridge.stop()


class Publisher:
    """Publishes as posflow's service account (allowed on every terminal topic)."""

    def __init__(self, settings: Settings) -> None:
        m = settings.mosquitto
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("pub"))
        self.client.username_pw_set(m.service_user, m.service_password.get_secret_value())
        self.client.max_inflight_messages_set(1000)
        self.client.connect(m.host, m.port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def publisher(settings: Settings, stack: Stack) -> Iterator[Publisher]:
    pub = Publisher(settings)
    yield pub
    pub.close()


async def consume(
    settings: Settings, topic: str, count: int, seconds: float = 30, *, distinct_seq: bool = False
) -> list[tuple[bytes, dict[str, Any]]]:
    """Read records of a topic from the beginning (key, decoded value) until ``count``.

    With ``distinct_seq``, count distinct payload sequence numbers: at-least-once
    delivery may repeat a record after a crash, and the test wants every message.
    """
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=settings.kafka.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    out: list[tuple[bytes, dict[str, Any]]] = []
    try:
        deadline = time.monotonic() + seconds
        seen: set[int] = set()
        while (len(seen) if distinct_seq else len(out)) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    assert record.key is not None
                    assert record.value is not None
                    value = json.loads(record.value)
                    out.append((record.key, value))
                    if distinct_seq:
                        seen.add(value["payload"]["seq"])
    finally:
        await consumer.stop()
    return out


def topic_of(settings: Settings, kind: str) -> str:
    return f"{settings.kafka.topic_prefix}.{kind}.v1"


async def test_messages_from_many_terminals_arrive_in_order_per_key(
    isolated: Settings, bridge: Bridge, publisher: Publisher
) -> None:
    merchant = merchant_of(isolated)
    terminals = [f"T-{i:03d}" for i in range(20)]
    for seq in range(25):
        for terminal in terminals:
            body = samples.telemetry(ts=NOW, merchant_id=merchant, terminal_id=terminal, seq=seq)
            publisher.publish(f"pos/v1/{merchant}/{terminal}/telemetry", json.dumps(body))
    records = await consume(isolated, topic_of(isolated, "telemetry"), 500)
    by_key: dict[bytes, list[int]] = {}
    for key, value in records:
        assert value["merchant_id"] == merchant
        assert value["source_topic"] == f"pos/v1/{merchant}/{value['terminal_id']}/telemetry"
        by_key.setdefault(key, []).append(value["payload"]["seq"])
    assert by_key == {t.encode(): list(range(25)) for t in terminals}


async def test_transactions_are_keyed_by_merchant_and_keep_integer_money(
    isolated: Settings, bridge: Bridge, publisher: Publisher
) -> None:
    merchant = merchant_of(isolated)
    for i in range(10):
        body = samples.txn(
            ts=NOW,
            merchant_id=merchant,
            terminal_id=f"T-{i % 3}",
            txn_id=f"tx-{i}",
            amount_minor=10**12 - i,
            seq=i,
        )
        publisher.publish(f"pos/v1/{merchant}/T-{i % 3}/txn", json.dumps(body))
    records = await consume(isolated, topic_of(isolated, "txn"), 10)
    assert {key for key, _ in records} == {merchant.encode()}
    assert [v["payload"]["txn_id"] for _, v in records] == [f"tx-{i}" for i in range(10)]
    assert [v["payload"]["amount_minor"] for _, v in records] == [10**12 - i for i in range(10)]


def _bad_inputs(merchant: str) -> list[tuple[str, str, bytes, str, str | None]]:
    """(case, topic, payload, expected reason, expected field)."""
    t = f"pos/v1/{merchant}/T-0001"
    tele = samples.telemetry(ts=NOW, merchant_id=merchant)
    txn = samples.txn(ts=NOW, merchant_id=merchant)

    def j(obj: object) -> bytes:
        return json.dumps(obj).encode()

    battery = {**tele["battery"], "level_pct": "87"}
    missing = {k: v for k, v in tele.items() if k != "battery"}
    return [
        ("malformed json", f"{t}/telemetry", b'{"v": 1, "kind": ', "malformed_json", None),
        ("wrong type", f"{t}/telemetry", j({**tele, "battery": battery}), "wrong_type",
         "battery.level_pct"),
        ("missing field", f"{t}/telemetry", j(missing), "missing_field", "battery"),
        ("float money", f"{t}/txn", j({**txn, "amount_minor": 12.5}), "float_money",
         "amount_minor"),
        ("unknown currency", f"{t}/txn", j({**txn, "currency": "XYZ"}), "unknown_currency",
         "currency"),
        ("identity mismatch", f"pos/v1/{merchant}/T-9999/telemetry", j(tele),
         "identity_mismatch", "terminal_id"),
        ("oversize", f"{t}/telemetry", b"{" + b" " * 70_000 + b"}", "oversize", None),
        ("not utf-8", f"{t}/telemetry", b"\xff\xfe\x00garbage", "not_utf8", None),
        ("card number", f"{t}/txn", j({**txn, "card_token": "4111 1111 1111 1111"}),
         "card_data", None),
        ("year 9999", f"{t}/telemetry", j({**tele, "ts": "9999-12-31T23:59:59Z"}),
         "implausible_timestamp", "ts"),
        ("duplicate key", f"{t}/txn",
         j(txn).replace(b'"amount_minor": 1250', b'"amount_minor": 1250, "amount_minor": 125000'),
         "duplicate_key", "amount_minor"),
    ]  # fmt: skip


async def test_every_kind_of_bad_input_is_dead_lettered_with_its_reason(
    isolated: Settings, bridge: Bridge, publisher: Publisher
) -> None:
    merchant = merchant_of(isolated)
    cases = _bad_inputs(merchant)
    for _, topic, payload, _, _ in cases:
        publisher.publish(topic, payload)
    # The bridge keeps running: a good message after the bad ones goes through.
    good = samples.telemetry(ts=NOW, merchant_id=merchant, seq=99)
    publisher.publish(f"pos/v1/{merchant}/T-0001/telemetry", json.dumps(good))
    dead = await consume(isolated, topic_of(isolated, "deadletter"), len(cases))
    ok = await consume(isolated, topic_of(isolated, "telemetry"), 1)
    assert [v["payload"]["seq"] for _, v in ok] == [99]
    # Dead letters are keyed by MQTT topic, so order holds per topic only: compare sorted.
    got = sorted((v["original_topic"], v["reason"]) for _, v in dead)
    assert got == sorted((topic, reason) for _, topic, _, reason, _ in cases)
    fields = {v["reason"]: v["field"] for _, v in dead}
    for case, _, _, reason, field in cases:
        if field is not None:
            assert fields[reason] == field, case
    # The card number never reaches Kafka in clear, in any form.
    raw = json.dumps([v for _, v in dead])
    assert "4111 1111 1111 1111" not in raw
    assert "4111111111111111" not in raw
    assert bridge.metrics.dead_lettered.labels("card_data")._value.get() == 1


async def _raw_records(
    settings: Settings, topic: str, count: int, seconds: float = 30
) -> list[Any]:
    """The first ``count`` records of ``topic`` as aiokafka gives them (headers included)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=settings.kafka.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + seconds
        while len(out) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            out += [r for records in batch.values() for r in records]
    finally:
        await consumer.stop()
    return out


async def test_the_bridge_marks_its_envelopes_for_the_fast_decoder_and_not_its_dead_letters(
    isolated: Settings, bridge: Bridge, publisher: Publisher
) -> None:
    from posflow.contracts.internal import BRIDGE_HEADER, BridgeEnvelope, decode_envelope

    merchant = merchant_of(isolated)
    bodies = {
        "telemetry": samples.telemetry(ts=NOW, merchant_id=merchant),
        "txn": samples.txn(ts=NOW, merchant_id=merchant),
        "status": samples.status(ts=NOW, merchant_id=merchant),
    }
    for kind, body in bodies.items():
        publisher.publish(f"pos/v1/{merchant}/T-0001/{kind}", json.dumps(body))
    publisher.publish(f"pos/v1/{merchant}/T-0001/telemetry", b'{"v": 1')
    for kind, body in bodies.items():
        [record] = await _raw_records(isolated, topic_of(isolated, kind), 1)
        assert list(record.headers) == [BRIDGE_HEADER], kind
        decoded = decode_envelope(record.value, record.headers)
        assert isinstance(decoded, BridgeEnvelope), kind
        assert (decoded.kind, decoded.payload.seq) == (kind, body["seq"])
    [letter] = await _raw_records(isolated, topic_of(isolated, "deadletter"), 1)
    assert list(letter.headers) == []


async def test_readyz_reports_ready_and_metrics_count_messages(
    isolated: Settings, bridge: Bridge, publisher: Publisher
) -> None:
    from posflow.http import start_http

    runner = await start_http(
        "127.0.0.1", isolated.services.ingest, bridge.metrics.registry, bridge.is_ready
    )
    try:
        merchant = merchant_of(isolated)
        body = samples.status(ts=NOW, merchant_id=merchant)
        publisher.publish(f"pos/v1/{merchant}/T-0001/status", json.dumps(body))
        await consume(isolated, topic_of(isolated, "status"), 1)
        base = f"http://127.0.0.1:{isolated.services.ingest}"
        ready = await asyncio.to_thread(_get, f"{base}/readyz")
        metrics = await asyncio.to_thread(_get, f"{base}/metrics")
    finally:
        await runner.cleanup()
    assert ready == (200, '{"status": "ready"}')
    assert 'posflow_ingest_received_total{kind="status"} 1.0' in metrics[1]
    assert (
        f'posflow_ingest_produced_total{{topic="{topic_of(isolated, "status")}"}} 1.0'
        in (metrics[1])
    )


def _get(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _publish_stream(
    publisher: Publisher, merchant: str, start: int, count: int
) -> list[mqtt.MQTTMessageInfo]:
    infos = []
    for seq in range(start, start + count):
        body = samples.telemetry(ts=NOW, merchant_id=merchant, terminal_id=f"T-{seq % 7}", seq=seq)
        infos.append(
            publisher.publish(f"pos/v1/{merchant}/T-{seq % 7}/telemetry", json.dumps(body))
        )
    for info in infos:
        info.wait_for_publish(10)  # the broker has it (PUBACK to the publisher)
    return infos


@pytest.mark.slow
async def test_kafka_down_and_back_loses_no_qos1_message(
    isolated: Settings, bridge: Bridge, publisher: Publisher, stack: Stack
) -> None:
    merchant = merchant_of(isolated)
    _publish_stream(publisher, merchant, 0, 200)
    assert len(await consume(isolated, topic_of(isolated, "telemetry"), 200)) == 200
    stack.kafka.process.stop(30)
    try:
        _publish_stream(publisher, merchant, 200, 300)
        deadline = time.monotonic() + 30
        while bridge.is_ready() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not bridge.is_ready()
        assert bridge.inflight > 0
    finally:
        await asyncio.to_thread(stack.up, ["kafka"])
    records = await consume(
        isolated, topic_of(isolated, "telemetry"), 500, seconds=90, distinct_seq=True
    )
    seqs = [v["payload"]["seq"] for _, v in records]
    assert sorted(set(seqs)) == list(range(500))  # every message, counted exactly
    deadline = time.monotonic() + 30
    while not bridge.is_ready() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert bridge.is_ready()


@pytest.mark.slow
async def test_bridge_killed_with_sigkill_loses_no_qos1_message(
    isolated: Settings, publisher: Publisher
) -> None:
    merchant = merchant_of(isolated)
    env = {
        **os.environ,
        "POSFLOW_KAFKA__TOPIC_PREFIX": isolated.kafka.topic_prefix,
        "POSFLOW_INGEST__CLIENT_ID": isolated.ingest.client_id,
        "POSFLOW_INGEST__SHARE_GROUP": isolated.ingest.share_group,
        "POSFLOW_INGEST__TOPIC_FILTER": isolated.ingest.topic_filter,
        "POSFLOW_SERVICES__INGEST": str(isolated.services.ingest),
    }

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "ingest"],
            env=env,
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if _get_or_none(f"http://127.0.0.1:{isolated.services.ingest}/readyz") == 200:
                return proc
            time.sleep(0.1)
        proc.kill()
        raise AssertionError("posflow ingest did not become ready")

    first = await asyncio.to_thread(start)
    try:
        # The persistent session exists now; publish a stream and kill mid-way.
        pub_task = asyncio.create_task(
            asyncio.to_thread(_publish_stream, publisher, merchant, 0, 3000)
        )
        # Kill as soon as the first records are in Kafka (the stream is still coming).
        await _until_records_in(isolated, topic_of(isolated, "telemetry"), 30)
        first.send_signal(signal.SIGKILL)
        await pub_task
    finally:
        first.kill()
        first.wait()
    before = await consume(
        isolated, topic_of(isolated, "telemetry"), 3000, seconds=3, distinct_seq=True
    )
    # Killed mid-stream: part of the stream was in Kafka, the rest waited at the broker.
    assert 0 < len({v["payload"]["seq"] for _, v in before}) < 3000
    second = await asyncio.to_thread(start)
    try:
        records = await consume(
            isolated, topic_of(isolated, "telemetry"), 3000, seconds=90, distinct_seq=True
        )
    finally:
        second.terminate()
        assert second.wait(timeout=60) == 0  # SIGTERM: drains and exits cleanly
    seqs = [v["payload"]["seq"] for _, v in records]
    assert sorted(set(seqs)) == list(range(3000))


async def _until_records_in(settings: Settings, topic: str, seconds: float) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(settings.kafka.default_partitions)]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if sum((await consumer.end_offsets(parts)).values()) > 0:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"nothing reached {topic} in {seconds} s")
    finally:
        await consumer.stop()


def _get_or_none(url: str) -> int | None:
    try:
        return _get(url)[0]
    except OSError:
        return None
