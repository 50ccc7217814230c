"""Fleet simulator and load test (see docs/architecture.md)."""

__all__: list[str] = []
