"""Ingest bridge throughput and produce latency, beside a bare MQTT subscriber.

Runs against the local stack (`posflow stack up`). Each phase pre-loads the
broker: N QoS 1 telemetry messages are published while the subscriber's
persistent session is offline, then the subscriber connects and the time to
drain them is measured. That measures the subscriber, not the publisher.

Phases, in one run on the same machine:
  bare       a plain paho subscriber (its own network thread) that only counts
  bare-fast  the bridge's MQTT client path (ingest/_mqtt.py) that only counts
  bridge     one bridge: validate, produce to Kafka (acks=all), PUBACK after ack
  bridge2    two bridge processes on one shared subscription (scale-out)
  live       one bridge under a steady publisher (--rate msgs/s): produce latency
             without a backlog (the drain phases measure it behind a full window)

Bridge phases also report the bridge processes' CPU per message (utime + stime from
/proc/self/stat of each bridge process, start to drained, summed over processes).

Usage:
  .venv/bin/python benchmarks/bench_ingest.py --messages 60000 --terminals 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest import Bridge, BridgeMetrics
from ingest._mqtt import BufferedClient, LoopDriver
from posflow.settings import IngestSettings, KafkaSettings, Settings
from posflow.stack import ensure_topics
from tests.unit import samples

TIME_LIMIT_S = 300  # every phase is bounded in time as well as in count


# The shared sample telemetry, with the values the figures in docs/benchmarks/ingest.md
# were measured with; a shallow copy per message keeps the publishers' cost as it was.
_TELEMETRY = samples.telemetry(
    **{"location.lon": 151.2093, "app_version": "4.2.1", "firmware_version": "fw-2.8.0"}
)


def _payload(merchant: str, terminal: str, seq: int) -> bytes:
    body = {
        **_TELEMETRY,
        "merchant_id": merchant,
        "terminal_id": terminal,
        "ts": datetime.now(UTC).isoformat(),
        "seq": seq,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _client(settings: Settings, client_id: str) -> mqtt.Client:
    m = settings.mosquitto
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(m.service_user, m.service_password.get_secret_value())
    return client


def _session_props(receive_max: int = 2000) -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    props.ReceiveMaximum = receive_max
    return props


def _register_session(settings: Settings, client_id: str, topic_filter: str) -> None:
    """Create a persistent session with the subscription, then go offline."""
    client = _client(settings, client_id)
    done: list[bool] = []
    client.on_subscribe = lambda *_a: done.append(True)
    client.connect(
        settings.mosquitto.host, settings.mosquitto.port, clean_start=True,
        properties=_session_props(),
    )  # fmt: skip
    client.loop_start()
    deadline = time.monotonic() + 10
    while not client.is_connected() and time.monotonic() < deadline:
        time.sleep(0.01)
    client.subscribe(topic_filter, qos=1)
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
    client.disconnect()
    client.loop_stop()


def _preload(settings: Settings, merchant: str, terminals: int, messages: int) -> float:
    """Publish ``messages`` QoS 1 messages; returns the publish rate."""
    client = _client(settings, f"bench-pub-{secrets.token_hex(3)}")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(settings.mosquitto.host, settings.mosquitto.port)
    client.loop_start()
    topics = [f"pos/v1/{merchant}/T-{i:05d}/telemetry" for i in range(terminals)]
    started = time.monotonic()
    last = None
    for seq in range(messages):
        t = seq % terminals
        last = client.publish(topics[t], _payload(merchant, f"T-{t:05d}", seq), qos=1)
    if last is not None:
        last.wait_for_publish(TIME_LIMIT_S)
    rate = messages / (time.monotonic() - started)
    client.disconnect()
    client.loop_stop()
    return rate


def _bare(settings: Settings, client_id: str, messages: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    """A subscriber that only counts (and acknowledges) messages."""
    count = 0
    first = last = 0.0

    def on_message(_c: object, _u: object, _m: object) -> None:
        nonlocal count, first, last
        if count == 0:
            first = time.monotonic()
        count += 1
        last = time.monotonic()

    client = _client(settings, client_id)
    client.on_message = on_message
    started = time.monotonic()
    client.connect(
        settings.mosquitto.host, settings.mosquitto.port, clean_start=False,
        properties=_session_props(),
    )  # fmt: skip
    client.loop_start()
    deadline = started + TIME_LIMIT_S
    while count < messages and time.monotonic() < deadline:
        time.sleep(0.05)
    client.disconnect()
    client.loop_stop()
    out.put({"count": count, "seconds": last - started, "first_after_s": first - started})


def _bare_fast(settings: Settings, client_id: str, messages: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    asyncio.run(_run_bare_fast(settings, client_id, messages, out))


async def _run_bare_fast(
    settings: Settings,
    client_id: str,
    messages: int,
    out: mp.Queue,  # type: ignore[type-arg]
) -> None:
    count = 0

    def on_publish(_topic: str, _payload: bytes, qos: int, mid: int) -> None:
        nonlocal count
        count += 1
        if qos:
            acks.append(mid)

    acks: list[int] = []
    client = BufferedClient(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=True
    )
    m = settings.mosquitto
    client.username_pw_set(m.service_user, m.service_password.get_secret_value())
    client.on_message = lambda _c, _u, msg: on_publish(
        msg.topic, bytes(msg.payload), msg.qos, msg.mid
    )
    driver = LoopDriver(client, on_publish, lambda: 2000)
    started = time.monotonic()
    client.connect(m.host, m.port, clean_start=False, properties=_session_props())
    deadline = started + TIME_LIMIT_S
    while count < messages and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
        client.send_pubacks(acks)
        acks.clear()
    seconds = time.monotonic() - started
    client.disconnect()
    client.loop_write()
    await driver.stop()
    out.put({"count": count, "seconds": seconds})


def _bridge_proc(settings: Settings, messages: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    asyncio.run(_run_bridge(settings, messages, out))


class _RecordingMetrics(BridgeMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.latencies: list[float] = []
        hist = self.produce_latency
        original = hist.observe

        def observe(value: float, exemplar: dict[str, str] | None = None) -> None:
            self.latencies.append(value)
            original(value, exemplar)

        hist.observe = observe  # type: ignore[method-assign,assignment]


def _cpu_s() -> float:
    """This process's CPU seconds (utime + stime, all threads) from /proc/self/stat."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _run_bridge(settings: Settings, messages: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    metrics = _RecordingMetrics()
    bridge = Bridge(settings, metrics)
    cpu = _cpu_s()
    started = time.monotonic()
    await bridge.start()
    deadline = started + TIME_LIMIT_S
    while len(metrics.latencies) < messages and time.monotonic() < deadline:
        await asyncio.sleep(0.02)  # polling a counter keeps the bridge's hot path untouched
    seconds = time.monotonic() - started
    cpu = _cpu_s() - cpu
    await bridge.stop()
    lat = sorted(metrics.latencies)
    out.put(
        {
            "count": len(lat),
            "seconds": seconds,
            "cpu_s": cpu,
            "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
            "p95_ms": 1000 * lat[int(len(lat) * 0.95)] if lat else None,
            "p99_ms": 1000 * lat[int(len(lat) * 0.99)] if lat else None,
            "mean_ms": 1000 * statistics.fmean(lat) if lat else None,
            "dead_letters": sum(
                s.value
                for m in metrics.dead_lettered.collect()
                for s in m.samples
                if s.name.endswith("_total")
            ),
        }
    )


def _run_phase(
    target: Callable[..., None], args_list: list[tuple[object, ...]]
) -> list[dict[str, float]]:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, out)) for args in args_list]
    for p in procs:
        p.start()
    results = [out.get(timeout=TIME_LIMIT_S + 30) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return results


def _live(
    base: Settings, settings: Settings, merchant: str, args: argparse.Namespace
) -> tuple[list[dict[str, float]], float]:
    """Bridge running first, then a publisher paced at --rate: latency without a backlog."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=_bridge_proc, args=(settings, args.messages, out))
    proc.start()
    time.sleep(2.0)  # let it connect
    client = _client(base, f"bench-livepub-{secrets.token_hex(3)}")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(base.mosquitto.host, base.mosquitto.port)
    client.loop_start()
    started = time.monotonic()
    step = 50
    for first in range(0, args.messages, step):
        for seq in range(first, min(first + step, args.messages)):
            t = seq % args.terminals
            client.publish(
                f"pos/v1/{merchant}/T-{t:05d}/telemetry",
                _payload(merchant, f"T-{t:05d}", seq),
                qos=1,
            )
        ahead = started + (first + step) / args.rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    rate = args.messages / (time.monotonic() - started)
    result = out.get(timeout=TIME_LIMIT_S + 30)
    proc.join(timeout=60)
    client.disconnect()
    client.loop_stop()
    return [result], rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=60_000, help="per phase (<= 100000)")
    parser.add_argument("--terminals", type=int, default=2_000)
    parser.add_argument("--phases", default="bare,bare-fast,bridge,bridge2,live")
    parser.add_argument("--rate", type=int, default=5_000, help="live phase: msgs/s published")
    args = parser.parse_args()
    if not 0 < args.messages <= 100_000:
        parser.error("--messages must be 1..100000 (Mosquitto's per-client queue limit)")

    base = Settings()
    run = secrets.token_hex(3)
    print(f"# bench_ingest {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, run {run}, "
          f"{os.cpu_count()} cores, {args.messages} msgs, {args.terminals} terminals")  # fmt: skip
    rows = []
    for phase in args.phases.split(","):
        merchant = f"M-bench-{run}-{phase}"
        topic_filter = f"pos/v1/{merchant}/+/+"
        group = f"bench{run}{phase}"
        if phase in ("bare", "bare-fast"):
            cid = f"bench-{phase}-{run}"
            _register_session(base, cid, f"$share/{group}/{topic_filter}")
            pub_rate = _preload(base, merchant, args.terminals, args.messages)
            target = _bare if phase == "bare" else _bare_fast
            (res,) = _run_phase(target, [(base, cid, args.messages)])
            rows.append((phase, pub_rate, res))
            continue
        n = 2 if phase == "bridge2" else 1
        settings = [
            base.model_copy(
                update={
                    "kafka": KafkaSettings(
                        **{**base.kafka.model_dump(), "topic_prefix": f"bench{run}{phase}"}
                    ),
                    "ingest": IngestSettings(
                        client_id=f"bench-{phase}-{run}-{i}",
                        share_group=group,
                        topic_filter=topic_filter,
                    ),
                }
            )
            for i in range(n)
        ]
        asyncio.run(ensure_topics(settings[0]))
        for s in settings:
            _register_session(s, s.ingest.client_id, f"$share/{group}/{topic_filter}")
        per_proc = args.messages // n
        if phase == "live":
            results, pub_rate = _live(base, settings[0], merchant, args)
        else:
            pub_rate = _preload(base, merchant, args.terminals, args.messages)
            results = _run_phase(_bridge_proc, [(s, per_proc) for s in settings])
        total = {
            "count": sum(r["count"] for r in results),
            "seconds": max(r["seconds"] for r in results),
            "p50_ms": max(r["p50_ms"] or 0 for r in results),
            "p95_ms": max(r["p95_ms"] or 0 for r in results),
            "p99_ms": max(r["p99_ms"] or 0 for r in results),
            "dead_letters": sum(r["dead_letters"] for r in results),
            "cpu_s": sum(r["cpu_s"] for r in results),
        }
        rows.append((phase, pub_rate, total))

    print()
    print(
        "| phase | processes | messages | seconds | msgs/s | produce p50 ms | p95 ms | p99 ms "
        "| bridge CPU µs/msg |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for phase, pub, measured in rows:
        procs = 2 if phase == "bridge2" else 1
        r = measured
        if phase == "live":
            # Throughput is the publisher's pace here; the latency is the point.
            r = {**measured, "seconds": measured["count"] / pub}
        rate = r["count"] / r["seconds"] if r["seconds"] else 0
        lat = (
            f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f}"
            if "p50_ms" in r
            else "- | - | -"
        )
        cpu = f"{r['cpu_s'] / r['count'] * 1e6:.1f}" if r.get("cpu_s") and r["count"] else "-"
        print(
            f"| {phase} | {procs} | {r['count']} | {r['seconds']:.2f} | {rate:,.0f} | {lat} "
            f"| {cpu} |"
        )
    print()
    for phase, pub, r in rows:
        print(f"# {phase}: preload publish rate {pub:,.0f} msgs/s; {r}")


if __name__ == "__main__":
    main()
