"""TimescaleDB for the stack's PostgreSQL: fetched, checked, built and installed once.

TimescaleDB is in no package registry these machines reach, so the stack
builds the pinned release from its source archive against Debian's
``postgresql-server-dev-15`` (about two minutes on two cores). The install
goes into PostgreSQL's own library and extension folders, so the next
``stack up`` (and any other checkout on the machine) finds it and builds
nothing. Where the source can't be had, the stack says so in one line and runs
on plain PostgreSQL, unless ``stack.require_timescaledb`` makes that an error.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from posflow.errors import PosflowError
from posflow.settings import Settings
from posflow.stack._install import ensure_debian_packages

__all__ = ["TIMESCALEDB_VERSION", "TimescaleBuild", "official_source"]

TIMESCALEDB_VERSION = "2.28.3"  # the newest release that supports PostgreSQL 15


def official_source(version: str) -> str:
    """The release tag's source archive on the official repository."""
    return f"https://github.com/timescale/timescaledb/archive/refs/tags/{version}.tar.gz"


class TimescaleBuild:
    """Where TimescaleDB comes from and whether this PostgreSQL already has it."""

    def __init__(self, settings: Settings, progress: Callable[[str], None]) -> None:
        self.settings = settings
        self.progress = progress
        self.version = settings.stack.timescaledb_version
        bin_dir = settings.postgres.bin_dir
        self.pg_config = bin_dir / "pg_config"
        self.cache = settings.stack.cache / "timescaledb"
        self.log_path = settings.stack.root / "logs" / "timescaledb-build.log"

    # --- what is installed -------------------------------------------------------------

    def _pg_dir(self, what: str) -> Path | None:
        if not self.pg_config.exists():
            return None
        out = subprocess.run(
            [str(self.pg_config), what], capture_output=True, text=True, check=False
        )
        return Path(out.stdout.strip()) if out.returncode == 0 else None

    def installed(self) -> bool:
        """The pinned version's library and its extension script are in place."""
        pkglib = self._pg_dir("--pkglibdir") or self.settings.postgres.bin_dir.parent / "lib"
        share = self._pg_dir("--sharedir") or Path("/usr/share/postgresql/15")
        return (pkglib / f"timescaledb-{self.version}.so").exists() and (
            share / "extension" / f"timescaledb--{self.version}.sql"
        ).exists()

    # --- getting it --------------------------------------------------------------------

    def ensure(self) -> str | None:
        """Build and install when missing; returns a one-line warning when it could not."""
        if self.installed():
            return None
        stack = self.settings.stack
        source = stack.timescaledb_source or official_source(self.version)
        try:
            archive = self._fetch(source)
            self._check_sha256(archive, source)
        except PosflowError as exc:
            if stack.require_timescaledb:
                raise
            return f"{exc.what}; running on plain PostgreSQL -- fix: {exc.fix}"
        self._build(archive)
        return None

    def _fetch(self, source: str) -> Path:
        if "://" not in source:
            path = Path(source).expanduser()
            if not path.exists():
                raise PosflowError(
                    f"TimescaleDB {self.version} source {path} does not exist",
                    fix="point POSFLOW_STACK__TIMESCALEDB_SOURCE at the release's source "
                    f"archive (a path or URL; default {official_source(self.version)})",
                )
            return path.resolve()
        target = self.cache / f"timescaledb-{self.version}.tar.gz"
        if target.exists():
            return target
        self.cache.mkdir(parents=True, exist_ok=True)
        self.progress(f"postgres   downloading TimescaleDB {self.version} from {source}")
        partial = target.with_suffix(".part")
        try:
            with urllib.request.urlopen(source, timeout=60) as response, partial.open("wb") as out:  # noqa: S310 - the URL is the operator's setting
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            partial.unlink(missing_ok=True)
            raise PosflowError(
                f"TimescaleDB {self.version}: could not download {source} ({exc})",
                fix="set POSFLOW_STACK__TIMESCALEDB_SOURCE to a local copy of the release's "
                "source archive",
            ) from None
        partial.rename(target)
        return target

    def _check_sha256(self, archive: Path, source: str) -> None:
        wanted = self.settings.stack.timescaledb_sha256
        if not wanted or archive.is_dir():
            return
        digest = hashlib.sha256()
        with archive.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != wanted.lower():
            raise PosflowError(
                f"TimescaleDB source {source} has sha256 {digest.hexdigest()}, "
                f"not the expected {wanted}",
                fix="fetch the release archive again, or correct POSFLOW_STACK__TIMESCALEDB_SHA256",
            )

    # --- building it -------------------------------------------------------------------

    def _build(self, archive: Path) -> None:
        stack = self.settings.stack
        ensure_debian_packages(
            {
                "/usr/include/postgresql/15/server/postgres.h": "postgresql-server-dev-15",
                "cmake": "cmake",
                "gcc": "gcc",
                "make": "make",
            },
            install=stack.install,
            log_path=stack.root / "logs" / "install.log",
        )
        if os.geteuid() != 0 and not os.access(self._pg_dir("--pkglibdir") or "/", os.W_OK):
            raise PosflowError(
                f"TimescaleDB {self.version} must be installed into PostgreSQL's folders, "
                "which needs root",
                fix="run `posflow stack up` as root once, or install timescaledb-2-postgresql-15 "
                "from Timescale's Debian repository",
            )
        source_dir = self._unpack(archive)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.progress(
            f"postgres   building TimescaleDB {self.version} (about two minutes; "
            f"log: {self.log_path})"
        )
        jobs = str(os.cpu_count() or 2)
        steps = [
            [
                "./bootstrap",
                f"-DPG_CONFIG={self.pg_config}",
                "-DREGRESS_CHECKS=OFF",
                "-DTAP_CHECKS=OFF",
                "-DWARNINGS_AS_ERRORS=OFF",
                "-DSEND_TELEMETRY_DEFAULT=OFF",
            ],
            ["make", "-C", "build", f"-j{jobs}"],
            ["make", "-C", "build", "install"],
        ]
        with self.log_path.open("ab") as log:
            for step in steps:
                proc = subprocess.run(
                    step, cwd=source_dir, stdout=log, stderr=subprocess.STDOUT, check=False
                )
                if proc.returncode != 0:
                    raise PosflowError(
                        f"building TimescaleDB {self.version} failed at `{' '.join(step[:3])}` "
                        f"(exit {proc.returncode}); see {self.log_path}",
                        fix="read the build log; POSFLOW_STACK__REQUIRE_TIMESCALEDB=false runs "
                        "the stack on plain PostgreSQL meanwhile",
                    )
        if not self.installed():
            raise PosflowError(
                f"TimescaleDB {self.version} built but timescaledb-{self.version}.so is not in "
                f"PostgreSQL's library folder; see {self.log_path}",
                fix="check that the archive is the release's source for this version",
            )
        self.progress(f"postgres   TimescaleDB {self.version} installed")

    def _unpack(self, archive: Path) -> Path:
        if archive.is_dir():
            return archive
        work = self.cache / "src"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
        tops = [p for p in work.iterdir() if p.is_dir()]
        if len(tops) != 1 or not (tops[0] / "bootstrap").exists():
            raise PosflowError(
                f"{archive} is not a TimescaleDB source archive (no single top folder "
                "with a bootstrap script)",
                fix="point POSFLOW_STACK__TIMESCALEDB_SOURCE at the release's source archive",
            )
        return tops[0]
