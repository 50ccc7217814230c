"""Every metric a PromQL panel names is exported by the real service it belongs to.

`posflow ingest`, `posflow streams worker`, `posflow settlement worker`,
`posflow alerts run`, `posflow api`, `posflow streams sink` and `posflow api webhooks
deliver` run as subprocesses on free ports with their
own topic prefix, database, consumer groups and app id; their /metrics are scraped
directly (the stack's Prometheus scrapes only the fixed default ports).

Names come from the exposition's metric families (``exposition_names``): a labelled
metric has no sample until its first label set is used, but its ``# HELP``/``# TYPE``
lines are there from the start, so a panel over an idle counter still finds its
name. A little traffic (one payment into the settlement worker, one refused API
request) then checks that labelled series really fill, and that both Kafka consumers
export ``posflow_consumer_lag`` for exactly the partitions they hold. Every
expression must also parse in the stack's real Prometheus.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from dashboards import catalog
from dashboards.promql import exposition_names, metric_names
from posflow.settings import KafkaSettings, PostgresSettings, Settings
from posflow.stack import Stack, ensure_topics
from posflow.storage import migrate
from posflow.storage.databases import create_database
from tests.conftest import ROOT, free_port, unique
from tests.integration._settlement_reference import envelope
from tests.unit import samples

pytestmark = pytest.mark.slow

# Series Prometheus itself adds to every scrape target.
_PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# Which service exports a metric, by name prefix; the lag gauge by both Kafka consumers.
_OWNERS = {
    "posflow_ingest_": ("ingest",),
    "posflow_streams_": ("streams",),
    "posflow_settlement_": ("settlement",),
    "posflow_alerts_": ("alerts",),
    "posflow_api_": ("api",),
    "posflow_rawsink_": ("sink",),
    "posflow_webhook_": ("webhooks",),
    "posflow_consumer_lag": ("settlement", "alerts"),
}
_SERVICES = {  # name -> (command, env var of its port)
    "ingest": (["ingest"], "POSFLOW_SERVICES__INGEST"),
    "streams": (["streams", "worker"], "POSFLOW_SERVICES__STREAMS"),
    "settlement": (["settlement", "worker"], "POSFLOW_SERVICES__SETTLEMENT"),
    "alerts": (["alerts", "run"], "POSFLOW_SERVICES__ALERTS"),
    "api": (["api"], "POSFLOW_SERVICES__API"),
    "sink": (["streams", "sink"], "POSFLOW_SERVICES__RAWSINK"),
    "webhooks": (["api", "webhooks", "deliver"], "POSFLOW_API__WEBHOOK_PORT"),
}
_STARTUP_S = 150  # seven Python services starting at once on two shared cores
_TRAFFIC_S = 60


def _get(url: str, timeout: float = 2) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
    except (urllib.error.URLError, OSError):
        return 0, ""


def samples_of(exposition: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Label set -> value of every sample called ``name``."""
    return {
        frozenset(s.labels.items()): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.name == name
    }


@dataclass
class Run:
    prefix: str
    groups: dict[str, str]  # service -> the group label its lag gauge carries
    ports: dict[str, int]
    logs: Path

    def scrape(self, service: str) -> str:
        status, text = _get(f"http://127.0.0.1:{self.ports[service]}/metrics")
        assert status == 200, f"/metrics of {service}: HTTP {status}; {self.log(service)}"
        return text

    def log(self, service: str) -> str:
        path = self.logs / f"{service}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _database(settings: Settings) -> str:
    name = unique("dashm").replace("-", "_")
    with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
        create_database(admin, name)
    pg = PostgresSettings(**{**settings.postgres.model_dump(), "database": name})
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
    return name


async def _pay(settings: Settings, prefix: str, merchant: str) -> None:
    txn = samples.txn(
        merchant_id=merchant, terminal_id="T-dm-1", txn_id="T-dm-1:000001", amount_minor=1234
    )
    env = envelope(txn, received_at=datetime.now(UTC))
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(f"{prefix}.txn.v1", env.to_json(), key=env.kafka_key())
    finally:
        await producer.stop()


def _wait(what: str, check: Callable[[], object], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


@pytest.fixture(scope="module")
def run(
    settings: Settings, stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Run]:
    prefix = unique("d").replace("-", "")
    dbname = _database(settings)
    ports = {name: free_port() for name in _SERVICES}
    groups = {"settlement": unique("dash-settle"), "alerts": unique("dash-alerts")}
    merchant = unique("M-dm")
    env = {
        **os.environ,
        "POSFLOW_KAFKA__TOPIC_PREFIX": prefix,
        "POSFLOW_KAFKA__DEFAULT_PARTITIONS": "1",
        "POSFLOW_POSTGRES__DATABASE": dbname,
        "POSFLOW_INGEST__CLIENT_ID": unique("ingest"),
        "POSFLOW_INGEST__SHARE_GROUP": unique("g"),
        "POSFLOW_INGEST__TOPIC_FILTER": f"pos/v1/{merchant}/+/+",
        "POSFLOW_STREAMS__APP_ID": unique("dash-health"),
        "POSFLOW_SETTLEMENT__GROUP": groups["settlement"],
        "POSFLOW_ALERTS__GROUP": groups["alerts"],
        "POSFLOW_RAWSINK__GROUP": unique("dash-sink"),
        "POSFLOW_SECURITY__MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        **{port_env: str(ports[name]) for name, (_, port_env) in _SERVICES.items()},
    }
    isolated = settings.model_copy(
        update={
            "kafka": KafkaSettings(
                **{**settings.kafka.model_dump(), "topic_prefix": prefix, "default_partitions": 1}
            )
        }
    )
    asyncio.run(ensure_topics(isolated))
    logs = tmp_path_factory.mktemp("dash-services")
    procs = {}
    for name, (command, _) in _SERVICES.items():
        with (logs / f"{name}.log").open("wb") as out:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "cli", *command],
                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
    result = Run(prefix, groups, ports, logs)
    try:
        deadline = time.monotonic() + _STARTUP_S
        for name, port in ports.items():
            status = 0
            while status != 200 and time.monotonic() < deadline:
                assert procs[name].poll() is None, f"{name} exited: {result.log(name)}"
                status, _ = _get(f"http://127.0.0.1:{port}/metrics")
                if status != 200:
                    time.sleep(0.3)
            assert status == 200, f"no /metrics from {name} on port {port}: {result.log(name)}"
        yield result
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'.encode())


def test_every_promql_metric_is_exported_by_the_service_it_belongs_to(run: Run) -> None:
    exported = {name: exposition_names(run.scrape(name)) for name in _SERVICES}
    assert "posflow_ingest_received_total" in exported["ingest"]  # the scrapes worked
    assert "posflow_streams_end_to_end_seconds_bucket" in exported["streams"]
    wrong = []
    for target in catalog.prom_targets():
        for name in metric_names(target.expr) - _PROMETHEUS_OWN:
            owners = next((o for p, o in _OWNERS.items() if name.startswith(p)), None)
            if owners is None:
                wrong.append((target.dashboard, target.where, name, "no posflow service"))
                continue
            for service in owners:
                if name not in exported[service]:
                    wrong.append((target.dashboard, target.where, name, f"not in {service}"))
    assert not wrong
    used = {n for t in catalog.prom_targets() for n in metric_names(t.expr)}
    # Each service the Pipeline dashboard promises a row for is really on it.
    for prefix in _OWNERS:
        assert any(n.startswith(prefix) for n in used), f"no panel reads {prefix}*"


def test_a_little_traffic_fills_the_labelled_series(settings: Settings, run: Run) -> None:
    asyncio.run(_pay(settings, run.prefix, unique("M-dm")))
    status, _ = _get(f"http://127.0.0.1:{run.ports['api']}/v1/merchants/M-x/balances")
    assert status == 401  # no key: refused, and counted

    def settled() -> bool:
        writes = samples_of(run.scrape("settlement"), "posflow_settlement_ledger_writes_total")
        return writes.get(frozenset({("effect", "applied")}), 0) == 1

    _wait("the payment in the ledger", settled, _TRAFFIC_S)
    text = run.scrape("settlement")
    assert samples_of(text, "posflow_settlement_cashflow_events_total") == {
        frozenset({("kind", "sale")}): 1.0
    }
    assert samples_of(text, "posflow_settlement_end_to_end_seconds_count") == {frozenset(): 1.0}
    assert samples_of(text, "posflow_settlement_publish_to_cashflow_seconds_count") == {
        frozenset(): 1.0
    }

    api = samples_of(run.scrape("api"), "posflow_api_requests_total")
    refused = {dict(k)["route"]: v for k, v in api.items() if dict(k)["status"] == "401"}
    assert refused == {"/v1/merchants/{merchant_id}/balances": 1.0}


def _lag(run: Run, service: str) -> dict[tuple[str, str, str], float]:
    return {
        (d["group"], d["topic"], d["partition"]): v
        for k, v in samples_of(run.scrape(service), "posflow_consumer_lag").items()
        for d in [dict(k)]
    }


def test_both_kafka_consumers_export_lag_of_the_partitions_they_hold(run: Run) -> None:
    p, settle, alerts = run.prefix, run.groups["settlement"], run.groups["alerts"]
    alert_topics = {f"{p}.{t}.v1" for t in ("health", "status", "telemetry", "integrity")}
    _wait(
        "lag series of both consumers",
        lambda: _lag(run, "settlement") and len(_lag(run, "alerts")) == len(alert_topics),
        _TRAFFIC_S,
    )
    # One partition each (default_partitions=1); whatever they hold is read up to its end
    # (nothing else writes these topics while the services idle).
    _wait("the settlement worker caught up", lambda: set(_lag(run, "settlement").values()) == {0},
          _TRAFFIC_S)  # fmt: skip
    assert _lag(run, "settlement") == {(settle, f"{p}.txn.v1", "0"): 0.0}
    assert _lag(run, "alerts") == {(alerts, t, "0"): 0.0 for t in alert_topics}


def test_prometheus_own_series_exist_in_the_stack_prometheus(settings: Settings) -> None:
    base = f"http://{settings.prometheus.host}:{settings.prometheus.port}"
    status, body = _get(f"{base}/api/v1/label/__name__/values", timeout=10)
    assert status == 200
    known = set(json.loads(body)["data"])
    used = {n for t in catalog.prom_targets() for n in metric_names(t.expr)} & _PROMETHEUS_OWN
    assert used == {"up"}
    assert used <= known


def test_every_promql_expression_parses_in_the_real_prometheus(settings: Settings) -> None:
    base = f"http://{settings.prometheus.host}:{settings.prometheus.port}"
    errors = []
    for target in catalog.prom_targets():
        # Grafana replaces $__rate_interval with at least 4 scrape intervals.
        expr = target.expr.replace("$__rate_interval", "1m")
        status, body = _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        if status != 200 or json.loads(body)["status"] != "success":
            errors.append((target.where, expr, body[:200]))
    assert not errors
