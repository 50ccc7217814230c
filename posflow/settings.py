"""The one settings object.

Every service reads its configuration from :class:`Settings`, built once at
the entry point from ``POSFLOW_``-prefixed environment variables (nested
fields use ``__``: ``POSFLOW_KAFKA__PORT=9092``). Tests build it explicitly.
"""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "AlertsSettings",
    "ApiSettings",
    "GrafanaSettings",
    "IngestSettings",
    "KafkaSettings",
    "MosquittoSettings",
    "PostgresSettings",
    "PrometheusSettings",
    "RawSinkSettings",
    "SecuritySettings",
    "ServicePorts",
    "Settings",
    "SettlementSettings",
    "SimulatorSettings",
    "StackSettings",
    "StorageSettings",
    "StreamsSettings",
]

_LOOPBACK = "127.0.0.1"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StackSettings(_Section):
    """Where the local stack keeps its data, logs, pids and downloads."""

    dir: Path = Field(default=Path(".stack"), description="stack directory (data, logs, pids)")
    cache_dir: Path | None = Field(
        default=None,
        description="downloads (Kafka jars, Maven repository); defaults to <dir>/cache",
    )
    install: bool = Field(default=True, description="install missing Debian packages with apt-get")
    start_timeout_s: float = Field(default=90.0, gt=0, description="per service readiness wait")
    stop_timeout_s: float = Field(default=30.0, gt=0, description="grace before SIGKILL on down")
    java: str = Field(default="java", description="the JDK's java launcher (17 or newer)")
    mvn: str = Field(default="mvn", description="the Maven launcher used to fetch Kafka's jars")
    timescaledb_version: str = Field(
        default="2.28.3", description="TimescaleDB release built for the stack's PostgreSQL 15"
    )
    timescaledb_source: str | None = Field(
        default=None,
        description="TimescaleDB source archive (path or URL); default: the release tag's "
        "archive on github.com/timescale/timescaledb",
    )
    timescaledb_sha256: str | None = Field(
        default=None, description="expected sha256 of the source archive (checked when set)"
    )
    require_timescaledb: bool = Field(
        default=False,
        description="fail `stack up` when TimescaleDB can't be installed (else plain PostgreSQL)",
    )

    @property
    def root(self) -> Path:
        return self.dir.resolve()

    @property
    def cache(self) -> Path:
        return (self.cache_dir or self.dir / "cache").resolve()


class KafkaSettings(_Section):
    host: str = _LOOPBACK
    port: int = Field(default=19092, ge=1, le=65535)
    controller_port: int = Field(default=19093, ge=1, le=65535)
    version: str = Field(default="4.0.1", description="org.apache.kafka:kafka_2.13 version")
    heap: str = Field(default="768m", description="broker JVM heap (-Xmx)")
    default_partitions: int = Field(default=6, ge=1)
    topic_prefix: str = Field(default="pos", description="prefix of every pipeline topic")

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"


class PostgresSettings(_Section):
    host: str = _LOOPBACK
    port: int = Field(default=15432, ge=1, le=65535)
    database: str = "posflow"
    user: str = "posflow"
    password: SecretStr = SecretStr("posflow-dev")
    bin_dir: Path = Path("/usr/lib/postgresql/15/bin")
    os_user: str = Field(
        default="postgres",
        description="system account the server runs as when the stack is started by root",
    )

    def dsn(self, *, database: str | None = None) -> str:
        """A libpq connection string (contains the password: never log it)."""
        return (
            f"host={self.host} port={self.port} dbname={database or self.database} "
            f"user={self.user} password={self.password.get_secret_value()} "
            "connect_timeout=5"
        )


class MosquittoSettings(_Section):
    host: str = _LOOPBACK
    port: int = Field(default=11883, ge=1, le=65535)
    tls_port: int = Field(
        default=18883, ge=1, le=65535, description="TLS listener (client certificates, TLS 1.2+)"
    )
    service_user: str = Field(default="posflow-svc", description="account of posflow's services")
    service_password: SecretStr = SecretStr("posflow-svc-dev")
    max_connections: int = Field(default=-1, description="-1: unlimited (bounded by nofile)")
    max_queued_messages: int = Field(default=100_000, ge=0)
    max_inflight_messages: int = Field(default=1_000, ge=0)
    nofile: int = Field(default=131_072, ge=1024, description="file-descriptor limit wanted")


class PrometheusSettings(_Section):
    host: str = _LOOPBACK
    port: int = Field(default=19090, ge=1, le=65535)
    scrape_interval_s: int = Field(default=5, ge=1)


class IngestSettings(_Section):
    """The MQTT -> Kafka bridge."""

    client_id: str = Field(
        default_factory=lambda: f"posflow-ingest-{socket.gethostname()}",
        description="MQTT client id; keep it stable per instance so its session survives restarts",
    )
    share_group: str = Field(default="ingest", description="MQTT v5 shared-subscription group")
    topic_filter: str = Field(default="pos/v1/+/+/+", description="what the bridge subscribes to")
    max_inflight: int = Field(
        default=2000, ge=1, le=65535, description="messages received but not yet acked by Kafka"
    )
    max_payload_bytes: int = Field(default=65_536, ge=256)
    clock_ahead_s: int = Field(
        default=24 * 3600, ge=60, description="refuse a payload ts further ahead of receipt"
    )
    clock_behind_s: int = Field(
        default=30 * 86400,
        ge=3600,
        description="refuse a payload ts further behind receipt (store-and-forward allowance)",
    )
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0)
    linger_ms: int = Field(default=5, ge=0, description="Kafka producer batching delay")
    drain_timeout_s: float = Field(default=30.0, gt=0)
    retry_backoff_s: float = Field(default=0.5, gt=0)
    kafka_stall_s: float = Field(
        default=5.0, gt=0, description="no Kafka acknowledgement for this long: not ready"
    )


class StreamsSettings(_Section):
    """The faust-streaming health workers."""

    app_id: str = Field(default="posflow-health", description="faust app id = consumer group")
    window_s: int = Field(default=60, ge=1, description="tumbling window length")
    grace_s: int = Field(default=10, ge=0, description="how late a message may be for its window")
    offline_factor: float = Field(default=3.0, gt=1, description="silent > K x heartbeat: offline")
    drain_span_s: int = Field(default=1800, ge=60, description="battery drain-rate span")
    max_ahead_s: int = Field(
        default=24 * 3600,
        ge=60,
        description="event times further ahead of the worker's clock go to the dead-letter topic",
    )
    tick_s: float = Field(default=1.0, gt=0, description="offline / window-close timer period")
    batch_max: int = Field(default=2000, ge=1, description="events processed per batch")
    batch_within_s: float = Field(default=0.05, gt=0, description="max wait to fill a batch")
    sink_flush_s: float = Field(default=0.25, gt=0, description="health rows to the database")
    log_level: str = "warn"
    data_dir: Path = Field(
        default=Path(tempfile.gettempdir()) / "posflow-faust",
        description="faust's local directory (tables live in memory, restored from changelogs)",
    )


class StorageSettings(_Section):
    """Retention, compression and partitioning of the time series."""

    raw_retention_days: int = Field(default=30, ge=1, description="raw telemetry and health")
    rollup_retention_days: int = Field(
        default=400, ge=1, description="rollups and transactions (analytics)"
    )
    compress_after_days: int = Field(
        default=2,
        ge=1,
        description="TimescaleDB: compress telemetry and health chunks older than this",
    )
    partitions_ahead_days: int = Field(default=3, ge=1, description="plain PostgreSQL")
    partitions_behind_days: int = Field(default=2, ge=0, description="plain PostgreSQL")


class ServicePorts(_Section):
    """Where posflow's own services expose /metrics and health endpoints."""

    bind_host: str = Field(default=_LOOPBACK, description="0.0.0.0 to serve other hosts")
    ingest: int = 9401
    streams: int = 9402
    alerts: int = 9403
    settlement: int = 9404
    api: int = 8400
    simulator: int = 9405
    rawsink: int = 9407


class SettlementSettings(_Section):
    """The settlement worker: transactions -> merchant ledger, balances, cash-flow events."""

    group: str = Field(default="posflow-settlement", description="Kafka consumer group")
    max_records: int = Field(default=1000, ge=1, description="records per ledger transaction")
    poll_ms: int = Field(
        default=20,
        ge=1,
        le=10_000,
        description="max wait to fill a batch (docs/benchmarks/feed.md: 100 -> 20 ms)",
    )
    release_interval_s: float = Field(
        default=60.0, gt=0, description="how often pending money past its cut-off is released"
    )
    outbox_interval_s: float = Field(
        default=1.0, gt=0, description="how often unpublished cash-flow/integrity events are sent"
    )


class ApiSettings(_Section):
    """The merchant feed API (REST + server-sent events)."""

    workers: int = Field(
        default=1, ge=1, description="uvicorn worker processes (rate limits are per process)"
    )
    rate_per_s: float = Field(
        default=20.0, gt=0, description="token bucket refill per API key, per API process"
    )
    rate_burst: int = Field(default=40, ge=1, description="token bucket size per API key")
    page_max: int = Field(default=500, ge=1, description="largest `limit` a page may ask for")
    page_default: int = Field(default=100, ge=1, description="`limit` when none is given")
    db_pool_max: int = Field(default=10, ge=1, description="PostgreSQL connections per process")
    sse_heartbeat_s: float = Field(default=15.0, gt=0, description="keep-alive comment period")
    sse_poll_s: float = Field(
        default=5.0, gt=0, description="re-read streams this often in case a NOTIFY was missed"
    )
    sse_queue_max: int = Field(
        default=10_000, ge=1, description="events buffered per SSE client before it is dropped"
    )
    sse_retry_ms: int = Field(default=1000, ge=0, description="reconnect delay told to clients")
    shutdown_grace_s: float = Field(default=10.0, gt=0, description="drain time on SIGTERM")
    audit_staff_reads: bool = Field(
        default=True, description="record staff reads of merchant data in the audit trail"
    )
    auth_recheck_s: float = Field(
        default=15.0, gt=0, description="open streams re-check their key (revocation) this often"
    )
    webhook_port: int = Field(
        default=9406, ge=1, le=65535, description="/metrics /healthz /readyz of the deliverer"
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="per delivery attempt")
    webhook_backoff_base_s: float = Field(
        default=1.0, gt=0, description="wait after the first failed attempt; doubles each time"
    )
    webhook_backoff_max_s: float = Field(default=600.0, gt=0, description="longest wait")
    webhook_jitter: float = Field(
        default=0.5, ge=0, le=1, description="a wait is drawn from [d*(1-jitter), d]"
    )
    webhook_give_up_s: float = Field(
        default=3 * 24 * 3600.0, gt=0, description="failing this long: endpoint dead (replayable)"
    )
    webhook_poll_s: float = Field(
        default=1.0, gt=0, description="due-endpoint check period (NOTIFY wakes it sooner)"
    )
    webhook_batch: int = Field(default=100, ge=1, description="events per endpoint per round")
    webhook_concurrency: int = Field(default=16, ge=1, description="endpoints delivered at once")
    webhook_lease_s: float = Field(
        default=120.0, gt=0, description="an endpoint's claim by one deliverer process"
    )
    webhook_allow_http: bool = Field(
        default=False, description="allow http:// URLs other than loopback (else https only)"
    )


class AlertsSettings(_Section):
    """The alert engine."""

    rules_file: Path | None = Field(
        default=None, description="user rules (YAML) added to the defaults"
    )
    group: str = Field(default="posflow-alerts", description="offsets key in consumer_offsets")
    tick_s: float = Field(default=0.5, gt=0, description="for-timers, silences, expiry checks")
    max_records: int = Field(default=2000, ge=1, description="records per state transaction")
    reload_poll_s: float = Field(default=2.0, gt=0, description="rules file change check")
    reference_refresh_s: float = Field(default=60.0, gt=0, description="merchants/terminals")
    area_deg: float = Field(default=0.1, gt=0, description="grid cell of an 'area' (degrees)")
    webhook_url: str | None = Field(default=None, description="signed webhook receiver")
    webhook_secret: SecretStr = SecretStr("posflow-alerts-dev")
    webhook_timeout_s: float = Field(default=5.0, gt=0)
    retry_schedule_s: list[float] = Field(
        default=[1, 2, 4, 8, 15, 30, 30, 30, 60, 60, 120, 300],
        description="waits between webhook attempts; after the last: dead letter (~11 min)",
    )
    log_notifications: bool = Field(default=True, description="the log channel")


class RawSinkSettings(_Section):
    """The raw storage sink: telemetry and transaction envelopes -> time-series tables."""

    group: str = Field(default="posflow-rawsink", description="Kafka consumer group")
    max_records: int = Field(default=5000, ge=1, description="records per database batch")
    poll_ms: int = Field(default=100, ge=1, le=10_000, description="max wait to fill a batch")
    maintain_interval_s: float = Field(
        default=300.0, gt=0, description="plain PostgreSQL upkeep period (partitions, rollups)"
    )


class SimulatorSettings(_Section):
    """The fleet simulator and load test."""

    seed: int = Field(default=42, description="same seed, same fleet, same messages")


class SecuritySettings(_Section):
    """Terminal PKI, merchant keys, TLS of client connections, the deployment profile."""

    profile: Literal["dev", "production"] = Field(
        default="dev", description="production: services refuse the repo's dev credentials"
    )
    mqtt_tls: bool = Field(default=True, description="Mosquitto gets the TLS listener")
    mqtt_password_auth: bool = Field(
        default=True, description="password listener + accounts (development; off in production)"
    )
    pki_dir: Path | None = Field(default=None, description="CA and certificates; <stack>/pki")
    cert_days: int = Field(default=397, ge=1, description="terminal certificate lifetime")
    master_key: SecretStr | None = Field(
        default=None, description="base64 of 32 bytes; or master_key_file"
    )
    master_key_file: Path | None = Field(
        default=None, description="file holding the master key (mode 0600); dev: <stack>/keys"
    )
    postgres_sslmode: Literal[
        "disable", "allow", "prefer", "require", "verify-ca", "verify-full"
    ] = Field(default="prefer", description="libpq sslmode of posflow's connections")
    postgres_sslrootcert: Path | None = None
    postgres_sslcert: Path | None = None
    postgres_sslkey: Path | None = None
    kafka_security_protocol: Literal["PLAINTEXT", "SSL"] = "PLAINTEXT"
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    mqtt_client_tls: bool = Field(
        default=False,
        description="services and simulated terminals connect to Mosquitto's TLS listener "
        "with a client certificate instead of a password (production: true)",
    )
    mqtt_client_cafile: Path | None = Field(
        default=None, description="CA that signed the broker; default <pki>/ca.crt"
    )
    mqtt_client_certfile: Path | None = Field(
        default=None,
        description="the service account's certificate; default <pki>/terminals/<service_user>.crt",
    )
    mqtt_client_keyfile: Path | None = Field(
        default=None, description="its private key; default next to the certificate"
    )


class GrafanaSettings(_Section):
    """The stack's Grafana, and where `posflow dashboards publish` pushes the dashboards."""

    host: str = Field(default=_LOOPBACK, description="the stack's Grafana listens here")
    port: int = Field(default=13000, ge=1, le=65535, description="the stack's Grafana port")
    source: str | None = Field(
        default=None,
        description="a Grafana home folder or release archive (.tar.xz/.tar.gz, unpacked once "
        "into the stack's cache) for the stack; default: grafana-server on PATH, else none",
    )
    url: str = Field(
        default="", description="Grafana's base URL; default: the stack's, http://<host>:<port>"
    )
    token: SecretStr | None = Field(
        default=None, description="service-account token; else basic auth with user/password"
    )
    user: str = Field(default="admin", description="basic-auth user; the stack's Grafana admin")
    password: SecretStr | None = Field(
        default=SecretStr("posflow-grafana-dev"),
        description="basic-auth password; the stack's Grafana admin password",
    )
    folder: str = Field(default="posflow", description="folder title, created when missing")
    folder_uid: str = Field(default="posflow", description="folder uid")
    postgres_datasource: str = Field(
        default="posflow-pg", description="uid or name of Grafana's PostgreSQL datasource"
    )
    prometheus_datasource: str = Field(
        default="posflow-prom", description="uid or name of Grafana's Prometheus datasource"
    )
    timeout_s: float = Field(default=10.0, gt=0, description="per HTTP request")

    @model_validator(mode="after")
    def _stack_url(self) -> GrafanaSettings:
        # Frozen: set the derived default once, while validating.
        if not self.url:
            object.__setattr__(self, "url", f"http://{self.host}:{self.port}")
        return self


class Settings(BaseSettings):
    """All of posflow's configuration, from ``POSFLOW_*`` environment variables."""

    model_config = SettingsConfigDict(
        env_prefix="POSFLOW_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    stack: StackSettings = StackSettings()
    kafka: KafkaSettings = KafkaSettings()
    postgres: PostgresSettings = PostgresSettings()
    mosquitto: MosquittoSettings = MosquittoSettings()
    prometheus: PrometheusSettings = PrometheusSettings()
    services: ServicePorts = ServicePorts()
    ingest: IngestSettings = IngestSettings()
    storage: StorageSettings = StorageSettings()
    streams: StreamsSettings = StreamsSettings()
    settlement: SettlementSettings = SettlementSettings()
    api: ApiSettings = ApiSettings()
    alerts: AlertsSettings = AlertsSettings()
    simulator: SimulatorSettings = SimulatorSettings()
    rawsink: RawSinkSettings = RawSinkSettings()
    security: SecuritySettings = SecuritySettings()
    grafana: GrafanaSettings = GrafanaSettings()
