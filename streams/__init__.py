"""faust-streaming app: terminal health, settlement, sinks (see docs/architecture.md)."""

__all__: list[str] = []
