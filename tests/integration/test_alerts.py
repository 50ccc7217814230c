"""The alert engine on the real stack: MQTT -> bridge -> health worker -> engine -> webhook.

Each test has its own topic prefix, database, merchant, ports and webhook receiver.
Rule ``for`` durations are shortened by a test rules file (the shipped defaults are
minutes); the health worker runs with 3 s windows so window-based rules answer fast.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from paho.mqtt.enums import CallbackAPIVersion

from cli.harness import stop_processes
from posflow.security.apikeys import issue_key
from posflow.security.roles import Role
from posflow.settings import KafkaSettings, PostgresSettings, Settings
from posflow.stack import ensure_topics
from tests.conftest import ROOT, free_port, unique
from tests.unit import samples

pytestmark = pytest.mark.slow

SECRET = "test-secret"
RULES = """
rules:
  - name: battery_low
    severity: warning
    scope: terminal
    when: [{fact: battery_pct, op: lt, value: 15}, {fact: charging, op: eq, value: false}]
    clear_when: [{fact: battery_pct, op: ge, value: 20}, {fact: charging, op: eq, value: true}]
    for: 2s
    annotations: {summary: "{terminal_id} battery {battery_pct}%", runbook: "https://rb/battery"}
  - name: printer_out_of_paper
    severity: warning
    scope: terminal
    when: [{fact: printer_paper, op: in, value: [out, jammed]}]
    for: 2s
    annotations: {summary: "{terminal_id} printer {printer_paper}", runbook: "https://rb/p"}
  - name: weak_signal
    severity: warning
    scope: terminal
    when: [{fact: signal_avg_dbm, op: lt, value: -110}]
    clear_when: [{fact: signal_avg_dbm, op: ge, value: -105}]
    for: 2s
    annotations: {summary: "{terminal_id} signal {signal_avg_dbm}", runbook: "https://rb/s"}
  - name: terminal_offline
    severity: critical
    scope: terminal
    when: [{fact: online, op: eq, value: false}]
    for: 4s
    annotations: {summary: "{terminal_id} offline", runbook: "https://rb/o"}
  - name: merchant_terminals_offline
    severity: critical
    scope: merchant
    group: {where: [{fact: online, op: eq, value: false}], min_count: 3, min_fraction: 0.3}
    inhibits: [terminal_offline]
    for: 1s
    annotations: {summary: "{count}/{total} offline", runbook: "https://rb/m"}
"""


class Receiver:
    """A signed-webhook receiver on loopback that records what it got and can be down."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.got: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        stamp = request.headers["X-Posflow-Timestamp"]
        mac = hmac.new(SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        payload = json.loads(body)
        self.got.append(
            {
                "id": request.headers["X-Posflow-Notification-Id"],
                "signed": hmac.compare_digest(
                    request.headers["X-Posflow-Signature"], f"sha256={mac}"
                ),
                "event": payload["event"],
                "rule": payload["alert"]["rule"],
                "subject": payload["alert"]["subject_id"],
                "at": time.time(),
            }
        )
        return web.json_response({"ok": True})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def events(self) -> set[tuple[str, str, str]]:
        return {(g["event"], g["rule"], g["subject"]) for g in self.got}


class Pipeline:
    """Own topics, database, ports; subprocesses for the bridge, the health worker, the engine."""

    def __init__(self, settings: Settings, pg: PostgresSettings, tmp: Path) -> None:
        self.prefix = unique("al").replace("-", "")
        self.merchant = unique("MA")
        self.settings = settings.model_copy(
            update={
                "kafka": KafkaSettings(
                    **{**settings.kafka.model_dump(), "topic_prefix": self.prefix,
                       "default_partitions": 2}
                ),
                "postgres": pg,
            }
        )  # fmt: skip
        self.alerts_port = free_port()
        self.hook_port = free_port()
        self.rules = tmp / "rules.yaml"
        self.rules.write_text(RULES)
        self.tmp = tmp
        self.env = {
            **os.environ,
            "POSFLOW_KAFKA__TOPIC_PREFIX": self.prefix,
            "POSFLOW_KAFKA__DEFAULT_PARTITIONS": "2",
            "POSFLOW_POSTGRES__DATABASE": pg.database,
            "POSFLOW_STREAMS__APP_ID": unique("health"),
            "POSFLOW_STREAMS__TICK_S": "0.2",
            "POSFLOW_STREAMS__WINDOW_S": "3",
            "POSFLOW_STREAMS__GRACE_S": "1",
            "POSFLOW_SERVICES__STREAMS": str(free_port()),
            "POSFLOW_SERVICES__INGEST": str(free_port()),
            "POSFLOW_INGEST__CLIENT_ID": unique("ingest"),
            "POSFLOW_INGEST__SHARE_GROUP": unique("g"),
            "POSFLOW_INGEST__TOPIC_FILTER": f"pos/v1/{self.merchant}/+/+",
            "POSFLOW_SERVICES__ALERTS": str(self.alerts_port),
            "POSFLOW_ALERTS__RULES_FILE": str(self.rules),
            "POSFLOW_ALERTS__WEBHOOK_URL": f"http://127.0.0.1:{self.hook_port}/hook",
            "POSFLOW_ALERTS__WEBHOOK_SECRET": SECRET,
            "POSFLOW_ALERTS__TICK_S": "0.2",
            "POSFLOW_ALERTS__RELOAD_POLL_S": "0.3",
            # Short schedule for the test (~8 s of retries); the default covers ~11 minutes.
            "POSFLOW_ALERTS__RETRY_SCHEDULE_S": "[0.5, 0.5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]",
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.tmp / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cli", *args],
                env=self.env, cwd=ROOT, stdout=log, stderr=log,
            )  # fmt: skip
        self.procs[name] = proc
        return proc

    def engine_log(self) -> str:
        return (self.tmp / "engine.log").read_text()

    def rows(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.settings.postgres.dsn()) as conn:
            return conn.execute(query.encode(), params).fetchall()

    async def wait_ready(self, seconds: float = 60) -> None:
        import httpx

        deadline = time.monotonic() + seconds
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                proc = self.procs["engine"]
                assert proc.poll() is None, self.engine_log()
                try:
                    r = await client.get(f"http://127.0.0.1:{self.alerts_port}/readyz")
                    if r.status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.3)
        raise AssertionError("the alert engine never became ready:\n" + self.engine_log())

    def stop(self) -> None:
        stop_processes(self.procs.values(), timeout=15)


@pytest.fixture
async def pipeline(
    settings: Settings, pg: PostgresSettings, tmp_path: Path
) -> AsyncIterator[Pipeline]:
    p = Pipeline(settings, pg, tmp_path)
    await ensure_topics(p.settings)
    yield p
    p.stop()


@pytest.fixture
async def receiver(pipeline: Pipeline) -> AsyncIterator[Receiver]:
    r = Receiver(pipeline.hook_port)
    yield r
    await r.stop()


class Terminals:
    """Publishes MQTT as posflow's service account, like terminals of one merchant would."""

    def __init__(self, settings: Settings, merchant: str) -> None:
        m = settings.mosquitto
        self.merchant = merchant
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("pub"))
        self.client.username_pw_set(m.service_user, m.service_password.get_secret_value())
        self.client.connect(m.host, m.port)
        self.client.loop_start()
        self.seq = 0

    def telemetry(self, terminal: str, **over: Any) -> None:
        self.seq += 1
        body = samples.telemetry(
            merchant_id=self.merchant, terminal_id=terminal, seq=self.seq,
            ts=datetime.now(UTC).isoformat(), **over,
        )  # fmt: skip
        self.client.publish(
            samples.topic("telemetry", self.merchant, terminal), json.dumps(body), qos=1
        )

    def offline(self, terminal: str) -> None:
        self.seq += 1
        body = samples.status(
            merchant_id=self.merchant, terminal_id=terminal, seq=self.seq, state="offline",
            reason="power loss", ts=datetime.now(UTC).isoformat(),
        )  # fmt: skip
        self.client.publish(
            samples.topic("status", self.merchant, terminal), json.dumps(body), qos=1
        )

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def terminals(pipeline: Pipeline) -> Iterator[Terminals]:
    t = Terminals(pipeline.settings, pipeline.merchant)
    yield t
    t.close()


FAULTS: dict[str, dict[str, Any]] = {
    "T-low": {"battery.level_pct": 9, "battery.charging": False},
    "T-paper": {"printer.paper": "out"},
    "T-weak": {"signal.rsrp_dbm": -118},
}
FOR_S = {
    "battery_low": 2,
    "printer_out_of_paper": 2,
    "weak_signal": 2,
    "merchant_terminals_offline": 1,
}


async def test_faulty_terminals_raise_exactly_the_expected_alerts_over_mqtt(
    pipeline: Pipeline, receiver: Receiver, terminals: Terminals
) -> None:
    await receiver.start()
    pipeline.start("engine", "alerts", "run")
    await pipeline.wait_ready()
    pipeline.start("ingest", "ingest")
    pipeline.start("worker", "streams", "worker")
    healthy = ["T-ok", "O-1", "O-2", "O-3", "O-4", "O-5"]
    # Warm-up: healthy telemetry until a closed health window reached the engine.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for t in [*healthy, *FAULTS]:
            terminals.telemetry(t)
        rows = pipeline.rows(
            "SELECT count(*) FROM alert_terminal_facts WHERE facts ? 'health_score'"
        )
        if rows[0][0] >= len(healthy) + len(FAULTS):
            break
        await asyncio.sleep(1)
    else:
        raise AssertionError("no health window reached the engine:\n" + pipeline.engine_log())
    assert receiver.got == []  # healthy terminals raise nothing

    faults_at = time.time()
    for _ in range(25):  # ~12 s of faulty and healthy telemetry, every 0.5 s
        for t in ["T-ok", "O-4", "O-5"]:
            terminals.telemetry(t)
        for t, over in FAULTS.items():
            terminals.telemetry(t, **over)
        if _ == 0:
            for t in ("O-1", "O-2", "O-3"):
                terminals.offline(t)
        await asyncio.sleep(0.5)
    merchant = pipeline.merchant
    expected = {
        ("firing", "battery_low", "T-low"),
        ("firing", "printer_out_of_paper", "T-paper"),
        ("firing", "weak_signal", "T-weak"),
        ("firing", "merchant_terminals_offline", merchant),
    }
    assert receiver.events() == expected, pipeline.engine_log()[-3000:]
    for g in receiver.got:
        assert g["signed"]
        assert g["at"] - faults_at <= FOR_S[g["rule"]] + 10, g
    # The individual offline alerts exist, inhibited, and sent nothing.
    rows = pipeline.rows(
        "SELECT subject_id, state, suppressed_by, notified FROM alerts"
        " WHERE rule = 'terminal_offline' ORDER BY subject_id"
    )
    assert [(r[0], r[1], r[3]) for r in rows] == [
        ("O-1", "firing", False), ("O-2", "firing", False), ("O-3", "firing", False),
    ]  # fmt: skip
    assert all(str(r[2]).startswith("inhibited by merchant_terminals_offline") for r in rows)

    # Fixing the faults resolves their alerts.
    for _ in range(16):
        terminals.telemetry("T-low", **{"battery.level_pct": 9, "battery.charging": True})
        terminals.telemetry("T-paper")
        terminals.telemetry("T-weak", **{"signal.rsrp_dbm": -90})
        await asyncio.sleep(0.5)
    resolved = {e for e in receiver.events() if e[0] == "resolved"}
    assert resolved == {
        ("resolved", "battery_low", "T-low"),
        ("resolved", "printer_out_of_paper", "T-paper"),
        ("resolved", "weak_signal", "T-weak"),
    }
    assert len(receiver.got) == len({g["id"] for g in receiver.got}) == 7
    # The same notifications went to the alerts topic and the database.
    open_rules = pipeline.rows("SELECT rule, subject_id FROM alerts WHERE state = 'firing'")
    assert sorted(open_rules) == sorted(
        [("merchant_terminals_offline", merchant)]
        + [("terminal_offline", f"O-{i}") for i in (1, 2, 3)]
    )


async def _integrity(settings: Settings, merchants: list[str]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all")
    await producer.start()
    try:
        for i, m in enumerate(merchants):
            event = {"merchant_id": m, "txn_id": f"tx-{i}", "kind": "txn_id_reused",
                     "first_sha256": "a" * 64, "new_field_from_the_future": True}  # fmt: skip
            await producer.send_and_wait(
                f"{settings.kafka.topic_prefix}.integrity.v1", json.dumps(event).encode(),
                key=m.encode(),
            )  # fmt: skip
    finally:
        await producer.stop()


async def _until(check: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.2)


OUTAGE_S = 60  # the acceptance: a receiver down for a minute


async def _alerts_topic(settings: Settings, expected: int, seconds: float) -> list[Any]:
    """Every record on the run's alerts topic (waits until ``expected`` arrived)."""
    consumer = AIOKafkaConsumer(
        f"{settings.kafka.topic_prefix}.alerts.v1",
        bootstrap_servers=settings.kafka.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + seconds
        while len(out) < expected and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


async def test_a_webhook_down_for_a_minute_gets_every_notification_once_by_id(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    """The receiver is down a full minute; the retry schedule (1, 2, 4, 8 s, then every
    8 s, ~100 s in all) outlasts it, as the default one (~11 min) does in production."""
    pipeline.env["POSFLOW_ALERTS__RETRY_SCHEDULE_S"] = "[1, 2, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8]"
    pipeline.start("engine", "alerts", "run")
    await pipeline.wait_ready()
    merchants = [unique("MI") for _ in range(5)]
    down_since = time.monotonic()
    await _integrity(pipeline.settings, merchants)
    await asyncio.sleep(OUTAGE_S - (time.monotonic() - down_since))
    assert receiver.got == []
    waiting = pipeline.rows(
        "SELECT count(*), min(attempts) FROM alert_notifications"
        " WHERE channel = 'webhook' AND state = 'pending'"
    )
    assert waiting[0][0] == 5
    assert waiting[0][1] >= 5  # retried through the minute, with backoff: 1+2+4+8+8+8 s
    await receiver.start()
    await _until(lambda: len(receiver.got) >= 5, 30)
    await asyncio.sleep(3)  # anything extra would show up now
    ids = [g["id"] for g in receiver.got]
    assert sorted(ids) == sorted(set(ids))
    assert all(g["signed"] for g in receiver.got)
    assert {(g["rule"], g["subject"], g["event"]) for g in receiver.got} == {
        ("ledger_integrity", m, "firing") for m in merchants
    }
    states = pipeline.rows("SELECT channel, state, count(*) FROM alert_notifications GROUP BY 1, 2")
    assert sorted(states) == [
        ("kafka", "delivered", 5),
        ("log", "delivered", 5),
        ("webhook", "delivered", 5),
    ]
    # The alerts topic got the same five notifications, each once, keyed by its alert.
    records = await _alerts_topic(pipeline.settings, 5, 20)
    on_topic = [(dict(r.headers)["notification_id"].decode(), json.loads(r.value)) for r in records]
    assert sorted(nid for nid, _ in on_topic) == sorted(ids)
    for nid, payload in on_topic:
        assert payload["notification_id"] == nid
        assert payload["event"] == "firing"
        assert payload["alert"]["rule"] == "ledger_integrity"
    assert {r.key.decode() for r in records if r.key} == {
        p["alert"]["alert_id"] for _, p in on_topic
    }


async def test_a_webhook_that_never_answers_ends_in_the_dead_letter_state(
    pipeline: Pipeline,
) -> None:
    """No receiver at all: after the last retry the notification is `dead` (kept, with the
    error, for a replay), counted, and the other channels still delivered it."""
    pipeline.env["POSFLOW_ALERTS__RETRY_SCHEDULE_S"] = "[0.2, 0.2, 0.2]"
    pipeline.start("engine", "alerts", "run")
    await pipeline.wait_ready()
    merchant = unique("MD")
    await _integrity(pipeline.settings, [merchant])

    def dead() -> bool:
        rows = pipeline.rows("SELECT state FROM alert_notifications WHERE channel = 'webhook'")
        return rows == [("dead",)]

    await _until(dead, 30)
    [(state, attempts, error)] = pipeline.rows(
        "SELECT state, attempts, last_error FROM alert_notifications WHERE channel = 'webhook'"
    )
    assert (state, attempts) == ("dead", 4)  # the first try and three retries
    assert error, "the dead letter keeps the last error"
    assert sorted(
        pipeline.rows("SELECT channel, state FROM alert_notifications WHERE channel <> 'webhook'")
    ) == [("kafka", "delivered"), ("log", "delivered")]
    import httpx

    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"http://127.0.0.1:{pipeline.alerts_port}/metrics")).text
    assert 'posflow_alerts_notification_dead_letters_total{channel="webhook"} 1.0' in metrics
    assert 'posflow_alerts_notification_failures_total{channel="webhook"} 4.0' in metrics


async def test_a_bad_rules_file_is_refused_and_the_engine_keeps_the_last_good_rules(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    import httpx

    await receiver.start()
    pipeline.start("engine", "alerts", "run")
    await pipeline.wait_ready()
    pipeline.rules.write_text(RULES.replace("op: lt, value: 15", "op: below, value: 15"))
    url = f"http://127.0.0.1:{pipeline.alerts_port}"
    body: dict[str, Any] = {}
    async with httpx.AsyncClient() as client:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "rules_error" not in body:
            body = (await client.get(f"{url}/readyz")).json()
            await asyncio.sleep(0.2)
    assert "rule 'battery_low' field 'when.0.op'" in body["rules_error"]
    assert body["status"] == "ready"
    # Still evaluating: an integrity event fires, and is acknowledged from the CLI.
    m = unique("MI")
    await _integrity(pipeline.settings, [m])
    await _until(lambda: len(receiver.got) >= 1, 15)
    assert receiver.events() == {("firing", "ledger_integrity", m)}
    alert_id = pipeline.rows("SELECT alert_id FROM alerts WHERE subject_id = %s", m)[0][0]
    with psycopg.connect(pipeline.settings.postgres.dsn(), autocommit=True) as conn:
        issued = issue_key(conn, None, "alice", role=Role.SUPPORT_AGENT)
    out = subprocess.run(
        [sys.executable, "-m", "cli", "alerts", "ack", alert_id],
        env={**pipeline.env, "POSFLOW_STAFF_KEY": issued.token}, cwd=ROOT,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"acknowledged {alert_id}" in out.stdout
    assert f"by api-key:{issued.key_id} (alice)" in out.stdout
    await _until(lambda: len(receiver.got) >= 2, 10)
    assert receiver.events() == {
        ("firing", "ledger_integrity", m), ("acknowledged", "ledger_integrity", m)
    }  # fmt: skip
    # Fixing the file: the error clears on the next reload.
    pipeline.rules.write_text(RULES)
    async with httpx.AsyncClient() as client:
        await asyncio.sleep(1.5)
        body = (await client.get(f"{url}/readyz")).json()
    assert "rules_error" not in body


async def _telemetry_direct(
    settings: Settings, merchant: str, events: list[tuple[str, dict[str, Any]]]
) -> None:
    """Envelopes exactly as the bridge writes them to the telemetry topic."""
    from posflow.contracts import Accepted, validate_message

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all")
    await producer.start()
    try:
        for seq, (terminal, over) in enumerate(events):
            body = samples.telemetry(merchant_id=merchant, terminal_id=terminal, seq=seq,
                                     ts=datetime.now(UTC).isoformat(), **over)  # fmt: skip
            result = validate_message(
                samples.topic("telemetry", merchant, terminal), json.dumps(body).encode(),
                received_at=datetime.now(UTC), mqtt_mid=1,
            )  # fmt: skip
            assert isinstance(result, Accepted), result
            env = result.envelope
            await producer.send_and_wait(
                f"{settings.kafka.topic_prefix}.telemetry.v1", env.to_json(), key=env.kafka_key()
            )
    finally:
        await producer.stop()


async def test_state_survives_a_crash_no_alert_lost_or_repeated(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    await receiver.start()
    pipeline.start("engine", "alerts", "run")
    await pipeline.wait_ready()
    m = pipeline.merchant
    await _telemetry_direct(pipeline.settings, m, [("T-tamper", {"tamper": True})])
    await _until(lambda: len(receiver.got) >= 1, 15)
    await _telemetry_direct(pipeline.settings, m, [("T-low", {"battery.level_pct": 5})])
    await _until(
        lambda: (
            pipeline.rows("SELECT state FROM alerts WHERE subject_id = 'T-low'") == [("pending",)]
        ),
        10,
    )
    pipeline.procs["engine"].kill()  # SIGKILL while battery_low's `for` (2 s) runs
    pipeline.procs["engine"].wait()
    await asyncio.sleep(2.5)
    pipeline.start("engine", "alerts", "run")
    await pipeline.wait_ready()
    await _until(lambda: len(receiver.got) >= 2, 15)
    await asyncio.sleep(1.5)
    assert sorted((g["rule"], g["subject"], g["event"]) for g in receiver.got) == [
        ("battery_low", "T-low", "firing"), ("tamper_detected", "T-tamper", "firing"),
    ]  # fmt: skip
