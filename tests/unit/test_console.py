"""The main job's console: counters read from a real prometheus_client exposition."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest
from rich.console import Console

from cli.console import Snapshot, Stage, Watcher, counter_totals, render


def _exposition() -> str:
    registry = CollectorRegistry()
    produced = Counter("posflow_ingest_produced", "records", ["topic"], registry=registry)
    produced.labels(topic="pos.telemetry.v1").inc(120)
    produced.labels(topic="pos.txn.v1").inc(7)
    Counter("posflow_streams_events", "events", ["type"], registry=registry).labels("txn").inc(3)
    return generate_latest(registry).decode()


def test_counter_totals_sum_matching_samples_and_ignore_created_series() -> None:
    text = _exposition()
    found = counter_totals(
        text,
        [
            ("posflow_ingest_produced", {}),
            ("posflow_ingest_produced", {"topic": "pos.txn.v1"}),
            ("posflow_streams_events", {}),
            ("posflow_absent", {}),
        ],
    )
    assert found[("posflow_ingest_produced", ())] == 127.0
    assert found[("posflow_ingest_produced", (("topic", "pos.txn.v1"),))] == 7.0
    assert found[("posflow_streams_events", ())] == 3.0
    assert found[("posflow_absent", ())] == 0.0


def test_render_shows_rates_fleet_alerts_and_the_balance_in_major_units() -> None:
    stages = [Stage("received from MQTT", "ingest", 1, "posflow_ingest_received")]
    snap = Snapshot(
        at=0.0,
        stage_totals={"received from MQTT": 12_345.0},
        stage_rates={"received from MQTT": 250.0},
        online=1990,
        offline=10,
        health_buckets={"healthy (80-100)": 1900, "unhealthy (0-49)": 100},
        open_alerts=[("a1", "battery_low", "T-0001", "firing")],
        balance=[("EUR", 123_456, -250, 0, 42)],
    )
    console = Console(width=160, record=True)
    console.print(
        render(
            snap,
            stages,
            title="t",
            addresses={"merchant API": "http://127.0.0.1:8400/docs"},
            events=["12:00:00 streams exited with code -9; restarting in 1 s"],
            merchant_id="M-1",
            services={"ingest": "pid 1"},
        )
    )
    out = console.export_text()
    assert "received from MQTT" in out
    assert "250" in out
    assert "12,345" in out
    assert "1,990" in out
    assert "battery_low" in out
    assert "T-0001" in out
    assert "1,234.56" in out
    assert "-2.50" in out
    assert "streams exited with code -9" in out


class _Metrics:
    """A /metrics endpoint on loopback whose counter value the test sets."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.value = 0.0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                registry = CollectorRegistry()
                c = Counter("posflow_settlement_ledger_writes", "rows", ["effect"],
                            registry=registry)  # fmt: skip
                c.labels("applied").inc(owner.value)
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_totals_keep_growing_across_a_service_restart() -> None:
    endpoint = _Metrics()
    stage = Stage("ledger entries", "settlement", endpoint.port, "posflow_settlement_ledger_writes")
    watcher = Watcher([stage], "host=/nonexistent", None)
    try:
        seen = []
        for value in (10, 25, 4, 9, 0, 3):  # restarted after 25 and again after 9
            endpoint.value = value
            seen.append(watcher.scrape()["ledger entries"])
        assert seen == [10, 25, 29, 34, 34, 37]
    finally:
        watcher.close()
        endpoint.close()


def test_alert_events_say_each_state_change_with_rule_and_subject() -> None:
    watcher = Watcher([], "host=/nonexistent", None)
    steps = [
        [("a1", "tamper_detected", "T-1", "firing"), ("a2", "printer_out_of_paper", "T-2",
                                                      "pending")],
        [("a1", "tamper_detected", "T-1", "firing"), ("a2", "printer_out_of_paper", "T-2",
                                                      "firing"), ("a3", "battery_low", "T-3",
                                                                  "pending")],
        [("a2", "printer_out_of_paper", "T-2", "acknowledged")],
    ]  # fmt: skip
    for open_alerts in steps:
        watcher._alert_events(Snapshot(at=0.0, stage_totals={}, stage_rates={},
                                       open_alerts=open_alerts))  # fmt: skip
    watcher.close()
    assert list(watcher.events) == [
        "alert firing: printer_out_of_paper on T-2",
        "alert pending: battery_low on T-3",
        "alert acknowledged: printer_out_of_paper on T-2",
        "alert resolved: tamper_detected on T-1",
        "alert dropped (cleared within its `for`): battery_low on T-3",
    ]
