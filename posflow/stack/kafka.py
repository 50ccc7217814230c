"""Apache Kafka: one KRaft broker+controller from Apache's own jars, run with the JDK."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from posflow.errors import PosflowError
from posflow.settings import Settings
from posflow.stack._install import (
    ensure_debian_packages,
    fetch_kafka_jars,
    java_major_version,
    require_tool,
)
from posflow.stack._process import port_answers
from posflow.stack._service import DEPLOY_DIR, Port, StackService
from posflow.topics import TopicSpec, pipeline_topics

__all__ = ["KafkaService", "ensure_topics"]

_LOG4J2 = """\
status = warn
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.filePattern = {log}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""


class KafkaService(StackService):
    name = "kafka"

    @property
    def ports(self) -> list[Port]:
        k = self.settings.kafka
        return [
            Port(k.host, k.port, "POSFLOW_KAFKA__PORT"),
            Port(k.host, k.controller_port, "POSFLOW_KAFKA__CONTROLLER_PORT"),
        ]

    @property
    def libs(self) -> Path:
        return self.settings.stack.cache / f"kafka-{self.settings.kafka.version}" / "libs"

    def _java(self) -> str:
        return require_tool(
            self.settings.stack.java,
            what="Java (JDK 17+) for the Kafka broker",
            setting="POSFLOW_STACK__JAVA",
            package="openjdk-17-jre-headless",
        )

    def install(self) -> None:
        stack = self.settings.stack
        log = stack.root / "logs" / "install.log"
        wanted: dict[str, str] = {}
        if stack.java == "java":
            wanted["java"] = "openjdk-17-jre-headless"
        if stack.mvn == "mvn":
            wanted["mvn"] = "maven"
        ensure_debian_packages(wanted, install=stack.install, log_path=log)
        java = self._java()
        major = java_major_version(java)
        if major < 17:
            raise PosflowError(
                f"Kafka {self.settings.kafka.version} needs Java 17 or newer; {java} is {major}",
                fix="install openjdk-17-jre-headless or set POSFLOW_STACK__JAVA to a JDK 17+",
            )
        mvn = require_tool(stack.mvn, what="Maven", setting="POSFLOW_STACK__MVN", package="maven")
        fetch_kafka_jars(
            mvn=mvn,
            pom=DEPLOY_DIR / "kafka" / "pom.xml",
            version=self.settings.kafka.version,
            libs=self.libs,
            maven_repo=stack.cache / "m2",
            log_path=stack.root / "logs" / "maven.log",
        )

    def configure(self) -> None:
        k = self.settings.kafka
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{k.host}:{k.controller_port}",
            "listeners": f"PLAINTEXT://{k.host}:{k.port},CONTROLLER://{k.host}:{k.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{k.host}:{k.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": str(k.default_partitions),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "12",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "6",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "log.retention.hours": "168",
            "log.segment.bytes": str(256 * 1024 * 1024),
            "message.max.bytes": str(2 * 1024 * 1024),
        }
        (self.dir / "server.properties").write_text(
            "".join(f"{key}={value}\n" for key, value in props.items())
        )
        (self.dir / "log4j2.properties").write_text(_LOG4J2.format(log=self.dir / "server.log"))
        if not (data / "meta.properties").exists():
            cluster_id = _cluster_id()
            self._run_tool(
                ["kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", "server.properties"]
            )

    def _run_tool(self, args: list[str]) -> None:
        proc = subprocess.run(
            [self._java(), "-cp", f"{self.libs}/*", *self._log_opts(), *args],
            cwd=self.dir,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if proc.returncode != 0:
            raise PosflowError(
                f"Kafka storage format failed in {self.dir}: {proc.stderr.strip()[-400:]}",
                fix=f"remove {self.dir} to start from empty storage, then `posflow stack up`",
            )

    def _log_opts(self) -> list[str]:
        return [
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.dir}",
        ]

    def argv(self) -> list[str]:
        return [
            self._java(),
            f"-Xmx{self.settings.kafka.heap}",
            f"-Xms{self.settings.kafka.heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            *self._log_opts(),
            "-cp",
            f"{self.libs}/*",
            "kafka.Kafka",
            str(self.dir / "server.properties"),
        ]

    def ready(self) -> bool:
        k = self.settings.kafka
        if not port_answers(k.host, k.port):
            return False
        return asyncio.run(_cluster_answers(k.bootstrap))

    def after_ready(self) -> None:
        asyncio.run(ensure_topics(self.settings))

    def version(self) -> str:
        return f"Apache Kafka {self.settings.kafka.version} (KRaft)"


async def _cluster_answers(bootstrap: str) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        await admin.start()
        await admin.describe_cluster()
    except (TimeoutError, KafkaError, OSError):
        return False
    else:
        return True
    finally:
        await admin.close()


async def ensure_topics(settings: Settings, extra: Sequence[TopicSpec] = ()) -> list[str]:
    """Create the pipeline's topics (and ``extra``) that are missing; returns those created."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka.bootstrap, request_timeout_ms=15000
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        specs = [*pipeline_topics(settings.kafka), *extra]
        wanted = [t for t in specs if t.name not in existing]
        if wanted:
            response = await admin.create_topics(
                [
                    NewTopic(
                        name=t.name,
                        num_partitions=t.partitions,
                        replication_factor=1,
                        topic_configs=t.config,
                    )
                    for t in wanted
                ]
            )
            for entry in response.topic_errors:
                name, code = entry[0], entry[1]
                if code not in (0, TopicAlreadyExistsError.errno):
                    message = entry[2] if len(entry) > 2 else ""
                    raise PosflowError(
                        f"Kafka refused to create topic {name}: error {code} {message}",
                        fix="check the broker log with `posflow stack logs kafka`",
                    )
        return [t.name for t in wanted]
    finally:
        await admin.close()


def _cluster_id() -> str:
    """A KRaft cluster id as Kafka makes them (a UUID, URL-safe base64), never starting
    with '-': the storage tool's argument parser takes "-t -Xyz..." for an option (1 in
    64 random ids did that and failed the format)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id
