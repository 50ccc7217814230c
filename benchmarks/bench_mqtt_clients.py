"""Publishing speed of paho-mqtt against aiomqtt, as the simulator publishes (QoS 1).

Three publishers, each sending the same telemetry payloads to the running stack's
Mosquitto, until every message is acknowledged (PUBACK):

  paho-loop    paho driven by the asyncio loop (simulator/transport.py's Conn): what
               the simulator uses
  paho-thread  paho with its own network thread (loop_start), the usual way
  aiomqtt      aiomqtt 2 (asyncio; paho underneath, one task per connection)

Two shapes: one connection carrying all messages (a multiplexed gateway) and many
connections with a few messages each (one per terminal). Messages go to
``pos/bench/...`` with the service account, so no bridge subscribed to terminal
topics sees them. Wall time, messages/s and the process's CPU seconds are printed.

    .venv/bin/python benchmarks/bench_mqtt_clients.py --messages 20000 --connections 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import resource
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from posflow.settings import Settings
from simulator.engine import Message, Run
from simulator.fleet import build_fleet
from simulator.transport import Conn, TransportStats

LIMIT_S = 120


def _payloads(count: int) -> list[bytes]:
    fleet = build_fleet(50, seed=1, name="bench", at=time.time())
    msgs = [m.payload for m in Run(fleet, t0=time.time(), duration_s=10**6, telemetry_s=10)
            .until(10**6) if m.kind == "telemetry"][:count]  # fmt: skip
    return (msgs * (count // len(msgs) + 1))[:count]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def paho_loop(s: Settings, topics: list[str], payloads: list[bytes], conns: int) -> None:
    stats = TransportStats()
    jitter = random.Random(1)
    m = s.mosquitto
    pool = [
        Conn(client_id=f"bench-pl-{secrets.token_hex(3)}-{i}", username=m.service_user,
             password=m.service_password.get_secret_value(), host=m.host, port=m.port,
             stats=stats, on_sent=lambda _m: None, jitter=jitter, max_inflight=1000)
        for i in range(conns)
    ]  # fmt: skip
    for c in pool:
        c.connect()
    deadline = time.monotonic() + LIMIT_S
    while stats.connects < conns and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    for i, body in enumerate(payloads):
        pool[i % conns].send(Message(0, 0, "telemetry", i, topics[i % len(topics)], body))
        if i % 500 == 0:
            await asyncio.sleep(0)  # let acknowledgements in
    while stats.acked < len(payloads) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    for c in pool:
        await c.close()


async def paho_thread(s: Settings, topics: list[str], payloads: list[bytes], conns: int) -> None:
    m = s.mosquitto
    acked = [0]
    clients = []
    for i in range(conns):
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"bench-pt-{secrets.token_hex(3)}-{i}"
        )
        c.username_pw_set(m.service_user, m.service_password.get_secret_value())
        c.max_inflight_messages_set(1000)

        def on_publish(*_a: object) -> None:
            acked[0] += 1

        c.on_publish = on_publish
        c.connect(m.host, m.port)
        c.loop_start()
        clients.append(c)
    deadline = time.monotonic() + LIMIT_S
    while not all(c.is_connected() for c in clients) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    for i, body in enumerate(payloads):
        clients[i % conns].publish(topics[i % len(topics)], body, qos=1)
    while acked[0] < len(payloads) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    for c in clients:
        c.disconnect()
        c.loop_stop()


async def aiomqtt_(s: Settings, topics: list[str], payloads: list[bytes], conns: int) -> None:
    m = s.mosquitto
    per = [payloads[i::conns] for i in range(conns)]

    async def one(i: int) -> None:
        async with aiomqtt.Client(
            m.host, m.port, username=m.service_user,
            password=m.service_password.get_secret_value(),
            identifier=f"bench-am-{secrets.token_hex(3)}-{i}", max_inflight_messages=1000,
        ) as client:  # fmt: skip
            # At most 500 publishes awaiting their PUBACK at once: 20,000 pending calls on one
            # client cost aiomqtt far more (its bookkeeping grows with them).
            mine = per[i]
            for start in range(0, len(mine), 500):
                await asyncio.gather(
                    *(client.publish(topics[(i + k) % len(topics)], body, qos=1,
                                     timeout=LIMIT_S)
                      for k, body in enumerate(mine[start : start + 500], start))
                )  # fmt: skip

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(conns))), LIMIT_S)


Bench = Callable[[Settings, list[str], list[bytes], int], Coroutine[Any, Any, None]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=1_000, help="many-connections shape")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    # aiomqtt warns once per publish beyond 10 pending: not part of what is measured.
    logging.getLogger("mqtt").setLevel(logging.ERROR)
    settings = Settings()
    run = secrets.token_hex(3)
    topics = [f"pos/bench/{run}/T-{i:05d}/telemetry" for i in range(500)]
    payloads = _payloads(args.messages)
    print(f"# {args.messages:,} QoS 1 messages of {sum(map(len, payloads)) // len(payloads)} B; "
          f"best of {args.rounds} rounds")  # fmt: skip
    benches: dict[str, Bench] = {"paho-loop": paho_loop, "paho-thread": paho_thread,
                                 "aiomqtt": aiomqtt_}  # fmt: skip
    results = {}
    for conns in (1, args.connections):
        for name, bench in benches.items():
            if name == "paho-thread" and conns > 1:
                continue  # a thread per connection: not a way to hold thousands
            best = None
            for _ in range(args.rounds):
                cpu, start = _cpu(), time.perf_counter()
                asyncio.run(bench(settings, topics, payloads, conns))
                wall, used = time.perf_counter() - start, _cpu() - cpu
                if best is None or wall < best[0]:
                    best = (wall, used)
            if best is None:
                raise RuntimeError("no round ran")
            wall, used = best
            results[f"{name} x{conns}"] = {
                "msgs_per_s": round(args.messages / wall), "wall_s": round(wall, 2),
                "cpu_s": round(used, 2), "cpu_us_per_msg": round(1e6 * used / args.messages, 1),
            }  # fmt: skip
            print(f"{name:12} {conns:5} conn  {args.messages / wall:10,.0f} msgs/s  "
                  f"wall {wall:6.2f} s  cpu {used:6.2f} s  "
                  f"{1e6 * used / args.messages:6.1f} us cpu/msg")  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    main()
