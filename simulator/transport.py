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

What it costs per message is kept small: :meth:`Fanout.send_many` routes a whole step's
messages first and then writes each connection's share at once (a gateway's in one
TCP write), and the keep-alive bookkeeping visits a slice of the connections
per call instead of all of them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable, Iterable

from simulator.connection import Conn, TransportStats
from simulator.engine import Message

__all__ = ["Conn", "Fanout", "TransportStats"]

log = logging.getLogger("posflow.simulator")

# Fanout.misc() looks at every connection's keep-alive once in this many calls: with a
# call every 2 s, every 16 s, far inside the 120 s keep-alive (and the broker's 1.5x).
_MISC_ROUNDS = 8


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
        self._every: list[Conn] = []  # every connection made, in order (for misc())
        self._misc_turn = 0
        self._muxed_online: set[int] = set()  # multiplexed terminals announced online
        self.halted = False
        self.unsent = 0  # dropped from the offline buffers by halt()
        muxed = len(order) - len(self.real)
        self._gateway_spec = (gateway_user, gateway_password, run_id, gateways if muxed else 0)

    def _conn(self, client_id: str, user: str, password: str, max_inflight: int = 20) -> Conn:
        conn = Conn(
            client_id=client_id, username=user, password=password, host=self._host,
            port=self._port, stats=self.stats, on_sent=self._on_sent, jitter=self._jitter,
            max_inflight=max_inflight, tls=self._tls(user) if self._tls is not None else None,
        )  # fmt: skip
        self._every.append(conn)
        return conn

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
        """Hand one message to its connection now."""
        self.send_many((msg,))

    def send_many(self, messages: Iterable[Message]) -> None:
        """Hand a batch to the connections: each connection's share goes out together."""
        touched: dict[int, Conn] = {}
        for msg in messages:
            conn = self._route(msg)
            if conn is not None:
                touched[id(conn)] = conn
        for conn in touched.values():
            if conn.ready:
                conn.flush()

    def _route(self, msg: Message) -> Conn | None:
        """Queue ``msg`` on its connection; that connection, if it has something to write."""
        if self.halted:
            self.unsent += 1
            return None
        i = msg.terminal
        if i not in self.real:
            if msg.is_will:
                self.stats.wills += 1
                self._muxed_online.discard(i)
            elif msg.will is not None:
                self._muxed_online.add(i)
            gateway = self.gateways[i % len(self.gateways)]
            gateway.send(msg, flush=False)
            return gateway
        conn = self.conns.get(i)
        if conn is None:
            client_id, user, password = self._terminals[i]
            conn = self._conn(client_id, user, password)
            self.conns[i] = conn
        if msg.is_will:
            # The broker publishes the will registered at connect (these very bytes), but
            # only for a connection it has: a terminal that never got through sends none.
            if conn.ready:
                conn.flush()  # what it sent before going away is written first
                self.stats.wills += 1
                conn.drop()
                self._on_sent(msg)
            else:
                conn.wanted = False
            return None
        conn.send(msg, flush=False)
        if msg.will is not None and not conn.ready:  # online: (re)connect with the new will
            conn.connect(msg)
        return conn

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
        """Keep-alive bookkeeping for one slice of the connections (each connection once in
        ``_MISC_ROUNDS`` calls); the gateways, few and busy, every call."""
        turn = self._misc_turn = (self._misc_turn + 1) % _MISC_ROUNDS
        for conn in self._every[turn::_MISC_ROUNDS]:
            conn.misc()
        for gateway in self.gateways:
            gateway.misc()

    async def close(self) -> None:
        for conn in list(self.conns.values()) + self.gateways:
            await conn.close()
