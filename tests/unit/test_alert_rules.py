"""Rule files: validation errors name the rule and the field; defaults load."""

from __future__ import annotations

from pathlib import Path

import pytest

from alerts.rules import load_rules, parse_duration, parse_rules
from posflow.errors import PosflowError

GOOD = """
rules:
  - name: my_battery
    severity: info
    scope: terminal
    when: [{fact: battery_pct, op: lt, value: 50}]
    for: 30s
    annotations: {summary: "battery {battery_pct}", runbook: "https://x"}
"""


def test_the_shipped_rules_cover_the_issue() -> None:
    names = {r.name for r in load_rules(None).rules}
    assert names >= {
        "battery_low", "battery_empty_before_close", "weak_signal", "terminal_offline",
        "printer_out_of_paper", "decline_rate_spike", "slow_authorizations",
        "battery_overheating", "merchant_terminals_offline", "carrier_area_signal_loss",
        "terminal_far_from_merchant", "tamper_detected", "app_version_behind",
        "terminal_dormant", "ledger_integrity",
    }  # fmt: skip


def test_a_user_rule_is_added_and_can_replace_a_default(tmp_path: Path) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text(GOOD + GOOD.replace("my_battery", "battery_low").split("rules:")[1])
    rules = load_rules(f).by_name()
    assert rules["my_battery"].for_s == 30
    assert rules["battery_low"].severity == "info"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("op: lt", "op: below"), "rule 'my_battery' field 'when.0.op'"),
        (("fact: battery_pct", "fact: batery"), "unknown fact 'batery'"),
        (("severity: info", "severity: loud"), "rule 'my_battery' field 'severity'"),
        (("for: 30s", "for: soon"), "rule 'my_battery' field 'for'"),
        (("{battery_pct}", "{battery_pct.__class__}"), "unknown placeholder"),
        (("scope: terminal", "scope: merchant"), "a 'when' rule has scope terminal"),
        (("    for: 30s\n", "    for: 30s\n    colour: red\n"), "field 'colour'"),
    ],
)
def test_errors_name_the_rule_and_the_field(change: tuple[str, str], message: str) -> None:
    with pytest.raises(PosflowError) as err:
        parse_rules(GOOD.replace(*change), "user.yaml")
    assert "user.yaml" in str(err.value)
    assert message in str(err.value)


def test_unknown_inhibit_target_and_duplicates_are_refused(tmp_path: Path) -> None:
    bad = GOOD.replace("    for: 30s", "    for: 30s\n    inhibits: [nope]")
    f = tmp_path / "r.yaml"
    f.write_text(bad)
    with pytest.raises(PosflowError, match="inhibits unknown rule 'nope'"):
        load_rules(f)
    with pytest.raises(PosflowError, match="unique: my_battery"):
        parse_rules(GOOD + GOOD.split("rules:")[1], "dup.yaml")


def test_yaml_syntax_error_is_named() -> None:
    with pytest.raises(PosflowError, match=r"x.yaml: not valid YAML"):
        parse_rules("rules: [", "x.yaml")


@pytest.mark.parametrize(
    ("text", "seconds"), [("250ms", 0.25), ("90s", 90), ("5m", 300), ("2h", 7200), ("3d", 259200)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("5 minutes")
