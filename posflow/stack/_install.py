"""Installing what the stack needs: Debian packages, the JDK, Maven, Kafka's jars."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from posflow.errors import PosflowError

__all__ = ["ensure_debian_packages", "fetch_kafka_jars", "java_major_version", "require_tool"]

_apt_updated = False


def _apt(args: list[str], log_path: Path) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.run(
            ["apt-get", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            check=False,
        )
    if proc.returncode != 0:
        raise PosflowError(
            f"apt-get {' '.join(args)} failed (exit {proc.returncode}); see {log_path}",
            fix="check that Debian's package mirror is reachable and dpkg is not locked",
        )


def ensure_debian_packages(needed: dict[str, str], *, install: bool, log_path: Path) -> None:
    """Install the Debian packages whose file (key) is missing; value is the package name."""
    global _apt_updated  # noqa: PLW0603 - one `apt-get update` per process is the point
    missing = sorted({pkg for path, pkg in needed.items() if not _exists(path)})
    if not missing:
        return
    command = f"apt-get install -y {' '.join(missing)}"
    if not install:
        raise PosflowError(
            f"missing Debian packages: {', '.join(missing)}",
            fix=f"run `{command}` or allow the stack to install (POSFLOW_STACK__INSTALL=true)",
        )
    if os.geteuid() != 0:
        raise PosflowError(
            f"missing Debian packages: {', '.join(missing)} (installing needs root)",
            fix=f"run `sudo apt-get update && sudo {command}`",
        )
    if not _apt_updated:
        _apt(["update", "-q"], log_path)
        _apt_updated = True
    _apt(["install", "-y", "-q", "--no-install-recommends", *missing], log_path)


def _exists(path_or_tool: str) -> bool:
    if "/" in path_or_tool:
        return Path(path_or_tool).exists()
    return shutil.which(path_or_tool) is not None


def require_tool(tool: str, *, what: str, setting: str, package: str) -> str:
    """Resolve a launcher on PATH (or an absolute path) or fail naming the fix."""
    resolved = shutil.which(tool)
    if resolved is None:
        raise PosflowError(
            f"{what} not found: `{tool}` is not an executable on PATH",
            fix=f"install it (`apt-get install -y {package}`) or point {setting} at it",
        )
    return resolved


def java_major_version(java: str) -> int:
    """The major version of a java launcher (17 for 'openjdk version "17.0.15"')."""
    out = subprocess.run(
        [java, "-version"], capture_output=True, text=True, check=False, timeout=60
    )
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if out.returncode != 0 or match is None:
        raise PosflowError(
            f"`{java} -version` did not report a Java version",
            fix="install a JDK 17+ (`apt-get install -y openjdk-17-jre-headless`)",
        )
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def fetch_kafka_jars(
    *, mvn: str, pom: Path, version: str, libs: Path, maven_repo: Path, log_path: Path
) -> None:
    """Copy Apache Kafka's broker jars and their dependencies from Maven Central into ``libs``."""
    if (libs / f"kafka_2.13-{version}.jar").exists():
        return
    staging = libs.with_name(libs.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.run(
            [
                mvn,
                "-B",
                "-q",
                "-f",
                str(pom),
                f"-Dmaven.repo.local={maven_repo}",
                f"-Dkafka.version={version}",
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={staging}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if proc.returncode != 0:
        tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if "ERROR" in ln]
        reason = tail[0].strip() if tail else f"exit {proc.returncode}"
        raise PosflowError(
            f"Maven could not fetch Apache Kafka {version} from Maven Central: {reason[:300]} "
            f"(full log: {log_path})",
            fix="check that Maven Central is reachable (proxy settings in ~/.m2/settings.xml) "
            "and that POSFLOW_KAFKA__VERSION names a published org.apache.kafka:kafka_2.13",
        )
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
