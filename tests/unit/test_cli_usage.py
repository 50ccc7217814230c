"""The CLI's usage errors: one line of usage and the reason, exit 2, never a traceback."""

from __future__ import annotations

import pytest

from cli.main import main


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["keys", "issue", "--merchant", "M-1", "--dry-run"], "No such option: --dry-run"),
        (["no-such-command"], "No such command 'no-such-command'."),
        (["db", "migrate", "extra"], "Got unexpected extra argument(s) (extra)"),
    ],
)
def test_a_usage_error_prints_usage_and_the_reason_and_exits_2(
    argv: list[str], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("Usage: posflow ")
    assert err.rstrip().endswith(f"Error: {reason}")


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "Usage: posflow" in capsys.readouterr().out
