"""Terminal identity over TLS, on a real Mosquitto of this test's own.

The broker is started the way ``posflow stack up mosquitto`` starts it, in a
temporary stack directory on free loopback ports, so the shared broker on 11883
is never touched; it is stopped at the end.
"""

from __future__ import annotations

import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from posflow.security.pki import Pki
from posflow.settings import MosquittoSettings, SecuritySettings, Settings, StackSettings
from posflow.stack import Stack
from posflow.stack._process import port_answers
from posflow.stack.mosquitto import MosquittoService
from tests.conftest import free_port, unique
from tests.integration.conftest import stop_own_mosquitto

# MQTT 3.1.1 CONNECT: clean session, keep-alive 30 s, empty client id.
_CONNECT = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 0])
_CONNACK_OK = bytes([0x20, 2, 0, 0])


@dataclass
class Broker:
    settings: Settings
    service: MosquittoService
    pki: Pki

    @property
    def tls_port(self) -> int:
        return self.settings.mosquitto.tls_port


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    tmp = Path(tempfile.mkdtemp(prefix="posflow-sec-"))
    tmp.chmod(0o755)  # the broker drops to the mosquitto account when started by root
    settings = Settings(
        stack=StackSettings(dir=tmp, install=False),
        mosquitto=MosquittoSettings(port=free_port(), tls_port=free_port()),
    )
    # `posflow stack up mosquitto`'s own path: configure (CA, broker certificate, TLS
    # listener), check both ports are free, start, wait until a login works.
    stack = Stack(settings)
    stack.up(["mosquitto"])
    service = stack.mosquitto
    try:
        yield Broker(settings, service, Pki.from_settings(settings))
    finally:
        stop_own_mosquitto(stack, tmp)


def _tls_probe(broker: Broker, ctx: ssl.SSLContext) -> bytes:
    """Handshake, send CONNECT, return what the broker answered (raises on TLS refusal)."""
    with (
        socket.create_connection(("127.0.0.1", broker.tls_port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(_CONNECT)
        return tls.recv(4)


def _client_ctx(broker: Broker, name: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(broker.pki.ca_cert_path))
    ctx.load_cert_chain(str(broker.pki.cert_path(name)), str(broker.pki.key_path(name)))
    return ctx


def test_config_is_tls12_plus_with_identity_as_username(broker: Broker) -> None:
    conf = (broker.service.dir / "mosquitto.conf").read_text()
    assert f"listener {broker.tls_port} 127.0.0.1" in conf
    for line in (
        "tls_version tlsv1.2",
        "require_certificate true",
        "use_identity_as_username true",
    ):
        assert line in conf
    assert (broker.pki.ca_key_path.stat().st_mode & 0o777) == 0o600
    assert (broker.pki.server_key_path.stat().st_mode & 0o777) == 0o600
    assert (broker.service.tls_dir / "server.key").stat().st_mode & 0o077 == 0


def test_terminal_certificate_connects_and_key_is_private(broker: Broker) -> None:
    name = unique("T")
    record = broker.pki.issue(name)
    assert (broker.pki.key_path(name).stat().st_mode & 0o777) == 0o600
    assert record.name == name
    assert _tls_probe(broker, _client_ctx(broker, name)) == _CONNACK_OK


def test_plaintext_connection_to_tls_listener_is_refused(broker: Broker) -> None:
    with socket.create_connection(("127.0.0.1", broker.tls_port), timeout=5) as raw:
        raw.sendall(_CONNECT)
        try:
            answer = raw.recv(4)
        except ConnectionResetError:
            answer = b""
    assert answer != _CONNACK_OK
    assert not answer.startswith(b"\x20")  # no CONNACK of any kind


def test_no_client_certificate_is_refused(broker: Broker) -> None:
    ctx = ssl.create_default_context(cafile=str(broker.pki.ca_cert_path))
    try:
        answer = _tls_probe(broker, ctx)
    except (ssl.SSLError, ConnectionResetError):
        answer = b"refused in the handshake"
    # TLS 1.3 may report the broker's refusal as an empty read after the handshake.
    assert answer in (b"", b"refused in the handshake")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=str)
def test_tls_1_0_and_1_1_are_refused_by_the_broker(broker: Broker, version: ssl.TLSVersion) -> None:
    name = unique("T-old")
    broker.pki.issue(name)
    ctx = _client_ctx(broker, name)
    # Let this client offer the old protocol at all (OpenSSL 3 forbids it at level 1+),
    # so the refusal we see is the broker's protocol_version alert, not our own.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = version
    ctx.maximum_version = version
    with pytest.raises(ssl.SSLError, match="TLSV1_ALERT_PROTOCOL_VERSION"):
        _tls_probe(broker, ctx)


def test_tls_1_2_is_accepted(broker: Broker) -> None:
    name = unique("T-12")
    broker.pki.issue(name)
    ctx = _client_ctx(broker, name)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    assert _tls_probe(broker, ctx) == _CONNACK_OK


def _mqtt_tls_client(broker: Broker, name: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("c"), protocol=mqtt.MQTTv5)
    client.tls_set(
        ca_certs=str(broker.pki.ca_cert_path),
        certfile=str(broker.pki.cert_path(name)),
        keyfile=str(broker.pki.key_path(name)),
    )
    return client


def test_terminal_a_cannot_publish_under_terminal_b(broker: Broker) -> None:
    term_a, term_b, merchant = unique("TA"), unique("TB"), unique("M")
    broker.pki.issue(term_a)
    m = broker.settings.mosquitto
    received: list[tuple[str, bytes]] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("svc"), protocol=mqtt.MQTTv5)
    sub.username_pw_set(m.service_user, m.service_password.get_secret_value())
    sub.on_message = lambda _c, _u, msg: received.append((msg.topic, bytes(msg.payload)))
    sub.connect("127.0.0.1", m.port)
    sub.subscribe(f"pos/v1/{merchant}/#", qos=1)
    sub.loop_start()
    acks: dict[int, int] = {}
    pub = _mqtt_tls_client(broker, term_a)
    pub.on_publish = lambda _c, _u, mid, reason, _p: acks.__setitem__(mid, reason.value)
    pub.connect("127.0.0.1", broker.tls_port)
    pub.loop_start()
    try:
        time.sleep(0.3)  # the subscription is in place
        forged = pub.publish(f"pos/v1/{merchant}/{term_b}/telemetry", b"forged", qos=1)
        own = pub.publish(f"pos/v1/{merchant}/{term_a}/telemetry", b"own", qos=1)
        deadline = time.monotonic() + 5
        while (len(acks) < 2 or not received) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        pub.loop_stop()
        pub.disconnect()
        sub.loop_stop()
        sub.disconnect()
    # Messages of one connection arrive in order: the forged one, sent first, never came.
    assert received == [(f"pos/v1/{merchant}/{term_a}/telemetry", b"own")]
    assert acks[own.mid] == 0
    assert acks[forged.mid] == 0x87  # MQTT v5 PUBACK: Not authorized


def test_revoked_certificate_is_refused_after_sighup(broker: Broker) -> None:
    name = unique("T-rev")
    broker.pki.issue(name)
    # Keep the terminal's files: a stolen device still holds its key after revocation.
    ctx = _client_ctx(broker, name)
    assert _tls_probe(broker, ctx) == _CONNACK_OK
    revoked = broker.pki.revoke(name, reason="device stolen")
    assert [r.status for r in revoked] == ["revoked"]
    assert int(revoked[0].serial, 16) in broker.pki.revoked_serials()
    broker.service.install_tls_files()
    # Mosquitto reads the CRL file at listener start and on SIGHUP only, not per connection.
    assert _tls_probe(broker, ctx) == _CONNACK_OK
    broker.service.process.reload()
    deadline = time.monotonic() + 5
    refused: Exception | None = None
    while refused is None and time.monotonic() < deadline:
        try:
            _tls_probe(broker, ctx)
            time.sleep(0.1)
        except ssl.SSLError as exc:
            refused = exc
    assert refused is not None
    if "CERTIFICATE_REVOKED" not in str(refused):
        # TLS 1.3 verifies the client certificate after the client's handshake ends: on a
        # busy machine the broker's alert can lose the race with its close, seen as EOF.
        assert isinstance(refused, ssl.SSLEOFError), refused
        for _ in range(3):
            with pytest.raises(ssl.SSLError):
                _tls_probe(broker, ctx)
        other = unique("T-ok")
        broker.pki.issue(other)
        assert _tls_probe(broker, _client_ctx(broker, other)) == _CONNACK_OK
    # Other terminals are unaffected, and the password listener still works.
    other = unique("T-ok")
    broker.pki.issue(other)
    assert _tls_probe(broker, _client_ctx(broker, other)) == _CONNACK_OK
    assert broker.service.ready()


def test_production_layout_has_no_password_listener_and_services_use_certificates() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="posflow-sec-prod-"))
    tmp.chmod(0o755)
    settings = Settings(
        stack=StackSettings(dir=tmp, install=False),
        mosquitto=MosquittoSettings(port=free_port(), tls_port=free_port()),
        security=SecuritySettings(mqtt_password_auth=False),
    )
    stack = Stack(settings)
    stack.up(["mosquitto"])
    try:
        m = settings.mosquitto
        assert not port_answers("127.0.0.1", m.port)  # no password listener at all
        assert "password_file" not in (stack.mosquitto.dir / "mosquitto.conf").read_text()
        broker = Broker(settings, stack.mosquitto, Pki.from_settings(settings))
        broker.pki.issue(m.service_user, kind="service")
        terminal, merchant = unique("T"), unique("M")
        broker.pki.issue(terminal)
        received: list[str] = []
        sub = _mqtt_tls_client(broker, m.service_user)  # the service account's certificate
        sub.on_message = lambda _c, _u, msg: received.append(msg.topic)
        sub.connect("127.0.0.1", m.tls_port)
        sub.subscribe(f"pos/v1/{merchant}/#", qos=1)
        sub.loop_start()
        pub = _mqtt_tls_client(broker, terminal)
        pub.connect("127.0.0.1", m.tls_port)
        pub.loop_start()
        try:
            time.sleep(0.3)
            pub.publish(f"pos/v1/{merchant}/{terminal}/status", b"online", qos=1)
            deadline = time.monotonic() + 5
            while not received and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            for client in (pub, sub):
                client.loop_stop()
                client.disconnect()
        assert received == [f"pos/v1/{merchant}/{terminal}/status"]
    finally:
        stop_own_mosquitto(stack, tmp)
