"""Shared fixtures: settings built explicitly, and the real local stack for integration tests."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

import pytest

from posflow.settings import Settings, StackSettings
from posflow.stack import Stack

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nothing listens on now, for a service a test starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def unique(prefix: str) -> str:
    """An id no other test uses, so tests never see each other's data."""
    return f"{prefix}-{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def settings() -> Settings:
    # The stack the README's commands start, in the repo's own stack directory.
    return Settings(stack=StackSettings(dir=ROOT / ".stack"))


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Stack:
    """The running local stack; started here if `posflow stack up` was not run first."""
    stack = Stack(settings)
    stack.up()
    return stack
