"""The merchant feed API's commands."""

from __future__ import annotations

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the merchant API's commands to the ``posflow`` command line."""
