"""`posflow alerts run`, `posflow ingest`, `posflow streams worker` (and every other service
the main job runs) refuse to start in the production profile while development defaults
are set (before touching any service).

The PostgreSQL, Kafka and MQTT ports point at nothing: a command that did not refuse
first would fail differently (or hang until the timeout) instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

COMMANDS = [("alerts", "run"), ("ingest",), ("streams", "worker")]
# The other services of the main job (tests/unit/test_production_profile_once.py checks
# that this list covers them all).
COMMANDS += [
    ("streams", "sink"),
    ("settlement", "worker"),
    ("api",),
    ("api", "webhooks", "deliver"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_service_refuses_dev_defaults_in_the_production_profile(
    command: tuple[str, ...], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSFLOW_")}
    nowhere = str(free_port())
    env |= {
        "POSFLOW_SECURITY__PROFILE": "production",
        "POSFLOW_STACK__DIR": str(tmp_path),
        "POSFLOW_POSTGRES__PORT": nowhere,
        "POSFLOW_KAFKA__PORT": nowhere,
        "POSFLOW_MOSQUITTO__PORT": nowhere,
    }
    out = subprocess.run(
        [sys.executable, "-m", "cli", *command],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    first = out.stderr.splitlines()[0]
    assert first.startswith(
        "posflow: error: the production profile refuses development defaults: "
    ), out.stderr
    for name in (
        "POSFLOW_POSTGRES__PASSWORD",
        "POSFLOW_MOSQUITTO__SERVICE_PASSWORD",
        "POSFLOW_ALERTS__WEBHOOK_SECRET",
        "POSFLOW_SECURITY__MASTER_KEY_FILE",
    ):
        assert name in first
    for value in ("posflow-dev", "posflow-svc-dev", "posflow-alerts-dev"):
        assert value not in out.stderr + out.stdout  # names, never values
    assert "Traceback" not in out.stderr


def test_the_dev_profile_is_not_refused(tmp_path: Path) -> None:
    """Same command in the dev profile gets past the check (and fails on the missing DB)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSFLOW_")}
    env |= {"POSFLOW_STACK__DIR": str(tmp_path), "POSFLOW_POSTGRES__PORT": str(free_port())}
    out = subprocess.run(
        [sys.executable, "-m", "cli", "streams", "worker"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode != 0
    assert "production profile" not in out.stderr
    assert "connection" in out.stderr.lower()
