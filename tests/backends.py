"""Where the tests' services come from: the local stack, or a Docker engine (testcontainers).

``POSFLOW_TEST_BACKEND`` chooses:

* ``stack`` (the default, and what CI uses): the local stack of ``posflow stack up``;
* ``testcontainers``: Kafka, TimescaleDB and Mosquitto in containers of a Docker engine
  (``DOCKER_HOST``, else ``/var/run/docker.sock``); without an engine that answers, or
  without the testcontainers package, the tests that need services are skipped, and the
  reason names what is missing;
* ``auto``: testcontainers where an engine answers and the package is installed, else
  the local stack.

:func:`choose_backend` decides from plain facts and is unit-tested;
:func:`probe_engine` gathers the facts.
"""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

__all__ = ["BACKEND_ENV", "Choice", "Engine", "choose_backend", "probe_engine"]

BACKEND_ENV = "POSFLOW_TEST_BACKEND"
DEFAULT_SOCKET = "unix:///var/run/docker.sock"
_VALUES = ("stack", "testcontainers", "auto")


@dataclass(frozen=True)
class Engine:
    """A Docker engine's address and whether it answered (``detail``: why not)."""

    address: str
    answers: bool
    detail: str = ""


@dataclass(frozen=True)
class Choice:
    """The backend the tests use, or ``None``: the services' tests are skipped."""

    backend: Literal["stack", "testcontainers"] | None
    reason: str


def choose_backend(requested: str | None, engine: Engine, *, installed: bool) -> Choice:
    """The backend for ``POSFLOW_TEST_BACKEND=requested`` given the engine and whether the
    testcontainers package is installed; an unknown value is a ValueError naming the
    allowed ones."""
    value = (requested or "stack").strip().lower()
    if value not in _VALUES:
        raise ValueError(
            f"{BACKEND_ENV}={requested!r}: expected one of {', '.join(_VALUES)} (default stack)"
        )
    if value == "stack":
        return Choice("stack", f"the local stack ({BACKEND_ENV} is {value!r} or unset)")
    missing = []
    if not engine.answers:
        missing.append(f"no Docker engine answers at {engine.address} ({engine.detail})")
    if not installed:
        missing.append("the testcontainers package is not installed (pip install -e '.[dev]')")
    if not missing:
        return Choice("testcontainers", f"Kafka, TimescaleDB and Mosquitto from {engine.address}")
    if value == "auto":
        return Choice("stack", f"the local stack ({BACKEND_ENV}=auto: {'; '.join(missing)})")
    return Choice(None, f"{BACKEND_ENV}=testcontainers but {'; '.join(missing)}")


def probe_engine(env: Mapping[str, str], timeout_s: float = 1.0) -> Engine:
    """Connect to the engine's socket (``DOCKER_HOST`` or the default unix socket)."""
    address = env.get("DOCKER_HOST") or DEFAULT_SOCKET
    url = urlsplit(address)
    try:
        if url.scheme == "unix":
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(timeout_s)
                sock.connect(url.path)
        elif url.scheme in ("tcp", "http", "https"):
            socket.create_connection((url.hostname or "", url.port or 2375), timeout_s).close()
        else:
            return Engine(address, answers=False, detail=f"unsupported scheme {url.scheme!r}")
    except OSError as exc:
        return Engine(address, answers=False, detail=exc.strerror or str(exc))
    return Engine(address, answers=True)


def testcontainers_installed() -> bool:
    return importlib.util.find_spec("testcontainers") is not None
