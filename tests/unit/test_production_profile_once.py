"""The production profile is checked in one place: ``posflow.cli_support.service_settings``.

No service checks it on its own any more; every service the main job runs gets its
settings through that one function, and tests/unit/test_alert_production_profile.py
shows each of them refusing the development defaults before it builds or connects
anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

from cli.mainjob import MainJobOptions, service_specs
from posflow.settings import Settings, StackSettings
from tests.conftest import ROOT
from tests.unit.test_alert_production_profile import COMMANDS
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


def test_every_service_of_the_main_job_is_among_those_shown_to_refuse() -> None:
    missing = {tuple(args) for args in _service_commands()} - set(COMMANDS)
    assert not missing, f"add them to tests/unit/test_alert_production_profile.py: {missing}"
