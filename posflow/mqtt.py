"""A paho-mqtt client whose socket reads come from a 64 KiB buffer.

paho reads every packet with up to three ``recv`` calls (command byte, length bytes,
body). :class:`BufferedReads` serves those reads from 64 KiB chunks, so one system
call brings hundreds of packets: PUBLISHes for the ingest bridge (ingest/_mqtt.py adds
its PUBLISH fast path on top), PUBACKs for the simulator's connections.

Whoever drives it from an event loop reads until :meth:`BufferedReads.buffered` is 0:
bytes already in the buffer make the socket no more readable.
"""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as mqtt

__all__ = ["BufferedReads"]

_CHUNK = 65_536


class BufferedReads(mqtt.Client):
    """A paho client whose socket reads come from a 64 KiB buffer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0

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
