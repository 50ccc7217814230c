"""Publishing a run over MQTT: one connection per terminal, or multiplexed gateways.

paho-mqtt driven by the asyncio loop of one thread (its external-loop API, as the
bridge does in ingest/_mqtt.py): one file descriptor per connection, no thread or
socket pair per client, and a PUBLISH is written at once (docs/benchmarks/mqtt_clients.md
has the measurement behind choosing paho over aiomqtt).

* **per terminal**: the terminal's own account (username = terminal id), its
  Last Will registered at connect; a fault that takes it offline drops the socket
  without a DISCONNECT, so the broker publishes the will.
* **multiplexed**: a few gateway connections carry many terminals' topics (the
  gateway account may publish under every terminal's topics); wills are
  published by the gateway when the terminal goes away.

Messages for a terminal that is not connected wait in its queue (a terminal
buffers while offline) and go out after the reconnect, which backs off
exponentially with full jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from posflow.runtime import Backoff
from simulator.engine import Message

__all__ = ["Conn", "Fanout", "TransportStats"]

log = logging.getLogger("posflow.simulator")


@dataclass
class TransportStats:
    published: int = 0  # handed to a connection (written or queued in paho)
    acked: int = 0  # PUBACK received
    connects: int = 0
    connect_failures: int = 0
    reconnects: int = 0
    wills: int = 0
    abandoned: int = 0  # in flight (no PUBACK yet) on a connection dropped by a fault
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


class Conn:
    """One MQTT connection on the running asyncio loop."""

    def __init__(
        self,
        *,
        client_id: str,
        username: str,
        password: str,
        host: str,
        port: int,
        stats: TransportStats,
        on_sent: Callable[[Message], None],
        jitter: random.Random,
        max_inflight: int = 20,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.host, self.port = host, port
        self.stats = stats
        self._on_sent = on_sent
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        if tls is not None:
            c.tls_set_context(tls)  # the certificate's common name is the MQTT username
        else:
            c.username_pw_set(username, password)
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)
        c.on_socket_open = self._sock_open
        c.on_socket_close = self._sock_close
        c.on_connect = self._connected
        c.on_disconnect = self._disconnected
        c.on_publish = self._acked
        self.client = c
        self.pending: deque[Message] = deque()
        self.inflight = 0
        self.ready = False
        self.wanted = False  # should be connected (False after a will until back online)
        self._sock: Any = None
        self._writing = False
        # Exponential backoff with full jitter, so a fleet does not reconnect in lockstep.
        self._backoff = Backoff(first=0.5, cap=30.0, jitter=True, rng=jitter)
        self._retry: asyncio.TimerHandle | None = None

    # --- paho callbacks -------------------------------------------------------------------

    def _sock_open(self, _c: mqtt.Client, _u: object, sock: Any) -> None:
        self._sock = sock
        self.loop.add_reader(sock, self._readable)

    def _sock_close(self, _c: mqtt.Client, _u: object, sock: Any) -> None:
        self.loop.remove_reader(sock)
        if self._writing:
            self.loop.remove_writer(sock)
            self._writing = False
        self._sock = None

    def _connected(self, _c: mqtt.Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        if reason.is_failure:
            self.stats.connect_failures += 1
            self.stats.error(f"connack: {reason}")
            return
        self.stats.connects += 1
        self.ready = True
        self._backoff.reset()
        self.flush()

    def _disconnected(
        self, _c: mqtt.Client, _u: object, _f: object, _r: object, _p: object
    ) -> None:
        self.ready = False
        if self.wanted:
            self._schedule_reconnect()

    def _acked(self, _c: mqtt.Client, _u: object, _mid: int, _r: object, _p: object) -> None:
        self.stats.acked += 1
        self.inflight -= 1

    # --- I/O ------------------------------------------------------------------------------

    def _readable(self) -> None:
        self.client.loop_read(64)

    def _writable(self) -> None:
        self.client.loop_write()
        if not self.client.want_write() and self._sock is not None:
            self.loop.remove_writer(self._sock)
            self._writing = False

    def _after_write(self) -> None:
        if self.client.want_write() and not self._writing and self._sock is not None:
            self.loop.add_writer(self._sock, self._writable)
            self._writing = True

    def connect(self, will: Message | None = None) -> None:
        self.wanted = True
        self.client.will_clear()
        if will is not None and will.will is not None:
            self.client.will_set(will.topic, will.will, qos=1, retain=True)
        self._try_connect()

    def _try_connect(self) -> None:
        self._retry = None
        if not self.wanted:
            return
        try:
            self.client.connect(self.host, self.port, keepalive=120)
            self._after_write()
        except OSError as exc:
            self.stats.connect_failures += 1
            self.stats.error(f"connect: {exc.strerror or exc}")
            self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if self._retry is not None:
            return
        self.stats.reconnects += 1
        self._retry = self.loop.call_later(self._backoff.next(), self._try_connect)

    def send(self, msg: Message) -> None:
        self.pending.append(msg)
        if self.ready:
            self.flush()

    def flush(self) -> None:
        while self.pending and self.ready:
            msg = self.pending.popleft()
            info = self.client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                self.pending.appendleft(msg)
                self.stats.error(f"publish rc {info.rc}")
                break
            self.stats.published += 1
            self.inflight += msg.qos > 0
            self._on_sent(msg)
        self._after_write()

    def drop(self) -> None:
        """Lose the connection without a DISCONNECT: the broker publishes the Last Will."""
        self.wanted = False
        self.ready = False
        sock = self._sock
        if sock is not None:
            # A FIN after the data already written, but no DISCONNECT packet: the broker
            # reads everything sent so far, then publishes the will.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            self.client.loop_read()  # acks already there; then paho sees the closed socket
        # Written but not acknowledged: the broker has it (the FIN follows the data), the
        # PUBACK will never come. The accounting in Kafka says whether it arrived.
        self.stats.abandoned += self.inflight
        self.inflight = 0

    def misc(self) -> None:
        if self._sock is not None:
            self.client.loop_misc()
            self._after_write()

    def halt(self) -> int:
        """Hand nothing more to MQTT and stop reconnecting; returns the messages not sent."""
        self.wanted = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        unsent = len(self.pending)
        self.pending.clear()
        return unsent

    async def close(self) -> None:
        """A clean DISCONNECT: the broker discards the Last Will (MQTT 3.1.1, 3.14.4)."""
        self.wanted = False
        if self._retry is not None:
            self._retry.cancel()
        if self._sock is not None:
            self.client.disconnect()
            self.client.loop_write()
            if self._sock is not None:
                self.client.loop_read()


class Fanout:
    """Routes a run's messages to connections: per terminal up to ``max_real``, then gateways."""

    def __init__(
        self,
        *,
        terminals: dict[int, tuple[str, str, str]],  # index -> (client id, username, password)
        host: str,
        port: int,
        max_real: int,
        gateways: int,
        gateway_user: str,
        gateway_password: str,
        on_sent: Callable[[Message], None],
        seed: int,
        run_id: str,
        tls: Callable[[str], ssl.SSLContext] | None = None,
    ) -> None:
        self.stats = TransportStats()
        self._tls = tls  # username -> its certificate's context (TLS listener)
        self._jitter = random.Random(f"{seed}:jitter")  # timing only, never message content
        self._terminals = terminals
        self._host, self._port = host, port
        self._on_sent = on_sent
        order = sorted(terminals)
        self.real = set(order[:max_real])
        self.conns: dict[int, Conn] = {}
        self.gateways: list[Conn] = []
        self._muxed_online: set[int] = set()  # multiplexed terminals announced online
        self.halted = False
        self.unsent = 0  # dropped from the offline buffers by halt()
        muxed = len(order) - len(self.real)
        self._gateway_spec = (gateway_user, gateway_password, run_id, gateways if muxed else 0)

    def _conn(self, client_id: str, user: str, password: str, max_inflight: int = 20) -> Conn:
        return Conn(
            client_id=client_id, username=user, password=password, host=self._host,
            port=self._port, stats=self.stats, on_sent=self._on_sent, jitter=self._jitter,
            max_inflight=max_inflight, tls=self._tls(user) if self._tls is not None else None,
        )  # fmt: skip

    async def start(self, stop: asyncio.Event | None = None) -> None:
        """Connect the gateways (if any terminal is multiplexed); returns early on ``stop``."""
        user, password, run_id, count = self._gateway_spec
        for g in range(count):
            conn = self._conn(f"posflow-gw-{run_id}-{g}", user, password, max_inflight=1000)
            conn.connect()
            self.gateways.append(conn)
        deadline = time.monotonic() + 10
        while self.gateways and not all(g.ready for g in self.gateways):
            if stop is not None and stop.is_set():
                return
            if time.monotonic() > deadline:
                raise ConnectionError("gateway connections not accepted within 10 s")
            await asyncio.sleep(0.05)

    def send(self, msg: Message) -> None:
        if self.halted:
            self.unsent += 1
            return
        i = msg.terminal
        if i not in self.real:
            if msg.is_will:
                self.stats.wills += 1
                self._muxed_online.discard(i)
            elif msg.will is not None:
                self._muxed_online.add(i)
            self.gateways[i % len(self.gateways)].send(msg)
            return
        conn = self.conns.get(i)
        if conn is None:
            client_id, user, password = self._terminals[i]
            conn = self._conn(client_id, user, password)
            self.conns[i] = conn
        if msg.is_will:
            # The broker publishes the will registered at connect (these very bytes), but
            # only for a connection it has: a terminal that never got through sends none.
            if conn.ready:
                self.stats.wills += 1
                conn.drop()
                self._on_sent(msg)
            else:
                conn.wanted = False
            return
        if msg.will is not None:  # online: (re)connect with the new will, then publish
            conn.send(msg)
            if not conn.ready:
                conn.connect(msg)
            return
        conn.send(msg)

    def connected(self) -> int:
        return sum(1 for c in self.conns.values() if c.ready) + sum(
            1 for g in self.gateways if g.ready
        )

    def terminals_connected(self) -> int:
        """Terminals online now: own connections up, plus multiplexed ones on a live gateway."""
        own = sum(1 for c in self.conns.values() if c.ready)
        if not self.gateways:
            return own
        up = len(self.gateways)
        return own + sum(1 for i in self._muxed_online if self.gateways[i % up].ready)

    def halt(self) -> None:
        """Stop: nothing more is handed to MQTT (buffered messages are dropped, counted in
        ``unsent``), no reconnects. What paho already holds still goes out until close()."""
        self.halted = True
        for conn in list(self.conns.values()) + self.gateways:
            self.unsent += conn.halt()

    def queued(self) -> int:
        return sum(len(c.pending) for c in self.conns.values()) + sum(
            len(g.pending) for g in self.gateways
        )

    def misc(self) -> None:
        for conn in list(self.conns.values()) + self.gateways:
            conn.misc()

    async def close(self) -> None:
        for conn in list(self.conns.values()) + self.gateways:
            await conn.close()
