"""What every ``posflow`` subcommand shares: its settings, a database connection, a console.

The core's part of the command line: the service packages' commands (``alerts.cli``,
``api.cli``, ...) import it, and ``cli.main`` on top puts the commands together.
Errors are :class:`~posflow.errors.PosflowError`, one line for ``cli.main.main``.

The production profile is checked here and nowhere else: a command that runs a service
or handles its secrets takes its settings from :func:`service_settings`, which refuses
the repository's development defaults before anything is built or connected.
"""

from __future__ import annotations

import getpass
import socket
import sys
from typing import TYPE_CHECKING, Any

import typer
from pydantic import ValidationError
from rich.console import Console

from posflow.errors import PosflowError
from posflow.security.production import refuse_dev_defaults
from posflow.settings import Settings

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "STAFF_KEY_ENV",
    "cli_source",
    "connect",
    "console",
    "load_settings",
    "service_settings",
    "staff_key_option",
]

# Where a staff API key is given to the commands that act through one (`posflow alerts`,
# the settlement's money-moving commands): out of the shell history and the process list.
STAFF_KEY_ENV = "POSFLOW_STAFF_KEY"

# A wide console when piped, so status tables stay one row per service in logs and CI.
console = Console(width=None if sys.stdout.isatty() else 200)


def load_settings() -> Settings:
    """The settings from the environment; a bad variable is named in a one-line error."""
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "POSFLOW_" + "__".join(str(p).upper() for p in first["loc"])
        raise PosflowError(
            f"invalid setting {where}: {first['msg']}",
            fix=f"correct or unset the environment variable {where}",
        ) from None


def service_settings() -> Settings:
    """The settings of a command that runs a service or handles secrets (keys, certificates,
    payout accounts): in the production profile, every development default still set is
    refused here, in one error naming them all, before anything starts."""
    settings = load_settings()
    refuse_dev_defaults(settings)
    return settings


def connect(
    settings: Settings | None = None,
    *,
    conninfo: str | None = None,
    fix: str = "start it (`posflow stack up postgres`) or set POSFLOW_POSTGRES__HOST/__PORT",
) -> psycopg.Connection[tuple[Any, ...]]:
    """An autocommit connection to the settings' database (or ``conninfo``, e.g. a role's
    own), or a one-line error naming the server and what to do."""
    import psycopg

    from posflow.security.tls import postgres_dsn

    settings = settings or load_settings()
    try:
        return psycopg.connect(conninfo or postgres_dsn(settings), autocommit=True)
    except psycopg.OperationalError as exc:
        pg = settings.postgres
        raise PosflowError(
            f"cannot connect to PostgreSQL at {pg.host}:{pg.port} database {pg.database}: "
            f"{str(exc).strip().splitlines()[0]}",
            fix=fix,
        ) from None


def cli_source() -> str:
    """Where a command-line change comes from, for the audit trail: ``cli:<user>@<host>``."""
    return f"cli:{getpass.getuser()}@{socket.gethostname()}"


def staff_key_option(what: str) -> Any:
    """The ``--key`` option (or ``POSFLOW_STAFF_KEY``) of a command that acts with a staff
    API key; ``what`` says which key, the help adds where it had better come from."""
    return typer.Option(
        "--key",
        envvar=STAFF_KEY_ENV,
        show_envvar=True,
        help=f"{what}; prefer the environment variable {STAFF_KEY_ENV}",
    )
