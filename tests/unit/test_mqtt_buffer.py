"""The core's buffered paho client: PUBACKs taken from the buffer do what paho's do."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, _ConnectionState

from posflow.mqtt import BufferedReads


@pytest.fixture
def connected() -> Iterator[tuple[BufferedReads, socket.socket]]:
    """A client "connected" over a socket pair: what it writes, the broker end reads."""
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    client = BufferedReads(CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(0)
    client._sock = ours
    client._state = _ConnectionState.MQTT_CS_CONNECTED
    yield client, broker
    client._sock = None
    ours.close()
    broker.close()


def _puback(mid: int) -> bytes:
    return b"\x40\x02" + mid.to_bytes(2, "big")


def test_pubacks_at_the_head_of_the_buffer_release_their_messages_like_paho(
    connected: tuple[BufferedReads, socket.socket],
) -> None:
    client, broker = connected
    infos = [client.publish(f"pos/v1/m/t/{i}", b"{}", qos=1) for i in range(4)]
    mids = [info.mid for info in infos]
    # Three PUBACKs, one for a message that is not ours, then a PINGRESP for paho.
    broker.sendall(_puback(mids[0]) + _puback(mids[2]) + _puback(60_000) + b"\xd0\x00")
    acked: list[int] = []

    assert client.fill()
    assert client.read_pubacks(acked.append) == 3
    assert acked == [mids[0], mids[2]]
    assert [info.is_published() for info in infos] == [True, False, True, False]
    assert sorted(client._out_messages) == [mids[1], mids[3]]
    assert client._inflight_messages == 2
    assert client.buffered() == 2  # the PINGRESP is left for paho
    assert client.read_pubacks(acked.append) == 0


def test_a_split_puback_waits_for_its_rest_and_a_closed_socket_reaches_paho(
    connected: tuple[BufferedReads, socket.socket],
) -> None:
    client, broker = connected
    info = client.publish("pos/v1/m/t/telemetry", b"{}", qos=1)
    disconnects: list[object] = []
    client.on_disconnect = lambda *args: disconnects.append(args)
    broker.sendall(_puback(info.mid)[:3])
    acked: list[int] = []

    assert client.fill()
    assert client.read_pubacks(acked.append) == 0  # incomplete: nothing taken
    assert client.buffered() == 3
    client.drop_buffer()
    assert not client.fill()  # nothing waiting on the socket
    broker.close()
    assert not client.fill()  # the close: paho read it and reported it
    assert disconnects
