"""The demo's and the load test's shared harness: commands, readiness, stored rows."""

from __future__ import annotations

import sys

from cli.harness import RowCount, answers_ready, posflow_command
from tests.conftest import free_port


def test_a_service_runs_as_the_posflow_command_of_this_interpreter() -> None:
    assert posflow_command("streams", "sink") == [
        sys.executable, "-m", "cli", "streams", "sink",
    ]  # fmt: skip


def test_a_port_nothing_listens_on_is_not_ready() -> None:
    assert answers_ready(free_port()) is False


def test_rows_lost_are_the_expected_ones_not_stored_never_negative() -> None:
    assert RowCount(expected=120, stored=118).lost == 2
    assert RowCount(expected=120, stored=120).lost == 0
    assert RowCount(expected=120, stored=125).lost == 0  # rows of an earlier run counted
    assert RowCount(expected=120, stored=-1).lost == 120  # the database never answered
