"""A small process supervisor for the main job: start services, restart the ones that die.

Each service is a ``posflow`` subcommand run as its own process (exactly how
an operator runs it on its own machine), in its own process group, with its
output in ``<log_dir>/<name>.log``. A service that exits while the supervisor
is running is restarted after a backoff that doubles (1 s, 2 s, 4 s, ... up to
30 s) and resets once the service has stayed up for a minute; every start,
exit and restart is reported through ``on_event`` so the console can say so.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cli.harness import answers_ready, posflow_command

__all__ = ["ServiceSpec", "Supervisor"]

_BACKOFF_MAX_S = 30.0
_STABLE_AFTER_S = 60.0


@dataclass(frozen=True)
class ServiceSpec:
    """One supervised service: a name and the ``posflow`` arguments that run it."""

    name: str
    args: Sequence[str]
    metrics_port: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    restart: bool = True  # False for a job that is expected to end (e.g. a bounded simulation)
    # Started only once each of these answers 200 on its /readyz (their metrics ports):
    # the simulator waits for the bridge's subscription, or its first messages go nowhere.
    after: Sequence[str] = ()


@dataclass
class _Running:
    spec: ServiceSpec
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = 1.0
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)
    finished: bool = False
    waiting: bool = False  # not started yet: a service in ``after`` is not ready


class Supervisor:
    """Starts :class:`ServiceSpec` processes, restarts crashed ones, stops them all cleanly."""

    def __init__(
        self,
        specs: Sequence[ServiceSpec],
        *,
        log_dir: Path,
        on_event: Callable[[str], None],
        program: Sequence[str] = tuple(posflow_command()),
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.log_dir = log_dir
        self.on_event = on_event
        self.program = list(program)
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.services = {s.name: _Running(s) for s in specs}
        self.stopping = False

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start every service; one with ``after`` once those are ready (see :meth:`poll`)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for running in self.services.values():
            if running.spec.after:
                running.waiting = True
            else:
                self._spawn(running)
        self._start_ready()

    def waiting(self) -> list[str]:
        """Services not started yet because what they come after is not ready."""
        return [name for name, r in self.services.items() if r.waiting]

    def _ready(self, name: str) -> bool:
        port = self.services[name].spec.metrics_port
        if port is None:
            return self.services[name].proc is not None
        return answers_ready(port)

    def _start_ready(self) -> None:
        for name, running in self.services.items():
            if running.waiting and all(self._ready(dep) for dep in running.spec.after):
                running.waiting = False
                self._spawn(running)
                self.on_event(f"{name} started ({', '.join(running.spec.after)} ready)")

    def poll(self) -> None:
        """Notice exits and restart what should run; call it about once a second."""
        now = time.monotonic()
        if not self.stopping:
            self._start_ready()
        for running in self.services.values():
            proc = running.proc
            if proc is not None and proc.poll() is not None:
                self._exited(running, int(proc.returncode), now)
            if running.restart_at is not None and now >= running.restart_at and not self.stopping:
                running.restart_at = None
                running.restarts += 1
                self._spawn(running)
                self.on_event(f"{running.spec.name} restarted (restart {running.restarts})")
            elif (
                running.proc is not None
                and now - running.started_at > _STABLE_AFTER_S
                and running.backoff_s > 1.0
            ):
                running.backoff_s = 1.0  # it stayed up: the next crash restarts quickly again

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM every service (they drain), then SIGKILL what is left after ``timeout_s``."""
        self.stopping = True
        for running in self.services.values():
            if running.proc is not None and running.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(running.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for running in self.services.values():
            proc = running.proc
            if proc is not None:
                self._reap(running, proc, timeout_s, deadline)
            if running.log is not None:
                running.log.close()
                running.log = None

    def _reap(
        self, running: _Running, proc: subprocess.Popen[bytes], timeout_s: float, deadline: float
    ) -> None:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.on_event(f"{running.spec.name} did not stop in {timeout_s:.0f} s: killed")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        running.exit_codes.append(int(proc.returncode))
        running.proc = None

    # --- queries ----------------------------------------------------------------------

    def pid(self, name: str) -> int | None:
        proc = self.services[name].proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def restarts(self, name: str) -> int:
        return self.services[name].restarts

    def finished(self, name: str) -> bool:
        """True once a non-restarting service has ended with exit code 0."""
        return self.services[name].finished

    def exit_codes(self, name: str) -> list[int]:
        return list(self.services[name].exit_codes)

    # --- internals --------------------------------------------------------------------

    def _spawn(self, running: _Running) -> None:
        spec = running.spec
        if running.log is None:
            running.log = (self.log_dir / f"{spec.name}.log").open("ab")
        running.proc = subprocess.Popen(
            [*self.program, *spec.args],
            stdout=running.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**self.base_env, **spec.env},
            start_new_session=True,  # its own process group: signals reach its children too
        )
        running.started_at = time.monotonic()
        # For operators (and tests) who want to signal one service directly.
        (self.log_dir / f"{spec.name}.pid").write_text(f"{running.proc.pid}\n")

    def _exited(self, running: _Running, code: int, now: float) -> None:
        running.proc = None
        running.exit_codes.append(code)
        if self.stopping:
            return
        spec = running.spec
        if not spec.restart:
            running.finished = code == 0
            self.on_event(f"{spec.name} finished (exit code {code})")
            return
        self.on_event(
            f"{spec.name} exited with code {code}; restarting in {running.backoff_s:.0f} s"
            f" (log: {self.log_dir / (spec.name + '.log')})"
        )
        running.restart_at = now + running.backoff_s
        running.backoff_s = min(_BACKOFF_MAX_S, running.backoff_s * 2)
