"""Processes the stack owns: started detached, tracked by pid file, stopped by pid.

A pid file holds the pid and the kernel's start time of that process, so a
recycled pid is never mistaken for ours and ``down`` never signals a stranger.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from posflow.errors import PosflowError

__all__ = [
    "ManagedProcess",
    "check_port_free",
    "log_tail",
    "port_answers",
    "raise_nofile",
    "wait_until",
]

# Popen objects of servers we started: kept so they are not collected (and reaped) early.
_CHILDREN: list[subprocess.Popen[bytes]] = []


def _start_time(pid: int) -> str | None:
    """The process start time in clock ticks since boot, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie has finished; only its parent's wait() is missing
        return None
    return fields[19]


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, for error messages."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16_384))
            text = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def check_port_free(host: str, port: int, *, service: str, setting: str) -> None:
    """Refuse to start when something else already listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers do: connections of a previous run in TIME_WAIT must not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
            raise PosflowError(
                f"{service} cannot start: port {host}:{port} is already in use by another process",
                fix=f"stop that process (`ss -ltnp 'sport = :{port}'` shows it) "
                f"or choose another port with {setting}=<port>",
            ) from None


def port_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a TCP connection to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    probe: Callable[[], bool],
    *,
    timeout_s: float,
    alive: Callable[[], bool] = lambda: True,
) -> bool:
    """Poll ``probe`` with a short backoff until it holds, the process dies, or time runs out."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while time.monotonic() < deadline:
        if probe():
            return True
        if not alive():
            return False
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    return probe()


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit (children inherit it); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if os.geteuid() == 0 and hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


@dataclass(frozen=True)
class ManagedProcess:
    """One long-running server process of the stack."""

    name: str
    run_dir: Path
    log_path: Path
    stop_signal: signal.Signals = signal.SIGTERM

    @property
    def pid_path(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    def pid(self) -> int | None:
        """The pid if our process is alive, else None (a stale pid file is removed)."""
        try:
            pid_text, started = self.pid_path.read_text().split()
            pid = int(pid_text)
        except (FileNotFoundError, ValueError):
            return None
        if _start_time(pid) != started:
            self.pid_path.unlink(missing_ok=True)
            return None
        return pid

    def running(self) -> bool:
        return self.pid() is not None

    def start(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: dict[str, str] | None = None,
        user: str | None = None,
    ) -> int:
        """Start detached (own session), output to the log, and record the pid."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        run_as: dict[str, object] = {}
        if user is not None and os.geteuid() == 0:
            entry = pwd.getpwnam(user)
            run_as = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        with self.log_path.open("ab") as log:
            log.write(f"\n=== posflow: starting {self.name}: {' '.join(argv)}\n".encode())
            log.flush()
            proc: subprocess.Popen[bytes] = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **run_as,  # type: ignore[call-overload]
            )
        _CHILDREN.append(proc)
        started = None
        for _ in range(100):
            started = _start_time(proc.pid)
            if started is not None or proc.poll() is not None:
                break
            time.sleep(0.01)
        self.pid_path.write_text(f"{proc.pid} {started}\n")
        return proc.pid

    def stop(self, timeout_s: float) -> bool:
        """Stop our process gracefully, then by force; True if it was running."""
        pid = self.pid()
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, self.stop_signal)
        if not wait_until(lambda: _start_time(pid) is None, timeout_s=timeout_s):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            wait_until(lambda: _start_time(pid) is None, timeout_s=5)
        # Children of the server (postgres backends, for one) share its process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        self.pid_path.unlink(missing_ok=True)
        return True

    def reload(self) -> None:
        """Ask the server to re-read its configuration (SIGHUP)."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGHUP)
