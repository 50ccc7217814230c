"""The small service runtime every long-running posflow service shares.

* :func:`run_service`: SIGTERM/SIGINT set a stop event, /metrics /healthz /readyz are
  served (plus any routes the service adds), the service's body runs until it has
  drained after the stop, and the endpoints close last.
* :class:`Backoff`: the one exponential backoff (optionally with full jitter) used by
  every reconnect loop.
* :func:`listen_forever`: a PostgreSQL ``LISTEN`` that reconnects with that backoff.
* :func:`cancel_tasks`: a service's helper tasks cancelled and awaited at its end.

Production-profile checks (``refuse_dev_defaults``) are not here: they run once, in
the command line's service launcher, before any service is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from posflow.cost import Handled
from posflow.http import Route, start_http

__all__ = [
    "Backoff",
    "Endpoints",
    "Service",
    "cancel_tasks",
    "install_stop_signals",
    "listen_forever",
    "run_service",
]

log = logging.getLogger("posflow.runtime")


@dataclass
class Backoff:
    """Delays that double from ``first`` up to ``cap``; ``reset()`` after a success.

    With ``jitter`` each delay is drawn uniformly from ``[0, delay]`` (full jitter), so
    many clients that lost the same server do not come back in lockstep; ``rng`` draws
    them (a seeded one makes a run's timing repeatable), the module's by default.
    """

    first: float = 0.2
    cap: float = 5.0
    factor: float = 2.0
    jitter: bool = False
    rng: random.Random | None = field(default=None, repr=False, compare=False)
    _next: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.cap or self.factor < 1:
            raise ValueError(
                f"Backoff needs 0 < first <= cap and factor >= 1, got first={self.first}, "
                f"cap={self.cap}, factor={self.factor}"
            )
        self._next = self.first

    def next(self) -> float:
        """The delay to wait now; the one after it grows."""
        delay = self._next
        self._next = min(self._next * self.factor, self.cap)
        if not self.jitter:
            return delay
        draw = random.uniform if self.rng is None else self.rng.uniform  # timing, not crypto
        return draw(0, delay)

    def reset(self) -> None:
        self._next = self.first

    async def sleep(self, stop: asyncio.Event | None = None) -> float:
        """Wait the next delay (returning early if ``stop`` is set); returns the delay."""
        delay = self.next()
        if stop is None:
            await asyncio.sleep(delay)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        return delay


def install_stop_signals(stop: asyncio.Event, on_stop: Callable[[str], None] | None = None) -> None:
    """SIGTERM and SIGINT set ``stop`` (after ``on_stop(signal name)`` when given)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        if on_stop is None:
            loop.add_signal_handler(sig, stop.set)
        else:
            loop.add_signal_handler(sig, _notify_then_set, on_stop, sig.name, stop)


def _notify_then_set(on_stop: Callable[[str], None], name: str, stop: asyncio.Event) -> None:
    on_stop(name)
    stop.set()


@dataclass(frozen=True)
class Endpoints:
    """Where and what a service serves over HTTP."""

    host: str
    port: int
    registry: CollectorRegistry
    ready: Callable[[], bool]
    routes: Iterable[Route] = ()
    # Extra fields of /readyz's body (see posflow.http.start_http).
    ready_detail: Callable[[], Mapping[str, object]] | None = None
    # Which counters are the service's messages (posflow_messages_handled_total; posflow.cost).
    handled: Handled | None = None


async def run_service(
    name: str,
    endpoints: Endpoints,
    body: Callable[[asyncio.Event], Awaitable[object]],
    *,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve ``endpoints``, run ``body(stop)`` until it returns (it drains after ``stop``
    is set by SIGTERM/SIGINT), then close the endpoints.

    ``body`` owns its draining: it returns once the work in flight is committed.
    """
    stop = stop if stop is not None else asyncio.Event()
    install_stop_signals(stop, lambda sig: log.info("%s: %s received, draining", name, sig))
    runner = await start_http(
        endpoints.host,
        endpoints.port,
        endpoints.registry,
        endpoints.ready,
        endpoints.routes,
        ready_detail=endpoints.ready_detail,
        handled=endpoints.handled,
    )
    log.info("%s: metrics on http://%s:%d/metrics", name, endpoints.host, endpoints.port)
    try:
        await body(stop)
    finally:
        await runner.cleanup()
        log.info("%s stopped", name)


@dataclass(frozen=True)
class Service:
    """A service as its ``build(settings)`` returns it: wired whole, ready to run."""

    name: str
    endpoints: Endpoints
    body: Callable[[asyncio.Event], Awaitable[object]]

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """:func:`run_service` with this service's endpoints and body."""
        await run_service(self.name, self.endpoints, self.body, stop=stop)


async def cancel_tasks(tasks: Iterable[asyncio.Task[object]]) -> None:
    """Cancel every task, then await each until it has ended (an error other than the
    cancellation is raised)."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def listen_forever(
    conninfo: str,
    channel: str,
    on_notify: Callable[[str], None],
    *,
    on_state: Callable[[bool], None] = lambda _up: None,
    backoff: Backoff | None = None,
) -> None:
    """``LISTEN channel`` on its own autocommit connection; each notification's payload
    goes to ``on_notify``. A lost connection is reopened after the backoff, with
    ``on_state(False)`` then ``on_state(True)`` (so the caller can catch up on what was
    committed meanwhile). Runs until cancelled."""
    import psycopg  # the runtime's other users need no database driver

    if not channel.isidentifier():
        raise ValueError(f"LISTEN channel must be an identifier, got {channel!r}")
    backoff = backoff or Backoff()
    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
            async with conn:
                await conn.execute(f"LISTEN {channel}")
                backoff.reset()
                log.info("listening on %s", channel)
                on_state(True)
                async for notify in conn.notifies():
                    on_notify(notify.payload)
        except (psycopg.Error, OSError) as exc:
            log.warning("LISTEN %s connection lost (%s); reconnecting", channel, exc)
        on_state(False)
        await backoff.sleep()
