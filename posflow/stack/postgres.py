"""PostgreSQL 15 in a cluster the stack owns (own port and data directory).

TimescaleDB is enabled when its extension is installed on the machine;
otherwise the pipeline runs on plain PostgreSQL (see docs/architecture.md).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
from pathlib import Path

import psycopg
from psycopg import sql

from posflow.errors import PosflowError
from posflow.stack._install import ensure_debian_packages
from posflow.stack._service import Port, StackService
from posflow.stack.timescaledb import TimescaleBuild
from posflow.storage.databases import (
    TIMESCALEDB_TEMPLATE,
    drop_database,
    timescaledb_template_exists,
)

__all__ = ["PostgresService", "timescaledb_version"]


def timescaledb_version(conn: psycopg.Connection[tuple[object, ...]]) -> str | None:
    """The installed TimescaleDB extension's version in this database, or None."""
    row = conn.execute(
        "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
    ).fetchone()
    return str(row[0]) if row else None


class PostgresService(StackService):
    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: roll back clients, checkpoint, exit

    @property
    def ports(self) -> list[Port]:
        pg = self.settings.postgres
        return [Port(pg.host, pg.port, "POSFLOW_POSTGRES__PORT")]

    @property
    def run_as(self) -> str | None:
        return self.settings.postgres.os_user

    @property
    def data(self) -> Path:
        return self.dir / "data"

    @property
    def _superuser_password_file(self) -> Path:
        return self.dir / "superuser.password"

    def _bin(self, tool: str) -> str:
        return str(self.settings.postgres.bin_dir / tool)

    def _timescaledb_library(self) -> bool:
        pkglibdir = self.settings.postgres.bin_dir.parent / "lib"
        return (pkglibdir / "timescaledb.so").exists()

    def install(self) -> None:
        ensure_debian_packages(
            {self._bin("postgres"): "postgresql-15"},
            install=self.settings.stack.install,
            log_path=self.settings.stack.root / "logs" / "install.log",
        )
        warning = TimescaleBuild(self.settings, self.progress).ensure()
        if warning:
            self.progress(f"postgres   warning: {warning}")

    def needs_restart(self) -> bool:
        """Running without TimescaleDB preloaded although it is installed now."""
        if not self._timescaledb_library():
            return False
        try:
            with psycopg.connect(self._superuser_dsn()) as conn:
                row = conn.execute("SHOW shared_preload_libraries").fetchone()
        except (psycopg.Error, FileNotFoundError):
            return False
        return row is not None and "timescaledb" not in str(row[0])

    def _owner(self) -> tuple[int, int] | None:
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam(self.settings.postgres.os_user)
        except KeyError:
            raise PosflowError(
                f"PostgreSQL refuses to run as root and there is no "
                f"'{self.settings.postgres.os_user}' account to run it as",
                fix="create it (`useradd --system postgres`) or set POSFLOW_POSTGRES__OS_USER",
            ) from None
        return entry.pw_uid, entry.pw_gid

    def configure(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        if (self.data / "PG_VERSION").exists():
            return
        owner = self._owner()
        _check_traversable(self.dir, owner)
        shutil.rmtree(self.data, ignore_errors=True)
        self.data.mkdir(mode=0o700)
        pwfile = self._superuser_password_file
        pwfile.write_text(secrets.token_urlsafe(24))
        pwfile.chmod(0o600)
        init_pwfile = self.dir / ".initdb-pw"
        shutil.copyfile(pwfile, init_pwfile)
        if owner is not None:
            os.chown(self.data, *owner)
            os.chown(init_pwfile, *owner)
        run_as: dict[str, object] = {}
        if owner is not None:
            run_as = {"user": owner[0], "group": owner[1], "extra_groups": []}
        try:
            proc = subprocess.run(
                [
                    self._bin("initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    f"--pwfile={init_pwfile}",
                    "--auth-local=peer",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ],
                capture_output=True,
                text=True,
                check=False,
                timeout=120,
                **run_as,  # type: ignore[call-overload]
            )
        finally:
            init_pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            shutil.rmtree(self.data, ignore_errors=True)
            raise PosflowError(
                f"initdb failed for {self.data}: {proc.stderr.strip()[-400:]}",
                fix="check the message above; the data directory was removed, so retry",
            )

    def argv(self) -> list[str]:
        pg = self.settings.postgres
        options = {
            "listen_addresses": pg.host,
            "port": str(pg.port),
            "unix_socket_directories": "",
            "max_connections": "200",
            "shared_buffers": "256MB",
            "synchronous_commit": "on",  # money tables rely on it; telemetry opts out per session
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "log_min_duration_statement": "1000",
            # Dashboard queries are short; JIT compiling them cost 0.8 s of a 1.2 s query
            # (docs/benchmarks/storage.md). Off, as TimescaleDB advises for such loads.
            "jit": "off",
        }
        if self._timescaledb_library():
            options["shared_preload_libraries"] = "timescaledb"
            options["timescaledb.telemetry_level"] = "off"
        argv = [self._bin("postgres"), "-D", str(self.data)]
        for key, value in options.items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def _superuser_dsn(self, database: str = "postgres") -> str:
        pg = self.settings.postgres
        password = self._superuser_password_file.read_text().strip()
        return (
            f"host={pg.host} port={pg.port} dbname={database} user=postgres "
            f"password={password} connect_timeout=3"
        )

    def ready(self) -> bool:
        try:
            with psycopg.connect(self._superuser_dsn()) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True

    def after_ready(self) -> None:
        pg = self.settings.postgres
        with psycopg.connect(self._superuser_dsn(), autocommit=True) as conn:
            role = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [pg.user]).fetchone()
            verb = "ALTER" if role else "CREATE"
            conn.execute(
                # CREATEDB: tests and benchmarks make throw-away databases on the dev stack.
                sql.SQL(verb + " ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                    sql.Identifier(pg.user), sql.Literal(pg.password.get_secret_value())
                )
            )
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", [pg.database]
            ).fetchone()
            if not exists:
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(pg.database), sql.Identifier(pg.user)
                    )
                )
        with psycopg.connect(self._superuser_dsn(pg.database), autocommit=True) as conn:
            available = conn.execute(
                "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
            ).fetchone()
            if available and self._timescaledb_library():
                conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                # Databases created later on this stack (a test's, a benchmark's) copy a
                # template that has it (posflow.storage.databases.create_database).
                self._timescaledb_template()
            elif self.settings.stack.require_timescaledb:
                raise PosflowError(
                    "TimescaleDB is required (POSFLOW_STACK__REQUIRE_TIMESCALEDB=true) but the "
                    "stack's PostgreSQL does not have it",
                    fix="see the warning above; `posflow stack up` builds it from "
                    "POSFLOW_STACK__TIMESCALEDB_SOURCE",
                )

    def _timescaledb_template(self) -> None:
        """The template a new database copies to have TimescaleDB (storage/databases.py)."""
        name = TIMESCALEDB_TEMPLATE
        with psycopg.connect(self._superuser_dsn(), autocommit=True) as conn:
            if timescaledb_template_exists(conn):
                return
            drop_database(conn, name)
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(
                sql.Identifier(name)))  # fmt: skip
            with psycopg.connect(self._superuser_dsn(name), autocommit=True) as tmpl:
                tmpl.execute("CREATE EXTENSION timescaledb")
            # No connections: TimescaleDB's launcher then starts no scheduler there, and
            # nothing is ever in the way of CREATE DATABASE ... TEMPLATE it.
            conn.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false")
                         .format(sql.Identifier(name)))  # fmt: skip
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                [name],
            )

    def version(self) -> str:
        out = subprocess.run(
            [self._bin("postgres"), "--version"], capture_output=True, text=True, check=False
        )
        return out.stdout.strip().replace("postgres (PostgreSQL)", "PostgreSQL")

    def detail(self) -> str:
        pg = self.settings.postgres
        try:
            with psycopg.connect(self._superuser_dsn(pg.database)) as conn:
                ts = timescaledb_version(conn)
        except (psycopg.Error, FileNotFoundError):
            return ""
        if ts:
            return f"database {pg.database}, TimescaleDB {ts}"
        return f"database {pg.database}, plain PostgreSQL (TimescaleDB extension not installed)"


def _check_traversable(path: Path, owner: tuple[int, int] | None) -> None:
    """The server account must be able to reach its data directory."""
    if owner is None:
        return
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if parent.stat().st_uid != owner[0] and not mode & 0o001:
            raise PosflowError(
                f"PostgreSQL runs as a system account that cannot enter {parent} "
                f"(the stack directory {path.parent} must be reachable by it)",
                fix="put the stack directory elsewhere with POSFLOW_STACK__DIR=/var/tmp/posflow "
                f"or `chmod o+x {parent}`",
            )
