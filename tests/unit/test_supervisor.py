"""The main job's supervisor: real child processes, real signals, no services needed."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from cli.supervisor import ServiceSpec, Supervisor

# A tiny "service": prints, then sleeps until terminated (or exits with the code it is given).
_PROGRAM = (
    sys.executable,
    "-c",
    "import sys, time; print('up', flush=True); "
    "code = int(sys.argv[1]); "
    "time.sleep(0.2 if code >= 0 else 60); sys.exit(max(code, 0))",
)


def _wait(cond: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_a_killed_service_is_restarted_and_the_event_says_so(tmp_path: Path) -> None:
    events: list[str] = []
    sup = Supervisor(
        [ServiceSpec("worker", ["-1"])], log_dir=tmp_path, on_event=events.append, program=_PROGRAM
    )
    sup.start()
    try:
        first = sup.pid("worker")
        assert first is not None
        _wait(lambda: (tmp_path / "worker.log").read_text() == "up\n")
        os.kill(first, signal.SIGKILL)

        def restarted() -> bool:
            sup.poll()
            return sup.restarts("worker") == 1 and sup.pid("worker") not in (None, first)

        _wait(restarted)
        _wait(lambda: (tmp_path / "worker.log").read_text() == "up\nup\n")
        assert events[0] == (
            f"worker exited with code -9; restarting in 1 s (log: {tmp_path / 'worker.log'})"
        )
        assert events[1] == "worker restarted (restart 1)"
        assert sup.exit_codes("worker") == [-9]
    finally:
        sup.stop(timeout_s=5)
    assert sup.pid("worker") is None
    assert (tmp_path / "worker.log").read_text() == "up\nup\n"


def test_a_bounded_job_finishes_without_restart_and_backoff_doubles_for_crashes(
    tmp_path: Path,
) -> None:
    events: list[str] = []
    sup = Supervisor(
        [ServiceSpec("sim", ["0"], restart=False), ServiceSpec("flaky", ["3"])],
        log_dir=tmp_path,
        on_event=events.append,
        program=_PROGRAM,
    )
    sup.start()
    try:

        def two_crashes() -> bool:
            sup.poll()
            return len(sup.exit_codes("flaky")) >= 2

        _wait(two_crashes)
        assert sup.finished("sim")
        assert sup.restarts("sim") == 0
        flaky = [e for e in events if e.startswith("flaky exited")]
        assert flaky[0].startswith("flaky exited with code 3; restarting in 1 s")
        assert flaky[1].startswith("flaky exited with code 3; restarting in 2 s")
        assert "sim finished (exit code 0)" in events
    finally:
        sup.stop(timeout_s=5)


def test_stop_terminates_the_whole_process_group(tmp_path: Path) -> None:
    sup = Supervisor(
        [ServiceSpec("a", ["-1"]), ServiceSpec("b", ["-1"])],
        log_dir=tmp_path,
        on_event=lambda _e: None,
        program=_PROGRAM,
    )
    sup.start()
    pids = [sup.pid("a"), sup.pid("b")]
    started = time.monotonic()
    sup.stop(timeout_s=5)
    assert time.monotonic() - started < 5  # SIGTERM was enough; nothing needed SIGKILL
    for pid in pids:
        assert pid is not None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"process {pid} still alive")
    assert sup.exit_codes("a") == [-signal.SIGTERM]


def test_a_service_with_after_starts_only_once_those_answer_ready(tmp_path: Path) -> None:
    import http.server
    import threading

    state = {"ready": False}

    class Readyz(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if state["ready"] else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Readyz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    events: list[str] = []
    sup = Supervisor(
        [ServiceSpec("bridge", ["-1"], port), ServiceSpec("fleet", ["-1"], after=("bridge",))],
        log_dir=tmp_path, on_event=events.append, program=_PROGRAM,
    )  # fmt: skip
    sup.start()
    try:
        assert sup.pid("bridge") is not None
        for _ in range(5):  # the bridge answers 503: the fleet waits
            sup.poll()
            time.sleep(0.05)
        assert sup.pid("fleet") is None
        assert sup.waiting() == ["fleet"]
        state["ready"] = True

        def started() -> bool:
            sup.poll()
            return sup.pid("fleet") is not None

        _wait(started)
        assert sup.waiting() == []
        assert events == ["fleet started (bridge ready)"]
    finally:
        sup.stop(timeout_s=5)
        server.shutdown()
        server.server_close()
