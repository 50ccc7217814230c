"""`posflow stack` as a user drives it: idempotent up, clean down, one-line errors.

These bring up a second, throw-away stack on other ports in a scratch
directory (sharing the download cache), so the main stack keeps running.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from posflow.settings import (
    GrafanaSettings,
    KafkaSettings,
    MosquittoSettings,
    PostgresSettings,
    PrometheusSettings,
    Settings,
    StackSettings,
)
from posflow.stack import Stack
from tests.conftest import ROOT, unique

pytestmark = pytest.mark.slow

OTHER_PORTS = {
    "POSFLOW_KAFKA__PORT": "29092",
    "POSFLOW_KAFKA__CONTROLLER_PORT": "29093",
    "POSFLOW_POSTGRES__PORT": "25432",
    "POSFLOW_MOSQUITTO__PORT": "21883",
    "POSFLOW_MOSQUITTO__TLS_PORT": "28883",
    "POSFLOW_PROMETHEUS__PORT": "29090",
    "POSFLOW_GRAFANA__PORT": "23000",
}


@pytest.fixture
def directory() -> Iterator[Path]:
    """A fresh stack directory inside the project's own (which the postgres account can enter)."""
    path = ROOT / ".stack" / "scratch" / unique("stack")
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _other_settings(directory: Path, **stack: object) -> Settings:
    return Settings(
        stack=StackSettings(dir=directory, cache_dir=ROOT / ".stack" / "cache", **stack),
        kafka=KafkaSettings(port=29092, controller_port=29093),
        postgres=PostgresSettings(port=25432),
        mosquitto=MosquittoSettings(port=21883, tls_port=28883),
        prometheus=PrometheusSettings(port=29090),
        # The same Grafana as the CLI below finds (its environment), on its own port.
        grafana=GrafanaSettings(port=23000, source=os.environ.get("POSFLOW_GRAFANA__SOURCE")),
    )


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **OTHER_PORTS, **env},
        cwd=ROOT,
        timeout=240,
        check=False,
    )


def _process_group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_up_twice_is_harmless_and_down_leaves_no_process(
    directory: Path,
) -> None:
    stack = Stack(_other_settings(directory))
    # Grafana runs where one can be had (POSFLOW_GRAFANA__SOURCE or on PATH), else is skipped.
    grafana = stack.grafana.unavailable() is None
    servers = 5 if grafana else 4
    try:
        stack.up()
        first = {row.name: row.pid for row in stack.status() if row.state != "not available"}
        assert len(first) == servers
        assert all(pid is not None for pid in first.values())

        second = _cli(["stack", "up"], {"POSFLOW_STACK__DIR": str(directory)})
        assert second.returncode == 0, second.stderr
        assert second.stdout.count("already running") == servers
        status = _cli(["stack", "status"], {"POSFLOW_STACK__DIR": str(directory)})
        assert status.returncode == 0, status.stdout
        now = {row.name: row.pid for row in stack.status() if row.state != "not available"}
        assert now == first
    finally:
        down = _cli(["stack", "down"], {"POSFLOW_STACK__DIR": str(directory)})
    assert down.returncode == 0, down.stderr
    assert down.stdout.count("stopped") == servers
    # No server and no child of one (postgres backends share its process group).
    assert [name for name, pid in first.items() if pid and _process_group_alive(pid)] == []
    assert [row.state for row in stack.status() if row.state != "not available"] == [
        "stopped"
    ] * servers
    after = _cli(["stack", "status"], {"POSFLOW_STACK__DIR": str(directory)})
    assert after.returncode == 1


def test_port_in_use_is_one_line_naming_the_port_and_the_setting(
    directory: Path,
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = _cli(
            ["stack", "up", "prometheus"],
            {"POSFLOW_STACK__DIR": str(directory), "POSFLOW_PROMETHEUS__PORT": str(port)},
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"posflow: error: prometheus cannot start: port 127.0.0.1:{port} is already in use by "
        f"another process -- fix: stop that process (`ss -ltnp 'sport = :{port}'` shows it) "
        "or choose another port with POSFLOW_PROMETHEUS__PORT=<port>"
    ]


def test_missing_jdk_is_one_line_naming_the_fix(directory: Path) -> None:
    result = _cli(
        ["stack", "up", "kafka"],
        {
            "POSFLOW_STACK__DIR": str(directory),
            "POSFLOW_STACK__JAVA": "/nonexistent/jdk/bin/java",
            "POSFLOW_STACK__INSTALL": "false",
        },
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("posflow: error: Java (JDK 17+) for the Kafka broker not found")
    assert "apt-get install -y openjdk-17-jre-headless" in line
    assert "POSFLOW_STACK__JAVA" in line


def test_maven_fetch_failure_is_one_line_naming_the_version(
    directory: Path,
) -> None:
    result = _cli(
        ["stack", "up", "kafka"],
        {
            "POSFLOW_STACK__DIR": str(directory),
            "POSFLOW_STACK__CACHE_DIR": str(directory / "cache"),
            "POSFLOW_KAFKA__VERSION": "0.0.404",
        },
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("posflow: error: Maven could not fetch Apache Kafka 0.0.404")
    assert "kafka_2.13:jar:0.0.404" in line
    assert "POSFLOW_KAFKA__VERSION" in line


def test_service_not_up_in_time_is_stopped_and_its_log_tail_shown(
    directory: Path,
) -> None:
    result = _cli(
        ["stack", "up", "kafka"],
        {"POSFLOW_STACK__DIR": str(directory), "POSFLOW_STACK__START_TIMEOUT_S": "0.5"},
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    first, *tail = result.stderr.strip().splitlines()
    assert first.startswith("posflow: error: kafka did not answer on 127.0.0.1:29092 within 0 s")
    assert "POSFLOW_STACK__START_TIMEOUT_S" in first
    assert tail
    assert all(line.startswith("  | ") for line in tail)
    assert "=== posflow: starting kafka" in "\n".join(tail)
    # It was stopped, not left half-started.
    assert not Stack(_other_settings(directory)).kafka.process.running()
