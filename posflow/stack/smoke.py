"""A short round trip through every service of the running stack (`posflow stack check`).

It proves the servers are real and wired as the pipeline needs them: a Kafka
record produced (acks=all, idempotent) and consumed back, an MQTT message from
a terminal account to the service account (and one outside the terminal's ACL
that never arrives), a PostgreSQL write and read, Prometheus' scrape targets,
and Grafana (when the stack runs one): a provisioned dashboard fetched through
its API and one of its panels' SQL run through ``/api/ds/query``.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from paho.mqtt.enums import CallbackAPIVersion

from posflow.settings import Settings
from posflow.stack import Stack
from posflow.stack.grafana import basic_auth

__all__ = ["CheckResult", "run_checks"]


@dataclass(frozen=True)
class CheckResult:
    service: str
    ok: bool
    what: str


async def _kafka(settings: Settings) -> CheckResult:
    topic = f"posflow.check.{secrets.token_hex(4)}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka.bootstrap, acks="all", enable_idempotence=True
        )
        await producer.start()
        try:
            sent = await producer.send_and_wait(topic, b"hello", key=b"T-check")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=settings.kafka.bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            record = await asyncio.wait_for(consumer.getone(), timeout=20)
        finally:
            await consumer.stop()
        ok = record.value == b"hello" and record.offset == sent.offset
        return CheckResult("kafka", ok, f"record produced (acks=all) and consumed on {topic}")
    finally:
        await admin.delete_topics([topic])
        await admin.close()


def _mqtt(settings: Settings, stack: Stack) -> CheckResult:
    m = settings.mosquitto
    terminal, password = f"T-check-{secrets.token_hex(3)}", secrets.token_urlsafe(12)
    merchant = f"M-check-{secrets.token_hex(3)}"
    stack.mosquitto.set_users({terminal: password})
    received: list[str] = []
    sub = _client(m.service_user, m.service_password.get_secret_value())
    sub.on_message = lambda _c, _u, msg: received.append(msg.topic)
    sub.connect(m.host, m.port)
    sub.subscribe(f"pos/v1/{merchant}/#", qos=1)
    sub.loop_start()
    pub = _client(terminal, password)
    try:
        _retry(lambda: pub.connect(m.host, m.port) == 0 and _loop_connected(pub), 10)
        own = f"pos/v1/{merchant}/{terminal}/telemetry"
        foreign = f"pos/v1/{merchant}/T-someone-else/telemetry"
        pub.publish(foreign, json.dumps({"probe": "foreign"}), qos=1).wait_for_publish(5)
        pub.publish(own, json.dumps({"probe": "own"}), qos=1).wait_for_publish(5)
        _retry(lambda: own in received, 5)
    finally:
        pub.disconnect()
        sub.loop_stop()
        sub.disconnect()
        stack.mosquitto.remove_users([terminal])
    ok = received == [own]
    return CheckResult(
        "mosquitto", ok, f"terminal {terminal} published; ACL held off a foreign topic"
    )


def _client(user: str, password: str) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"posflow-check-{secrets.token_hex(4)}",
        protocol=mqtt.MQTTv5,
    )
    client.username_pw_set(user, password)
    return client


def _loop_connected(client: mqtt.Client) -> bool:
    deadline = time.monotonic() + 3
    while not client.is_connected() and time.monotonic() < deadline:
        client.loop(timeout=0.1)
    if client.is_connected():
        client.loop_start()
    return client.is_connected()


def _retry(probe: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.2)


def _postgres(settings: Settings) -> CheckResult:
    with psycopg.connect(settings.postgres.dsn()) as conn:
        conn.execute("CREATE TEMP TABLE posflow_check (id int PRIMARY KEY, amount_minor bigint)")
        conn.execute("INSERT INTO posflow_check VALUES (1, 1234)")
        row = conn.execute("SELECT amount_minor FROM posflow_check WHERE id = 1").fetchone()
        version = conn.info.server_version
    ok = row == (1234,)
    return CheckResult("postgres", ok, f"psycopg 3 write and read (server {version})")


def _prometheus(settings: Settings) -> CheckResult:
    url = f"http://{settings.prometheus.host}:{settings.prometheus.port}/api/v1/targets"
    jobs: list[str] = []

    def listed() -> bool:
        nonlocal jobs
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
        jobs = sorted({t["labels"]["job"] for t in body["data"]["activeTargets"]})
        return "prometheus" in jobs

    # Just after start, Prometheus answers before its scrape manager has listed targets.
    _retry(listed, 15)
    return CheckResult("prometheus", "prometheus" in jobs, f"scrape targets: {', '.join(jobs)}")


# A panel query Grafana's backend runs as written: only macros ($__timeFilter(...)), no
# template variables, which the browser would have replaced first.
_BACKEND_ONLY = re.compile(r"\$(?!__time\w*\()")


def _grafana_call(settings: Settings, path: str, body: object | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 - the configured Grafana URL
        settings.grafana.url.rstrip("/") + path, data=data, method="GET" if data is None else "POST"
    )
    request.add_header("Authorization", basic_auth(settings))
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=settings.grafana.timeout_s) as resp:  # noqa: S310
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        if exc.code in (400, 500) and path == "/api/ds/query":
            return json.load(exc)  # a failed query: the error is in the results
        raise


def _grafana(settings: Settings, stack: Stack) -> CheckResult:
    missing = stack.grafana.unavailable()
    if missing is not None:
        return CheckResult("grafana", True, f"skipped, not in this stack: {missing}")
    uid = "posflow-fleet"
    dashboard = _grafana_call(settings, f"/api/dashboards/uid/{uid}")["dashboard"]
    panel, target = next(
        (p, t)
        for p in dashboard["panels"]
        for t in p.get("targets", [])
        if "rawSql" in t and not _BACKEND_ONLY.search(t["rawSql"])
    )
    span = dashboard.get("time", {"from": "now-6h", "to": "now"})

    def run(sql: str) -> dict[str, Any]:
        query = {**{k: target[k] for k in ("refId", "datasource", "format")}, "rawSql": sql}
        body = {"from": span["from"], "to": span["to"], "queries": [query]}
        results: dict[str, dict[str, Any]] = _grafana_call(settings, "/api/ds/query", body)[
            "results"
        ]
        return results[target["refId"]]

    what = f"dashboard {uid} fetched; panel {panel['title']!r}"
    result = run(target["rawSql"])
    if "does not exist" in str(result.get("error")):
        # Before `posflow db migrate` (make demo's first run) there are no tables yet.
        what = f"dashboard {uid} fetched; schema not migrated yet, SELECT 1"
        result = run("SELECT 1 AS one")
    if result.get("error"):
        return CheckResult("grafana", False, f"{what}: {result['error']}")
    frames = result.get("frames", [])
    rows = len(frames[0]["data"]["values"][0]) if frames and frames[0]["data"]["values"] else 0
    return CheckResult(
        "grafana", bool(frames), f"{what} queried through /api/ds/query ({rows} rows)"
    )


def run_checks(settings: Settings) -> list[CheckResult]:
    """Run every check; one failing does not hide the others."""
    stack = Stack(settings)
    results = []
    checks: list[tuple[str, Callable[[], CheckResult]]] = [
        ("kafka", lambda: asyncio.run(_kafka(settings))),
        ("mosquitto", lambda: _mqtt(settings, stack)),
        ("postgres", lambda: _postgres(settings)),
        ("prometheus", lambda: _prometheus(settings)),
        ("grafana", lambda: _grafana(settings, stack)),
    ]
    for name, check in checks:
        try:
            results.append(check())
        except Exception as exc:
            results.append(CheckResult(name, ok=False, what=f"{type(exc).__name__}: {exc}"))
    return results
