"""The ``posflow`` command line. Later parts of the pipeline add their subcommands here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from posflow.errors import PosflowError
from posflow.settings import Settings
from simulator.cli import AlwaysOpen, Merchants, TxnScale

if TYPE_CHECKING:
    import psycopg

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

# A wide console when piped, so status tables stay one row per service in logs and CI.
_out = Console(width=None if sys.stdout.isatty() else 200)
_err = Console(stderr=True)


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "POSFLOW_" + "__".join(str(p).upper() for p in first["loc"])
        raise PosflowError(
            f"invalid setting {where}: {first['msg']}",
            fix=f"correct or unset the environment variable {where}",
        ) from None


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

    Stack(_settings()).up(services, progress=lambda line: _out.print(f"  {line}"))
    _out.print("[green]stack is up[/green]  (`posflow stack status` for addresses and versions)")


@stack_app.command("down")
def stack_down(services: ServiceNames = None) -> None:
    """Stop the services the stack started (by pid); data stays in the stack directory."""
    from posflow.stack import Stack

    Stack(_settings()).down(services, progress=lambda line: _out.print(f"  {line}"))


@stack_app.command("status")
def stack_status() -> None:
    """Each service: state, address, version, pid. Exits 1 if any is not running.

    A service with nothing to run here (Grafana, when none can be had) is
    "not available" and does not count as down.
    """
    from posflow.stack import Stack

    rows = Stack(_settings()).status()
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
    _out.print(table)
    if any(row.state not in ("running", "not available") for row in rows):
        raise typer.Exit(1)


@stack_app.command("check")
def stack_check() -> None:
    """A short round trip through every service; exits 1 if any fails."""
    from posflow.stack.smoke import run_checks

    results = run_checks(_settings())
    for result in results:
        mark = "[green]ok  [/green]" if result.ok else "[red]FAIL[/red]"
        _out.print(f"  {mark} {result.service:<10} {result.what}")
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

    print(Stack(_settings()).logs(service, lines))


def _connect() -> psycopg.Connection[tuple[Any, ...]]:
    import psycopg

    settings = _settings()
    try:
        from posflow.security.tls import postgres_dsn

        return psycopg.connect(postgres_dsn(settings), autocommit=True)
    except psycopg.OperationalError as exc:
        pg = settings.postgres
        raise PosflowError(
            f"cannot connect to PostgreSQL at {pg.host}:{pg.port} database {pg.database}: "
            f"{str(exc).strip().splitlines()[0]}",
            fix="start it (`posflow stack up postgres`) or set POSFLOW_POSTGRES__HOST/__PORT",
        ) from None


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply pending migrations (safe to run twice, and from two processes at once)."""
    from posflow.storage import detect_path, migrate

    with _connect() as conn:
        applied = migrate(conn)
        path = detect_path(conn)
    for migration in applied:
        _out.print(f"  applied {migration.version:04d}_{migration.name}")
    _out.print(f"schema up to date ({len(applied)} applied now), storage path: {path}")


@db_app.command("maintain")
def db_maintain() -> None:
    """Plain: partitions ahead, hourly rollups, retention. TimescaleDB: runs its policy jobs."""
    from posflow.storage.maintenance import maintain
    from posflow.storage.setup import prepare_database, retention_of

    settings = _settings()
    with _connect() as conn:
        path = prepare_database(conn, settings.storage)
        result = maintain(conn, retention_of(settings.storage)) if path == "timescaledb" else {}
    for run in result.get("jobs", []):  # type: ignore[attr-defined]
        outcome = "ok" if run.ok else f"FAILED: {run.error}"
        _out.print(f"  job {run.job_id} {run.job}: {outcome} ({run.seconds:.2f} s)")
    if path == "timescaledb":
        _out.print(
            "storage maintained (timescaledb): the policy jobs ran in this session, not left "
            "to TimescaleDB's background scheduler (see docs/operations.md)"
        )
    else:
        _out.print(f"storage maintained ({path})")
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
        _out.print(f"  wrote {path}")


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
    from posflow.mainjob import MainJobOptions, run_main

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
    summary = run_main(_settings(), options, _out)
    if summary_json is not None:
        summary_json.write_text(summary.to_json())


streams_app = typer.Typer(help="The faust-streaming health workers.")
app.add_typer(streams_app, name="streams")


@streams_app.command("worker")
def streams_worker() -> None:
    """Run a health worker (more workers with the same app id share the partitions)."""
    from streams.app import run_worker

    run_worker(_settings())


@streams_app.command("sink")
def streams_sink() -> None:
    """Run the raw storage sink: telemetry + transactions into the time-series tables."""
    import asyncio

    from posflow.logs import configure_logging
    from streams.rawsink import build

    settings = _settings()
    configure_logging()

    async def serve() -> None:
        # aiokafka clients must be created inside the running event loop;
        # build() refuses development defaults in the production profile.
        await build(settings).run()

    asyncio.run(serve())


@app.command("ingest")
def ingest_run() -> None:
    """Run the MQTT -> Kafka bridge until SIGTERM (then it drains and exits)."""
    import asyncio

    from ingest import build
    from posflow.logs import configure_logging
    from posflow.security import refuse_dev_defaults

    settings = _settings()
    refuse_dev_defaults(settings)
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


_register_services()


def _click_classes() -> tuple[tuple[type[Any], ...], tuple[type[Any], ...], tuple[type[Any], ...]]:
    """Click's exit, usage-error and abort exceptions: typer 0.2x raises its own vendored
    click's (``typer._click``), which the ``click`` package's classes do not catch."""
    exits: list[type[Any]] = [click.exceptions.Exit, typer.Exit]
    errors: list[type[Any]] = [click.ClickException]
    aborts: list[type[Any]] = [click.exceptions.Abort, typer.Abort]
    try:
        from typer._click import exceptions as vendored
    except ImportError:  # a typer that uses the click package itself
        pass
    else:
        errors.append(vendored.ClickException)
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
