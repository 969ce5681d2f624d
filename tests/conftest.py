"""Test session fixtures: a real embedded Kafka broker and Redis on free loopback ports, and a real
three-master Redis Cluster (started only when a test asks for it).

No mocks: every test that needs a store or a broker talks to these servers.
Each test gets its own topic names, consumer group ids, Redis key prefix and
index directory, so tests never see each other's data.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from consumers.stack import EmbeddedStack, free_port
from indexes import ScoreStore
from ranker import stores
from ranker.settings import (
    IndexSettings,
    KafkaSettings,
    ModelSettings,
    RedisSettings,
    Settings,
    TopicSettings,
)
from tests.redis_cluster import RedisCluster

#: Group timeouts for the tests' Kafka clients. Tansu completes a join after about half the session
#: timeout (3 s at the production 6000 ms, 1.1 s here) and a killed member's partitions move after
#: it; every test runs its own group ids, so no group mixes these with other values.
FAST_GROUPS = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 600}


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    state = tmp_path_factory.mktemp("stack")
    base = Settings(
        state_dir=state,
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"),
        redis=RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0"),  # type: ignore[arg-type]
    )
    embedded = EmbeddedStack(base)
    embedded.up()
    try:
        yield embedded
    finally:
        embedded.down()


@pytest.fixture
def settings(stack: EmbeddedStack, tmp_path: Path) -> Settings:
    """Settings pointing at the session's servers, isolated to this test."""
    tag = uuid.uuid4().hex[:10]
    base = stack.settings
    topics = TopicSettings(
        songs_generated=f"t{tag}.songs.generated",
        songs_scored=f"t{tag}.songs.scored",
        dead_letter=f"t{tag}.songs.dead-letter",
        engagement=f"t{tag}.engagement",
        engagement_dead_letter=f"t{tag}.engagement.dead-letter",
        models_promoted=f"t{tag}.models.promoted",
        feeds_served=f"t{tag}.feeds.served",
        songs_deleted=f"t{tag}.songs.deleted",
        partitions=2,
    )
    return Settings(
        state_dir=tmp_path / "state",
        dev_mode=True,  # the tests' audio is file:// under tmp_path, with no file_root
        encoder="logmel",
        kafka=base.kafka.model_copy(
            update={
                "topics": topics,
                "worker_group_id": f"worker-{tag}",
                "feedback_group_id": f"feedback-{tag}",
                **FAST_GROUPS,
            }
        ),
        redis=RedisSettings(url=base.redis.url, key_prefix=f"t{tag}"),
        index=IndexSettings(path=tmp_path / "index"),
        # The tests run the pipeline with the head seeded by model.seed unless they promote a trained
        # one (the golden paths, the live table tests, the loop simulation): its scores mean nothing
        # and need not. The worker's refusal without the flag is tested in test_worker.
        model=ModelSettings(logmel_n_mels=32, allow_untrained=True),
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[ScoreStore]:
    """The score store (the session's Redis) under the test's own key prefix, built by the factory."""
    s = stores.score_store(settings)
    yield s
    s.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """Three ``redis-server --cluster-enabled yes`` masters joined by ``redis-cli --cluster create``."""
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def on_cluster(settings: Settings, cluster: RedisCluster) -> Settings:
    """``settings`` with Redis on ``cluster`` (a ``redis+cluster://`` URL, the same key prefix)."""
    redis = settings.redis.model_copy(update={"url": SecretStr(cluster.url)})
    return settings.model_copy(update={"redis": redis})


@pytest.fixture
def cluster_settings(settings: Settings, redis_cluster: RedisCluster) -> Settings:
    """The test's settings with Redis on the session's cluster."""
    return on_cluster(settings, redis_cluster)


@pytest.fixture(params=["node", "cluster"])
def redis_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """The test's settings, once on the single Redis node and once on the Redis Cluster."""
    if request.param == "node":
        return settings
    return on_cluster(settings, request.getfixturevalue("redis_cluster"))


@pytest.fixture
def redis_store(redis_settings: Settings) -> Iterator[ScoreStore]:
    """The score store on the parametrized Redis (one node, then the cluster), built by the factory."""
    s = stores.score_store(redis_settings)
    yield s
    s.close()
