"""One MQTT connection of the simulator on the running asyncio loop (paho-mqtt's
external-loop API), and the statistics every connection of a run adds to.

A connection writes what is queued when asked (:meth:`Conn.flush`), all of it in one
write (``publish_batch``, posflow/mqtt.py), at most ``max_inflight`` unacknowledged:
the window is kept here, as paho's own walks every message in flight on each PUBACK.
Reads are driven by the loop (``add_reader``) from a 64 KiB buffer, PUBACKs taken
straight from it (``read_pubacks``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from posflow.mqtt import BufferedReads
from posflow.runtime import Backoff
from simulator.engine import Message

__all__ = ["Conn", "TransportStats"]

_READS_PER_WAKEUP = 16  # 64 KiB each


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
        c = BufferedReads(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        if tls is not None:
            c.tls_set_context(tls)  # the certificate's common name is the MQTT username
        else:
            c.username_pw_set(username, password)
        c.max_inflight_messages_set(0)  # the window is ours: see flush()
        c.max_queued_messages_set(0)
        c.on_socket_open = self._sock_open
        c.on_socket_close = self._sock_close
        c.on_connect = self._connected
        c.on_disconnect = self._disconnected
        c.on_publish = self._acked
        self.client = c
        self.pending: deque[Message] = deque()
        self.inflight = 0
        self.max_inflight = max_inflight
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
        self.client.drop_buffer()
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

    def _acked(self, _c: mqtt.Client, _u: object, mid: int, _r: object, _p: object) -> None:
        self._acked_mid(mid)

    def _acked_mid(self, _mid: int) -> None:
        self.stats.acked += 1
        self.inflight -= 1

    # --- I/O ------------------------------------------------------------------------------

    def _readable(self) -> None:
        client = self.client
        # PUBACKs straight from the buffer; anything else (CONNACK, PINGRESP, a packet
        # split across reads) through paho. Bounded: a busy gateway does not starve the rest.
        for _ in range(_READS_PER_WAKEUP):
            if self._sock is None or not client.fill():
                break
            client.read_pubacks(self._acked_mid)
            if client.buffered():
                client.loop_read()
            elif client.drained:  # the socket had no more: the loop calls again if it gets some
                break
        if self.pending and self.ready:  # acknowledgements opened the window
            self.flush()

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

    def send(self, msg: Message, *, flush: bool = True) -> None:
        """Queue ``msg``; write it now when connected, unless ``flush`` is False (the
        caller flushes after queueing the rest of its batch)."""
        self.pending.append(msg)
        if flush and self.ready:
            self.flush()

    def flush(self) -> None:
        """Publish what is queued, as far as the in-flight window allows, in one write."""
        room = self.max_inflight - self.inflight
        if self.pending and self.ready and room > 0:
            pending = self.pending
            batch = [pending.popleft() for _ in range(min(room, len(pending)))]
            if self.client.publish_batch([(m.topic, m.payload, m.qos, m.retain) for m in batch]):
                self.stats.published += len(batch)
                for msg in batch:
                    self.inflight += msg.qos > 0
                    self._on_sent(msg)
            else:  # the socket went away meanwhile: they wait for the reconnect
                pending.extendleft(reversed(batch))
                self.stats.error(f"publish rc {mqtt.MQTT_ERR_NO_CONN}")
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
