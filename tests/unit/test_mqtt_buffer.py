"""The core's batching paho client: PUBACKs taken from the buffer do what paho's do, and
a batch of PUBLISHes is what paho's publish() writes, in one write."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, _ConnectionState

from posflow.mqtt import BufferedReads


def _pair(cls: type[mqtt.Client]) -> tuple[mqtt.Client, socket.socket, socket.socket]:
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    client = cls(CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(0)
    client._sock = ours
    client._state = _ConnectionState.MQTT_CS_CONNECTED
    return client, ours, broker


@pytest.fixture
def connected() -> Iterator[tuple[BufferedReads, socket.socket]]:
    """A client "connected" over a socket pair: what it writes, the broker end reads."""
    client, ours, broker = _pair(BufferedReads)
    assert isinstance(client, BufferedReads)
    yield client, broker
    client._sock = None
    ours.close()
    broker.close()


def _received(broker: socket.socket) -> bytes:
    broker.settimeout(1)
    return broker.recv(1 << 20)


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


def test_a_publish_batch_writes_what_paho_publish_writes_and_keeps_them_in_flight(
    connected: tuple[BufferedReads, socket.socket],
) -> None:
    client, broker = connected
    batch = [
        ("pos/v1/m-1/t-1/telemetry", b'{"seq":1}', 1, False),
        ("pos/v1/m-1/t-1/status", b'{"state":"online"}', 1, True),
        ("pos/v1/m-1/t-1/telemetry", b"x" * 300, 0, False),  # a two-byte remaining length
    ]
    reference, ours, other_end = _pair(mqtt.Client)
    try:
        for topic, payload, qos, retain in batch:
            reference.publish(topic, payload, qos=qos, retain=retain)
        want = _received(other_end)
    finally:
        reference._sock = None
        ours.close()
        other_end.close()

    assert client.publish_batch(batch)
    assert _received(broker) == want  # the same bytes, packet ids included
    in_flight = client._out_messages
    assert [(m.mid, m.topic, m.payload, m.retain) for m in in_flight.values()] == [
        (1, "pos/v1/m-1/t-1/telemetry", b'{"seq":1}', False),
        (2, "pos/v1/m-1/t-1/status", b'{"state":"online"}', True),
    ]
    assert client._inflight_messages == 2
    broker.sendall(_puback(1) + _puback(2))
    acked: list[int] = []
    assert client.fill()
    assert client.read_pubacks(acked.append) == 2
    assert acked == [1, 2]
    assert not client._out_messages


def test_a_publish_batch_without_a_connection_queues_nothing() -> None:
    client = BufferedReads(CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv311)
    assert not client.publish_batch([("pos/v1/m/t/telemetry", b"{}", 1, False)])
    assert not client._out_messages
