"""Webhooks per merchant: a real HTTP receiver on loopback, a real deliverer, real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest

from api.delivery import DeliveryMetrics, WebhookDeliverer
from api.signing import verify
from api.webhooks import Endpoint, add_endpoint, get_endpoint, list_endpoints, replay
from posflow.errors import PosflowError
from posflow.security.audit import records
from posflow.security.keys import LocalMasterKey, issue_merchant_key, revoke_merchant_key
from posflow.security.roles import Principal, Role
from posflow.settings import ApiSettings, PostgresSettings
from posflow.storage import migrate
from tests.conftest import free_port, unique
from tests.integration.test_api import add_events

ADMIN = Principal("alice", Role.SECURITY_ADMIN)


@dataclass
class Receiver:
    """A webhook receiver on loopback; ``status`` is what it answers, ``stop()`` takes it down."""

    port: int
    status: int = 200
    accepted: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    refused: int = 0
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.status == 200:
                    receiver.accepted.append((dict(self.headers.items()), body))
                else:
                    receiver.refused += 1
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def ids(self) -> list[str]:
        return [h["Posflow-Event-Id"] for h, _ in self.accepted]


@dataclass
class Env:
    conn: psycopg.Connection[tuple[Any, ...]]
    provider: LocalMasterKey
    dsn: str

    def merchant(self) -> str:
        m = unique("m")
        self.conn.execute("INSERT INTO merchants (merchant_id, name) VALUES (%s, 'shop')", [m])
        issue_merchant_key(self.conn, self.provider, m, actor=ADMIN, source="test")
        return m

    def add(self, merchant: str, url: str, from_seq: int | None = 1) -> tuple[Endpoint, str]:
        return add_endpoint(
            self.conn,
            self.provider,
            merchant,
            url,
            actor="bob",
            source="test",
            allow_http=False,
            from_seq=from_seq,
        )


@pytest.fixture
def env(pg: PostgresSettings) -> Iterator[Env]:
    conn = psycopg.connect(pg.dsn(), autocommit=True)
    migrate(conn)
    yield Env(conn, LocalMasterKey(secrets.token_bytes(32)), pg.dsn())
    conn.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(free_port())
    r.start()
    yield r
    r.stop()


@pytest.fixture
def deliverer(env: Env) -> Iterator[Callable[..., WebhookDeliverer]]:
    """Start a deliverer (its own event loop in a thread); stopped like SIGTERM at the end."""
    running: list[tuple[asyncio.AbstractEventLoop, asyncio.Event, threading.Thread]] = []

    def start(**overrides: Any) -> WebhookDeliverer:
        settings = ApiSettings(
            **{
                "webhook_backoff_base_s": 0.05,
                "webhook_backoff_max_s": 0.2,
                "webhook_poll_s": 0.1,
                "webhook_timeout_s": 2.0,
                **overrides,
            }
        )
        d = WebhookDeliverer(settings, env.dsn, env.provider, DeliveryMetrics())
        ready = threading.Event()
        box: dict[str, Any] = {}

        def main() -> None:
            async def go() -> None:
                box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
                await d.open()
                ready.set()
                try:
                    await d.run(box["stop"])
                finally:
                    await d.close()

            asyncio.run(go())

        thread = threading.Thread(target=main, daemon=True)
        thread.start()
        assert ready.wait(30), "deliverer did not start"
        running.append((box["loop"], box["stop"], thread))
        return d

    yield start
    for loop, stop, thread in running:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=20)
        assert not thread.is_alive(), "deliverer did not stop within 20 s"


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_events_arrive_signed_in_order_and_the_signature_verifies(
    env: Env, receiver: Receiver, deliverer: Callable[..., WebhookDeliverer]
) -> None:
    merchant = env.merchant()
    add_events(env.conn, merchant, range(1, 4))
    ep, secret = env.add(merchant, receiver.url)
    stored = env.conn.execute(
        "SELECT ciphertext FROM merchant_secrets WHERE merchant_id = %s AND purpose = %s",
        [merchant, f"webhook.{ep.endpoint_id}"],
    ).fetchone()
    assert stored is not None
    assert secret.encode() not in bytes(stored[0])  # encrypted at rest
    deliverer()
    add_events(env.conn, merchant, range(4, 6))  # live, after the deliverer started
    wait_for("5 events", lambda: len(receiver.accepted) >= 5)
    assert receiver.ids() == [f"{merchant}:{s}" for s in range(1, 6)]
    for headers, body in receiver.accepted:
        assert verify(
            secret.encode(),
            headers["Posflow-Timestamp"],
            body,
            headers["Posflow-Signature"],
            now=time.time(),
        )
        assert not verify(
            b"another secret",
            headers["Posflow-Timestamp"],
            body,
            headers["Posflow-Signature"],
            now=time.time(),
        )
        assert headers["Content-Type"] == "application/json"
    first = json.loads(receiver.accepted[0][1])
    assert first["id"] == f"{merchant}:1"
    assert first["type"] == "cashflow"
    assert first["merchant_id"] == merchant
    assert (first["data"]["seq"], first["data"]["amount_minor"], first["data"]["currency"]) == (
        1,
        100,
        "EUR",
    )
    wait_for("cursor", lambda: get_endpoint(env.conn, ep.endpoint_id).delivered_seq == 5)


def test_receiver_down_then_back_gets_every_event_once_in_order(
    env: Env, receiver: Receiver, deliverer: Callable[..., WebhookDeliverer]
) -> None:
    merchant = env.merchant()
    ep, _ = env.add(merchant, receiver.url)
    receiver.stop()  # connection refused from now on
    d = deliverer()
    add_events(env.conn, merchant, range(1, 4))
    wait_for(
        "retries while down",
        lambda: get_endpoint(env.conn, ep.endpoint_id).attempts >= 3,
    )
    down = get_endpoint(env.conn, ep.endpoint_id)
    assert down.state == "active"
    assert down.delivered_seq == 0
    assert down.last_error is not None
    assert down.last_error.startswith("event 1: ConnectError")
    add_events(env.conn, merchant, range(4, 7))
    receiver.status = 503  # back, but failing: still nothing accepted, nothing skipped
    receiver.start()
    wait_for("503 answers", lambda: receiver.refused >= 2)
    receiver.status = 200
    wait_for("6 events", lambda: get_endpoint(env.conn, ep.endpoint_id).delivered_seq == 6)
    time.sleep(0.3)  # nothing more arrives
    assert receiver.ids() == [f"{merchant}:{s}" for s in range(1, 7)]
    after = get_endpoint(env.conn, ep.endpoint_id)
    assert (after.state, after.attempts, after.last_error) == ("active", 0, None)
    assert d.metrics.attempts.labels("delivered")._value.get() == 6


def test_give_up_parks_the_endpoint_dead_and_replay_delivers_again(
    env: Env, receiver: Receiver, deliverer: Callable[..., WebhookDeliverer]
) -> None:
    merchant = env.merchant()
    ep, _ = env.add(merchant, receiver.url)
    add_events(env.conn, merchant, range(1, 3))
    deliverer(webhook_give_up_s=0.5)
    wait_for("2 events", lambda: len(receiver.accepted) == 2)
    receiver.status = 500
    add_events(env.conn, merchant, range(3, 5))
    wait_for("dead", lambda: get_endpoint(env.conn, ep.endpoint_id).state == "dead")
    dead = get_endpoint(env.conn, ep.endpoint_id)
    assert dead.delivered_seq == 2  # parked at event 3, event 4 not sent either
    assert dead.last_error == "event 3: HTTP 500"
    assert dead.dead_at is not None
    refused_before = receiver.refused
    time.sleep(0.5)
    assert receiver.refused == refused_before  # a dead endpoint gets no more attempts

    receiver.status = 200
    (replayed,) = replay(env.conn, merchant, 2, actor="bob", source="test")
    assert (replayed.state, replayed.delivered_seq) == ("active", 1)
    wait_for("replay", lambda: get_endpoint(env.conn, ep.endpoint_id).delivered_seq == 4)
    # Event 2 twice (the replay asked for it; receivers de-duplicate on the id), 3 and 4 once.
    assert receiver.ids() == [f"{merchant}:{s}" for s in (1, 2, 2, 3, 4)]
    (audited,) = records(env.conn, action="webhook.replay")
    assert (audited.actor, audited.target, audited.detail) == (
        "bob",
        f"webhook:{ep.endpoint_id}",
        {"from_seq": 2},
    )


def test_revoked_merchant_key_stops_deliveries_with_a_logged_reason(
    env: Env,
    receiver: Receiver,
    deliverer: Callable[..., WebhookDeliverer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    merchant, other = env.merchant(), env.merchant()
    ep, _ = env.add(merchant, receiver.url)
    other_ep, _ = env.add(other, receiver.url)
    add_events(env.conn, merchant, range(1, 2))
    caplog.set_level(logging.ERROR, logger="posflow.api.webhooks")
    deliverer()
    wait_for("event 1", lambda: len(receiver.accepted) == 1)
    revoke_merchant_key(env.conn, merchant, actor=ADMIN, source="test", reason="closed")
    add_events(env.conn, merchant, range(2, 4))
    add_events(env.conn, other, range(1, 2))
    wait_for("revoked", lambda: get_endpoint(env.conn, ep.endpoint_id).state == "revoked")
    wait_for("other merchant", lambda: len(receiver.accepted) == 2)
    time.sleep(0.3)
    assert receiver.ids() == [f"{merchant}:1", f"{other}:1"]
    stopped = get_endpoint(env.conn, ep.endpoint_id)
    assert stopped.delivered_seq == 1
    assert stopped.last_error is not None
    assert stopped.last_error.startswith("merchant key revoked, signing secret unreadable")
    assert get_endpoint(env.conn, other_ep.endpoint_id).state == "active"
    logged = [r.getMessage() for r in caplog.records if r.name == "posflow.api.webhooks"]
    assert any(
        f"webhook {ep.endpoint_id} of merchant {merchant} stopped: merchant key revoked" in m
        for m in logged
    ), logged
    with pytest.raises(PosflowError, match="cannot be replayed: the merchant key was revoked"):
        replay(env.conn, merchant, 1, actor="bob", source="test")


def test_add_refuses_bad_urls_unknown_and_revoked_merchants(env: Env) -> None:
    merchant = env.merchant()
    for url, fragment in [
        ("ftp://example.com/x", "not an absolute http(s) URL"),
        ("http://example.com/x", "plain http"),
        ("https://user:pw@example.com/x", "must not carry credentials"),
    ]:
        with pytest.raises(PosflowError, match=re.escape(fragment)):
            env.add(merchant, url)
    with pytest.raises(PosflowError, match="no merchant 'nobody'"):
        env.add("nobody", "https://example.com/x")
    revoke_merchant_key(env.conn, merchant, actor=ADMIN, source="test")
    with pytest.raises(PosflowError, match="has no active key"):
        env.add(merchant, "https://example.com/x")
    assert list_endpoints(env.conn, merchant) == []  # nothing half-created
