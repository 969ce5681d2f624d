"""A/B arms (issue 16, item 9): stable hashed assignment, per-arm totals counted once on a real Redis (a node
and the cluster), the ``/metrics`` gauges and ``apexrank report arms`` run as a real process.

Share tolerances: 20,000 users hashed independently into an arm of share p give a share with standard
deviation sqrt(p (1 - p) / 20000) <= 0.0036 (p = 0.5); 0.015 is more than 4 standard deviations, so a
correct hash fails it with probability below 1e-4, while a biased or constant mapping (a share off by
0.05 or more) cannot pass. The users are fixed, so the test is deterministic either way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr

from consumers.stack import free_port
from indexes.arms import ArmTotals, ArmUpdate, NullArmStore
from indexes.redis_schema import RedisKeys
from ranker import stores
from ranker.events import Engagement
from ranker.serving.arm_metrics import arm_rows, refresh_arm_gauges
from ranker.serving.arms import assign, record_arm_events, resolve, wilson
from ranker.settings import Arm, ArmsSettings, FeedPolicy, FeedSettings, Settings
from tests.test_cli_startup import WRAPPER, env_for

ROOT = Path(__file__).resolve().parents[1]
USERS = [f"user-{i}" for i in range(20_000)]
TOLERANCE = 0.015


def arms_settings(experiment: str = "exp-1", weights: tuple[float, ...] = (1.0, 1.0)) -> ArmsSettings:
    return ArmsSettings(
        experiment=experiment,
        arms=[Arm(name=f"arm{i}", feed="cold-start", weight=w) for i, w in enumerate(weights)],
    )


def with_arms(settings: Settings, experiment: str = "exp-test") -> Settings:
    """``settings`` with two feeds and a 1:3 experiment on the default feed (validated as a whole)."""
    data = settings.model_dump()
    data["feed"] = FeedSettings(feeds={"cold-start": FeedPolicy(), "fresh": FeedPolicy()}).model_dump()
    data["arms"] = ArmsSettings(
        experiment=experiment,
        arms=[
            Arm(name="control", feed="cold-start", model_version="m1", weight=1),
            Arm(name="fresh", feed="fresh", model_version="m2", weight=3),
        ],
    ).model_dump()
    data["redis"]["url"] = settings.redis.url
    return Settings.model_validate(data)


def event(event_id: str, user: str, kind: str, feed: str | None = None) -> Engagement:
    return Engagement(event_id=event_id, song_id="song-1", user_id=user, type=kind, ts=datetime.now(UTC), feed=feed)


# -- assignment ------------------------------------------------------------------------------------------------
def test_assignment_is_stable_across_calls_and_settings_objects() -> None:
    first, second = arms_settings(), arms_settings()
    names = [assign(u, first).name for u in USERS[:2000]]  # type: ignore[union-attr]
    assert names == [assign(u, second).name for u in USERS[:2000]]  # type: ignore[union-attr]
    assert names == [assign(u, first).name for u in USERS[:2000]]  # type: ignore[union-attr]
    assert set(names) == {"arm0", "arm1"}


def test_assignment_is_stable_across_processes() -> None:
    """A fresh interpreter (another hash seed: PYTHONHASHSEED differs per process) assigns the same arms."""
    code = (
        "import json, sys\n"
        "from ranker.serving.arms import assign\n"
        "from ranker.settings import Arm, ArmsSettings\n"
        "arms = [Arm(name='arm0', feed='cold-start'), Arm(name='arm1', feed='cold-start')]\n"
        "s = ArmsSettings(experiment='exp-1', arms=arms)\n"
        "print(json.dumps([assign(f'user-{i}', s).name for i in range(500)]))\n"
    )
    env = {"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    here = arms_settings()
    assert json.loads(out.stdout) == [assign(f"user-{i}", here).name for i in range(500)]  # type: ignore[union-attr]


def test_weights_give_the_expected_shares() -> None:
    arms = arms_settings(weights=(1.0, 1.0, 2.0))
    counts = Counter(assign(u, arms).name for u in USERS)  # type: ignore[union-attr]
    for name, expected in (("arm0", 0.25), ("arm1", 0.25), ("arm2", 0.5)):
        assert abs(counts[name] / len(USERS) - expected) <= TOLERANCE, (name, counts)


def test_a_new_experiment_reshuffles_users_independently() -> None:
    """Under a new salt each user's arm is independent of the old one: each of the four (old, new) pairs
    of a 50/50 split holds a quarter of the users (a user keeps their arm with probability 1/2)."""
    old, new = arms_settings("exp-1"), arms_settings("exp-2")
    pairs = Counter((assign(u, old).name, assign(u, new).name) for u in USERS)  # type: ignore[union-attr]
    assert len(pairs) == 4
    for pair, n in pairs.items():
        assert abs(n / len(USERS) - 0.25) <= TOLERANCE, (pair, pairs)


def test_resolve_splits_only_the_experiments_feed_for_a_user(settings: Settings) -> None:
    s = with_arms(settings)
    served = Counter(resolve(None, u, s)[0] for u in USERS[:4000])
    assert abs(served["fresh"] / 4000 - 0.75) <= 0.03, served  # sd 0.0068 at n=4000
    user = USERS[0]
    feed, arm = resolve("cold-start", user, s)
    assert arm is not None and feed == arm.feed and arm == assign(user, s.arms)
    assert resolve("cold-start", None, s) == ("cold-start", None)  # no user: unchanged
    assert resolve("fresh", user, s) == ("fresh", None)  # another feed: unchanged
    assert resolve(None, user, settings) == ("cold-start", None)  # no arms configured


def test_wilson_interval() -> None:
    low, high = wilson(10, 5)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = wilson(10, 0)
    assert low == 0.0 and round(high, 4) == 0.2775
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(5, 9) == (wilson(5, 5)[0], 1.0)  # likes beyond plays count as a rate of 1
    narrow, wide = wilson(10_000, 2000), wilson(100, 20)
    assert wide[0] < narrow[0] < 0.2 < narrow[1] < wide[1]


# -- totals on a real Redis --------------------------------------------------------------------------------
def test_totals_count_each_event_once_under_replays(redis_settings: Settings) -> None:
    store = stores.arm_store(with_arms(redis_settings))
    try:
        arms = ["control", "fresh", "control", "fresh", "control", "control"]
        ids = ["e1", "e2", "e3", "e4", "e5", "e6"]
        types = ["play", "play", "like", "like", "skip", "unlike"]
        assert store.record(arms, ids, types) == ArmUpdate(applied=5, seen=0)  # the skip is not sent
        assert store.totals(["control", "fresh"]) == {"control": ArmTotals(1, 0), "fresh": ArmTotals(1, 1)}
        # The same batch replayed, then a batch with old and new events (and a repeat inside it).
        assert store.record(arms, ids, types) == ArmUpdate(applied=0, seen=5)
        assert store.record(["fresh", "fresh", "fresh"], ["e2", "e7", "e7"], ["play", "play", "play"]) == ArmUpdate(
            applied=1, seen=2
        )
        assert store.totals(["control", "fresh", "nobody"]) == {
            "control": ArmTotals(1, 0),
            "fresh": ArmTotals(2, 1),
            "nobody": ArmTotals(0, 0),
        }
        # One event id counts once per arm: the same id in another arm is another arm's event.
        assert store.record(["control"], ["e7"], ["play"]).applied == 1
    finally:
        store.close()


def test_a_key_of_the_wrong_type_fails_before_any_write(settings: Settings) -> None:
    s = with_arms(settings)
    store = stores.arm_store(s)
    keys = RedisKeys(s.redis.key_prefix)
    try:
        import redis

        client = redis.Redis.from_url(s.redis.url.get_secret_value())
        client.set(keys.arm("exp-test", "control"), "not a hash")
        with pytest.raises(redis.exceptions.ResponseError):
            store.record(["control"], ["w1"], ["play"])
        assert client.exists(keys.arm_event("exp-test", "control", "w1")) == 0  # no dedup key without its count
        client.close()
    finally:
        store.close()


def test_record_arm_events_skips_other_feeds_and_counts_once(redis_settings: Settings) -> None:
    s = with_arms(redis_settings)
    store = stores.arm_store(s)
    try:
        users = USERS[:400]
        batch = [event(f"p-{u}", u, "play") for u in users]  # no feed named: counted
        batch += [event(f"l-{u}", u, "like", feed="cold-start") for u in users[:100]]  # the experiment's feed
        batch += [event(f"x-{u}", u, "like", feed="elsewhere") for u in users]  # another feed: skipped
        batch += [event(f"s-{u}", u, "skip") for u in users]  # changes nothing
        first = record_arm_events(store, batch, s)
        assert first == ArmUpdate(applied=500, seen=0)
        assert record_arm_events(store, batch, s) == ArmUpdate(applied=0, seen=500)  # a replay
        arm_of = {u: assign(u, s.arms).name for u in users}  # type: ignore[union-attr]
        want = {
            name: ArmTotals(
                sum(1 for u in users if arm_of[u] == name), sum(1 for u in users[:100] if arm_of[u] == name)
            )
            for name in ("control", "fresh")
        }
        assert store.totals(["control", "fresh"]) == want
        assert want["control"].plays > 0 and want["fresh"].plays > 0
    finally:
        store.close()


def test_a_new_experiment_starts_from_zero_and_the_old_keeps_its_totals(redis_settings: Settings) -> None:
    """Arms keep their names from one experiment to the next, but not their totals: a new experiment counts
    from zero (its own dedup keys too: an event id seen by the old one counts anew), and switching back shows
    the old experiment's totals unchanged. The second name is free text, stored under a digest."""
    first, second = with_arms(redis_settings, "exp-a"), with_arms(redis_settings, "exp b {lofi}: 2")
    users = USERS[:200]
    batch = [event(f"p-{u}", u, "play") for u in users] + [event(f"l-{u}", u, "like") for u in users[:50]]
    store = stores.arm_store(first)
    try:
        assert record_arm_events(store, batch, first) == ArmUpdate(applied=250, seen=0)
        old = {row.arm: (row.plays, row.likes) for row in arm_rows(store, first)}
    finally:
        store.close()
    assert sum(plays for plays, _ in old.values()) == 200 and sum(likes for _, likes in old.values()) == 50
    store = stores.arm_store(second)
    try:
        assert {row.arm: (row.plays, row.likes, row.like_rate) for row in arm_rows(store, second)} == {
            "control": (0, 0, None),
            "fresh": (0, 0, None),
        }
        plays = [e for e in batch if e.type == "play"]
        assert record_arm_events(store, plays, second) == ArmUpdate(applied=200, seen=0)
        arm_of = Counter(assign(u, second.arms).name for u in users)  # type: ignore[union-attr]
        assert {row.arm: (row.plays, row.likes) for row in arm_rows(store, second)} == {
            name: (arm_of[name], 0) for name in ("control", "fresh")
        }
    finally:
        store.close()
    store = stores.arm_store(first)  # back to the first experiment: its totals, and its replays still seen
    try:
        assert {row.arm: (row.plays, row.likes) for row in arm_rows(store, first)} == old
        assert record_arm_events(store, batch, first) == ArmUpdate(applied=0, seen=250)
    finally:
        store.close()


def test_arm_keys_name_the_experiment_in_one_slot_per_arm() -> None:
    """Both keys of an arm share its hash tag (one script call, one slot on a cluster), which holds the
    experiment (free text: a digest, never a brace) and the arm, so experiments and arms never share keys."""
    from redis.crc import key_slot

    keys = RedisKeys("apexrank")
    assert keys.arm("exp-a", "control") == "apexrank:arm:{exp-a:control}"
    assert keys.arm_event("exp-a", "control", "e1") == "apexrank:aevt:{exp-a:control}:e1"
    for experiment in ("exp-a", "exp b {lofi}: 2", "a:b"):
        totals, dedup = keys.arm(experiment, "control"), keys.arm_event(experiment, "control", "e1")
        assert key_slot(totals.encode()) == key_slot(dedup.encode())
        tag = totals[totals.index("{") + 1 : totals.index("}")]
        assert tag.endswith(":control") and "{" not in tag and tag.count(":") == 1, tag
    names = {keys.arm(e, a) for e in ("exp-a", "exp-b", "a:b", "a") for a in ("control", "b:control")}
    assert len(names) == 8


def test_an_old_experiments_totals_are_found_by_the_documented_pattern(settings: Settings) -> None:
    """docs/arms.md deletes an old experiment's totals with SCAN MATCH ``{prefix}:arm:{<experiment>:*``:
    it finds that experiment's hashes and no other's."""
    import redis

    for experiment in ("old-exp", "old-exp2"):
        s = with_arms(settings, experiment)
        store = stores.arm_store(s)
        try:
            record_arm_events(store, [event(f"p-{u}", u, "play") for u in USERS[:40]], s)
        finally:
            store.close()
    client = redis.Redis.from_url(settings.redis.url.get_secret_value(), decode_responses=True)
    try:
        prefix = settings.redis.key_prefix
        found = set(client.scan_iter(match=f"{prefix}:arm:{{old-exp:*", count=1000))
    finally:
        client.close()
    assert found == {f"{prefix}:arm:{{old-exp:control}}", f"{prefix}:arm:{{old-exp:fresh}}"}


def test_no_arms_is_the_null_store(settings: Settings) -> None:
    store = stores.arm_store(settings)
    assert isinstance(store, NullArmStore) and not store.keeps_state
    assert record_arm_events(store, [event("n1", "u", "play")], settings) == ArmUpdate()


# -- metrics and report ------------------------------------------------------------------------------------
def gauge(name: str, arm: str, model_version: str, feed: str, experiment: str = "exp-test") -> float | None:
    labels = {"experiment": experiment, "arm": arm, "feed": feed, "model_version": model_version}
    return REGISTRY.get_sample_value(name, labels)


def test_metrics_gauges(settings: Settings) -> None:
    s = with_arms(settings)
    store = stores.arm_store(s)
    try:
        store.record(["fresh"] * 12, [f"g{i}" for i in range(12)], ["play"] * 10 + ["like"] * 2)
        assert refresh_arm_gauges(store, s)
    finally:
        store.close()
    low, high = wilson(10, 2)
    assert gauge("apexrank_arm_plays", "fresh", "m2", "fresh") == 10
    assert gauge("apexrank_arm_likes", "fresh", "m2", "fresh") == 2
    assert gauge("apexrank_arm_like_rate", "fresh", "m2", "fresh") == pytest.approx(0.2)
    assert gauge("apexrank_arm_like_rate_low", "fresh", "m2", "fresh") == pytest.approx(low)
    assert gauge("apexrank_arm_like_rate_high", "fresh", "m2", "fresh") == pytest.approx(high)
    assert gauge("apexrank_arm_plays", "control", "m1", "cold-start") == 0
    # Redis down: the gauges keep their last figures and the call says so.
    redis = s.redis.model_copy(update={"url": SecretStr(f"redis://127.0.0.1:{free_port()}/0"), "socket_timeout_s": 1})
    down = s.model_copy(update={"redis": redis})
    unreachable = stores.arm_store(down)
    try:
        assert refresh_arm_gauges(unreachable, down) is False
    finally:
        unreachable.close()
    assert gauge("apexrank_arm_plays", "fresh", "m2", "fresh") == 10


def arms_env(settings: Settings) -> dict[str, str]:
    env = env_for(settings)
    env["APEXRANK_FEED__FEEDS"] = json.dumps({name: {} for name in settings.feed.feeds})
    env["APEXRANK_ARMS__EXPERIMENT"] = settings.arms.experiment
    env["APEXRANK_ARMS__ARMS"] = json.dumps([arm.model_dump() for arm in settings.arms.arms])
    return env


def test_report_arms_cli(settings: Settings) -> None:
    """The real ``apexrank report arms`` against the stack's Redis, as JSON and as a table; it loads no
    model stack (the CLI's light-start rule)."""
    s = with_arms(settings)
    store = stores.arm_store(s)
    try:
        store.record(["control"] * 7, [f"r{i}" for i in range(7)], ["play"] * 4 + ["like"] * 3)
    finally:
        store.close()
    env = arms_env(s)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-c", WRAPPER, "report", "arms", *argv],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stderr.splitlines()[-1] == "HEAVY_MODULES=", proc.stderr[-2000:]
        return proc

    body = json.loads(run("--json").stdout)
    assert body["experiment"] == "exp-test"
    rows = {row["arm"]: row for row in body["arms"]}
    assert rows["control"] | {"low": None, "high": None} == {
        "arm": "control",
        "feed": "cold-start",
        "model_version": "m1",
        "share": 0.25,
        "plays": 4,
        "likes": 3,
        "like_rate": 0.75,
        "low": None,
        "high": None,
    }
    assert (rows["control"]["low"], rows["control"]["high"]) == pytest.approx(wilson(4, 3))
    assert rows["fresh"]["share"] == 0.75 and rows["fresh"]["plays"] == 0 and rows["fresh"]["like_rate"] is None
    table = run().stdout
    low, high = wilson(4, 3)
    control = next(line for line in table.splitlines() if "control" in line)
    for cell in ("cold-start", "m1", "25.0%", "0.7500", f"[{low:.4f}, {high:.4f}]"):
        assert cell in control, table
    assert "fresh" in table and "75.0%" in table and "exp-test" in table
    # The same arms under a new experiment: its own (empty) totals, and the report says whose they are.
    env["APEXRANK_ARMS__EXPERIMENT"] = "exp-next"
    body = json.loads(run("--json").stdout)
    assert body["experiment"] == "exp-next"
    assert [(row["arm"], row["plays"], row["likes"]) for row in body["arms"]] == [("control", 0, 0), ("fresh", 0, 0)]


def test_report_arms_without_arms(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    from consumers.report import print_arms

    assert print_arms(settings, as_json=True) == 0
    assert json.loads(capsys.readouterr().out) == {"experiment": "default", "arms": []}


# -- through the API and the feedback consumer ---------------------------------------------------


def test_the_api_serves_each_user_their_arms_feed_and_logs_the_arm(settings: Settings, tmp_path: Path) -> None:
    """A request for the experiment's feed with a user is served by the user's arm's feed and says which arm;
    the served log records the arm and its model version; the feedback consumer counts the users' engagement
    into their arms, which the API's /metrics then shows."""
    from fastapi.testclient import TestClient

    from consumers.feedback import FeedbackConsumer
    from indexes.served_log import ServedLog
    from ranker.serving.api import create_app
    from tests.test_served_log import own_topics, publish

    s = own_topics(with_arms(settings), tmp_path)
    s = s.model_copy(update={"feedback": s.feedback.model_copy(update={"served_log_dir": tmp_path / "served"})})
    users = [f"listener-{i}" for i in range(12)]
    arms = {u: assign(u, s.arms) for u in users}
    assert {a.name for a in arms.values() if a} == {"control", "fresh"}  # both arms among these users
    with TestClient(create_app(s)) as client:
        rids = {}
        for u in users:
            body = client.get("/v1/feeds/cold-start", params={"user": u, "limit": 5}).json()
            arm = arms[u]
            assert arm is not None and body["feed"] == arm.feed and body["arm"] == arm.name, body
            rids[body["request_id"]] = arm
        anonymous = client.get("/v1/feeds/cold-start").json()
        assert anonymous["feed"] == "cold-start" and "arm" not in anonymous
        other = client.get("/v1/feeds/fresh", params={"user": users[0]}).json()  # not the experiment's feed
        assert other["feed"] == "fresh" and "arm" not in other
        ranked = client.post("/v1/rank", json={"candidates": ["s1"], "user": users[1]}).json()
        assert ranked["feed"] == arms[users[1]].feed and ranked["arm"] == arms[users[1]].name  # type: ignore[union-attr]

    plays = [event(f"p-{i}", u, "play") for i, u in enumerate(users)]
    likes = [event(f"l-{i}", u, "like") for i, u in enumerate(users) if i % 2 == 0]
    sent = plays + likes
    publish(s, s.kafka.topics.engagement, [e.to_bytes() for e in sent], [e.song_id.encode() for e in sent])
    FeedbackConsumer(s).run(until_idle_s=2.0, until_caught_up=True)

    served = ServedLog(s.served_log_dir, s.kafka.topics.feeds_served).read()
    logged = dict(zip(served.column("request_id").to_pylist(), served.column("arm").to_pylist(), strict=True))
    versions = dict(
        zip(served.column("request_id").to_pylist(), served.column("model_version").to_pylist(), strict=True)
    )
    for rid, arm in rids.items():
        assert logged[rid] == arm.name and versions[rid] == arm.model_version, (rid, logged.get(rid))
    want = Counter(arms[u].name for u in users)  # type: ignore[union-attr]
    liked = Counter(arms[u].name for i, u in enumerate(users) if i % 2 == 0)  # type: ignore[union-attr]
    with TestClient(create_app(s)) as client:
        text = client.get("/metrics").text
    for name in ("control", "fresh"):
        plays_line = next(
            line for line in text.splitlines() if line.startswith("apexrank_arm_plays{") and f'arm="{name}"' in line
        )
        likes_line = next(
            line for line in text.splitlines() if line.startswith("apexrank_arm_likes{") and f'arm="{name}"' in line
        )
        assert float(plays_line.rsplit(" ", 1)[1]) == want[name], plays_line
        assert float(likes_line.rsplit(" ", 1)[1]) == liked[name], likes_line
