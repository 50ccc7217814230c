"""The shared service runtime: the backoff, the stop signals and run_service on loopback."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from posflow.runtime import Backoff, Endpoints, install_stop_signals, listen_forever, run_service
from tests.conftest import free_port


@pytest.fixture
async def restore_signals() -> AsyncIterator[None]:
    """The test loop lives for the session: give SIGTERM/SIGINT back their default meaning."""
    yield
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)


# --- Backoff ----------------------------------------------------------------------------


def test_backoff_doubles_from_first_up_to_the_cap() -> None:
    backoff = Backoff(first=0.2, cap=5.0)
    assert [backoff.next() for _ in range(8)] == pytest.approx(
        [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    )


def test_backoff_grows_by_its_factor() -> None:
    backoff = Backoff(first=1.0, cap=30.0, factor=3)
    assert [backoff.next() for _ in range(5)] == [1.0, 3.0, 9.0, 27.0, 30.0]


def test_backoff_starts_again_from_first_after_reset() -> None:
    backoff = Backoff(first=0.5, cap=4.0)
    assert [backoff.next() for _ in range(4)] == [0.5, 1.0, 2.0, 4.0]
    backoff.reset()
    assert [backoff.next() for _ in range(2)] == [0.5, 1.0]


def test_backoff_with_jitter_draws_each_delay_between_zero_and_the_plain_delay() -> None:
    plain = Backoff(first=0.5, cap=30.0)
    jittered = Backoff(first=0.5, cap=30.0, jitter=True)
    draws = []
    for _ in range(200):
        bound, delay = plain.next(), jittered.next()
        assert 0 <= delay <= bound
        draws.append(delay)
    # Full jitter: the draws spread out, they are not the plain delays.
    assert len(set(draws)) > 150
    assert sum(draws[20:]) / len(draws[20:]) == pytest.approx(15.0, rel=0.25)


def _seeded() -> random.Random:
    return random.Random("seed")  # noqa: S311 - timing, not crypto


def test_backoff_with_a_seeded_rng_repeats_its_delays() -> None:
    first = Backoff(first=0.5, cap=30.0, jitter=True, rng=_seeded())
    second = Backoff(first=0.5, cap=30.0, jitter=True, rng=_seeded())
    expected = _seeded()
    delays = [first.next() for _ in range(10)]
    assert delays == [second.next() for _ in range(10)]
    assert delays == [expected.uniform(0, min(30.0, 0.5 * 2**i)) for i in range(10)]


@pytest.mark.parametrize(
    ("first", "cap", "factor"),
    [(0.0, 5.0, 2.0), (-1.0, 5.0, 2.0), (6.0, 5.0, 2.0), (0.2, 5.0, 0.5)],
)
def test_backoff_refuses_delays_that_cannot_back_off(
    first: float, cap: float, factor: float
) -> None:
    with pytest.raises(ValueError, match=r"Backoff needs 0 < first <= cap and factor >= 1"):
        Backoff(first=first, cap=cap, factor=factor)


async def test_backoff_sleep_waits_the_delay_or_returns_when_stop_is_set() -> None:
    backoff = Backoff(first=0.05, cap=10.0)
    started = time.monotonic()
    assert await backoff.sleep() == 0.05
    assert time.monotonic() - started >= 0.04
    stop = asyncio.Event()
    stop.set()
    started = time.monotonic()
    assert await backoff.sleep(stop) == 0.1
    assert await Backoff(first=10.0, cap=10.0).sleep(stop) == 10.0
    assert time.monotonic() - started < 1.0


# --- signals ----------------------------------------------------------------------------


async def test_sigint_sets_stop_after_telling_on_stop_its_name(restore_signals: None) -> None:
    stop = asyncio.Event()
    heard: list[str] = []
    install_stop_signals(stop, on_stop=lambda name: heard.append(f"{name} {stop.is_set()}"))
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.wait_for(stop.wait(), 5)
    assert heard == ["SIGINT False"]


async def test_listen_forever_refuses_a_channel_that_is_not_an_identifier() -> None:
    with pytest.raises(ValueError, match=r"LISTEN channel must be an identifier, got 'a; b'"):
        await listen_forever("host=nowhere", "a; b", print)


# --- run_service ------------------------------------------------------------------------


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as resp:
        return resp.status, await resp.text()


async def _until_up(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            await _get(session, url)
            return
        except aiohttp.ClientConnectionError:
            assert time.monotonic() < deadline, f"{url} did not answer within 10 s"
            await asyncio.sleep(0.02)


async def test_run_service_serves_its_endpoints_until_sigterm_then_drains_and_closes(
    restore_signals: None,
) -> None:
    port = free_port()
    registry = CollectorRegistry()
    handled = Counter("runtime_test_handled", "messages handled", registry=registry)
    ready = {"now": False}
    happened: list[str] = []

    async def hello(_: web.Request) -> web.Response:
        return web.json_response({"hello": "runtime"})

    async def body(stop: asyncio.Event) -> None:
        happened.append("running")
        handled.inc(3)
        await stop.wait()
        happened.append("stop seen")
        await asyncio.sleep(0.2)  # draining: the endpoints still answer meanwhile
        happened.append("drained")

    endpoints = Endpoints("127.0.0.1", port, registry, lambda: ready["now"],
                          routes=[("GET", "/hello", hello)])  # fmt: skip
    stop = asyncio.Event()
    service = asyncio.create_task(run_service("runtime-test", endpoints, body, stop=stop))
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        await _until_up(session, f"{base}/healthz")
        assert await _get(session, f"{base}/healthz") == (200, '{"status": "ok"}')
        assert await _get(session, f"{base}/readyz") == (503, '{"status": "not ready"}')
        ready["now"] = True
        assert await _get(session, f"{base}/readyz") == (200, '{"status": "ready"}')
        assert await _get(session, f"{base}/hello") == (200, '{"hello": "runtime"}')
        status, metrics = await _get(session, f"{base}/metrics")
        assert status == 200
        assert "runtime_test_handled_total 3.0" in metrics
        assert happened == ["running"]

        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 5)
        await asyncio.sleep(0.05)
        assert happened == ["running", "stop seen"]
        assert await _get(session, f"{base}/healthz") == (200, '{"status": "ok"}')

        await asyncio.wait_for(service, 10)
        assert happened == ["running", "stop seen", "drained"]
        with pytest.raises(aiohttp.ClientConnectionError):
            await _get(session, f"{base}/healthz")


async def test_run_service_closes_its_endpoints_when_the_body_fails(
    restore_signals: None,
) -> None:
    port = free_port()
    up = asyncio.Event()

    async def body(_stop: asyncio.Event) -> None:
        await up.wait()
        raise RuntimeError("the body broke")

    endpoints = Endpoints("127.0.0.1", port, CollectorRegistry(), lambda: True)
    service = asyncio.create_task(run_service("runtime-test", endpoints, body))
    async with aiohttp.ClientSession() as session:
        await _until_up(session, f"http://127.0.0.1:{port}/healthz")
        up.set()
        with pytest.raises(RuntimeError, match="the body broke"):
            await asyncio.wait_for(service, 10)
        with pytest.raises(aiohttp.ClientConnectionError):
            await _get(session, f"http://127.0.0.1:{port}/healthz")
