"""Shared fixtures: settings built explicitly, and the real local stack for integration tests.

The services come from the local stack unless ``POSFLOW_TEST_BACKEND`` says otherwise
(tests/backends.py): with ``testcontainers`` (or ``auto`` where a Docker engine answers)
Kafka, TimescaleDB and Mosquitto come from containers instead.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from posflow.settings import Settings, StackSettings
from posflow.stack import Stack
from tests.backends import (
    BACKEND_ENV,
    Choice,
    choose_backend,
    probe_engine,
    testcontainers_installed,
)

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
def test_backend() -> Choice:
    """Where the services come from (``POSFLOW_TEST_BACKEND``; the local stack by default)."""
    env = os.environ
    try:
        return choose_backend(
            env.get(BACKEND_ENV), probe_engine(env), installed=testcontainers_installed()
        )
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.fixture(scope="session")
def settings(test_backend: Choice, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    # The stack the README's commands start, in the repo's own stack directory; CI's
    # TimescaleDB settings (.ci/run) hold here too, so a test database must have it there.
    env = os.environ
    local = Settings(
        stack=StackSettings(
            dir=ROOT / ".stack",
            require_timescaledb=env.get("POSFLOW_STACK__REQUIRE_TIMESCALEDB", "").lower()
            in {"1", "true", "yes"},
            timescaledb_source=env.get("POSFLOW_STACK__TIMESCALEDB_SOURCE") or None,
            timescaledb_sha256=env.get("POSFLOW_STACK__TIMESCALEDB_SHA256") or None,
        )
    )
    if test_backend.backend is None:
        pytest.skip(test_backend.reason)
    if test_backend.backend == "stack":
        yield local
        return
    from tests._containers import container_services

    # Its own stack directory: the containers' broker configuration, PKI and logs.
    own = local.model_copy(
        update={"stack": StackSettings(dir=tmp_path_factory.mktemp("stack"), install=False)}
    )
    with container_services(own, free_port()) as settings:
        yield settings


@pytest.fixture(scope="session")
def stack(settings: Settings, test_backend: Choice) -> Stack:
    """The running local stack; started here if `posflow stack up` was not run first.

    With the testcontainers backend the containers are the services: nothing is started.
    """
    stack = Stack(settings)
    if test_backend.backend == "stack":
        stack.up()
    return stack


@pytest.fixture
def storage_path() -> str:
    """The storage path of a test's database: TimescaleDB unless parametrized (see
    tests/integration/conftest.py, BOTH_PATHS)."""
    return "timescaledb"
