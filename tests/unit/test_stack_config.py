from __future__ import annotations

import base64
import hashlib
import json
import socket
from pathlib import Path

import pytest

from posflow.errors import PosflowError
from posflow.settings import KafkaSettings, PrometheusSettings, ServicePorts, Settings
from posflow.stack._process import check_port_free, log_tail, wait_until
from posflow.stack.mosquitto import mosquitto_password_hash, render_acl, render_config
from posflow.stack.prometheus import render_prometheus_config
from posflow.topics import pipeline_topics


def test_password_hash_matches_mosquitto_passwd_output() -> None:
    # Produced by `mosquitto_passwd -b file testuser secret` (Mosquitto 2.0.11).
    expected = (
        "$7$101$XW4GXkfT5JEz00dU$nUlrhEM/caTKfazOQAPocIwP+hB7WYHJFXBeW097FWg/m2hz4dCIy705Mb"
        "+ANBJ8ndcJuZZWa4sq0lUn49pL8w=="
    )
    salt = base64.b64decode("XW4GXkfT5JEz00dU")
    assert mosquitto_password_hash("secret", salt=salt) == expected


def test_password_hash_uses_a_fresh_salt_each_time() -> None:
    first, second = mosquitto_password_hash("pw"), mosquitto_password_hash("pw")
    assert first != second
    _, kind, rounds, salt, digest = first.split("$")
    assert (kind, rounds) == ("7", "101")
    raw = hashlib.pbkdf2_hmac("sha512", b"pw", base64.b64decode(salt), 101)
    assert base64.b64decode(digest) == raw


def test_acl_binds_terminals_to_their_own_topics_only() -> None:
    rules = [ln for ln in render_acl("svc").splitlines() if ln and not ln.startswith("#")]
    assert rules == [
        "user svc",
        "topic readwrite pos/#",
        "pattern write pos/v1/+/%u/telemetry",
        "pattern write pos/v1/+/%u/txn",
        "pattern write pos/v1/+/%u/status",
        "pattern read pos/v1/+/%u/cmd",
    ]


def test_mosquitto_config_refuses_anonymous_and_raises_queue_limits(tmp_path: Path) -> None:
    text = render_config(
        host="127.0.0.1",
        port=1883,
        directory=tmp_path,
        max_connections=-1,
        max_queued_messages=100_000,
        max_inflight_messages=1_000,
    )
    directives = dict(
        line.split(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert directives["allow_anonymous"] == "false"
    assert directives["listener"] == "1883 127.0.0.1"
    assert directives["max_queued_messages"] == "100000"
    assert directives["max_inflight_messages"] == "1000"
    assert directives["password_file"] == str(tmp_path / "passwd")


def test_prometheus_config_scrapes_every_posflow_service() -> None:
    settings = Settings(prometheus=PrometheusSettings(port=19090), services=ServicePorts())
    config = json.loads(render_prometheus_config(settings))
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]
    }
    assert targets == {
        "prometheus": ["127.0.0.1:19090"],
        "posflow-ingest": ["127.0.0.1:9401"],
        "posflow-streams": ["127.0.0.1:9402"],
        "posflow-alerts": ["127.0.0.1:9403"],
        "posflow-api": ["127.0.0.1:8400"],
        "posflow-simulator": ["127.0.0.1:9405"],
        "posflow-rawsink": ["127.0.0.1:9407"],
        "posflow-settlement": ["127.0.0.1:9404"],
        "posflow-webhooks": ["127.0.0.1:9406"],
    }


def test_pipeline_topics_have_unique_names_and_compact_only_state() -> None:
    topics = pipeline_topics(KafkaSettings(topic_prefix="x", default_partitions=3))
    names = [t.name for t in topics]
    assert len(names) == len(set(names))
    assert all(name.startswith("x.") and name.endswith(".v1") for name in names)
    compacted = sorted(t.name for t in topics if t.config["cleanup.policy"] == "compact")
    assert compacted == ["x.status.v1", "x.terminal-state.v1"]
    assert {t.partitions for t in topics} == {3}


def test_port_check_names_the_port_and_the_setting() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(PosflowError) as err:
            check_port_free("127.0.0.1", port, service="kafka", setting="POSFLOW_KAFKA__PORT")
    assert f"port 127.0.0.1:{port} is already in use" in str(err.value)
    assert "POSFLOW_KAFKA__PORT=<port>" in str(err.value)


def test_log_tail_returns_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert log_tail(log, 3).splitlines() == ["line 97", "line 98", "line 99"]
    assert log_tail(tmp_path / "missing.log") == f"(no log at {tmp_path / 'missing.log'})"


def test_wait_until_stops_early_when_the_process_died() -> None:
    calls: list[int] = []

    def probe() -> bool:
        calls.append(1)
        return False

    assert wait_until(probe, timeout_s=30, alive=lambda: False) is False
    assert len(calls) == 1  # one poll, then it gives up: no 30 s wait


def test_kafka_cluster_ids_never_start_with_a_dash() -> None:
    from posflow.stack.kafka import _cluster_id

    ids = [_cluster_id() for _ in range(5000)]  # ~78 would start with "-" unfiltered
    assert all(not i.startswith("-") for i in ids)
    assert all(len(i) == 22 for i in ids)
    assert len(set(ids)) == len(ids)
