"""What every service of the local stack provides to the orchestrator."""

from __future__ import annotations

import signal
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from posflow.settings import Settings
from posflow.stack._process import ManagedProcess

__all__ = ["Port", "ServiceStatus", "StackService"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def _quiet(_: str) -> None:
    return None


DEPLOY_DIR = REPO_ROOT / "deploy"


@dataclass(frozen=True)
class Port:
    host: str
    port: int
    setting: str  # the environment variable that changes it, for error messages


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: str  # running | stopped | not answering
    address: str
    version: str
    pid: int | None
    detail: str = ""


class StackService(ABC):
    """A real server process the stack installs, configures, starts and stops."""

    name: str
    stop_signal: signal.Signals = signal.SIGTERM

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._progress: Callable[[str], None] = _quiet
        root = settings.stack.root
        self.dir = root / self.name
        self.process = ManagedProcess(
            name=self.name,
            run_dir=root / "run",
            log_path=root / "logs" / f"{self.name}.log",
            stop_signal=self.stop_signal,
        )

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    @property
    @abstractmethod
    def ports(self) -> list[Port]:
        """Ports the server listens on; the first is its address."""

    @property
    def address(self) -> str:
        first = self.ports[0]
        return f"{first.host}:{first.port}"

    @property
    def run_as(self) -> str | None:
        """System account to run as when the stack is started by root (None: as is)."""
        return None

    def install(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Make sure the software is present (Debian packages, downloads)."""

    def progress(self, line: str) -> None:
        """Tell the operator about a long step (the stack's progress callback, when up)."""
        self._progress(line)

    def needs_restart(self) -> bool:
        """A running server that must be restarted to take what install() added."""
        return False

    @abstractmethod
    def configure(self) -> None:
        """Write configuration and initialise data directories (idempotent)."""

    @abstractmethod
    def argv(self) -> list[str]:
        """The command line that runs the server in the foreground."""

    def env(self) -> dict[str, str]:
        return {}

    @abstractmethod
    def ready(self) -> bool:
        """True once the server really answers requests."""

    def after_ready(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Provisioning that needs the running server (topics, databases)."""

    @abstractmethod
    def version(self) -> str:
        """The server's version as it reports it."""

    def warnings(self) -> list[str]:
        """Things that work but fall short of what was asked (shown by `stack up`)."""
        return []

    def detail(self) -> str:
        """Extra facts for `stack status` (for example, TimescaleDB or plain PostgreSQL)."""
        return ""
