"""CPU of the simulator per message it publishes, over MQTT to the running stack's Mosquitto.

One fleet run as `posflow simulate` drives it (simulator.runner.drive, with the load
test's per-message accounting), no pipeline: the figure is the simulator's own. Prints
one JSON line: messages published and acknowledged, the process's user and system CPU
seconds over the drive (from /proc) and CPU microseconds per message published.

Register the fleet's MQTT accounts once, then compare two trees in turn (PYTHONPATH
selects the simulator under test; the baseline a `git archive` of the commit before):

    posflow fleet register --no-database -n 6000 --fleet cs18
    PYTHONPATH=. .venv/bin/python benchmarks/bench_simulator.py -n 2000 -d 40 --telemetry-s 10
    PYTHONPATH=. .venv/bin/python benchmarks/bench_simulator.py -n 6000 -d 40 \\
        --max-real 1000 --gateways 4 --telemetry-s 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from posflow.settings import Settings
from simulator.accounting import Recorder
from simulator.engine import Run
from simulator.fleet import build_fleet
from simulator.metrics import SimMetrics
from simulator.runner import DriveResult, drive

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu() -> tuple[float, float]:
    """This process's user and system CPU seconds."""
    stat = Path(f"/proc/{os.getpid()}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


async def _drive(args: argparse.Namespace) -> tuple[DriveResult, float, float, float]:
    settings = Settings()
    t0 = time.time()
    fleet = build_fleet(args.terminals, seed=settings.simulator.seed, name=args.fleet, at=t0)
    run = Run(fleet, t0=t0, duration_s=args.duration, telemetry_s=args.telemetry_s,
              ramp_per_s=args.ramp)  # fmt: skip
    rec = Recorder({t.index: t.terminal_id for t in fleet.terminals})
    metrics = SimMetrics(terminals_total=args.terminals)
    (user0, sys0), wall0 = _cpu(), time.monotonic()
    result = await drive(settings, fleet, run, on_sent=rec, max_real=args.max_real,
                         gateways=args.gateways, run_id=f"{args.fleet}{os.getpid()}",
                         metrics=metrics)  # fmt: skip
    user1, sys1 = _cpu()
    return result, user1 - user0, sys1 - sys0, time.monotonic() - wall0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--terminals", type=int, default=2000)
    parser.add_argument("-d", "--duration", type=float, default=40)
    parser.add_argument("--telemetry-s", type=int, default=10)
    parser.add_argument("--ramp", type=float, default=1000)
    parser.add_argument("--max-real", type=int, default=19_000)
    parser.add_argument("--gateways", type=int, default=8)
    parser.add_argument("--fleet", default="cs18")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    result, user, system, wall = asyncio.run(_drive(args))
    published = result.stats.published
    print(json.dumps({
        "label": args.label, "terminals": args.terminals, "max_real": args.max_real,
        "gateways": args.gateways, "telemetry_s": args.telemetry_s,
        "published": published, "acked": result.stats.acked,
        "user_s": round(user, 2), "sys_s": round(system, 2), "wall_s": round(wall, 1),
        "cpu_us_per_msg": round((user + system) * 1e6 / max(published, 1), 1),
        "errors": result.stats.errors,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
