"""One convention across the command line: a merchant is named by ``--merchant M``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer

from cli.main import app, main


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    subcommands = getattr(command, "commands", None)
    if subcommands is None:
        yield " ".join(path), command
        return
    for name, sub in subcommands.items():
        yield from _commands(sub, (*path, name))


def test_every_command_names_the_merchant_with_the_merchant_option() -> None:
    found, wrong = [], []
    for name, command in _commands(typer.main.get_command(app)):
        for param in command.params:
            if param.name not in ("merchant", "merchant_id"):  # not `--merchants N`, a count
                continue
            found.append(name)
            if param.param_type_name != "option" or "--merchant" not in param.opts:
                wrong.append(f"posflow {name}: {param.name} {param.opts}")
    assert not wrong, wrong
    # The merchant keys, the API keys, webhooks, payouts and settlement rules all take it.
    for command in ("keys issue", "keys rotate", "keys revoke", "keys status"):
        assert command in found
    assert {"api keys issue", "api webhooks add", "payout"} <= set(found)


def test_a_merchant_command_without_a_merchant_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["keys", "status"]) == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith("Error: Invalid value for '--merchant': a merchant id is needed")
