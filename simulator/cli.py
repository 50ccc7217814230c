"""The simulator's and the load test's commands."""

from __future__ import annotations

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the simulator's commands to the ``posflow`` command line."""
