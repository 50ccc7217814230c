"""MQTT -> Kafka ingest bridge (see docs/architecture.md)."""

from ingest.bridge import Bridge
from ingest.metrics import BridgeMetrics
from ingest.service import IngestService, build

__all__ = ["Bridge", "BridgeMetrics", "IngestService", "build"]
