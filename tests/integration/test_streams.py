"""The health workers on the real stack: known terminal behaviour -> expected health rows."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from posflow.contracts import Accepted, validate_message
from posflow.settings import KafkaSettings, PostgresSettings, Settings
from posflow.stack import ensure_topics
from posflow.topics import TopicSpec
from tests.conftest import ROOT, free_port, unique
from tests.unit import samples

pytestmark = pytest.mark.slow


class Health:
    """An isolated health pipeline: own topics, own app id, own database."""

    def __init__(self, settings: Settings, pg: PostgresSettings) -> None:
        self.prefix = unique("h").replace("-", "")
        self.app_id = unique("health")
        self.settings = settings.model_copy(
            update={
                "kafka": KafkaSettings(
                    **{**settings.kafka.model_dump(), "topic_prefix": self.prefix,
                       "default_partitions": 3}
                ),
                "postgres": pg,
            }
        )  # fmt: skip
        self.env = {
            **os.environ,
            "POSFLOW_KAFKA__TOPIC_PREFIX": self.prefix,
            "POSFLOW_KAFKA__DEFAULT_PARTITIONS": "3",
            "POSFLOW_POSTGRES__DATABASE": pg.database,
            "POSFLOW_STREAMS__APP_ID": self.app_id,
            "POSFLOW_STREAMS__TICK_S": "0.2",
            "POSFLOW_SERVICES__STREAMS": str(free_port()),
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def start_worker(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "streams", "worker"],
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        return proc

    async def send(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Publish payloads as the bridge would: validated envelopes, keyed like the bridge."""
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka.bootstrap, acks="all", enable_idempotence=True
        )
        await producer.start()
        try:
            for kind, payload in events:
                topic = f"pos/v1/{payload['merchant_id']}/{payload['terminal_id']}/{kind}"
                result = validate_message(
                    topic,
                    json.dumps(payload).encode(),
                    received_at=datetime.now(UTC),
                    mqtt_mid=1,
                )
                assert isinstance(result, Accepted), result
                env = result.envelope
                await producer.send(f"{self.prefix}.{kind}.v1", env.to_json(), key=env.kafka_key())
            await producer.flush()
        finally:
            await producer.stop()

    def rows(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.settings.postgres.dsn()) as conn:
            return conn.execute(query.encode(), params).fetchall()

    async def wait_for(self, query: str, want: int, seconds: float = 90) -> list[tuple[Any, ...]]:
        deadline = time.monotonic() + seconds
        rows: list[tuple[Any, ...]] = []
        while time.monotonic() < deadline:
            try:
                rows = self.rows(query)
            except psycopg.errors.UndefinedTable:
                rows = []
            if len(rows) >= want:
                return rows
            await asyncio.sleep(0.5)
        return rows

    async def health_topic(self, wanted: int, seconds: float = 30) -> list[dict[str, Any]]:
        consumer = AIOKafkaConsumer(
            f"{self.prefix}.health.v1",
            bootstrap_servers=self.settings.kafka.bootstrap,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        out: list[dict[str, Any]] = []
        try:
            deadline = time.monotonic() + seconds
            while len(out) < wanted and time.monotonic() < deadline:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    out.extend(json.loads(r.value) for r in batch if r.value)
        finally:
            await consumer.stop()
        return out

    async def wait_rekeyed(self, count: int, seconds: float = 60) -> None:
        """Until the worker's txn router has re-keyed ``count`` payments."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka.bootstrap)
        await consumer.start()
        try:
            deadline = time.monotonic() + seconds
            topic = f"{self.app_id}-txn"
            while time.monotonic() < deadline:
                parts = [
                    TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()
                ]
                if parts and sum((await consumer.end_offsets(parts)).values()) >= count:
                    return
                await consumer._client.force_metadata_update()
                await asyncio.sleep(0.3)
            raise AssertionError(f"the txn router did not forward {count} payments")
        finally:
            await consumer.stop()

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


@pytest.fixture
async def health(settings: Settings, pg: PostgresSettings) -> Any:
    h = Health(settings, pg)
    await ensure_topics(h.settings)
    yield h
    h.stop()


def _base() -> float:
    """The start of the minute ten minutes ago: event time runs 10x faster than the test."""
    now = time.time()
    return now - now % 60 - 600


def _tele(terminal: str, seq: int, ts: float, **over: Any) -> tuple[str, dict[str, Any]]:
    body = samples.telemetry(
        merchant_id="M-h",
        terminal_id=terminal,
        seq=seq,
        ts=datetime.fromtimestamp(ts, UTC).isoformat(),
        **over,
    )
    return "telemetry", body


FINAL = (
    "SELECT extract(epoch FROM window_start)::bigint, score, signal_score, battery_score,"
    " txn_score, details FROM terminal_health WHERE terminal_id = '{t}'"
    " AND (details->>'final')::boolean ORDER BY window_start"
)


async def test_known_terminal_behaviour_gives_the_expected_health(health: Health) -> None:
    worker = health.start_worker()
    base = _base()
    events: list[tuple[str, dict[str, Any]]] = []
    for i in range(22):  # 10.5 minutes, a sample every 30 s: minutes 0-9 close by event time
        ts = base + 30 * i
        events.append(_tele("T-weak", i, ts, **{"signal.rsrp_dbm": -118}))
        events.append(
            _tele("T-drain", i, ts, **{"battery.level_pct": 60 - i, "battery.charging": False})
        )
        events.append(_tele("T-fail", i, ts))
        if i < 6:
            events.append(_tele("T-will", i, ts))
        if i % 2 == 0 and i < 20:  # four payments a minute: 2 approved, 1 error, 1 timeout
            for j, status in enumerate(["approved", "approved", "error", "timeout"]):
                events.append(
                    (
                        "txn",
                        samples.txn(
                            merchant_id="M-h", terminal_id="T-fail", txn_id=f"tx-{i}-{j}",
                            status=status, auth_latency_ms=300 + 100 * j,
                            ts=datetime.fromtimestamp(ts + j, UTC).isoformat(),
                            seq=1000 + i * 4 + j,
                        ),
                    )
                )  # fmt: skip
    events.append(
        (
            "status",
            samples.status(merchant_id="M-h", terminal_id="T-will", state="offline", seq=99,
                           ts=datetime.fromtimestamp(base + 200, UTC).isoformat()),
        )
    )  # fmt: skip
    events.append(_tele("T-silent", 0, base + 600, heartbeat_interval_s=1))
    # Payments take one more hop (re-keyed by terminal). Event time here runs far ahead
    # of the wall clock, so let them through first, as they would be in real time.
    await health.send([e for e in events if e[0] == "txn"])
    await health.wait_rekeyed(40)
    await health.send([e for e in events if e[0] != "txn"])

    weak = await health.wait_for(FINAL.format(t="T-weak"), 10)
    drain = await health.wait_for(FINAL.format(t="T-drain"), 10)
    fail = await health.wait_for(FINAL.format(t="T-fail"), 10)
    assert worker.poll() is None, "the worker died"

    # Weak signal: every closed minute, contiguous, -118 dBm on LTE's scale -> 7.
    assert [w[0] for w in weak] == [int(base) + 60 * m for m in range(10)]  # no gaps
    assert {(w[2], w[5]["signal_avg_dbm"], w[5]["samples"]) for w in weak} == {(7, -118.0, 2)}
    assert all("weak signal (lte, -118 dBm)" in w[5]["reasons"] for w in weak)
    # Draining 1% per 30 s: 120 %/h once 5 minutes are seen; the last window says so.
    assert drain[-1][5]["drain_pct_per_hour"] == 120.0
    assert drain[-1][5]["battery_level_pct"] == 41
    assert drain[-1][3] == 52  # 41%: 40 + 60 x 21/30 = 82, minus 30 for the drain
    # Failing payments: half errors or timeouts -> transaction component 0.
    assert {(f[5]["txn"], f[5]["failed"], f[5]["error_rate"], f[4]) for f in fail} == {
        (4, 2, 0.5, 0)
    }
    assert fail[0][5]["auth_p95_ms"] == 500

    # Offline: the Last Will at once; the silent terminal after 3 x its 1 s heartbeat.
    states = await health.wait_for(
        "SELECT terminal_id, online FROM terminal_state WHERE NOT online ORDER BY 1", 2, 60
    )
    assert states == [("T-silent", False), ("T-will", False)]
    # 10 final windows each of T-weak, T-drain, T-fail, 2 of T-will, 2 offline changes.
    topic = await health.health_topic(wanted=34)
    changes = {(r["terminal_id"], r["online"], r["reason"]) for r in topic if r["type"] == "state"}
    assert ("T-will", False, "last will") in changes
    assert any(t == "T-silent" and not on and r.startswith("silent for") for t, on, r in changes)
    windows = [r for r in topic if r["type"] == "window" and r["terminal_id"] == "T-weak"]
    assert [r["window_start"] for r in windows] == [int(base) + 60 * m for m in range(10)]


async def test_worker_killed_mid_stream_resumes_its_windows_without_gaps(
    health: Health,
) -> None:
    first = health.start_worker()
    base = _base()
    stream = [
        _tele("T-k", i, base + 15 * i, **{"signal.rsrp_dbm": -90 - (i % 4)}) for i in range(42)
    ]  # 10.5 minutes, 4 samples a minute
    await health.send(stream[:18])  # up to 4.25 minutes: minute 4 half full
    await health.wait_for(FINAL.format(t="T-k"), 3)
    await asyncio.sleep(2)  # let the table changelog and offsets catch up
    first.send_signal(signal.SIGKILL)
    first.wait()
    await health.send(stream[18:])
    health.start_worker()  # recovers "terminal-state" from its changelog
    rows = await health.wait_for(FINAL.format(t="T-k"), 10)
    assert [r[0] for r in rows] == [int(base) + 60 * m for m in range(10)]  # no gap
    # Every minute has exactly its 4 samples: the half-full window survived the kill,
    # and messages redelivered after it were not counted twice.
    assert [r[5]["samples"] for r in rows] == [4] * 10
    assert {r[5]["signal_avg_dbm"] for r in rows} == {-91.5}


def _status(terminal: str, seq: int, ts: float, state: str) -> tuple[str, dict[str, Any]]:
    body = samples.status(
        merchant_id="M-h",
        terminal_id=terminal,
        seq=seq,
        ts=datetime.fromtimestamp(ts, UTC).isoformat(),
        state=state,
        reason="last will" if state == "offline" else None,
    )
    return "status", body


async def test_messages_sent_before_the_will_but_processed_after_it_leave_it_offline(
    health: Health,
) -> None:
    """Status and telemetry/payments are different topics: their processing order is
    forced here (each step waits for the worker), as load makes it happen by chance."""
    worker = health.start_worker()
    base = _base()
    state_q = "SELECT online FROM terminal_state WHERE terminal_id = 'T-order'"
    window_q = (
        "SELECT (details->>'samples')::int, (details->>'txn')::int, details->>'printer_paper'"
        " FROM terminal_health WHERE terminal_id = 'T-order' AND window_start = to_timestamp(%s)"
    )

    async def until(query: str, want: list[tuple[Any, ...]], *params: object) -> None:
        rows: list[tuple[Any, ...]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                rows = health.rows(query, *params)
            except psycopg.errors.UndefinedTable:
                rows = []
            if rows == want:
                return
            await asyncio.sleep(0.3)
        raise AssertionError(f"{query} {params}: {rows}, wanted {want}")

    # Connected at base: online seq 100, its Last Will reserved as seq 101 (ts base).
    await health.send([_status("T-order", 100, base, "online"), _tele("T-order", 102, base + 5)])
    await until(window_q, [(1, 0, "ok")], base)
    # The connection drops; the will overtakes the last telemetry and payment.
    await health.send([_status("T-order", 101, base, "offline")])
    await until(state_q, [(False,)])
    payment = samples.txn(
        merchant_id="M-h", terminal_id="T-order", txn_id="T-order:104", seq=104,
        ts=datetime.fromtimestamp(base + 36, UTC).isoformat(),
    )  # fmt: skip
    await health.send(
        [_tele("T-order", 103, base + 35, **{"printer.paper": "low"}), ("txn", payment)]
    )
    await until(window_q, [(2, 1, "low")], base)  # valid data: counted in its window
    assert health.rows(state_q) == [(False,)], "a message sent before the will revived it"
    # Reconnected: its next connection's telemetry comes before its online status.
    await health.send([_tele("T-order", 112, base + 305)])
    await until(window_q, [(1, 0, "ok")], base + 300)
    assert health.rows(state_q) == [(False,)]
    await health.send([_status("T-order", 110, base + 300, "online")])
    await until(state_q, [(True,)])
    assert worker.poll() is None, "the worker died"

    # Offline, the first minute (closed by telemetry 112's event time), back online.
    topic = await health.health_topic(wanted=3, seconds=20)
    changes = [(r["online"], r["reason"]) for r in topic if r["type"] == "state"]
    assert changes == [(False, "last will"), (True, None)]
    windows = [(r["window_start"], r["facts"]["samples"]) for r in topic if r["type"] == "window"]
    assert windows == [(int(base), 2)]


async def test_a_year_9999_record_is_dead_lettered_and_the_worker_keeps_scoring(
    health: Health,
) -> None:
    """A record that did not come through the bridge's clock check (an old topic, another
    producer) used to crash-loop the worker: its window's end is past datetime's range."""
    worker = health.start_worker()
    base = _base()
    kind, good = _tele("T-9999", 1, base + 5)
    forged = {**good, "seq": 0}
    result = validate_message(
        f"pos/v1/M-h/T-9999/{kind}", json.dumps(forged).encode(),
        received_at=datetime.now(UTC), mqtt_mid=1,
    )  # fmt: skip
    assert isinstance(result, Accepted)
    record = json.loads(result.envelope.to_json())
    record["payload"]["ts"] = "9999-12-31T23:59:59Z"
    producer = AIOKafkaProducer(bootstrap_servers=health.settings.kafka.bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            f"{health.prefix}.telemetry.v1", json.dumps(record).encode(), key=b"T-9999"
        )
    finally:
        await producer.stop()
    await health.send([(kind, good)])
    rows = await health.wait_for(
        "SELECT extract(epoch FROM window_start)::bigint FROM terminal_health"
        " WHERE terminal_id = 'T-9999'",
        1,
    )
    assert rows == [(int(base),)]
    consumer = AIOKafkaConsumer(
        f"{health.prefix}.deadletter.v1",
        bootstrap_servers=health.settings.kafka.bootstrap,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        letters = await consumer.getmany(timeout_ms=15_000)
    finally:
        await consumer.stop()
    (letter,) = [json.loads(r.value or b"") for batch in letters.values() for r in batch]
    assert (letter["reason"], letter["field"]) == ("implausible_timestamp", "ts")
    assert letter["original_topic"] == f"{health.prefix}.telemetry.v1"
    await asyncio.sleep(2)  # a few timer ticks: the poisoned record would crash one
    assert worker.poll() is None, "the worker died"


def _previous_worker_state(terminal: str, base: float) -> dict[str, Any]:
    """A terminal's state as the worker before issue 18 wrote it to the changelog (a JSON
    object, windows keyed by str(start)): readings 0 and 1 of minute ``base`` applied."""
    window = {
        "samples": 2, "sig_sum": -190.0, "sig_n": 2, "sig_min": -100, "sig_type": "lte",
        "dropouts": 0, "battery": 80, "battery_ts": base + 20, "charging": False,
        "temp_max": 31.5, "printer": "ok", "txn": 0, "approved": 0, "declined": 0,
        "failed": 0, "latencies": [], "last_ts": base + 20,
    }  # fmt: skip
    return {
        "terminal_id": terminal, "merchant_id": "M-h", "windows": {str(int(base)): window},
        "closed_upto": 0.0, "watermark": base + 20, "last_heard": time.time(),
        "online": True, "offline_reason": None, "heartbeat_s": 30, "late": 0, "max_seq": 1,
        "status_seq": -1, "offline_by": None, "silent_seq": -1, "seqs": [0, 1], "txns": [],
        "battery_hist": [[base, 80, False]],
        "current": {"ts": base + 20, "seq": 1, "signal_type": "lte", "signal_dbm": -100,
                    "carrier": "Telstra", "battery": 80, "charging": False, "printer": "ok",
                    "app_version": "3.4.1", "firmware_version": "fw-2026.10", "lat": None,
                    "lon": None},
        "health_score": 90, "status_changed_at": None,
    }  # fmt: skip


async def test_a_worker_carries_on_from_state_the_previous_version_left_in_the_changelog(
    health: Health,
) -> None:
    """The changelog of a worker before issue 18 holds JSON objects; the new worker reads
    them on restore and carries the half-full window on, counting nothing twice."""
    base = _base()
    changelog = TopicSpec(
        f"{health.app_id}-terminal-state-changelog", 3, {"cleanup.policy": "compact"}, "test"
    )
    await ensure_topics(health.settings, [changelog])
    producer = AIOKafkaProducer(bootstrap_servers=health.settings.kafka.bootstrap, acks="all")
    await producer.start()
    try:  # keyed like the table's writes (use_partitioner: the producer's partitioner)
        await producer.send_and_wait(
            changelog.name, json.dumps(_previous_worker_state("T-old", base)).encode(),
            key=b"T-old",
        )  # fmt: skip
    finally:
        await producer.stop()
    worker = health.start_worker()
    await health.send(
        [
            _tele("T-old", 1, base + 20, **{"signal.rsrp_dbm": -100}),  # redelivered
            _tele("T-old", 2, base + 40, **{"signal.rsrp_dbm": -110}),
            _tele("T-old", 3, base + 75, **{"signal.rsrp_dbm": -90}),  # closes minute 0
        ]
    )
    rows = await health.wait_for(FINAL.format(t="T-old"), 1)
    assert worker.poll() is None, "the worker died"
    assert [(r[0], r[5]["samples"], r[5]["signal_avg_dbm"]) for r in rows] == [
        (int(base), 3, -100.0)
    ]


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_changed_states_reach_the_changelog_in_bulk_in_their_terminals_partitions(
    health: Health,
) -> None:
    """The bulk changelog path (streams/changelog.py) writes what faust's table would: the
    raw key, the state in the table's codec, in the partition the terminal's events are in
    (so faust's recovery, which reads the changelog partitions of the partitions it is
    assigned, finds each state); the kill-and-resume test above restores from it."""
    import httpx

    from streams.state import decode_state

    health.start_worker()
    base = _base()
    terminals = [f"T-b{i:02d}" for i in range(30)]
    await health.send([_tele(t, 1, base + 5) for t in terminals])
    url = f"http://127.0.0.1:{health.env['POSFLOW_SERVICES__STREAMS']}/metrics"
    deadline, bulk = time.monotonic() + 60, 0.0
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline and bulk < len(terminals):
            try:
                text = (await client.get(url)).text
            except httpx.TransportError:
                text = ""
            bulk = _metric(text, "posflow_streams_changelog_records_total", path="bulk")
            await asyncio.sleep(0.5)
    assert bulk >= len(terminals), f"bulk changelog records: {bulk}"

    async def latest(topic: str) -> dict[bytes, tuple[int, bytes]]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=health.settings.kafka.bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
            if not parts:
                await consumer._client.force_metadata_update()
                parts = [
                    TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()
                ]
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            ends = await consumer.end_offsets(parts)
            out: dict[bytes, tuple[int, bytes]] = {}
            stop = time.monotonic() + 30
            while time.monotonic() < stop and [
                tp for tp in parts if await consumer.position(tp) < ends[tp]
            ]:
                for tp, batch in (await consumer.getmany(timeout_ms=500)).items():
                    for record in batch:
                        out[record.key] = (tp.partition, record.value)
            return out
        finally:
            await consumer.stop()

    sources = await latest(f"{health.prefix}.telemetry.v1")
    changelog = await latest(f"{health.app_id}-terminal-state-changelog")
    for terminal in terminals:
        key = terminal.encode()
        assert key in changelog, f"{terminal}: no changelog record"
        partition, value = changelog[key]
        assert partition == sources[key][0], f"{terminal}: changelog partition {partition}"
        state = decode_state(value)
        assert (state.terminal_id, state.merchant_id) == (terminal, "M-h")
        assert (state.max_seq, state.seqs) == (1, [1]), state
