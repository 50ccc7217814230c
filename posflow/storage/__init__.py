"""Storage: schema and migrations, partitions, batched idempotent writers, named queries."""

from posflow.storage.migrate import StoragePath, detect_path, migrate
from posflow.storage.partitions import drop_expired_partitions, ensure_partitions

__all__ = ["StoragePath", "detect_path", "drop_expired_partitions", "ensure_partitions", "migrate"]
