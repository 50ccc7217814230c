"""MQTT -> Kafka ingest bridge (see docs/architecture.md)."""

__all__: list[str] = []
