"""The README's first command ends in `posflow demo`: it runs through every part that exists."""

from __future__ import annotations

import os
import subprocess
import sys

from posflow.stack import Stack
from tests.conftest import ROOT


def test_demo_moves_terminal_messages_through_bridge_kafka_and_storage(stack: Stack) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "posflow.cli", "demo"],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "20 MQTT messages published by the terminals (QoS 1)" in out
    assert out.count("telemetry seq") == 15
    assert out.count("txn seq") == 3
    assert "card_data: payload contains a 16-digit card number in field card_token" in out
    assert "float_money: field amount_minor" in out
    assert 'card_token": "[REDACTED-PAN]"' in out
    assert "4111 1111 1111 1111" not in out
    assert "4111111111111111" not in out
    assert "15 telemetry rows written" in out
    assert "ledger: 3 payments applied; written again: 0 applied, 3 recognised as duplicates" in out
    # 12.50 + 13.50 + 14.50 AUD less 1.5% + 0.10 each, in integer cents
    assert "AUD pending 39.61" in out
