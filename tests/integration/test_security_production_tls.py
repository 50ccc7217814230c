"""The documented production layout carries the pipeline's MQTT side on certificates alone.

A Mosquitto of this test's own with no password listener (``mqtt_password_auth=false``:
only the TLS listener, TLS 1.2+, client certificates, identity as username); the real
`posflow ingest` connects with the service account's certificate
(``mqtt_client_tls=true``); simulated terminals, some on their own connection and some
multiplexed over a gateway, each with its own certificate from the project CA. Every
message they publish must reach Kafka (or be an expected dead letter).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.loadtest import read_back
from posflow.errors import PosflowError
from posflow.security.pki import Pki
from posflow.security.tls import service_mqtt_endpoint
from posflow.settings import (
    KafkaSettings,
    MosquittoSettings,
    PostgresSettings,
    SecuritySettings,
    Settings,
    StackSettings,
)
from posflow.stack import Stack, ensure_topics
from posflow.stack._process import port_answers
from simulator.accounting import Recorder, reconcile
from simulator.engine import Run
from simulator.fleet import build_fleet
from simulator.register import register_fleet
from simulator.runner import drive
from simulator.scenarios import Fault, Scenario, Target
from tests.conftest import ROOT, free_port, unique
from tests.integration.conftest import stop_own_mosquitto

pytestmark = pytest.mark.slow

TERMINALS = 6
REAL = 4  # terminals 4 and 5 go over one multiplexed gateway connection


@pytest.fixture
def production(settings: Settings, pg: PostgresSettings, stack: Stack) -> Iterator[Settings]:
    """Settings of the production layout: own Mosquitto (TLS only), shared Kafka, own DB."""
    tmp = Path(tempfile.mkdtemp(prefix="posflow-prod-tls-"))
    tmp.chmod(0o755)
    prefix = unique("ptls").replace("-", "")
    prod = settings.model_copy(
        update={
            "stack": StackSettings(dir=tmp, install=False),
            "mosquitto": MosquittoSettings(port=free_port(), tls_port=free_port()),
            "kafka": KafkaSettings(**{**settings.kafka.model_dump(), "topic_prefix": prefix}),
            "postgres": pg,
            "security": SecuritySettings(mqtt_password_auth=False, mqtt_client_tls=True),
        }
    )
    own = Stack(prod)
    own.up(["mosquitto"])
    try:
        yield prod
    finally:
        stop_own_mosquitto(own, tmp)


def _env(s: Settings, metrics_port: int) -> dict[str, str]:
    m = s.mosquitto
    return {
        **os.environ,
        "POSFLOW_STACK__DIR": str(s.stack.dir),
        "POSFLOW_STACK__INSTALL": "false",
        "POSFLOW_MOSQUITTO__PORT": str(m.port),
        "POSFLOW_MOSQUITTO__TLS_PORT": str(m.tls_port),
        "POSFLOW_SECURITY__MQTT_PASSWORD_AUTH": "false",
        "POSFLOW_SECURITY__MQTT_CLIENT_TLS": "true",
        "POSFLOW_KAFKA__TOPIC_PREFIX": s.kafka.topic_prefix,
        "POSFLOW_POSTGRES__DATABASE": s.postgres.database,
        "POSFLOW_INGEST__CLIENT_ID": unique("ingest-tls"),
        "POSFLOW_INGEST__SHARE_GROUP": unique("tls").replace("-", ""),
        "POSFLOW_SERVICES__INGEST": str(metrics_port),
    }


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return int(resp.status) == 200
    except OSError:
        return False


async def test_ingest_and_terminals_work_on_certificates_alone(
    production: Settings, tmp_path: Path
) -> None:
    s = production
    assert not port_answers("127.0.0.1", s.mosquitto.port)  # no password listener at all
    with pytest.raises(PosflowError, match="service account's certificate"):
        service_mqtt_endpoint(s)  # no certificate issued yet: a clear error, not a hang
    Pki.from_settings(s).issue(s.mosquitto.service_user, kind="service")
    assert service_mqtt_endpoint(s)[0] == s.mosquitto.tls_port

    fleet = build_fleet(TERMINALS, seed=s.simulator.seed, name=unique("tls").lower())
    done = register_fleet(s, fleet, certificates=True)
    assert done["certificates"] == TERMINALS + 1  # every terminal and the gateway
    assert register_fleet(s, fleet, certificates=True)["certificates"] == 0  # idempotent
    await ensure_topics(s)

    port = free_port()
    log = tmp_path / "ingest.log"
    with log.open("wb") as out:
        bridge = subprocess.Popen(
            [sys.executable, "-m", "cli", "ingest"], env=_env(s, port), cwd=ROOT,
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _ready(port) and time.monotonic() < deadline:
            assert bridge.poll() is None, log.read_text()
            await asyncio.sleep(0.3)
        assert _ready(port), log.read_text()

        # A broken app on terminal 1 as well: dead letters travel the TLS path too.
        plan = Scenario(name="tls", faults=[
            Fault(kind="malformed_messages", at_s=0, target=Target(indexes=[1]),
                  params={"probability": 0.5}),
        ])  # fmt: skip
        run = Run(fleet, t0=time.time() - 300, duration_s=300, telemetry_s=10, txn_scale=20,
                  always_open=True, scenario=plan)  # fmt: skip
        rec = Recorder({t.index: t.terminal_id for t in fleet.terminals})
        result = await drive(s, fleet, run, on_sent=rec, max_real=REAL, gateways=1, speed=30,
                             run_id=unique("r"), tls=True)  # fmt: skip
        assert result.stats.connect_failures == 0, result.stats.errors
        assert result.unacked == 0
        assert result.peak_connected == REAL + 1  # own TLS connections + the gateway's

        ids = {t.terminal_id for t in fleet.terminals}
        seen = await read_back(s.kafka, ids, rec.total - rec.by_expect.get("dup", 0), 60)
        acc = reconcile(rec, seen)
        assert rec.total > 100
        assert acc["lost"] == 0, acc["lost_examples"]
        assert acc["dead_letters_unexpected"] == 0
        assert acc["dead_letters_expected"] > 0
    finally:
        bridge.terminate()
        bridge.wait(timeout=30)
    assert bridge.returncode == 0, log.read_text()[-3000:]
    assert "password" not in log.read_text().lower()
