"""Listener taste and heard sets (issue 16, item 1) on the real broker and Redis, one node and Redis Cluster."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY
from redis.client import NEVER_DECODE

from consumers.feedback import FeedbackConsumer
from consumers.shard_embeddings import STORE_FILE
from indexes import EmbeddingRecord, SqliteEmbeddingStore
from indexes.listeners import ListenerEvent, ListenerStore
from indexes.redis_client import connect
from indexes.redis_schema import RedisKeys
from ranker import stores
from ranker.events import Engagement
from ranker.settings import Settings
from tests.helpers import wait_for
from tests.test_feedback import actual_counts, publish

DIM = 16
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
DAY = 86400.0


def axis(i: int, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """A unit vector near the i-th axis."""
    v = np.zeros(DIM, np.float32)
    v[i] = 1.0
    if noise:
        v += np.random.default_rng(seed).normal(0, noise, DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def store_vectors(settings: Settings, vectors: dict[str, np.ndarray]) -> None:
    """Write the songs' embeddings into the shard's store, as the worker does."""
    settings.index_dir.mkdir(parents=True, exist_ok=True)
    with SqliteEmbeddingStore(settings.index_dir / STORE_FILE) as emb:
        emb.put_many([EmbeddingRecord(s, "test-enc", np.ones((2, 4), np.float32), v, 1, 1) for s, v in vectors.items()])


def event(user: str, song: str, kind: str, at: datetime) -> Engagement:
    return Engagement.model_validate(
        {"event_id": uuid.uuid4().hex, "song_id": song, "user_id": user, "type": kind, "ts": at, "feed": "cold-start"}
    )


def send(settings: Settings, events: list[Engagement]) -> None:
    publish(settings, [e.to_bytes() for e in events], [e.song_id.encode() for e in events])


def consume(settings: Settings) -> FeedbackConsumer:
    consumer = FeedbackConsumer(settings, on_engagement=lambda ids: None)
    consumer.run(until_idle_s=2.0, until_caught_up=True)
    return consumer


def with_listeners(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update={"listeners": settings.listeners.model_copy(update=changes)})


def raw_state(settings: Settings, users: list[str]) -> list[object]:
    """Each user's taste hash (bytes as stored) and heard set with its scores."""
    client = connect(settings.redis.url.get_secret_value(), 5.0)
    keys = RedisKeys(settings.redis.key_prefix)
    try:
        out: list[object] = []
        for u in users:
            out.append(client.execute_command("HGETALL", keys.user(u), **{NEVER_DECODE: []}))
            out.append(client.zrange(keys.heard(u), 0, -1, withscores=True))
        return out
    finally:
        client.close()


def missing_vectors() -> float:
    return REGISTRY.get_sample_value("apexrank_feedback_taste_missing_vectors_total") or 0.0


def test_likes_pull_the_taste_and_skips_push_by_their_weight(redis_settings: Settings) -> None:
    s = redis_settings
    vectors = {f"a{i}": axis(0, 0.2, i) for i in range(4)} | {"b": axis(1), "c": axis(2), "other": axis(3)}
    store_vectors(s, vectors)
    odd = "we{ird} user"  # braces: not usable in a hash tag as it is
    events = [event("fan", f"a{i}", "like", T0 + timedelta(minutes=i)) for i in range(4)]
    events += [event("fan", "other", "play", T0)]  # heard, no weight
    events += [event("mixed", "b", "like", T0), event("mixed", "c", "skip", T0)]  # same time: no decay between them
    events += [event(odd, "b", "like", T0), event(odd, "unscored", "like", T0)]  # a song no store has
    before = missing_vectors()
    send(s, events)
    consumer = consume(s)

    assert consumer.stats.missing_vectors == 1 and missing_vectors() - before == 1
    assert actual_counts(s, ["unscored"])["unscored"]["likes"] == 1  # its counters still count
    with _open(s) as store:
        taste = store.taste(["fan", "mixed", odd, "nobody"], now=T0.timestamp())
        fan = taste["fan"].vector
        assert fan is not None
        assert float(fan @ axis(0)) > 0.9 > float(fan @ vectors["other"])
        assert float(fan @ vectors["a0"]) > float(fan @ vectors["b"])

        mixed = taste["mixed"]
        expected = axis(1) - 0.25 * axis(2)  # like +1, skip -skip_weight (0.25 by default)
        assert mixed.vector is not None
        assert np.allclose(mixed.vector, expected / np.linalg.norm(expected), atol=1e-5)
        assert mixed.evidence == pytest.approx(1.25)

        odd_vec = taste[odd].vector
        assert odd_vec is not None and np.allclose(odd_vec, axis(1), atol=1e-6)
        assert taste[odd].evidence == pytest.approx(1.0)  # the unscored song's like moved nothing
        assert taste["nobody"].vector is None and taste["nobody"].evidence == 0.0

        assert set(store.heard_all("fan")) == {"a0", "a1", "a2", "a3", "other"}
        assert store.heard("fan", ["a1", "b", "other", "zzz"]) == {"a1", "other"}
        assert store.heard(odd, ["b", "unscored", "a0"]) == {"b", "unscored"}


class _open:
    """The listener store of ``settings`` as a context manager."""

    def __init__(self, settings: Settings) -> None:
        self.store = stores.listener_store(settings)

    def __enter__(self) -> ListenerStore:
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.close()


def test_a_replayed_batch_changes_nothing(redis_settings: Settings) -> None:
    s = redis_settings
    store_vectors(s, {f"s{i}": axis(i % DIM, 0.3, i) for i in range(12)})
    users = [f"u{i}" for i in range(5)]
    kinds = ["like", "skip", "play", "like", "unlike", "complete"]
    events = [event(users[i % 5], f"s{i % 12}", kinds[i % len(kinds)], T0 + timedelta(hours=i)) for i in range(60)]
    send(s, events)
    consume(s)
    first = raw_state(s, users)
    assert any(first[0::2]) and any(first[1::2])  # tastes and heard sets were written

    send(s, events)  # republished: duplicates of counted events
    again = s.model_copy(
        update={"kafka": s.kafka.model_copy(update={"feedback_group_id": f"replay-{uuid.uuid4().hex[:8]}"})}
    )
    replayed = consume(again)  # a new group reads every message again: the first half replays
    assert replayed.stats.replayed == 60 and replayed.stats.duplicates == 60
    assert raw_state(s, users) == first


def test_heard_is_capped_and_expires(redis_settings: Settings) -> None:
    s = with_listeners(redis_settings, heard_max=3, heard_ttl_s=1)
    with _open(s) as store:
        t = T0.timestamp()
        update = store.record([ListenerEvent(f"e{i}", "u", f"s{i}", "play", t + i) for i in range(5)], {})
        assert update.applied == 5 and update.taste_updates == 0
        assert store.heard_all("u") == ["s4", "s3", "s2"]  # the newest three, newest first
        assert store.heard("u", [f"s{i}" for i in range(5)]) == {"s2", "s3", "s4"}
        assert store.taste(["u"])["u"].vector is None  # plays carry no taste
        time.sleep(2.5)  # past the 1 s TTL (no write since)
        assert store.heard_all("u") == [] and store.heard("u", ["s4"]) == set()


def test_decay_halves_an_old_event_after_a_half_life(redis_settings: Settings) -> None:
    s = with_listeners(redis_settings, half_life_days=10.0)
    t = T0.timestamp()
    old, new = axis(0), axis(1)
    forward = [ListenerEvent("e1", "fwd", "old", "like", t), ListenerEvent("e2", "fwd", "new", "like", t + 10 * DAY)]
    backward = [ListenerEvent("e3", "bwd", "new", "like", t + 10 * DAY), ListenerEvent("e4", "bwd", "old", "like", t)]
    with _open(s) as store:
        store.record(forward, {"old": old, "new": new})
        for e in backward:  # the older event arrives last, in a later call
            store.record([e], {"old": old, "new": new})
        taste = store.taste(["fwd", "bwd"], now=t + 10 * DAY)
        for user in ("fwd", "bwd"):
            vec = taste[user].vector
            assert vec is not None
            assert float(vec @ old) / float(vec @ new) == pytest.approx(0.5, rel=1e-5)
            assert taste[user].evidence == pytest.approx(1.5, rel=1e-6)
            assert taste[user].updated_at == pytest.approx(t + 10 * DAY)
        # Read a half-life later, the evidence halves; the direction does not change.
        later = store.taste(["fwd"], now=t + 20 * DAY)["fwd"]
        assert later.evidence == pytest.approx(0.75, rel=1e-6)
        fwd = taste["fwd"].vector
        assert later.vector is not None and fwd is not None and np.allclose(later.vector, fwd)


def test_listener_state_off_does_nothing(settings: Settings) -> None:
    off = with_listeners(settings, enabled=False)
    null = stores.listener_store(off)
    assert not null.keeps_state
    assert stores.listener_store(settings).keeps_state  # on by default: an index path is configured
    no_index = settings.model_copy(update={"index": settings.index.model_copy(update={"path": None})})
    assert not stores.listener_store(no_index).keeps_state

    store_vectors(off, {"a": axis(0)})
    send(off, [event("u", "a", "like", T0), event("u", "a", "play", T0)])
    consumer = consume(off)
    assert consumer.stats.accepted == 2 and consumer.stats.taste_updates == 0
    assert actual_counts(off, ["a"])["a"]["likes"] == 1
    assert raw_state(off, ["u"]) == [{}, []]  # no taste, no heard set written
    assert null.record([ListenerEvent("e", "u", "a", "like", 0.0)], {"a": axis(0)}).applied == 0
    assert null.taste(["u"])["u"].vector is None and null.heard_all("u") == [] and null.heard("u", ["a"]) == set()


def test_a_vector_longer_than_one_unpack_slice_is_summed_exactly(redis_settings: Settings) -> None:
    """The script unpacks and packs vectors in slices of 2,000 floats: a 4,500-d taste crosses two seams."""
    rng = np.random.default_rng(7)
    a, b = (rng.normal(size=4500).astype(np.float32) for _ in range(2))
    t = T0.timestamp()
    with _open(redis_settings) as store:
        store.record(
            [ListenerEvent("e1", "u", "a", "like", t), ListenerEvent("e2", "u", "b", "skip", t)], {"a": a, "b": b}
        )
        vec = store.taste(["u"], now=t)["u"].vector
    expected = a / np.linalg.norm(a) - 0.25 * b / np.linalg.norm(b)
    assert vec is not None and vec.shape == (4500,)
    assert np.allclose(vec, expected / np.linalg.norm(expected), atol=1e-6)


def test_a_shard_that_appears_after_the_first_taste_event_moves_tastes(
    redis_settings: Settings, tmp_path: Path
) -> None:
    """Workers scale out while the consumer runs: the new shard's songs must move tastes from a later batch
    on (a like read without its vector is deduplicated, so lost for good)."""
    shards = tmp_path / "shards"
    s = redis_settings.model_copy(
        update={
            "index": redis_settings.index.model_copy(update={"shards": [str(shards / "shard-*")]}),
            "api": redis_settings.api.model_copy(update={"index_refresh_s": 0.1}),
        }
    )

    def scored(shard: str, song: str, vector: np.ndarray) -> None:
        with SqliteEmbeddingStore(shards / shard / STORE_FILE) as emb:
            emb.put_many([EmbeddingRecord(song, "test-enc", np.ones((2, 4), np.float32), vector, 1, 1)])

    scored("shard-0", "a", axis(0))
    consumer = FeedbackConsumer(s, on_engagement=lambda ids: None)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            consumer.run()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        with _open(s) as store:
            send(s, [event("early", "a", "like", T0)])
            wait_for("the first like's taste", lambda: store.taste(["early"])["early"].vector is not None)
            scored("shard-1", "b", axis(1))  # a worker that joined after the consumer opened shard-0
            time.sleep(0.2)  # past api.index_refresh_s: the next miss looks for shards again
            send(s, [event("late", "b", "like", T0)])
            wait_for("the second batch", lambda: consumer.stats.accepted == 2)
            late = store.taste(["late"], now=T0.timestamp())["late"]
    finally:
        consumer.request_stop()
        thread.join(timeout=60)
    assert not thread.is_alive() and not errors, errors
    assert consumer.stats.missing_vectors == 0
    assert late.vector is not None and np.allclose(late.vector, axis(1), atol=1e-6)
