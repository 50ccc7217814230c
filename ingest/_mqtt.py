"""paho-mqtt driven by the asyncio loop, reading the socket in large chunks.

Two things make a bridge process fast enough for tens of thousands of
messages a second on two cores:

* **One thread.** paho's own network thread and an asyncio loop in another
  thread fight over the GIL and wake each other through a socket pair on every
  acknowledgement. paho's documented external-loop API (``loop_read``,
  ``loop_write``, ``loop_misc`` and the socket callbacks) lets the asyncio loop
  drive it instead.
* **Buffered reads.** paho reads every packet with up to three ``recv`` calls
  (command byte, length bytes, body). :class:`BufferedClient` serves those
  reads from 64 KiB chunks, so one system call brings hundreds of messages.
* **A fast path for PUBLISH.** paho builds a message object, a properties
  object and a log line for every PUBLISH. :meth:`BufferedClient.read_publishes`
  decodes the complete PUBLISH packets at the head of the buffer directly
  (MQTT 5.0 section 3.3) and hands topic, payload, QoS and packet id to the
  caller; every other packet, and a PUBLISH split across reads, still goes
  through paho. Acknowledgements go out as one write per burst
  (:meth:`BufferedClient.send_pubacks`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.client import PUBACK

from posflow.mqtt import BufferedReads
from posflow.runtime import Backoff

__all__ = ["BufferedClient", "LoopDriver"]

log = logging.getLogger("posflow.ingest")

_PUBLISH = 3

# (topic, payload, qos, packet id): what the bridge needs of a PUBLISH.
PublishHandler = Callable[[str, bytes, int, int], None]


class BufferedClient(BufferedReads):
    """A paho client with buffered reads (posflow.mqtt) and a fast path for PUBLISH."""

    def read_publishes(self, handler: PublishHandler, limit: int) -> int:
        """Decode up to ``limit`` complete PUBLISH packets from the buffer; returns how many.

        Stops at the first packet that is not a PUBLISH or not complete yet: paho
        reads that one. Properties are skipped: the bridge sets no topic alias
        maximum, so the broker sends none it would have to resolve.
        """
        if self._in_packet["command"] != 0:
            return 0  # paho is in the middle of a packet
        buf, pos, end = self._rbuf, self._rpos, len(self._rbuf)
        count = 0
        while count < limit and pos < end:
            header = buf[pos]
            if header >> 4 != _PUBLISH:
                break
            length, i = _varint(buf, pos + 1, end)
            if length < 0 or i + length > end:
                break  # incomplete (or malformed: paho reports it)
            body_end = i + length
            qos = (header >> 1) & 3
            topic_len = (buf[i] << 8) | buf[i + 1]
            j = i + 2 + topic_len
            topic = buf[i + 2 : j].decode("utf-8", errors="replace")
            mid = 0
            if qos:
                mid = (buf[j] << 8) | buf[j + 1]
                j += 2
            props_len, j = _varint(buf, j, body_end)
            handler(topic, buf[j + props_len : body_end], qos, mid)
            pos = body_end
            count += 1
        self._rpos = pos
        return count

    def send_pubacks(self, mids: Iterable[int]) -> None:
        """Queue one write holding a PUBACK (reason: success) for each packet id."""
        blob = b"".join(b"\x40\x02" + mid.to_bytes(2, "big") for mid in mids)
        if blob:
            self._packet_queue(PUBACK, blob, 0, 0)


def _varint(buf: bytes, i: int, end: int) -> tuple[int, int]:
    """Decode an MQTT variable byte integer at ``i``: (value, next index); -1 if incomplete."""
    value, shift = 0, 0
    while i < end:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
        if shift > 21:
            return -1, i
    return -1, i


class LoopDriver:
    """Runs a :class:`BufferedClient` on the current asyncio loop.

    ``may_read`` is asked before each packet: returning False pauses reading
    (backpressure) until :meth:`resume` is called.
    """

    def __init__(
        self,
        client: BufferedClient,
        on_publish: PublishHandler,
        room: Callable[[], int],
        max_burst: int = 2_000,
    ) -> None:
        self.client = client
        self._on_publish = on_publish
        self._room = room
        self.loop = asyncio.get_running_loop()
        self._max_burst = max_burst
        self._sock: Any = None
        self._reading = False
        self._misc: asyncio.Task[None] | None = None
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write

    # paho's socket callbacks --------------------------------------------------------

    def _on_socket_open(self, _c: mqtt.Client, _u: object, sock: Any) -> None:
        self._sock = sock
        self.resume()

    def _on_socket_close(self, _c: mqtt.Client, _u: object, sock: Any) -> None:
        if self._reading:
            self.loop.remove_reader(sock)
            self._reading = False
        self.loop.remove_writer(sock)
        self._sock = None
        self.client.drop_buffer()

    def _on_register_write(self, _c: mqtt.Client, _u: object, sock: Any) -> None:
        self.loop.add_writer(sock, self._on_writable)

    def _on_unregister_write(self, _c: mqtt.Client, _u: object, sock: Any) -> None:
        self.loop.remove_writer(sock)

    # reading and writing --------------------------------------------------------------

    def _on_readable(self) -> None:
        client = self.client
        budget = self._max_burst
        while budget > 0:
            room = self._room()
            if room <= 0:
                self.pause()  # backpressure: the broker keeps the rest for our session
                return
            handled = client.read_publishes(self._on_publish, min(room, budget))
            budget -= handled
            if handled and client.buffered():
                continue
            # Empty buffer, or a packet for paho: one packet through paho (refills the buffer).
            if client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                return
            budget -= 1
            if client.buffered() == 0:
                return

    def _on_writable(self) -> None:
        self.client.loop_write()

    def pause(self) -> None:
        if self._reading and self._sock is not None:
            self.loop.remove_reader(self._sock)
        self._reading = False

    def resume(self) -> None:
        if not self._reading and self._sock is not None:
            self.loop.add_reader(self._sock, self._on_readable)
            self._reading = True
            if self.client.buffered():
                # Bytes already read from the socket would not wake the reader.
                self.loop.call_soon(self._on_readable)

    # keepalive and reconnects ------------------------------------------------------------

    def start(self) -> None:
        self._misc = asyncio.create_task(self._misc_loop())

    async def _misc_loop(self) -> None:
        backoff = Backoff(first=1.0, cap=30.0)
        while True:
            await asyncio.sleep(1.0)
            if self.client.loop_misc() == mqtt.MQTT_ERR_NO_CONN:
                try:
                    self.client.reconnect()
                    backoff.reset()
                except OSError as exc:
                    delay = backoff.next()
                    log.warning("MQTT reconnect failed (%s); next try in %.0f s", exc, delay)
                    await asyncio.sleep(delay)

    async def stop(self) -> None:
        if self._misc is not None:
            self._misc.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._misc
