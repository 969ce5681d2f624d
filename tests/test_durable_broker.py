"""The durable embedded broker: topics and committed offsets survive ``services down`` and ``up``.

Each test runs a private stack (its own broker, Redis and state directory on free ports), so
stopping it never disturbs the session's. The memory-mode test shows what durability buys: the
same steps there lose every record and offset.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.structs import OffsetAndMetadata
from pydantic import SecretStr

from consumers.stack import EmbeddedStack, free_port
from ranker.settings import Settings
from tests.helpers import settings_env

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [f"record-{i}".encode() for i in range(12)]
#: What the test group commits: partition -> next offset to read.
COMMITS = {0: 4, 1: 2}
CLI = "import sys; from consumers.cli import main; sys.argv[0] = 'apexrank'; sys.exit(main())"


def private_settings(base: Settings, state_dir: Path) -> Settings:
    """``base`` pointed at a stack of its own: fresh loopback ports and state directory."""
    return base.model_copy(
        update={
            "state_dir": state_dir,
            "kafka": base.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{free_port()}"}),
            "redis": base.redis.model_copy(update={"url": SecretStr(f"redis://127.0.0.1:{free_port()}/0")}),
        }
    )


@pytest.fixture
def private(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """Settings for a private stack; whatever it left running is stopped at the end."""
    s = private_settings(settings, tmp_path / "private-state")
    try:
        yield s
    finally:
        EmbeddedStack(s).down()


def apexrank(settings: Settings, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APEXRANK_")}
    env.update(settings_env(settings))
    return subprocess.run(
        [sys.executable, "-c", CLI, *argv],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def produce_and_commit(settings: Settings, topic: str, group: str) -> None:
    """Two partitions of records, and the group's offsets committed part way through each."""
    admin = KafkaAdminClient(**settings.kafka.client_kwargs())
    try:
        admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    finally:
        admin.close()
    producer = KafkaProducer(acks="all", **settings.kafka.client_kwargs())
    try:
        for i, value in enumerate(RECORDS):
            producer.send(topic, value=value, partition=i % 2)
        producer.flush(timeout=30)
    finally:
        producer.close()
    consumer = KafkaConsumer(group_id=group, enable_auto_commit=False, **settings.kafka.client_kwargs())
    try:
        consumer.commit({TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in COMMITS.items()})
    finally:
        consumer.close(autocommit=False)
    assert read_back(settings, topic, group) == (sorted(RECORDS), COMMITS), "the setup itself did not land"


def read_back(settings: Settings, topic: str, group: str) -> tuple[list[bytes], dict[int, int | None]]:
    """Every record of the topic (from the start, counted, not from end offsets) and the group's commits."""
    consumer = KafkaConsumer(group_id=group, enable_auto_commit=False, **settings.kafka.client_kwargs())
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or set())]
        committed = {tp.partition: consumer.committed(tp) for tp in parts}
        values: list[bytes] = []
        if parts:
            consumer.assign(parts)
            consumer.seek_to_beginning()
            deadline = time.monotonic() + 10
            while len(values) < len(RECORDS) and time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=300).values():
                    values += [r.value for r in records]
        return sorted(values), committed
    finally:
        consumer.close(autocommit=False)


def test_durable_broker_keeps_topics_and_offsets_across_down_and_up(private: Settings) -> None:
    topic, group = f"durable-{uuid.uuid4().hex[:8]}", f"group-{uuid.uuid4().hex[:8]}"
    up = apexrank(private, "services", "up", "--durable")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "broker storage: durable" in " ".join(up.stdout.split()), up.stdout
    assert {st.name for st in EmbeddedStack(private).status() if st.running} == {"s3", "kafka", "redis"}
    produce_and_commit(private, topic, group)

    switch = apexrank(private, "services", "up", "--memory")
    assert switch.returncode != 0 and "services down" in switch.stderr, "a running durable broker was switched"

    down = apexrank(private, "services", "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not any(s.running for s in EmbeddedStack(private).status()), "down left a service running"

    # No flag: the state directory remembers that it is durable.
    again = apexrank(private, "services", "up")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "broker storage: durable" in " ".join(again.stdout.split()), again.stdout
    assert read_back(private, topic, group) == (sorted(RECORDS), COMMITS)


def test_memory_broker_loses_topics_and_offsets_across_down_and_up(private: Settings) -> None:
    topic, group = f"memory-{uuid.uuid4().hex[:8]}", f"group-{uuid.uuid4().hex[:8]}"
    stack = EmbeddedStack(private)
    assert not stack.storage.durable
    stack.up()
    produce_and_commit(private, topic, group)
    stack.down()
    stack.up()
    assert read_back(private, topic, group) == ([], {})


def test_the_embedded_stack_refuses_a_cluster_url(settings: Settings, tmp_path: Path) -> None:
    """A redis+cluster:// URL names an external cluster: `services up` says so instead of misreading it."""
    from ranker.errors import ConfigError

    s = private_settings(settings, tmp_path / "state")
    s = s.model_copy(update={"redis": s.redis.model_copy(update={"url": SecretStr("redis+cluster://10.0.0.1:7000")})})
    with pytest.raises(ConfigError, match="external Redis Cluster"):
        EmbeddedStack(s)


def test_two_services_up_at_once_start_each_server_once(private: Settings) -> None:
    """Two `services up` at once (a demo and a test run, say) both succeed on one broker and one Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APEXRANK_")}
    env.update(settings_env(private))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLI, "services", "up"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    status = {s.name: s for s in EmbeddedStack(private).status()}
    assert status["kafka"].running and status["redis"].running, status
