"""The alert engine's Prometheus metrics (its own registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["AlertMetrics"]


class AlertMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.evaluations = Counter(
            "posflow_alerts_evaluations", "rule-set evaluations (terminal or group)", registry=r
        )
        self.records = Counter("posflow_alerts_records", "records consumed", ["source"], registry=r)
        self.bad_records = Counter(
            "posflow_alerts_bad_records", "records that could not be read (skipped, logged)",
            ["source"], registry=r,
        )  # fmt: skip
        self.alerts = Gauge(
            "posflow_alerts_open", "open alerts by rule and state", ["rule", "state"], registry=r
        )
        self.transitions = Counter(
            "posflow_alerts_notifications_created", "notifications by rule and event",
            ["rule", "event"], registry=r,
        )  # fmt: skip
        self.notify_seconds = Histogram(
            "posflow_alerts_notification_latency_seconds",
            "from the alert's transition to its delivery", ["channel"], registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900),
        )  # fmt: skip
        self.notify_failures = Counter(
            "posflow_alerts_notification_failures", "failed delivery attempts", ["channel"],
            registry=r,
        )  # fmt: skip
        self.dead_letters = Counter(
            "posflow_alerts_notification_dead_letters", "notifications given up", ["channel"],
            registry=r,
        )  # fmt: skip
        self.reloads = Counter(
            "posflow_alerts_rule_reloads", "rules file reloads", ["result"], registry=r
        )
        self.batch_seconds = Histogram(
            "posflow_alerts_batch_seconds", "evaluate + store one batch", registry=r
        )
