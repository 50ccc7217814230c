"""A paho-mqtt client that reads and writes in batches (the bridge and the simulator).

paho reads every packet with up to three ``recv`` calls (command byte, length bytes,
body). :class:`BufferedReads` serves those reads from 64 KiB chunks, so one system
call brings hundreds of packets: PUBLISHes for the ingest bridge (ingest/_mqtt.py adds
its PUBLISH fast path on top), PUBACKs for the simulator's connections.

A fast path for PUBACK too: paho builds a properties object and a reason-code object
for each (tens of microseconds); :meth:`BufferedReads.read_pubacks` takes the complete
PUBACKs at the head of the buffer directly and does what paho's handler does with them
(the message leaves the in-flight table, its info is marked published). Any other
packet, and one split across reads, still goes through paho.

And a batch of PUBLISHes in one write: :meth:`BufferedReads.publish_batch` puts each
QoS 1 message in paho's in-flight table (so PUBACKs, resends after a reconnect and the
keep-alive work as with paho's ``publish``) and queues all their packets as one write,
instead of paho's packet object, info object and ``send`` call per message.

Whoever drives it from an event loop reads until :meth:`BufferedReads.buffered` is 0:
bytes already in the buffer make the socket no more readable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.client import PUBLISH

__all__ = ["BufferedReads"]

_CHUNK = 65_536
_PUBACK = 0x40  # fixed header byte of a PUBACK (MQTT 3.1.1 and 5.0)


class BufferedReads(mqtt.Client):
    """A paho client whose socket reads come from a 64 KiB buffer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        # The last read took less than a chunk: the socket had nothing more then.
        self.drained = False

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            chunk = super()._sock_recv(_CHUNK)  # BlockingIOError when nothing is there
            if not chunk:
                return b""  # the broker closed the connection
            self._rbuf, self._rpos = chunk, 0
        end = min(self._rpos + bufsize, len(self._rbuf))
        data = self._rbuf[self._rpos : end]
        self._rpos = end
        return data

    def buffered(self) -> int:
        """Bytes received from the socket and not yet parsed."""
        return len(self._rbuf) - self._rpos

    def drop_buffer(self) -> None:
        """Forget what was read (the socket it came from is closed)."""
        self._rbuf, self._rpos = b"", 0

    def fill(self) -> bool:
        """Make sure there are bytes to parse: True when the buffer holds some (already,
        or read now); False when the socket has nothing yet, or closed (paho has then
        read the close and reported it)."""
        if self._rpos < len(self._rbuf):
            return True
        if self._sock is None:
            return False
        try:
            chunk = super()._sock_recv(_CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            self.loop_read()  # paho reads the close (or the error) itself and reports it
            return False
        self._rbuf, self._rpos = chunk, 0
        self.drained = len(chunk) < _CHUNK
        return True

    def read_pubacks(self, acked: Callable[[int], None]) -> int:
        """Take the complete PUBACKs at the head of the buffer; ``acked(mid)`` for each
        message of ours it acknowledges. Returns how many PUBACKs were taken."""
        if self._in_packet["command"] != 0:
            return 0  # paho is in the middle of a packet
        buf, pos, end = self._rbuf, self._rpos, len(self._rbuf)
        mids: list[int] = []
        while pos + 4 <= end and buf[pos] == _PUBACK:
            length = buf[pos + 1]
            if length < 2 or length & 0x80 or pos + 2 + length > end:
                break  # not a plain PUBACK, or incomplete: paho reads it
            mids.append((buf[pos + 2] << 8) | buf[pos + 3])
            pos += 2 + length
        if not mids:
            return 0
        self._rpos = pos
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()  # the keep-alive's clock
        with self._out_message_mutex:
            for mid in mids:
                msg = self._out_messages.pop(mid, None)
                if msg is None:
                    continue  # not (or no longer) ours to acknowledge
                msg.info._set_as_published()  # what paho's own handler does
                if msg.qos > 0:
                    self._inflight_messages -= 1
                acked(mid)
        return len(mids)

    def publish_batch(self, messages: Sequence[tuple[str, bytes, int, bool]]) -> bool:
        """Publish ``(topic, payload, qos, retain)`` messages, QoS 0 or 1, in one write
        (MQTT 3.1.1). False, and nothing queued, when not connected (as paho's
        ``MQTT_ERR_NO_CONN``) or on MQTT 5 (use ``publish``)."""
        if self._sock is None or self._protocol == mqtt.MQTTv5 or not messages:
            return False
        now = mqtt.time_func()
        parts: list[bytes] = []
        with self._out_message_mutex:
            for topic, payload, qos, retain in messages:
                name = topic.encode()
                mid = b""
                if qos:
                    message = mqtt.MQTTMessage(self._mid_generate(), name)
                    message.payload, message.qos, message.retain = payload, qos, retain
                    message.timestamp = now
                    message.state = mqtt.mqtt_ms_wait_for_puback
                    self._out_messages[message.mid] = message
                    self._inflight_messages += 1
                    mid = message.mid.to_bytes(2, "big")
                size = 2 + len(name) + len(mid) + len(payload)
                parts += (bytes((PUBLISH | qos << 1 | retain,)), _varint(size),
                          len(name).to_bytes(2, "big"), name, mid, payload)  # fmt: skip
        # One out-packet for all (qos 1 in paho's terms: no per-packet callback).
        self._packet_queue(PUBLISH, b"".join(parts), 0, 1)
        return True


def _varint(value: int) -> bytes:
    """MQTT's variable byte integer (remaining length)."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)
