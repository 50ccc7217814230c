"""The bridge's PUBLISH decoder agrees with paho's own encoder, byte for byte."""

from __future__ import annotations

from collections.abc import Callable

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest._mqtt import BufferedClient


def _capture(into: list[bytes]) -> Callable[..., MQTTErrorCode]:
    """Stands in for paho's outgoing queue: keeps the bytes instead of writing them."""

    def queue(
        _command: int, packet: bytes | bytearray, _mid: int, _qos: int, _info: object = None
    ) -> MQTTErrorCode:
        into.append(bytes(packet))
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    return queue


def _publish_packet(topic: str, payload: bytes, qos: int, mid: int, *, props: bool) -> bytes:
    """A PUBLISH as paho's own client would put it on the wire (MQTT 5)."""
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sent: list[bytes] = []
    sender._packet_queue = _capture(sent)  # type: ignore[method-assign]
    properties = None
    if props:
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.UserProperty = ("trace", "abc")
        properties.ContentType = "application/json"
    sender._sock = object()  # type: ignore[assignment] # "connected"; nothing is written to it
    message = mqtt.MQTTMessageInfo(mid)
    try:
        sender._send_publish(mid, topic.encode(), payload, qos, False, False, message, properties)
    finally:
        sender._sock = None
    return sent[0]


def _client_with(data: bytes) -> BufferedClient:
    client = BufferedClient(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, manual_ack=True)
    client._rbuf, client._rpos = data, 0
    return client


def _decode(data: bytes, limit: int = 1000) -> tuple[list[tuple[str, bytes, int, int]], int]:
    client = _client_with(data)
    got: list[tuple[str, bytes, int, int]] = []
    client.read_publishes(lambda t, p, q, m: got.append((t, p, q, m)), limit)
    return got, client.buffered()


@given(
    topic=st.text(min_size=1, max_size=80).filter(lambda t: "\x00" not in t),
    payload=st.binary(max_size=70_000),
    qos=st.sampled_from([0, 1]),
    mid=st.integers(1, 65535),
    props=st.booleans(),
)
def test_decoder_reads_what_paho_encodes(
    topic: str, payload: bytes, qos: int, mid: int, props: bool
) -> None:
    packet = _publish_packet(topic, payload, qos, mid, props=props)
    got, left = _decode(packet)
    assert got == [(topic, payload, qos, mid if qos else 0)]
    assert left == 0


def test_decoder_stops_at_an_incomplete_packet_and_leaves_it_for_paho() -> None:
    first = _publish_packet("pos/v1/M/T/telemetry", b"a" * 300, 1, 7, props=False)
    second = _publish_packet("pos/v1/M/T/telemetry", b"b" * 300, 1, 8, props=False)
    got, left = _decode(first + second[:-10])
    assert [m for *_, m in got] == [7]
    assert left == len(second) - 10


def test_decoder_stops_at_a_packet_that_is_not_a_publish() -> None:
    publish = _publish_packet("pos/v1/M/T/status", b"{}", 1, 3, props=False)
    pingresp = b"\xd0\x00"
    got, left = _decode(publish + pingresp + publish)
    assert [m for *_, m in got] == [3]
    assert left == len(pingresp) + len(publish)


def test_decoder_respects_the_limit_given_by_backpressure() -> None:
    packets = b"".join(
        _publish_packet("pos/v1/M/T/telemetry", b"x", 1, mid, props=False) for mid in range(1, 11)
    )
    got, _ = _decode(packets, limit=4)
    assert [m for *_, m in got] == [1, 2, 3, 4]


def test_decoder_waits_while_paho_is_inside_a_packet() -> None:
    client = _client_with(_publish_packet("t", b"x", 0, 0, props=False))
    client._in_packet["command"] = 0x32  # paho has read a header byte already
    assert client.read_publishes(lambda *_: None, 10) == 0


@pytest.mark.parametrize("mids", [[1], [1, 2, 65535]])
def test_pubacks_for_a_burst_are_one_write_of_success_pubacks(mids: list[int]) -> None:
    client = BufferedClient(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, manual_ack=True)
    queued: list[bytes] = []
    client._packet_queue = _capture(queued)  # type: ignore[method-assign]
    client.send_pubacks(mids)
    # MQTT 5.0 3.4.2.1: reason code and properties may be omitted when the reason is success.
    assert queued == [b"".join(b"\x40\x02" + m.to_bytes(2, "big") for m in mids)]
