"""docker-compose.yml and its config files agree with what the local stack runs.

Nothing here needs Docker or a running service: docker-compose 1.x validates the file
without an engine, and the rest compares the files with the settings, renderers and
topic list the local stack uses, so the two ways of running posflow cannot drift apart.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from posflow.settings import KafkaSettings, MosquittoSettings, Settings
from posflow.stack.mosquitto import render_acl, render_config
from posflow.stack.prometheus import scrape_jobs
from posflow.topics import pipeline_topics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
MOSQUITTO_CONF = ROOT / "deploy" / "compose" / "mosquitto" / "mosquitto.conf"
MOSQUITTO_ACL = ROOT / "deploy" / "compose" / "mosquitto" / "acl"
PROMETHEUS_CONF = ROOT / "deploy" / "compose" / "prometheus" / "prometheus.yml"

# Directives naming paths or the listen address: in a container these differ on purpose.
CONTAINER_SPECIFIC = {"password_file", "acl_file", "persistence_location", "listener"}
LIMITS = (
    "max_queued_messages",
    "max_inflight_messages",
    "max_connections",
    "allow_anonymous",
    "message_size_limit",
    "persistent_client_expiration",
)
ACL_RULE = re.compile(r"^(topic|pattern|user)\s")
DEFAULTED_VARIABLE = re.compile(r"\$\{\w+:-([^}]*)\}")


def directives(conf: str) -> list[tuple[str, str]]:
    """(name, value) of every directive of a mosquitto.conf, in order, without comments."""
    found = []
    for raw in conf.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition(" ")
            found.append((name, value.strip()))
    return found


def acl_rules(acl: str) -> list[str]:
    """The rule lines of a Mosquitto ACL, in order (order matters: `user` opens a section)."""
    return [line.strip() for line in acl.splitlines() if ACL_RULE.match(line.strip())]


def local_stack_conf() -> str:
    m = MosquittoSettings()
    return render_config(
        host=m.host,
        port=m.port,
        directory=Path("/unused"),  # only paths depend on it, and those are not compared
        max_connections=m.max_connections,
        max_queued_messages=m.max_queued_messages,
        max_inflight_messages=m.max_inflight_messages,
    )


def topic_creations(script: str) -> list[argparse.Namespace]:
    """The `kafka-topics.sh --create` calls of a shell script, their options parsed."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--replication-factor", type=int)
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("--if-not-exists", action="store_true")
    calls = []
    for command in script.replace("\\\n", " ").splitlines():
        argv = shlex.split(command, comments=True)
        if argv and argv[0].endswith("/kafka-topics.sh") and "--create" in argv:
            calls.append(parser.parse_known_args(argv[1:])[0])
    return calls


@pytest.fixture
def no_posflow_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Settings() as a container gets it: no POSFLOW_* variables from the test's shell."""
    for name in [n for n in os.environ if n.startswith("POSFLOW_")]:
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read docker-compose.yml")
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def test_docker_compose_accepts_the_compose_file() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip(
            "docker-compose is not installed, so docker-compose.yml cannot be validated: "
            "`apt-get install docker-compose` (it parses the file without a Docker engine)"
        )
    proc = subprocess.run(
        [binary, "-f", COMPOSE_FILE.name, "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_compose_mosquitto_has_the_local_stack_limits_and_settings() -> None:
    compose_conf = directives(MOSQUITTO_CONF.read_text())
    local_conf = directives(local_stack_conf())

    compose_limits = {name: value for name, value in compose_conf if name in LIMITS}
    local_limits = {name: value for name, value in local_conf if name in LIMITS}
    assert compose_limits == local_limits
    assert sorted(local_limits) == sorted(LIMITS)
    # Everything else too, so a directive added to the local stack is not forgotten here.
    assert [d for d in compose_conf if d[0] not in CONTAINER_SPECIFIC] == [
        d for d in local_conf if d[0] not in CONTAINER_SPECIFIC
    ]


def test_compose_mosquitto_acl_has_the_local_stack_rules() -> None:
    expected = acl_rules(render_acl(MosquittoSettings().service_user))
    assert acl_rules(MOSQUITTO_ACL.read_text()) == expected


def test_compose_mounts_mosquitto_files_where_the_config_expects_them(
    compose: dict[str, Any],
) -> None:
    conf = dict(directives(MOSQUITTO_CONF.read_text()))
    mosquitto = compose["services"]["mosquitto"]
    mounts = dict(volume.split(":")[:2] for volume in mosquitto["volumes"])
    assert mounts["./deploy/compose/mosquitto/acl"] == conf["acl_file"]
    assert mounts["mosquitto-data"] + "/" == conf["persistence_location"]
    assert conf["listener"] == "1883 0.0.0.0"
    # The entrypoint writes the password file the config names, for the service account.
    script = "\n".join(mosquitto["command"])
    assert f"{conf['password_file']} {MosquittoSettings().service_user} " in script


def test_kafka_init_creates_exactly_the_pipeline_topics(compose: dict[str, Any]) -> None:
    script = "\n".join(compose["services"]["kafka-init"]["command"])
    calls = topic_creations(script)
    created = {call.topic: dict(c.split("=", 1) for c in call.config) for call in calls}
    expected = {t.name: t for t in pipeline_topics(KafkaSettings())}

    assert len(calls) == len(created)  # each topic created once
    assert set(created) == set(expected)
    assert {name: config["cleanup.policy"] for name, config in created.items()} == {
        name: t.config["cleanup.policy"] for name, t in expected.items()
    }
    # The rest of each topic's configuration and its partitions match as well.
    assert created == {name: t.config for name, t in expected.items()}
    assert {call.topic: call.partitions for call in calls} == {
        name: t.partitions for name, t in expected.items()
    }
    # Re-running the one-shot service must be harmless; a single broker holds one replica.
    assert {(call.if_not_exists, call.replication_factor) for call in calls} == {(True, 1)}


def test_posflow_services_build_their_settings_from_the_shared_environment(
    compose: dict[str, Any], no_posflow_env: pytest.MonkeyPatch
) -> None:
    shared = compose["x-posflow-env"]
    app = {name: s for name, s in compose["services"].items() if "app" in s.get("profiles", [])}
    assert sorted(app) == [
        "alerts", "api", "ingest", "posflow-migrate",
        "rawsink", "settlement", "streams", "webhooks",
    ]  # fmt: skip
    assert {name: s["environment"] for name, s in app.items()} == dict.fromkeys(app, shared)

    # What a container sees with nothing overridden: ${VAR:-default} becomes the default.
    for name, value in shared.items():
        no_posflow_env.setenv(name, DEFAULTED_VARIABLE.sub(r"\1", str(value)))
    settings = Settings()

    assert (settings.kafka.bootstrap, settings.postgres.host, settings.postgres.port) == (
        "kafka:9092",
        "timescaledb",
        5432,
    )
    assert (settings.mosquitto.host, settings.mosquitto.port) == ("mosquitto", 1883)
    # The defaults the infrastructure containers get are the ones the services log in with.
    timescaledb = compose["services"]["timescaledb"]["environment"]
    assert settings.postgres.password.get_secret_value() == DEFAULTED_VARIABLE.sub(
        r"\1", timescaledb["POSTGRES_PASSWORD"]
    )
    mosquitto = compose["services"]["mosquitto"]["environment"]
    assert settings.mosquitto.service_password.get_secret_value() == DEFAULTED_VARIABLE.sub(
        r"\1", mosquitto["POSFLOW_MOSQUITTO__SERVICE_PASSWORD"]
    )


@pytest.mark.usefixtures("no_posflow_env")
def test_compose_prometheus_scrapes_each_posflow_service_by_its_compose_name(
    compose: dict[str, Any],
) -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load(PROMETHEUS_CONF.read_text())
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    # The local stack's jobs and ports under their compose names (no simulator in compose);
    # services still to come are scraped already and simply show as down until they run.
    expected = {
        job: [f"{job.removeprefix('posflow-')}:{address.rsplit(':', 1)[1]}"]
        for job, address in scrape_jobs(Settings()).items()
        if job != "posflow-simulator"
    }
    assert "ingest" in compose["services"]
    assert targets == {"prometheus": ["localhost:9090"], **expected}
    assert config["global"]["scrape_interval"] == f"{Settings().prometheus.scrape_interval_s}s"


def test_compose_runs_the_timescaledb_and_postgresql_versions_ci_tests(
    compose: dict[str, Any],
) -> None:
    from posflow.settings import StackSettings

    image = compose["services"]["timescaledb"]["image"]
    pinned = StackSettings().timescaledb_version
    assert image == f"timescale/timescaledb:{pinned}-pg15", (image, pinned)
