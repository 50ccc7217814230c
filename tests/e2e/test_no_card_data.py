"""Issue 10: after a simulated run with card-number injections, no card number anywhere.

A 20-terminal fleet runs ten simulated minutes at 40x speed over real MQTT
connections (each terminal its own account) with the ``card_numbers.yaml``
scenario: broken apps put card numbers in the card token, some of those messages
are also malformed or sent twice. During the run the test publishes more card
numbers with a terminal's own account, in the places the simulator cannot reach: a
free-text field, a telemetry string, a status reason, a JSON key, a card-field key,
track 2 data, a JSON ``\\u`` escape, a broken JSON body, a body that is not UTF-8,
an oversize body and the MQTT topic itself.

The real pipeline runs as subprocesses on this test's own topics, groups, ports and
database: ``posflow ingest``, ``posflow streams worker``, ``posflow settlement
worker`` and ``posflow alerts run``, each logging to a file. When they have
processed everything and stopped, the test scans every table of the database,
every Kafka topic of the run (the prefix's and the health worker's internal
topics), every service log and what the stack's own logs got during the run. The
scanner is :func:`posflow.contracts.find_card_data` applied to the text as stored,
to its JSON ``\\u`` escapes decoded, and to the dead letters' hex previews decoded;
the injected numbers are also searched for literally, digits only. The dead letters
must hold every injected message with exactly the redaction marks for what it
carried, so the test cannot pass because nothing arrived; and the scanners are
shown to find a card number planted in a real table and a real topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from paho.mqtt.enums import CallbackAPIVersion
from psycopg import sql

from posflow.contracts import Reason, Rejected, find_card_data, luhn_valid, validate_message
from posflow.contracts.cardguard import PAN_MARK, REDACTED_MARK, TRACK_MARK
from posflow.settings import KafkaSettings, PostgresSettings, Settings
from posflow.stack import Stack, ensure_topics
from posflow.topics import TopicSpec
from simulator.accounting import parse_deadletter
from simulator.engine import Message, Run
from simulator.fleet import Fleet, build_fleet
from simulator.register import register_fleet
from simulator.runner import drive
from simulator.scenarios import load_scenario
from tests.conftest import ROOT, free_port, unique
from tests.unit import samples

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
TERMINALS = 20
DURATION_S = 600  # ten simulated minutes...
SPEED = 40  # ...in 15 wall seconds
# The simulator's card_number fault puts one of these in the card token (simulator/engine.py).
SIMULATOR_PANS = ("4111111111111111", "5555555555554444", "378282246310005")
_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")
_HEX_PREVIEW = re.compile(r"hex:((?:[0-9a-f]{2})(?::[0-9a-f]{2})*)")
_SERVICES = {
    # name: (argv, readiness path)
    "ingest": (["ingest"], "/readyz"),
    "streams": (["streams", "worker"], "/healthz"),
    "settlement": (["settlement", "worker"], "/readyz"),
    "alerts": (["alerts", "run"], "/readyz"),
    "rawsink": (["streams", "sink"], "/readyz"),  # telemetry + payments into their tables
    "api": (["api"], "/readyz"),  # the merchant feed reads what settlement wrote
}


# --- the scanner ---------------------------------------------------------------------------


def new_pan(length: int, first: str = "4") -> str:
    """A random card number of ``length`` digits that passes the Luhn check."""
    body = first + "".join(secrets.choice("0123456789") for _ in range(length - 2))
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


# Kafka's own log prints epoch milliseconds (lastModifiedTime=1795461267862): 13 digits, and
# one in ten passes the Luhn check. Within ten years of now such a number starts with 1 and
# is a timestamp; 13-digit card numbers are Visa's and start with 4.
_EPOCH_MS = re.compile(r"(?<![0-9])1[0-9]{12}(?![0-9])")


# Digests (ledger_entries.body_sha256) and bytea values in a row's text form are hex: a
# 64-character digest holds a Luhn-valid run of 13+ digits about one time in a hundred.
# bytea values are scanned as bytes on their own; the injected numbers are searched for
# digits-only in the text as stored, digests included.
# Alert ids are 24 lowercase hex characters of a sha256 (alerts/lifecycle.py): one with
# 12+ digits, a "d" and 4 digits reads as track 2 data about once in a few thousand ids
# (seen in CI: "db:public.alerts: track 2 data"). Lowercase 24+ runs are digests too;
# real track 2 data separates with "=" or an uppercase "D", which stay scanned.
_HEX_TOKEN = re.compile(
    r"(?<![0-9A-Za-z])(?:(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{32,}"
    r"|(?=[0-9a-f]*[a-f])[0-9a-f]{24,})(?![0-9A-Za-z])"
)
_BYTEA = re.compile(r"\\\\?x[0-9a-f]+")


def _letters(name: str) -> str:
    """A fleet name without digits: a random hex id of digits only, with a terminal's
    number after it ("58301872-000008"), can pass the Luhn check, and this run's topics
    also hold earlier runs' retained statuses, under their fleet names."""
    return name.translate(str.maketrans("0123456789", "ghijklmnop"))


def _noise_out(text: str) -> str:
    """``text`` without epoch milliseconds, hex digests and bytea hex."""
    now = time.time() * 1000
    ten_years = 10 * 365 * 86400 * 1000
    text = _EPOCH_MS.sub(
        lambda m: "<epoch-ms>" if abs(int(m.group()) - now) < ten_years else m.group(), text
    )
    return _HEX_TOKEN.sub("<hex>", _BYTEA.sub("<bytea>", text))


def _decodings(text: str) -> Iterator[str]:
    """``text`` as stored, then what a JSON parser or a hex preview's reader would see."""
    yield text
    if "\\u" in text:
        yield _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)
    for m in _HEX_PREVIEW.finditer(text):
        yield bytes.fromhex(m.group(1).replace(":", "")).decode("utf-8", "replace")


@dataclass
class Scan:
    """What a scan read, and every place it found card data (never the data itself)."""

    known: tuple[str, ...] = ()  # numbers the test injected: also searched for digits-only
    items: Counter[str] = field(default_factory=Counter)
    findings: list[str] = field(default_factory=list)

    def check(self, where: str, data: str | bytes | None) -> None:
        if data is None:
            return
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        self.items[where.split(":", 1)[0]] += 1
        for decoded in _decodings(text):
            found = find_card_data(_noise_out(decoded))
            if found is not None:
                self.findings.append(f"{where}: {found}")
                return
            digits = re.sub(r"[^0-9]", "", decoded)
            if any(pan in digits for pan in self.known):
                self.findings.append(f"{where}: an injected card number (digits only)")
                return


# TimescaleDB's own bookkeeping (job stats, invalidation logs of microsecond timestamps,
# chunk catalog): numbers it makes, never what a terminal sent. Its data schema,
# _timescaledb_internal (chunks, compressed chunks, aggregates' materialisations), IS
# scanned, besides every hypertable through its parent.
_NOT_DATA = (
    "pg_catalog",
    "information_schema",
    "_timescaledb_catalog",
    "_timescaledb_config",
    "_timescaledb_cache",
    "_timescaledb_functions",
    "_timescaledb_debug",
    "timescaledb_information",
    "timescaledb_experimental",
)


def scan_database(scan: Scan, pg: PostgresSettings) -> None:
    """Every row of every table (as its text form) and every bytea value, generically."""
    with psycopg.connect(pg.dsn()) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_type = 'BASE TABLE' AND NOT (table_schema = ANY(%s))"
            " ORDER BY 1, 2",
            [list(_NOT_DATA)],
        ).fetchall()
        timescale = conn.execute(
            "SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'"
        ).fetchone()
        if timescale:  # the scan still reaches the chunks where TimescaleDB keeps the rows
            assert any(schema == "_timescaledb_internal" for schema, _ in tables), tables
        for schema, table in tables:
            name = sql.Identifier(schema, table)
            for (row,) in conn.execute(sql.SQL("SELECT t::text FROM {} AS t").format(name)):
                scan.check(f"db:{schema}.{table}", row)
        binary = conn.execute(
            b"SELECT c.table_schema, c.table_name, c.column_name"
            b" FROM information_schema.columns c JOIN information_schema.tables t"
            b" USING (table_schema, table_name) WHERE t.table_type = 'BASE TABLE'"
            b" AND c.data_type = 'bytea'"
            b" AND NOT (c.table_schema = ANY(%s))",
            [list(_NOT_DATA)],
        ).fetchall()
        for schema, table, column in binary:
            query = sql.SQL("SELECT {} FROM {}").format(
                sql.Identifier(column), sql.Identifier(schema, table)
            )
            for (value,) in conn.execute(query):
                scan.check(f"db:{schema}.{table}.{column}", bytes(value) if value else None)


async def run_topics(kafka: KafkaSettings, prefixes: Iterable[str]) -> list[str]:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap)
    await consumer.start()
    try:
        names = await consumer.topics()
    finally:
        await consumer.stop()
    return sorted(t for t in names if any(t.startswith(p) for p in prefixes))


async def read_topics(kafka: KafkaSettings, topics: list[str]) -> dict[str, list[Any]]:
    """Every record of ``topics``, from the beginning to the end offsets of now."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 << 20,
    )
    await consumer.start()
    out: dict[str, list[Any]] = {t: [] for t in topics}
    try:
        await consumer._client.force_metadata_update()
        parts = [
            TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()
        ]
        if not parts:
            return out
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        todo = {tp for tp in parts if ends[tp] > 0}
        deadline = time.monotonic() + 30
        while todo and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for tp, records in batches.items():
                out[tp.topic].extend(records)
            todo = {tp for tp in todo if await consumer.position(tp) < ends[tp]}
        assert not todo, f"could not read to the end of {sorted(map(str, todo))} in 30 s"
    finally:
        await consumer.stop()
    return out


def scan_records(scan: Scan, records: dict[str, list[Any]]) -> None:
    for topic, rs in records.items():
        for r in rs:
            where = f"kafka:{topic}[{r.partition}]@{r.offset}"
            scan.check(f"{where} key", r.key)
            scan.check(f"{where} value", r.value)
            for name, value in r.headers or ():
                scan.check(f"{where} header", f"{name}={value.decode('utf-8', 'replace')}")


def scan_lines(scan: Scan, where: str, text: str) -> None:
    for n, line in enumerate(text.splitlines(), 1):
        scan.check(f"log:{where}:{n}", line)


def test_the_scanner_reports_a_card_number_wherever_the_pipeline_could_put_one() -> None:
    pan = new_pan(16)
    escaped = "".join(f"\\u{ord(c):04x}" for c in pan)
    hexed = "hex:" + f"x {pan} y".encode().hex(":")
    planted = {
        "plain": f'{{"note": "paid with {pan}"}}',
        "grouped": f"card {pan[:4]} {pan[4:8]} {pan[8:12]} {pan[12:]}",
        "escaped": f'{{"card_token": "{escaped}"}}',
        "hex preview": f'{{"payload_redacted": "{hexed}"}}',
        "row text": f'(1,"{{""merchant_id"": ""M-1"", ""x"": {pan}}}")',
    }
    for name, text in planted.items():
        scan = Scan()
        scan.check(f"scratch:{name}", text)
        assert scan.findings == [f"scratch:{name}: a 16-digit card number"], name
    # Epoch milliseconds (Kafka's log prints them) are not card numbers; a 13-digit Visa is.
    visa13 = new_pan(13)
    scan = Scan()
    ms = next(str(n) for n in range(int(time.time() * 1000), 1 << 62) if luhn_valid(str(n)))
    assert find_card_data(ms) == "a 13-digit card number"  # what the plain check says
    scan.check("scratch:ms", f"lastModifiedTime={ms}")
    scan.check("scratch:visa13", f"x={visa13}")
    assert scan.findings == ["scratch:visa13: a 13-digit card number"]
    # Nor are the digits of a hex digest or of a bytea value's text form.
    digest = next(
        d for n in range(10_000) if find_card_data(d := hashlib.sha256(str(n).encode()).hexdigest())
    )
    scan.check("scratch:digest", f'(1,T-1:00000001,{digest},"2026-11-23 19:20:01+00")')
    scan.check("scratch:bytea", f"(7,\\x{digest})")
    assert scan.findings == ["scratch:visa13: a 13-digit card number"]
    # A number the test injected is found even when something rewrote its separators.
    scan = Scan(known=(pan,))
    scan.check("scratch:mangled", f"{pan[:8]}/{pan[8:]}")
    assert scan.findings == ["scratch:mangled: an injected card number (digits only)"]
    # And the redacted forms are clean.
    scan = Scan(known=(pan,))
    for text in (PAN_MARK, TRACK_MARK, f'{{"cvv": "{REDACTED_MARK}"}}', "hex:5b:52:45"):
        scan.check("scratch:redacted", text)
    assert scan.findings == []


def test_a_card_number_in_the_topic_is_redacted_from_the_dead_letter_of_a_good_topic() -> None:
    # A terminal may publish under any merchant segment (the broker's ACL binds only its own
    # terminal id): the rejection shows that segment redacted, the terminal id as it is.
    pan = new_pan(16)
    result = validate_message(
        f"pos/v1/{pan}/T-0001/telemetry",
        samples.encode(samples.telemetry()),
        received_at=datetime.now(UTC),
        mqtt_mid=1,
    )
    assert isinstance(result, Rejected)
    assert result.dead_letter.reason is Reason.IDENTITY_MISMATCH
    assert result.dead_letter.original_topic == f"pos/v1/{PAN_MARK}/T-0001/telemetry"
    assert find_card_data(result.dead_letter.to_json().decode()) is None


# --- the pipeline ----------------------------------------------------------------------


class Pipeline:
    """Own topic prefix, database, groups, ports; each service a subprocess with a log file."""

    def __init__(self, settings: Settings, pg: PostgresSettings, logs: Path) -> None:
        self.run_id = secrets.token_hex(4)
        self.prefix = f"nocard{self.run_id}"
        self.app_id = f"posflow-health-nocard{self.run_id}"
        self.pg = pg
        self.logs = logs
        self.settings = settings.model_copy(
            update={
                "kafka": KafkaSettings(
                    **{**settings.kafka.model_dump(), "topic_prefix": self.prefix,
                       "default_partitions": 2}
                ),
                "postgres": pg,
            }
        )  # fmt: skip
        self.ports = {name: free_port() for name in _SERVICES}
        self.env = {
            **os.environ,
            "POSFLOW_KAFKA__TOPIC_PREFIX": self.prefix,
            "POSFLOW_KAFKA__DEFAULT_PARTITIONS": "2",
            "POSFLOW_POSTGRES__DATABASE": pg.database,
            "POSFLOW_INGEST__CLIENT_ID": unique("ingest-nocard"),
            "POSFLOW_INGEST__SHARE_GROUP": unique("nocard"),
            "POSFLOW_INGEST__SESSION_EXPIRY_S": "0",
            "POSFLOW_STREAMS__APP_ID": self.app_id,
            "POSFLOW_STREAMS__LOG_LEVEL": "info",
            "POSFLOW_SETTLEMENT__GROUP": unique("settlement-nocard"),
            "POSFLOW_ALERTS__GROUP": unique("alerts-nocard"),
            "POSFLOW_RAWSINK__GROUP": unique("rawsink-nocard"),
            "POSFLOW_ALERTS__TICK_S": "0.2",
            **{f"POSFLOW_SERVICES__{n.upper()}": str(p) for n, p in self.ports.items()},
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        for name, (argv, _path) in _SERVICES.items():
            with (self.logs / f"{name}.log").open("ab") as log:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "cli", *argv],
                    env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
        for name, (_argv, path) in _SERVICES.items():
            self._wait_ready(name, path, 90)

    def _wait_ready(self, name: str, path: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        url = f"http://127.0.0.1:{self.ports[name]}{path}"
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited:\n{self.log(name)[-3000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
            time.sleep(0.3)
        raise AssertionError(f"{name} not ready in {seconds:.0f} s:\n{self.log(name)[-3000:]}")

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def rows(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.pg.dsn()) as conn:
            return conn.execute(query.encode(), params).fetchall()

    def stop(self) -> dict[str, int | None]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                codes[name] = None
        return codes


@pytest.fixture
async def pipeline(
    settings: Settings, pg: PostgresSettings, stack: Stack, tmp_path: Path
) -> AsyncIterator[Pipeline]:
    p = Pipeline(settings, pg, tmp_path)
    scratch = TopicSpec(f"{p.prefix}.scratch", 1, {}, "a planted card number (scanner check)")
    await ensure_topics(p.settings, [scratch])
    yield p
    p.stop()
    # The run's topics go with it (the scratch one holds a planted test card number).
    topics = await run_topics(p.settings.kafka, [f"{p.prefix}.", p.app_id])
    admin = AIOKafkaAdminClient(bootstrap_servers=p.settings.kafka.bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(topics)
    finally:
        await admin.close()


# --- what the test injects itself ----------------------------------------------------------


@dataclass(frozen=True)
class Injection:
    """One message published with a terminal's own account, and what its dead letter must say."""

    tag: str  # also in the payload, to find its dead letter
    topic: str
    payload: bytes
    reason: str
    marks: dict[str, int]  # redaction marks its dead letter's preview must hold
    pans: tuple[str, ...]
    shown_topic: str  # the dead letter's original_topic and Kafka key


def injections(fleet: Fleet, index: int) -> list[Injection]:
    t = fleet.terminals[index]
    m, tid = t.merchant.merchant_id, t.terminal_id
    now = datetime.now(UTC).isoformat()
    seq = iter(range(1, 100))
    out: list[Injection] = []

    def add(kind: str, body: bytes | dict[str, Any], reason: str, marks: dict[str, int],
            *pans: str, topic: str | None = None) -> None:  # fmt: skip
        tag = f"inj{len(out)}x"
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        raw = raw.replace(b"@TAG@", tag.encode())
        own = f"pos/v1/{m}/{tid}/{kind}"
        shown = own if topic is None else topic.replace(pans[0], PAN_MARK)
        out.append(Injection(tag, topic or own, raw, reason, marks, pans, shown))

    ids = {"merchant_id": m, "terminal_id": tid, "ts": now}
    p = [new_pan(n, first) for n, first in ((16, "4"), (16, "5"), (15, "3"), (19, "6"))]
    more = [new_pan(16, "4") for _ in range(8)]
    # Free text in a payment: the decline code.
    add("txn", samples.txn(**ids, seq=next(seq), txn_id="@TAG@", status="declined",
                           decline_code=p[0]), "card_data", {PAN_MARK: 1}, p[0])  # fmt: skip
    # A telemetry string, dash-grouped, and track 2 data in another string.
    grouped = "-".join(p[1][i : i + 4] for i in range(0, 16, 4))
    add("telemetry", samples.telemetry(**ids, seq=next(seq), app_version=f"@TAG@ {grouped}"),
        "card_data", {PAN_MARK: 1}, p[1])  # fmt: skip
    add("telemetry", samples.telemetry(**ids, seq=next(seq),
                                       firmware_version=f"@TAG@;{more[0]}=29121011000012?"),
        "card_data", {TRACK_MARK: 1}, more[0])  # fmt: skip
    # A status reason, space-grouped (a 15-digit, 4-6-5 like an Amex).
    spaced = f"{p[2][:4]} {p[2][4:10]} {p[2][10:]}"
    add("status", samples.status(**ids, seq=next(seq), state="offline",
                                 reason=f"@TAG@ card {spaced} stuck"),
        "card_data", {PAN_MARK: 1}, p[2])  # fmt: skip
    # A JSON key that is a card number, and a card-number field next to a CVV.
    add("txn", {"@TAG@": 1, p[3]: "x", **ids}, "card_data", {PAN_MARK: 1}, p[3])
    add("txn", {"note": "@TAG@", "card_number": more[1], "cvv": "123", **ids},
        "card_data", {REDACTED_MARK: 2}, more[1])  # fmt: skip
    # The card token spelled with JSON \u escapes.
    escaped = "".join(f"\\u{ord(c):04x}" for c in more[2])
    body = json.dumps(samples.txn(**ids, seq=next(seq), txn_id="@TAG@", card_token="ESC"))
    add("txn", body.replace('"ESC"', f'"{escaped}"').encode(), "card_data", {PAN_MARK: 1},
        more[2])  # fmt: skip
    # Broken JSON, a body that is not UTF-8, a body over the size limit.
    add("txn", f'{{"note": "@TAG@", "card": "{more[3]}", "amount_minor": '.encode(),
        "card_data", {PAN_MARK: 1}, more[3])  # fmt: skip
    add("telemetry", b"\xff\xfe @TAG@ " + more[4].encode() + b" \xc3", "not_utf8",
        {PAN_MARK: 1}, more[4])  # fmt: skip
    add("telemetry", b'{"note": "@TAG@ ' + more[5].encode() + b'", "pad": "'
        + b"x" * 70_000 + b'"}', "oversize", {PAN_MARK: 1}, more[5])  # fmt: skip
    # The topic: a terminal may publish under any merchant segment (the ACL binds only its
    # own terminal id), so a broken app can put a card number there.
    add(
        "telemetry",
        samples.telemetry(**ids, seq=next(seq), app_version="@TAG@"),
        "identity_mismatch",
        {},
        more[6],
        topic=f"pos/v1/{more[6]}/{tid}/telemetry",
    )
    return out


def publish(settings: Settings, fleet: Fleet, index: int, items: list[Injection]) -> None:
    """Publish with the terminal's own account (QoS 1) and wait for every PUBACK."""
    t = fleet.terminals[index]
    m = settings.mosquitto
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("nocard-inj"),
                         protocol=mqtt.MQTTv5)  # fmt: skip
    client.username_pw_set(t.terminal_id, t.password)
    client.connect(m.host, m.port)
    client.loop_start()
    try:
        infos = [client.publish(i.topic, i.payload, qos=1) for i in items]
        for info in infos:
            info.wait_for_publish(timeout=10)
            assert info.is_published(), info.rc
    finally:
        client.loop_stop()
        client.disconnect()


# --- the test ------------------------------------------------------------------------------


async def test_no_card_number_anywhere_after_a_run_with_card_number_injections(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    settings = pipeline.settings
    stack_logs = [
        settings.stack.dir / "logs" / "mosquitto.log",
        settings.stack.dir / "logs" / "kafka.log",
        settings.stack.dir / "logs" / "postgres.log",
        settings.stack.dir / "kafka" / "server.log",
    ]
    log_start = {p: p.stat().st_size for p in stack_logs if p.exists()}
    t0 = time.time() - DURATION_S  # event time reaches the wall clock at the end
    name = _letters(f"nc{pipeline.run_id}")
    fleet = build_fleet(TERMINALS, seed=settings.simulator.seed, name=name, at=t0)
    ids = {t.terminal_id for t in fleet.terminals}
    register_fleet(settings, fleet)
    pipeline.start()
    extra = injections(fleet, 7)
    sent = await simulate(pipeline, fleet, t0, extra, tmp_path / "simulator.log")
    assert sum(sent.values()) >= 20, sent  # the scenario did inject card numbers

    # Everything reaches the dead-letter topic; then the downstream services catch up.
    topics = [f"{pipeline.prefix}.{k}.v1" for k in ("telemetry", "txn", "status", "deadletter")]
    tags = {i.tag for i in extra}
    deadline = time.monotonic() + 40
    while True:
        records = await read_topics(settings.kafka, topics)
        dead = records[topics[3]]
        seen_tags = {tag for r in dead for tag in tags if tag.encode() in (r.value or b"")}
        mine = [p for r in dead if (p := parse_deadletter(r.value or b"")) and p[0] in ids]
        if (seen_tags == tags and len(mine) >= len(sent)) or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)
    await _caught_up(pipeline, records[topics[1]], deadline=time.monotonic() + 40)
    codes = pipeline.stop()
    # uvicorn re-raises SIGTERM after its graceful shutdown (test_api_cli.py says the same).
    if codes.get("api") == -signal.SIGTERM:
        codes["api"] = 0
    assert codes == dict.fromkeys(_SERVICES, 0), codes

    # (3) The dead letters hold every injected card number, redacted: per message, exactly.
    check_dead_letters(dead, ids, sent, extra)
    # No payload of the fleet that carried a card number reached a pipeline topic.
    for topic in topics[:3]:
        for r in records[topic]:
            assert find_card_data((r.value or b"").decode()) is None, (topic, r.offset)

    # (1) every table, (2) every topic of the run, (4) every log: no card number anywhere.
    scan = Scan(known=(*SIMULATOR_PANS, *(pan for i in extra for pan in i.pans)))
    scan_database(scan, pipeline.pg)
    run_topics_ = await run_topics(settings.kafka, [f"{pipeline.prefix}.", pipeline.app_id])
    assert set(topics) <= set(run_topics_)
    assert any(t.startswith(pipeline.app_id) and "changelog" in t for t in run_topics_)
    scan_records(scan, await read_topics(settings.kafka, run_topics_))
    for name in [*_SERVICES, "simulator"]:
        scan_lines(scan, name, (tmp_path / f"{name}.log").read_text(errors="replace"))
    for path, start in log_start.items():
        with path.open("rb") as f:
            f.seek(start)
            scan_lines(scan, path.name, f.read().decode("utf-8", "replace"))
    assert scan.findings == [], scan.findings[:20]
    # The scan read what it should have: the run's rows, records and log lines.
    assert scan.items["db"] > 500, scan.items
    assert scan.items["kafka"] > 1000, scan.items
    assert scan.items["log"] > 50, scan.items
    assert "dead letter card_data" in pipeline.log("ingest")

    # The same scanners find a card number planted in a real table and a real topic.
    planted = new_pan(16)
    with psycopg.connect(pipeline.pg.dsn()) as conn:
        conn.execute(b"CREATE TABLE scratch_plant (id int, note jsonb)")
        conn.execute(b"INSERT INTO scratch_plant VALUES (1, %s)", (json.dumps({"x": planted}),))
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(f"{pipeline.prefix}.scratch", b"x", key=planted.encode())
    finally:
        await producer.stop()
    check = Scan()
    scan_database(check, pipeline.pg)
    scan_records(check, await read_topics(settings.kafka, [f"{pipeline.prefix}.scratch"]))
    assert sorted(check.findings) == [
        "db:public.scratch_plant: a 16-digit card number",
        f"kafka:{pipeline.prefix}.scratch[0]@0 key: a 16-digit card number",
    ], check.findings


async def simulate(
    pipeline: Pipeline, fleet: Fleet, t0: float, extra: list[Injection], log: Path
) -> Counter[tuple[str, int]]:
    """Drive the fleet (and publish ``extra`` on the way); (terminal, seq) -> card numbers sent."""
    sent: Counter[tuple[str, int]] = Counter()

    def on_sent(msg: Message) -> None:
        pans = sum(msg.payload.count(pan.encode()) for pan in SIMULATOR_PANS)
        if pans:
            sent[(fleet.terminals[msg.terminal].terminal_id, msg.seq)] += pans

    scenario = load_scenario(str(HERE / "card_numbers.yaml"))
    run = Run(fleet, t0=t0, duration_s=DURATION_S, telemetry_s=30, txn_scale=4,
              scenario=scenario, always_open=True)  # fmt: skip
    # The simulator's own log, captured like a service's.
    handler = logging.FileHandler(log)
    logging.getLogger().addHandler(handler)
    try:
        driving = asyncio.create_task(
            drive(pipeline.settings, fleet, run, on_sent=on_sent, max_real=TERMINALS,
                  gateways=1, speed=SPEED, run_id=pipeline.run_id)
        )  # fmt: skip
        await asyncio.sleep(5)
        await asyncio.to_thread(publish, pipeline.settings, fleet, 7, extra)
        result = await driving
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert result.stats.connect_failures == 0, result.stats.errors
    assert result.unacked == 0
    assert result.stats.abandoned == 0
    return sent


def check_dead_letters(
    dead: list[Any], ids: set[str], sent: Counter[tuple[str, int]], extra: list[Injection]
) -> None:
    """Each card-number message has its dead letter, with one redaction mark per number."""
    tags = {i.tag for i in extra}
    got: Counter[tuple[str, int]] = Counter()
    by_tag: dict[str, list[dict[str, Any]]] = {}
    for r in dead:
        doc = json.loads(r.value)
        preview = str(doc["payload_redacted"])
        hexed = _HEX_PREVIEW.search(preview)
        shown = (
            bytes.fromhex(hexed.group(1).replace(":", "")).decode("utf-8", "replace")
            if hexed
            else preview
        )
        found_tags = tags & set(re.findall(r"inj\d+x", shown))
        for tag in found_tags:
            by_tag.setdefault(tag, []).append({**doc, "shown": shown, "key": r.key.decode()})
        parsed = parse_deadletter(r.value)
        if found_tags or not parsed or parsed[0] not in ids or parsed[1] is None:
            continue  # the test's own injections are checked below, one by one
        if marks := shown.count(PAN_MARK):
            got[(parsed[0], parsed[1])] += marks
    assert got == sent, (sorted(set(got) ^ set(sent))[:10], sum(got.values()), sum(sent.values()))
    for inj in extra:
        letters = by_tag.get(inj.tag, [])
        assert len(letters) == 1, (inj.tag, inj.reason, letters)
        letter = letters[0]
        assert letter["reason"] == inj.reason, (inj.tag, letter)
        assert letter["payload_size"] == len(inj.payload)
        assert letter["original_topic"] == letter["key"] == inj.shown_topic, (inj.tag, letter)
        for mark, n in inj.marks.items():
            assert letter["shown"].count(mark) == n, (inj.tag, mark, letter["shown"][:300])


async def _caught_up(pipeline: Pipeline, txns: list[Any], deadline: float) -> None:
    """Wait until the settlement worker stored offsets past every payment record."""
    ends: dict[tuple[str, int], int] = {}
    for r in txns:
        key = (r.topic, r.partition)
        ends[key] = max(ends.get(key, 0), r.offset + 1)
    group = pipeline.env["POSFLOW_SETTLEMENT__GROUP"]
    while time.monotonic() < deadline:
        rows = pipeline.rows(
            "SELECT topic, partition, next_offset FROM consumer_offsets WHERE consumer_group = %s",
            group,
        )
        stored = {(t, p): o for t, p, o in rows}
        if all(stored.get(k, 0) >= v for k, v in ends.items()):
            await asyncio.sleep(2)  # the health worker and the alert engine, a moment more
            return
        await asyncio.sleep(0.5)
    raise AssertionError(
        f"settlement did not catch up: {ends}\n{pipeline.log('settlement')[-2000:]}"
    )
