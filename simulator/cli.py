"""The simulator's commands (``posflow fleet``, ``posflow simulate``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from simulator.fleet import Fleet

__all__ = ["AlwaysOpen", "Merchants", "Terminals", "TxnScale", "register"]

Terminals = Annotated[int, typer.Option("--terminals", "-n", min=1, help="fleet size")]
FleetName = Annotated[str, typer.Option("--fleet", help="fleet name: prefix of every id")]
Merchants = Annotated[
    int | None,
    typer.Option(
        "--merchants", min=1, help="share the terminals among exactly this many merchants"
    ),
]
# Shared by `posflow simulate`, `posflow loadtest` and `posflow demo`.
TxnScale = Annotated[float, typer.Option(min=0, help="x the realistic payment rates")]
AlwaysOpen = Annotated[
    bool,
    typer.Option(
        "--always-open/--opening-hours",
        help="every shop at its peak hour (else payments follow each shop's local hours)",
    ),
]


def _fleet(
    terminals: int, seed: int, name: str, merchants: int | None, *, at: float = 0.0
) -> Fleet:
    """The fleet, or a one-line error when ``merchants`` cannot share ``terminals``."""
    from posflow.errors import PosflowError
    from simulator.fleet import build_fleet

    if merchants is not None and merchants > terminals:
        raise PosflowError(
            f"--merchants {merchants} is more than the {terminals} terminals: "
            "every merchant needs at least one",
            fix="give --merchants at most --terminals",
        )
    return build_fleet(terminals, seed=seed, name=name, at=at, merchants=merchants)


def register(app: typer.Typer) -> None:
    """Add the simulator's commands to the ``posflow`` command line."""
    fleet_app = typer.Typer(help="Simulated fleets: merchants, terminals, their accounts.")
    app.add_typer(fleet_app, name="fleet")

    @fleet_app.command("register")
    def fleet_register(  # noqa: PLR0917 - typer options
        terminals: Terminals = 100,
        fleet: FleetName = "sim",
        merchants: Merchants = None,
        database: Annotated[
            bool, typer.Option(help="merchants and terminals in PostgreSQL")
        ] = True,
        mqtt: Annotated[
            bool, typer.Option(help="terminal and gateway accounts in Mosquitto")
        ] = True,
        certificates: Annotated[
            bool,
            typer.Option(help="a client certificate per terminal and gateway (simulate --tls)"),
        ] = False,
    ) -> None:
        """Register a fleet (same seed, same fleet) in the database and in Mosquitto."""
        from posflow.cli_support import console, load_settings
        from simulator.register import register_fleet

        settings = load_settings()
        built = _fleet(terminals, settings.simulator.seed, fleet, merchants)
        done = register_fleet(
            settings, built, database=database, mqtt=mqtt, certificates=certificates
        )
        console.print(
            f"fleet {fleet}: {done['merchants']:,} merchants, {done['terminals']:,} terminals in "
            f"the database; {done['mqtt_accounts']:,} MQTT accounts"
            + (f"; {done['certificates']:,} certificates issued" if certificates else "")
            + f" (seed {settings.simulator.seed})"
        )

    @app.command("simulate")
    def simulate(  # noqa: PLR0917 - typer options
        terminals: Terminals = 100,
        fleet: FleetName = "sim",
        merchants: Merchants = None,
        duration: Annotated[
            float, typer.Option("--duration", "-d", min=0, help="run seconds; 0: until stopped")
        ] = 300,
        forever: Annotated[
            bool, typer.Option("--forever", help="run until SIGTERM / Ctrl-C (as --duration 0)")
        ] = False,
        scenario: Annotated[
            str | None, typer.Option(help="fault scenario: a shipped name or a .yaml path")
        ] = None,
        speed: Annotated[
            float, typer.Option(min=0.001, help="simulated seconds per wall second")
        ] = 1.0,
        telemetry_s: Annotated[int, typer.Option(help="telemetry (heartbeat) interval")] = 30,
        txn_scale: TxnScale = 1.0,
        always_open: AlwaysOpen = False,
        ramp: Annotated[
            float | None, typer.Option(help="terminals coming online per second")
        ] = None,
        max_real: Annotated[int, typer.Option(help="terminals with their own connection")] = 19_000,
        gateways: Annotated[int, typer.Option(help="multiplexed connections for the rest")] = 8,
        offline: Annotated[
            Path | None, typer.Option(help="write the messages (JSON lines) here, no MQTT")
        ] = None,
        register_first: Annotated[bool, typer.Option("--register/--no-register")] = True,
        start: Annotated[
            float | None, typer.Option("--t0", help="start, epoch seconds (default: now)")
        ] = None,
        summary_json: Annotated[
            Path | None, typer.Option(help="also write the final counts as JSON here")
        ] = None,
        tls: Annotated[
            bool,
            typer.Option(
                "--tls/--passwords",
                help="terminals connect to the TLS listener with their own certificates",
            ),
        ] = False,
    ) -> None:
        """Run a fleet against the running pipeline (or write its messages with --offline).

        Serves /metrics, /healthz, /readyz on services.simulator (9405) while it runs;
        SIGTERM / Ctrl-C stops it cleanly (no Last Wills) with exit status 0.
        """
        import asyncio
        import json
        import math
        import time

        from posflow.cli_support import console, load_settings
        from posflow.errors import PosflowError
        from posflow.logs import configure_logging
        from simulator.engine import Run
        from simulator.scenarios import load_scenario
        from simulator.service import SimulateOptions, build

        settings = load_settings()
        endless = forever or duration == 0
        if endless and offline is not None:
            raise PosflowError(
                "--offline writes a whole run: it needs a finite --duration",
                fix="give --duration SECONDS (not 0, not --forever)",
            )
        t0 = time.time() if start is None else start  # fixed: the same bytes every time
        built = _fleet(terminals, settings.simulator.seed, fleet, merchants, at=t0)
        plan = load_scenario(scenario) if scenario else None
        run = Run(built, t0=t0, duration_s=math.inf if endless else duration,
                  telemetry_s=telemetry_s, txn_scale=txn_scale, ramp_per_s=ramp,
                  scenario=plan, always_open=always_open)  # fmt: skip
        if offline is not None:
            with offline.open("w") as out:
                for m in run.all():
                    out.write(json.dumps({"at": m.at, "topic": m.topic, "expect": m.expect,
                                          "payload": m.payload.decode()}) + "\n")  # fmt: skip
            console.print(f"messages written to {offline}")
            return
        configure_logging()
        options = SimulateOptions(
            speed=speed, max_real=max_real, gateways=gateways, register=register_first, tls=tls
        )
        sim = build(settings, built, run, options)
        asyncio.run(sim.run_until_done())
        # One line, never wrapped: the main job and the tests read it.
        console.print(sim.summary(), soft_wrap=True, markup=False, highlight=False)
        if summary_json is not None:
            summary_json.write_text(json.dumps(sim.metrics.counts(), indent=2, sort_keys=True))
