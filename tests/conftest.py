"""Shared fixtures: settings built explicitly, and the real local stack for integration tests."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import pytest

from posflow.settings import Settings, StackSettings
from posflow.stack import Stack

ROOT = Path(__file__).resolve().parents[1]


# Below the kernel's ephemeral range (32768-60999), so an outgoing connection of some other
# process cannot take a test's port between choosing it and binding it; the local stack's
# ports (11883, 15432, 18883, 19090, 19092-3) and a second stack's (2xxxx) lie outside it.
_TEST_PORTS = range(12_000, 15_000)


def free_port() -> int:
    """A TCP port nothing listens on now, for a service a test starts."""
    for _ in range(200):
        port = _TEST_PORTS.start + secrets.randbelow(len(_TEST_PORTS))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {_TEST_PORTS}")


def unique(prefix: str) -> str:
    """An id no other test uses, so tests never see each other's data."""
    return f"{prefix}-{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def settings() -> Settings:
    # The stack the README's commands start, in the repo's own stack directory; CI's
    # TimescaleDB settings (.ci/run) hold here too, so a test database must have it there.
    env = os.environ
    return Settings(
        stack=StackSettings(
            dir=ROOT / ".stack",
            require_timescaledb=env.get("POSFLOW_STACK__REQUIRE_TIMESCALEDB", "").lower()
            in {"1", "true", "yes"},
            timescaledb_source=env.get("POSFLOW_STACK__TIMESCALEDB_SOURCE") or None,
            timescaledb_sha256=env.get("POSFLOW_STACK__TIMESCALEDB_SHA256") or None,
        )
    )


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Stack:
    """The running local stack; started here if `posflow stack up` was not run first."""
    stack = Stack(settings)
    stack.up()
    return stack


@pytest.fixture
def storage_path() -> str:
    """The storage path of a test's database: TimescaleDB unless parametrized (see
    tests/integration/conftest.py, BOTH_PATHS)."""
    return "timescaledb"
