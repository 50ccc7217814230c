"""The alert engine's commands."""

from __future__ import annotations

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the alert engine's commands to the ``posflow`` command line."""
