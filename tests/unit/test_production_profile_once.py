"""The production profile is checked in one place: ``posflow.cli_support.service_settings``.

No service checks it on its own any more; instead every service the main job runs gets
its settings through that one function, so each of them refuses the development
defaults before it builds or connects anything.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posflow.mainjob import MainJobOptions, service_specs
from posflow.settings import Settings, StackSettings
from tests.conftest import ROOT, free_port
from tests.unit.test_layers import PACKAGES


def _calls_of(name: str) -> list[str]:
    """``module:line`` of every call of ``name`` in the shipped packages."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_refuse_dev_defaults_is_called_only_by_service_settings() -> None:
    calls = _calls_of("refuse_dev_defaults")
    assert len(calls) == 1, calls
    assert calls[0].startswith("posflow/cli_support.py:"), calls


def _service_commands() -> list[list[str]]:
    specs = service_specs(
        Settings(stack=StackSettings(dir=ROOT / ".stack")), MainJobOptions(), Path("logs")
    )
    return [list(spec.args) for spec in specs if spec.name != "simulate"]


@pytest.mark.parametrize("args", _service_commands(), ids=" ".join)
def test_every_service_of_the_main_job_refuses_dev_defaults_before_starting(
    args: list[str], tmp_path: Path
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
        [sys.executable, "-m", "posflow.cli", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith(
        "posflow: error: the production profile refuses development defaults: "
    ), out.stderr
    assert "POSFLOW_POSTGRES__PASSWORD" in out.stderr
    assert "posflow-dev" not in out.stderr + out.stdout  # names, never values
