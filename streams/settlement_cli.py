"""The settlement worker's and the payouts' commands."""

from __future__ import annotations

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the settlement commands to the ``posflow`` command line."""
