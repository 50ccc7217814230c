"""The ``posflow`` command line. Later parts of the pipeline add their subcommands here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from posflow.cli_support import connect, console, load_settings, service_settings
from posflow.errors import PosflowError
from simulator.cli import AlwaysOpen, Merchants, Terminals, TxnScale

__all__ = ["app", "main"]

app = typer.Typer(
    name="posflow",
    help="posflow: real-time telemetry and cash-flow pipeline for POS terminals.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
stack_app = typer.Typer(
    help="The local stack: Kafka, PostgreSQL, Mosquitto, Prometheus, Grafana (when available)."
)
app.add_typer(stack_app, name="stack")
db_app = typer.Typer(help="The database: migrations, upkeep.")
app.add_typer(db_app, name="db")
contracts_app = typer.Typer(help="The wire contracts terminals and services share.")
app.add_typer(contracts_app, name="contracts")

_err = Console(stderr=True)


ServiceNames = Annotated[
    list[str] | None,
    typer.Argument(
        help="services to act on (default: all): postgres kafka mosquitto prometheus grafana"
    ),
]


@stack_app.command("up")
def stack_up(services: ServiceNames = None) -> None:
    """Install what is missing, start each service and wait until it answers."""
    from posflow.stack import Stack

    Stack(load_settings()).up(services, progress=lambda line: console.print(f"  {line}"))
    console.print("[green]stack is up[/green]  (`posflow stack status` for addresses and versions)")


@stack_app.command("down")
def stack_down(services: ServiceNames = None) -> None:
    """Stop the services the stack started (by pid); data stays in the stack directory."""
    from posflow.stack import Stack

    Stack(load_settings()).down(services, progress=lambda line: console.print(f"  {line}"))


@stack_app.command("status")
def stack_status() -> None:
    """Each service: state, address, version, pid. Exits 1 if any is not running.

    A service with nothing to run here (Grafana, when none can be had) is
    "not available" and does not count as down.
    """
    from posflow.stack import Stack

    rows = Stack(load_settings()).status()
    table = Table("service", "state", "address", "version", "pid", "detail")
    for row in rows:
        colour = {"running": "green", "not available": "yellow"}.get(row.state, "red")
        table.add_row(
            row.name,
            f"[{colour}]{row.state}[/{colour}]",
            row.address,
            row.version,
            str(row.pid or "-"),
            row.detail,
        )
    console.print(table)
    if any(row.state not in ("running", "not available") for row in rows):
        raise typer.Exit(1)


@stack_app.command("check")
def stack_check() -> None:
    """A short round trip through every service; exits 1 if any fails."""
    from posflow.stack.smoke import run_checks

    results = run_checks(load_settings())
    for result in results:
        mark = "[green]ok  [/green]" if result.ok else "[red]FAIL[/red]"
        console.print(f"  {mark} {result.service:<10} {result.what}")
    if not all(result.ok for result in results):
        raise typer.Exit(1)


@stack_app.command("logs")
def stack_logs(
    service: Annotated[
        str, typer.Argument(help="postgres, kafka, mosquitto, prometheus or grafana")
    ],
    lines: Annotated[int, typer.Option("--lines", "-n", help="how many lines")] = 50,
) -> None:
    """Show the end of a service's log."""
    from posflow.stack import Stack

    print(Stack(load_settings()).logs(service, lines))


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply pending migrations (safe to run twice, and from two processes at once)."""
    from posflow.storage import detect_path, migrate

    with connect() as conn:
        applied = migrate(conn)
        path = detect_path(conn)
    for migration in applied:
        console.print(f"  applied {migration.version:04d}_{migration.name}")
    console.print(f"schema up to date ({len(applied)} applied now), storage path: {path}")


@db_app.command("maintain")
def db_maintain() -> None:
    """Plain: partitions ahead, hourly rollups, retention. TimescaleDB: runs its policy jobs."""
    from posflow.storage.maintenance import maintain
    from posflow.storage.setup import prepare_database, retention_of

    settings = load_settings()
    with connect() as conn:
        path = prepare_database(conn, settings.storage)
        result = maintain(conn, retention_of(settings.storage)) if path == "timescaledb" else {}
    for run in result.get("jobs", []):  # type: ignore[attr-defined]
        outcome = "ok" if run.ok else f"FAILED: {run.error}"
        console.print(f"  job {run.job_id} {run.job}: {outcome} ({run.seconds:.2f} s)")
    if path == "timescaledb":
        console.print(
            "storage maintained (timescaledb): the policy jobs ran in this session, not left "
            "to TimescaleDB's background scheduler (see docs/operations.md)"
        )
    else:
        console.print(f"storage maintained ({path})")
    if result.get("failed"):
        raise SystemExit(1)


@contracts_app.command("export-schemas")
def contracts_export(
    out: Annotated[Path, typer.Option("--out", help="directory to write into")] = Path(
        "docs/schemas"
    ),
) -> None:
    """Write the JSON Schema of every terminal payload (for terminal vendors)."""
    from posflow.contracts import export_schemas

    for path in export_schemas(out):
        console.print(f"  wrote {path}")


@app.command("demo")
def demo(  # noqa: PLR0917 - typer options
    duration: Annotated[
        float | None, typer.Option(help="seconds to run, then stop and print a summary")
    ] = None,
    terminals: Annotated[int, typer.Option(min=1, help="simulated terminals")] = 2000,
    scenario: Annotated[
        str, typer.Option(help="fault scenario: a shipped name or a .yaml path")
    ] = "demo",
    fleet: Annotated[str, typer.Option(help="fleet name: prefix of every id")] = "demo",
    merchants: Merchants = None,  # default: one per ten terminals
    txn_scale: TxnScale = 1.0,
    always_open: AlwaysOpen = False,
    summary_json: Annotated[
        Path | None, typer.Option(help="also write the summary as JSON here")
    ] = None,
    log_dir: Annotated[
        Path | None, typer.Option(help="services' logs and pid files (default: in the stack dir)")
    ] = None,
) -> None:
    """The whole pipeline: stack, services, a simulated fleet and a live console (Ctrl-C stops)."""
    from cli.mainjob import MainJobOptions, run_main

    options = MainJobOptions(
        terminals=terminals,
        scenario=scenario,
        duration_s=duration,
        fleet_id=fleet,
        merchants=merchants,
        log_dir=log_dir,
        txn_scale=txn_scale,
        always_open=always_open,
    )
    summary = run_main(load_settings(), options, console)
    if summary_json is not None:
        summary_json.write_text(summary.to_json())


def loadtest(  # noqa: PLR0917 - typer options
    terminals: Terminals = 2000,
    duration: Annotated[float, typer.Option("--duration", "-d", help="run seconds")] = 60,
    ramp: Annotated[float, typer.Option(help="terminals coming online per second")] = 500,
    telemetry_s: Annotated[int, typer.Option(help="telemetry interval per terminal")] = 10,
    txn_scale: TxnScale = 1.0,
    max_real: Annotated[int, typer.Option(help="terminals with their own connection")] = 19_000,
    gateways: Annotated[int, typer.Option(help="multiplexed connections for the rest")] = 8,
    scenario: Annotated[str | None, typer.Option(help="fault scenario")] = None,
    out_dir: Annotated[Path, typer.Option(help="report directory")] = Path("docs/benchmarks"),
    name: Annotated[str, typer.Option(help="report file name (.json, .md)")] = "loadtest-run",
    keep_database: Annotated[bool, typer.Option(help="keep the run's database")] = False,
    alerts: Annotated[bool, typer.Option(help="run the alert engine too (a stage)")] = True,
) -> None:
    """Ramp a fleet up over MQTT, account for every message, write a JSON + Markdown report."""
    import asyncio
    import shlex

    from cli.loadtest import LoadTestOptions, run_loadtest

    opts = LoadTestOptions(
        terminals=terminals, duration_s=duration, ramp_per_s=ramp, telemetry_s=telemetry_s,
        txn_scale=txn_scale, max_real=max_real, gateways=gateways, scenario=scenario,
        out_dir=out_dir, name=name, keep_database=keep_database, alerts=alerts,
        command="posflow " + shlex.join(sys.argv[1:]),
    )  # fmt: skip
    report = asyncio.run(run_loadtest(load_settings(), opts, console))
    a = report["accounting"]
    console.print(
        f"sent {a['sent']:,}  delivered {a['delivered']:,}  expected dead letters "
        f"{a['dead_letters_expected']:,}  lost [bold]{a['lost']:,}[/bold]  "
        f"unexpected duplicates {a['duplicates_unexpected']:,}  "
        f"publish->Kafka {a['latency_publish_to_kafka_ms']}"
    )
    console.print(f"report: {out_dir / name}.json and .md")
    if report["pipeline_exited_during_run"]:
        console.print(f"[red]pipeline processes died: {report['pipeline_exited_during_run']}")
    lost_db = report["database"].get("lost_before_database", 0)
    console.print(
        f"database: {report['database'].get('stored_rows', 0):,} rows stored, "
        f"lost before the database [bold]{lost_db:,}[/bold]"
    )
    if a["lost"] or lost_db or report["pipeline_exited_during_run"]:
        raise typer.Exit(1)


streams_app = typer.Typer(help="The faust-streaming health workers.")
app.add_typer(streams_app, name="streams")


@streams_app.command("worker")
def streams_worker() -> None:
    """Run a health worker (more workers with the same app id share the partitions)."""
    from streams.app import run_worker

    run_worker(service_settings())


@streams_app.command("sink")
def streams_sink() -> None:
    """Run the raw storage sink: telemetry + transactions into the time-series tables."""
    import asyncio

    from posflow.logs import configure_logging
    from streams.rawsink import build

    settings = service_settings()
    configure_logging()

    async def serve() -> None:
        # aiokafka clients must be created inside the running event loop.
        await build(settings).run()

    asyncio.run(serve())


@app.command("ingest")
def ingest_run() -> None:
    """Run the MQTT -> Kafka bridge until SIGTERM (then it drains and exits)."""
    import asyncio

    from ingest import build
    from posflow.logs import configure_logging

    settings = service_settings()
    configure_logging()
    asyncio.run(build(settings).run())


def _register_services() -> None:
    # Each service package owns its commands; their modules import heavy parts lazily.
    from alerts.cli import register as register_alerts
    from api.cli import register as register_api
    from dashboards.cli import register as register_dashboards
    from posflow.security.cli import register as register_security
    from simulator.cli import register as register_simulator
    from streams.settlement_cli import register as register_settlement

    for register in (
        register_settlement,
        register_api,
        register_alerts,
        register_simulator,
        register_dashboards,
        register_security,
    ):
        register(app)
    # The load test drives the simulator and the pipeline: a command of the top layer,
    # listed after `simulate` as before.
    app.command("loadtest")(loadtest)


_register_services()


def _click_classes() -> tuple[tuple[type[Any], ...], tuple[type[Any], ...], tuple[type[Any], ...]]:
    """Click's exit, usage-error and abort exceptions: typer 0.2x raises its own vendored
    click's (``typer._click``) and no longer needs the ``click`` package; an older typer
    raises the ``click`` package's, whose classes the vendored ones do not catch."""
    exits: list[type[Any]] = [typer.Exit]
    errors: list[type[Any]] = []
    aborts: list[type[Any]] = [typer.Abort]
    try:
        from typer._click import exceptions as vendored
    except ImportError:  # a typer that uses the click package itself
        pass
    else:
        errors.append(vendored.ClickException)
    try:
        import click
    except ImportError:  # typer 0.2x without the click package installed
        pass
    else:
        exits.append(click.exceptions.Exit)
        errors.append(click.ClickException)
        aborts.append(click.exceptions.Abort)
    return tuple(exits), tuple(errors), tuple(aborts)


_EXITS, _USAGE_ERRORS, _ABORTS = _click_classes()


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line to stderr and exit non-zero, no traceback."""
    try:
        # Without standalone mode click returns a command's exit code instead of exiting.
        code = app(args=argv, prog_name="posflow", standalone_mode=False)
    except PosflowError as exc:
        _err.print(f"posflow: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        if exc.detail:
            _err.print(
                "\n".join(f"  | {line}" for line in exc.detail.splitlines()),
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        return 1
    except _EXITS as exc:
        return int(exc.exit_code)
    except _USAGE_ERRORS as exc:
        exc.show()
        return int(exc.exit_code)
    except _ABORTS:
        _err.print("posflow: aborted")
        return 130
    except KeyboardInterrupt:
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
