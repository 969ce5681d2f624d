"""Retraining on the real stack: a worse candidate is never promoted; a promotion rescores the feed."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families
from scipy.stats import spearmanr

from consumers import retrain_metrics
from consumers.publish import catalog_events, publish_events
from consumers.retrain import run_once
from consumers.stack import free_port
from consumers.worker import Worker
from indexes import ScoreStore
from indexes.engagement_log import EngagementLog, LoggedEvent
from indexes.redis_schema import RedisKeys, examination_json, parse_examination
from ranker.errors import ConfigError
from ranker.features import FeatureSet
from ranker.model.artifact import ScoringModel
from ranker.model.registry import (
    PROMOTION_LOCK,
    RETRAIN_REPORT,
    CurrentMoved,
    models_root_of,
    pending,
    promote,
    promote_if_serving,
    promotion_lock,
    prune_versions,
    resolve_model_dir,
)
from ranker.model.retrain import (
    Observed,
    RetrainReport,
    _exposure_like_rate,
    exposure_adjusted_likes,
    gate,
    retrain,
    smoothed_like_rates,
)
from ranker.model.targets import TargetTransform
from ranker.model.train_config import TrainConfig
from ranker.serving.state import PRIOR_FIELD
from ranker.serving.writer import FeedWriter, on_engagement
from ranker.settings import RetrainSettings, Settings
from ranker.synth import simulate_catalog
from tests.helpers import read_topic, serving, url_of
from tests.test_worker import feed, song

#: Spearman of the current model on the holdout; the candidates below move it by binary fractions,
#: so that "exactly the margin" is exact in floating point.
CURRENT = {"streams": 0.5, "likes": 0.25}
MARGIN = 0.125
TINY = 2.0**-10


@pytest.mark.parametrize(
    ("streams", "likes", "promote"),
    [
        pytest.param(0.625, 0.375, True, id="both-gain-exactly-the-margin"),
        pytest.param(0.625 - TINY, 0.375, False, id="mean-gain-just-below-the-margin"),
        pytest.param(0.75, 0.25, True, id="one-task-gains-twice-the-margin"),
        pytest.param(0.75 - TINY, 0.25, False, id="one-task-gains-just-under-twice"),
        pytest.param(0.875, 0.125, True, id="a-loss-of-exactly-the-margin-is-allowed"),
        pytest.param(0.875 + TINY, 0.125 - TINY, False, id="a-loss-just-past-the-margin-is-not"),
        pytest.param(1.0, 0.0, False, id="a-large-gain-cannot-buy-a-large-loss"),
        pytest.param(0.5, 0.25, False, id="no-change"),
        pytest.param(0.25, 0.125, False, id="worse"),
        pytest.param(math.nan, 0.9, False, id="undefined-spearman"),
        pytest.param(0.9, math.inf, False, id="non-finite-spearman"),
    ],
)
def test_gate_promotes_only_a_gain_of_at_least_the_margin(streams: float, likes: float, promote: bool) -> None:
    """gate(): mean Spearman gain >= margin, and no task losing more than the margin."""
    ok, reason = gate(CURRENT, {"streams": streams, "likes": likes, "coherence": 0.0}, MARGIN)
    assert ok is promote, reason
    if not math.isfinite(streams + likes):
        assert "undefined" in reason
    elif promote:
        assert reason == f"mean Spearman gain {((streams + likes) - 0.75) / 2:+.4f} >= margin {MARGIN}"
    else:
        assert "below margin 0.125" in reason and "worst task" in reason


def test_gate_reads_the_popularity_tasks_only() -> None:
    """Aesthetic outputs do not vote; a missing popularity task is an error, not a silent pass."""
    base = {"streams": 0.5, "likes": 0.25, "coherence": 0.9}
    assert gate(base, {**base, "coherence": -0.9}, 0.0)[0] is True  # no popularity change, margin 0
    assert gate(base, {**base, "coherence": 0.99}, 0.01)[0] is False
    with pytest.raises(KeyError):
        gate(base, {"streams": 0.9}, 0.01)


@dataclass
class Push:
    method: str
    path: str
    body: str

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """(name, sorted labels) -> value, as prometheus_client's own parser reads the pushed text."""
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(self.body)
            for s in family.samples
        }


@dataclass
class PushReceiver:
    """A loopback HTTP server standing in for a Prometheus Pushgateway: it records each push and answers
    200. (A real Pushgateway binary cannot be had offline; what the gateway would store is what the job
    sent, which the tests parse with prometheus_client.parser.)"""

    url: str
    pushes: list[Push] = field(default_factory=list)


@contextmanager
def push_receiver() -> Iterator[PushReceiver]:
    """A :class:`PushReceiver` on a free loopback port for the block."""
    received: list[Push] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
            with lock:
                received.append(Push(self.command, self.path, body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_PUT = do_POST = _record

        def log_message(self, format: str, *args: object) -> None:
            pass

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as httpd:
        yield PushReceiver(url_of(httpd), received)


@pytest.fixture
def pushgateway() -> Iterator[PushReceiver]:
    with push_receiver() as receiver:
        yield receiver


def label_set(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("retrain-world")
    return simulate_catalog(out, n_songs=240, seed=11, duration_s=2.0).catalog_path


def engage(settings: Settings, catalog: Path, seed: int = 3) -> None:
    """Plays and likes drawn from each song's true (hidden) like probability, into the real log."""
    table = pq.read_table(catalog).to_pylist()
    rng = np.random.default_rng(seed)
    log = EngagementLog(settings.engagement_log_dir, settings.kafka.topics.engagement)
    events: list[LoggedEvent] = []
    t0 = datetime.now(UTC) - timedelta(hours=1)
    offset = 0
    for row in table:
        plays = int(rng.integers(30, 90))
        likes = int(rng.binomial(plays, min(0.9, row["latent_like_prob"] * 3)))
        for k in range(plays + likes):
            kind = "play" if k < plays else "like"
            events.append(
                LoggedEvent(f"{row['song_id']}-{k}", row["song_id"], f"u{k}", kind, t0, None, None, 0, offset)
            )
            offset += 1
    log.append(events)


def scored_world(settings: Settings, catalog: Path) -> None:
    events = catalog_events(catalog)
    # The cold-start window is measured from created_at: make the songs new.
    now = datetime.now(UTC)
    events = [e.model_copy(update={"created_at": now - timedelta(minutes=i)}) for i, e in enumerate(events)]
    publish_events(settings, events)
    Worker(settings).run(until_idle_s=2.0, until_caught_up=True)
    engage(settings, catalog)


def test_a_promotion_cut_short_is_finished_by_the_next_run(
    settings: Settings, world: Path, store: ScoreStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``current`` moved, then Redis went away mid-rescore: the window kept the old model's scores and
    nobody heard of the new one. The next run, whose gate sees the promoted model as the incumbent
    and promotes nothing, finishes the rescore and announces it. ``model.head_dir`` names the models
    folder here, not its ``current``: the promotion goes where the workers look."""
    import redis.exceptions

    import consumers.retrain

    root = settings.state_dir / "models"
    like_rate = settings.feed.like_rate.model_copy(update={"generator_calibration": False})
    settings = settings.model_copy(
        update={
            "retrain": RetrainSettings(min_plays=10, epochs=40, margin=0.05, pushgateway_url="", off_policy_gate=False),
            "feed": settings.feed.model_copy(update={"like_rate": like_rate}),
            "model": settings.model.model_copy(update={"head_dir": root}),
        }
    )
    scored_world(settings, world)
    old_version = song(settings, feed(settings)[0][0])["model_version"]  # type: ignore[index]

    def window_versions() -> set[str]:
        return {song(settings, s)["model_version"] for s, _ in feed(settings)}  # type: ignore[index]

    rescore = consumers.retrain.rescore_window

    def cut_short(*args: Any, stragglers: bool = False, **kwargs: Any) -> int:
        if stragglers:  # the run's opening sweep: nothing to rescore yet
            return rescore(*args, stragglers=True, **kwargs)
        raise redis.exceptions.ConnectionError("Redis went away mid-rescore")

    monkeypatch.setattr(consumers.retrain, "rescore_window", cut_short)
    with pytest.raises(redis.exceptions.ConnectionError):
        run_once(settings)
    promoted = resolve_model_dir(settings.head_dir)
    assert promoted is not None and promoted.parent == root and promoted.name != old_version
    assert (pending(root) or {}).get("model_version") == promoted.name
    assert window_versions() == {old_version}

    monkeypatch.setattr(consumers.retrain, "rescore_window", rescore)
    second = run_once(settings)
    assert not second.promoted and second.current_version == promoted.name, second.reason
    assert window_versions() == {promoted.name}
    (announced,) = [
        json.loads(m.value) for m in read_topic(settings, settings.kafka.topics.models_promoted, 1, timeout_s=10)
    ]
    assert (announced["model_version"], announced["previous_version"]) == (promoted.name, old_version)
    assert announced["rescored"] == len(feed(settings)) and pending(root) is None


def promoting(settings: Settings, root: Path, grace_s: float = 0.0) -> Settings:
    """Settings whose retrain promotes over this world's seeded head into ``root`` (where the workers
    look), with a worker that looks for a new head only every 10 minutes: a promotion leaves it on
    the old one for the whole test."""
    like_rate = settings.feed.like_rate.model_copy(update={"generator_calibration": False})
    return settings.model_copy(
        update={
            "retrain": RetrainSettings(
                min_plays=10,
                epochs=40,
                margin=0.05,
                pushgateway_url="",
                off_policy_gate=False,
                rescore_grace_s=grace_s,
            ),
            "feed": settings.feed.model_copy(update={"like_rate": like_rate}),
            "model": settings.model.model_copy(update={"head_dir": root}),
            "worker": settings.worker.model_copy(update={"model_check_s": 600.0}),
        }
    )


def test_a_promotion_by_hand_while_the_run_gathers_stands(
    settings: Settings, world: Path, store: ScoreStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator rolls back while the run reads the logs and the embedding stores (after it loaded the
    incumbent): the candidate, warm-started from and judged against the incumbent, is not promoted over
    the rollback, and its unserved save is removed."""
    import consumers.retrain

    root = settings.state_dir / "models"
    settings = promoting(settings, root)
    scored_world(settings, world)
    incumbent = consumers.retrain.current_model(settings)
    promote(root, incumbent.save_versioned(root))
    rollback = ScoringModel.from_seed(
        incumbent.input_dim, 99, incumbent.encoder_id, n_layers=incumbent.n_layers, layers=incumbent.layers
    )
    gather = consumers.retrain.gather

    def gather_while_the_operator_rolls_back(*args: Any) -> Any:
        out = gather(*args)
        promote(root, rollback.save_versioned(root))  # from another shell
        return out

    monkeypatch.setattr(consumers.retrain, "gather", gather_while_the_operator_rolls_back)
    report = run_once(settings)
    assert not report.promoted and "current moved" in report.reason, report.reason
    assert "mean Spearman gain" in report.reason  # the candidate did pass the gate
    assert report.current_version == incumbent.version and report.candidate_version is not None
    served = resolve_model_dir(root)
    assert served is not None and served.name == rollback.version
    assert pending(root) is None and not (root / report.candidate_version).exists()
    assert "rescore" not in report.timings_s


def test_a_promotion_by_hand_while_the_candidate_is_saved_stands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other window: the gate has passed and the candidate is being written when the operator promotes."""
    features, _, plays, likes = _placement_world(300, seed=1)
    root = tmp_path / "models"
    operator = ScoringModel.from_seed(16, seed=7, encoder_id="test-enc", n_layers=4)
    save = ScoringModel.save_versioned

    def save_while_the_operator_promotes(model: ScoringModel, models_root: Path) -> Path:
        out = save(model, models_root)
        if model.version != operator.version:
            promote(root, save(operator, root))
        return out

    monkeypatch.setattr(ScoringModel, "save_versioned", save_while_the_operator_promotes)
    report = retrain(
        ScoringModel.from_seed(16, seed=0, encoder_id="test-enc", n_layers=4),
        features,
        _observed(features, plays, likes),
        models_root=root,
        holdout_fraction=0.2,
        margin=0.0,  # the seeded head knows nothing: the candidate passes the gate
        warm_start=True,
        train_config=TrainConfig(epochs=5, lr=1e-3, batch_size=32, patience=5, seed=0),
        likes_model="head",
        serving=None,  # nothing served when the incumbent was loaded
    )
    assert not report.promoted and report.reason.endswith(f"to {root / operator.version} during the run"), report
    assert resolve_model_dir(root) == root / operator.version
    assert pending(root) is None and report.model_dir is None
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["current", operator.version]


def test_every_move_of_current_holds_the_promotion_lock_which_dies_with_its_holder(tmp_path: Path) -> None:
    """A hand promotion waits for whoever holds the lock (the retrain's check and swap); a swap it makes
    meanwhile is seen by the retrain's check; a holder killed mid-way leaves nothing held."""
    import signal
    import subprocess
    import sys

    root = tmp_path / "models"
    first, second, third = (
        ScoringModel.from_seed(16, seed=i, encoder_id="test-enc", n_layers=4).save_versioned(root) for i in (1, 2, 3)
    )
    promote(root, first)
    done = threading.Event()
    hand = threading.Thread(target=lambda: (promote(root, second), done.set()))
    with promotion_lock(root):
        hand.start()
        assert not done.wait(1.0) and resolve_model_dir(root) == first  # waiting, not swapped
    hand.join(60)
    judged = resolve_model_dir(root)
    assert done.is_set() and judged == second

    # The retrain judged against ``second``; an operator's swap lands while it waits for the lock.
    failed: list[BaseException] = []

    def retrain_promotes() -> None:
        try:
            promote_if_serving(root, third, judged, {"model_version": third.name})
        except CurrentMoved as exc:
            failed.append(exc)

    checking = threading.Thread(target=retrain_promotes)
    with promotion_lock(root):
        checking.start()
        (root / "current").unlink()
        (root / "current").symlink_to(first.name)  # the operator's rollback, under the lock
    checking.join(60)
    assert len(failed) == 1 and resolve_model_dir(root) == first and pending(root) is None

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from ranker.model.registry import promotion_lock\n"
            f"with promotion_lock({str(root)!r}):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        holder.send_signal(signal.SIGKILL)
        holder.wait(60)
    finally:
        holder.kill()
    after = threading.Thread(target=promote, args=(root, third))
    after.start()
    after.join(60)
    assert not after.is_alive() and resolve_model_dir(root) == third


def late_songs(settings: Settings, tmp_path: Path) -> list[str]:
    """Six new songs published for the workers, created now (inside the cold-start window)."""
    extra = simulate_catalog(tmp_path / "late", n_songs=6, seed=5, duration_s=2.0).catalog_path
    now = datetime.now(UTC)
    events = [
        e.model_copy(update={"song_id": f"late-{i}", "created_at": now}) for i, e in enumerate(catalog_events(extra))
    ]
    publish_events(settings, events)
    return [e.song_id for e in events]


def scored_with(settings: Settings, song_ids: list[str]) -> set[str]:
    return {song(settings, s)["model_version"] for s in song_ids}  # type: ignore[index]


@pytest.mark.parametrize("grace_s", [0.5, 0.0], ids=["grace-pass", "next-runs-sweep"])
def test_songs_a_worker_scores_with_the_old_head_after_the_promotions_rescore_are_rescored(
    settings: Settings,
    world: Path,
    store: ScoreStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    grace_s: float,
) -> None:
    """A worker still on the old head scores new songs once the promotion's rescore has listed the window
    (its batch in hand, or before its next look for a head). The grace pass rescores them; with it off (0),
    the next run's opening sweep does."""
    import consumers.retrain

    root = settings.state_dir / "models"
    settings = promoting(settings, root, grace_s)
    scored_world(settings, world)
    worker = Worker(settings)  # keeps its head: it looks for a new one only every 10 minutes
    old = worker.model.version
    rescore = consumers.retrain.rescore_window
    late: list[str] = []

    def rescore_then_the_worker_scores(*args: Any, stragglers: bool = False, **kwargs: Any) -> int:
        n = rescore(*args, stragglers=stragglers, **kwargs)
        if not stragglers:  # the promotion's rescore
            late.extend(late_songs(settings, tmp_path))
            worker.run(until_idle_s=2.0, until_caught_up=True)
            assert scored_with(settings, late) == {old}
        return n

    monkeypatch.setattr(consumers.retrain, "rescore_window", rescore_then_the_worker_scores)
    report = run_once(settings)
    assert report.promoted and report.candidate_version != old, report.reason
    assert report.rescored["stragglers"] == 0 and report.rescored["window"] == len(feed(settings)) - len(late)
    if grace_s:
        assert report.rescored["grace"] == len(late) and "rescore_grace" in report.timings_s
        assert scored_with(settings, [s for s, _ in feed(settings)]) == {report.candidate_version}
        return
    assert "grace" not in report.rescored and scored_with(settings, late) == {old}
    monkeypatch.setattr(consumers.retrain, "rescore_window", rescore)
    second = run_once(settings)
    assert second.rescored["stragglers"] == len(late)
    served = resolve_model_dir(root)
    assert served is not None and scored_with(settings, [s for s, _ in feed(settings)]) == {served.name}


def test_the_models_folder_is_where_current_lives(tmp_path: Path) -> None:
    """The retrain job and ``apexrank promote`` agree on it; a model directory has no ``current`` to move."""
    assert models_root_of(tmp_path / "models" / "current") == tmp_path / "models"
    assert models_root_of(tmp_path / "models") == tmp_path / "models"
    model_dir = tmp_path / "models" / "apex-a"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="model directory"):
        models_root_of(model_dir)


def test_old_versions_the_job_made_and_cut_short_saves_are_pruned(tmp_path: Path) -> None:
    """retrain.keep_models: the newest of the job's own versions stay, and the serving one even when
    older; a directory the operator made stays; a save's leftover goes once it is an hour old."""
    import os

    root = tmp_path / "models"
    root.mkdir()

    def version(name: str, age_s: float, made_by_retrain: bool = True) -> Path:
        d = root / name
        d.mkdir()
        (d / "config.json").write_text("{}")
        if made_by_retrain:
            (d / RETRAIN_REPORT).write_text("{}")
        os.utime(d, (time.time() - age_s, time.time() - age_s))
        return d

    for i in range(6):
        version(f"apex-{i}", age_s=1000 * (6 - i))  # apex-5 is the newest
    version("imported", age_s=10_000, made_by_retrain=False)
    (root / "current").symlink_to("apex-0")  # rolled back to the oldest: it serves, so it stays
    crashed, fresh = root / ".apex-6.tmp-1a2b3c4d", root / ".apex-7.tmp-5e6f7a8b"
    crashed.mkdir()
    fresh.mkdir()
    os.utime(crashed, (time.time() - 7200, time.time() - 7200))

    removed = prune_versions(root, keep=2)
    assert sorted(removed) == sorted(["apex-1", "apex-2", "apex-3", crashed.name])
    left = sorted(p.name for p in root.iterdir())
    assert left == sorted(["apex-0", "apex-4", "apex-5", "imported", "current", fresh.name, PROMOTION_LOCK])
    assert resolve_model_dir(root) == root / "apex-0"


def test_retrain_promotes_a_better_head_rescoring_the_feed_and_never_a_worse_one(
    settings: Settings, world: Path, store: ScoreStore, pushgateway: PushReceiver
) -> None:
    """Each run also pushes its report's figures to the Pushgateway: here a loopback HTTP receiver started
    by the test (no Pushgateway binary can be had offline), whose recorded body is parsed with
    prometheus_client.parser and checked against the report."""
    gateway = pushgateway.url
    # The generators' calibration factors (tests/test_generator_calibration.py) are left out here: a run that
    # promotes nothing would still move the feed by them.
    like_rate = settings.feed.like_rate.model_copy(update={"generator_calibration": False})
    settings = settings.model_copy(
        update={
            "retrain": RetrainSettings(
                min_plays=10, epochs=40, margin=0.05, pushgateway_url=gateway, off_policy_gate=False, rescore_grace_s=0
            ),
            "feed": settings.feed.model_copy(update={"like_rate": like_rate}),
        }
    )
    scored_world(settings, world)
    before = feed(settings)
    old_version = song(settings, before[0][0])["model_version"]  # type: ignore[index]

    # The product's default also asks the off-policy question (consumers/retrain_gate.py): this world has
    # engagement but no served log, so a candidate that passes the Spearman gate is still not promoted.
    gated = settings.retrain.model_copy(update={"off_policy_gate": True, "pushgateway_url": ""})
    kept = run_once(settings.model_copy(update={"retrain": gated}))
    assert not kept.promoted and "mean Spearman gain" in kept.reason, kept.reason
    assert "no explored impressions" in kept.reason, kept.reason
    assert feed(settings) == before

    played = [s for s, _ in before[:5]]  # counted in the calibration totals at the old model's prior
    for sid in played:
        store.client.hincrby(store.song_key(sid), "eng.plays", 50)
        store.client.hincrby(store.song_key(sid), "eng.likes", 10)
    assert on_engagement(played, settings) == 5

    exam_key = RedisKeys(settings.redis.key_prefix).examination()
    store.client.set(exam_key, examination_json([2.0, 0.5]))  # weights of an earlier refresh
    began = time.time()
    report = run_once(settings)

    assert report.promoted, report
    # The run refreshed the examination weights: no served log here, so too little data, all 1.
    assert parse_examination(store.client.get(exam_key)) == [1.0]
    (push,) = pushgateway.pushes
    assert (push.method, push.path) == ("POST", "/metrics/job/apexrank_retrain")  # pushadd: see retrain_metrics
    check_pushed(push, report, began)
    assert report.candidate["likes"] >= report.current["likes"] - 0.05
    assert resolve_model_dir(settings.head_dir) is not None
    after = feed(settings)
    assert sorted(s for s, _ in after) == sorted(s for s, _ in before)  # nothing lost or added
    assert [s for s, _ in after] != [s for s, _ in before]  # but the order follows the new model
    rec = song(settings, after[0][0])
    assert rec is not None and rec["model_version"] == report.candidate_version != old_version
    # The calibration totals now measure the promoted model: plays x its prior, song by song.
    priors = [float(song(settings, sid)[PRIOR_FIELD]) for sid in played]  # type: ignore[index]
    assert store.calibration_totals() == pytest.approx((50.0, 50 * sum(priors)))
    # ...and every entry was written at that final scale: recomputing every feed changes nothing.
    FeedWriter(settings, store).rebuild()
    rebuilt = dict(feed(settings))
    assert {s: pytest.approx(v, abs=1e-9) for s, v in after} == rebuilt
    promoted = ScoringModel.load(report.model_dir)  # type: ignore[arg-type]
    card = promoted.card.training
    assert card is not None and card["retrain_targets"] == "exposure" and card["rate_prior_plays"] == 20.0
    # The default: the likes output is a read-out fitted on the plays and likes; 240 songs are too few to
    # fine-tune the head, which is the incumbent's.
    assert card["likes_model"] == "readout" and promoted.like_readout is not None
    assert promoted.like_readout.n_songs >= report.n_train
    announced = read_topic(settings, settings.kafka.topics.models_promoted, 1)
    assert [m.key for m in announced] == [report.candidate_version.encode()]  # type: ignore[union-attr]

    # A new worker picks the promoted head up.
    assert Worker(settings).model.version == report.candidate_version

    # A deliberately worse candidate (a head trained on shuffled targets, its own likes output) is not
    # promoted over it.
    worse_settings = RetrainSettings(
        min_plays=10,
        epochs=15,
        margin=0.0,
        warm_start=False,
        likes_model="head",
        pushgateway_url=gateway,
        off_policy_gate=False,
    )
    settings = settings.model_copy(update={"retrain": worse_settings})
    promoted_feed = feed(settings)
    began = time.time()
    worse = run_once(settings, train_overrides={"shuffle_targets": True, "layer_mix": "mean"})
    assert not worse.promoted, worse
    assert "rescore" not in worse.timings_s
    check_pushed(pushgateway.pushes[1], worse, began)  # no rescore step left over from the first run
    assert worse.current_version == report.candidate_version and worse.candidate_version is not None
    assert resolve_model_dir(settings.head_dir).name == report.candidate_version  # type: ignore[union-attr]
    assert feed(settings) == promoted_feed


def check_pushed(push: Push, report: RetrainReport, began: float) -> None:
    """The pushed text holds the report's figures, and nothing else."""
    got = push.samples()
    ended = got[("apexrank_retrain_last_run_timestamp_seconds", ())]
    assert began <= ended <= time.time()
    assert got[("apexrank_retrain_last_success_timestamp_seconds", ())] == ended
    assert got[("apexrank_retrain_promoted", ())] == float(report.promoted)
    for model, figures in (("candidate", report.candidate), ("current", report.current)):
        assert set(figures) == {"streams", "likes"}
        for task, value in figures.items():
            assert got[("apexrank_retrain_holdout_spearman", label_set(model=model, task=task))] == value
    assert got[("apexrank_retrain_songs", label_set(set="train"))] == report.n_train
    assert got[("apexrank_retrain_songs", label_set(set="holdout"))] == report.n_holdout
    steps = {dict(labels)["step"]: v for (name, labels), v in got.items() if name == "apexrank_retrain_step_seconds"}
    assert steps == report.timings_s and {"gather", "train", "evaluate", "total"} <= set(steps)
    assert len(got) == 3 + 4 + 2 + len(steps)  # times, promoted; spearman; songs; steps


def test_a_failed_run_pushes_its_time_only_and_a_failed_push_fails_nothing(
    settings: Settings, pushgateway: PushReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """A run that fails (no embedding store yet) pushes its last-run time alone, so that the gateway keeps
    the last success (POST replaces only the names pushed); a gateway that is down is only logged."""
    retrain = settings.retrain.model_copy(update={"pushgateway_url": pushgateway.url})
    began = time.time()
    with pytest.raises(ConfigError, match="no embedding store"):
        run_once(settings.model_copy(update={"retrain": retrain}))
    (push,) = pushgateway.pushes
    assert push.method == "POST"
    (((name, labels), value),) = push.samples().items()
    assert labels == ()
    assert name == "apexrank_retrain_last_run_timestamp_seconds" and began <= value <= time.time()

    down = settings.retrain.model_copy(update={"pushgateway_url": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(ConfigError, match="no embedding store"):  # the run's own error, not the push's
        run_once(settings.model_copy(update={"retrain": down}))
    assert "could not push the retrain metrics" in caplog.text
    report = RetrainReport(False, "test", "v0", None, 0, 0)
    assert retrain_metrics.push(settings.model_copy(update={"retrain": down}), report) is False


def test_exposure_adjusted_likes_rank_songs_by_like_rate_not_by_plays() -> None:
    plays = np.array([10, 1000, 40, 40])
    likes = np.array([2, 200, 0, 20])
    raw = exposure_adjusted_likes(plays, likes, prior_plays=0.0)
    np.testing.assert_allclose(raw, [0.2 * 40, 0.2 * 40, 0.0, 0.5 * 40])  # rate x the median plays (40)
    smoothed = exposure_adjusted_likes(plays, likes, prior_plays=20.0)
    pooled = 222 / 1090
    assert smoothed[0] == pytest.approx((2 + 20 * pooled) / 30 * 40)  # few plays: pulled toward the pool
    assert smoothed[1] == pytest.approx(0.2 * 40, rel=0.01)  # many plays: barely moved
    assert smoothed[2] < smoothed[0] < smoothed[3]
    assert exposure_adjusted_likes(np.zeros(0), np.zeros(0), 20.0).shape == (0,)


def _placement_world(n: int, seed: int) -> tuple[FeatureSet, np.ndarray, np.ndarray, np.ndarray]:
    """Songs whose like rate follows one feature direction and whose plays follow another.

    A closed loop in miniature: plays say where a (simulated) feed put the song, likes per play
    what the audience thought of it.
    """
    rng = np.random.default_rng(seed)
    dim = 16
    x = rng.normal(size=(n, dim))
    taste, placement = x[:, 0], x[:, 1]
    rate = 1 / (1 + np.exp(-(-1.5 + 1.0 * taste)))
    plays = rng.poisson(np.exp(3.0 + 1.2 * placement)) + 5
    likes = rng.binomial(plays, rate)
    layers = np.repeat(x[:, None, :], 4, axis=1) + rng.normal(scale=0.1, size=(n, 4, dim))
    ids = [f"s{seed}-{i}" for i in range(n)]
    fs = FeatureSet(ids, layers.astype(np.float32), np.ones(n, np.int64), encoder_id="test-enc")
    return fs, rate, plays, likes


def _observed(features: FeatureSet, plays: np.ndarray, likes: np.ndarray) -> Observed:
    """The songs' counts as a retrain gathers them: one generator, created a minute apart in order."""
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    n = len(plays)
    return Observed(features.song_ids, plays, likes, ["g"] * n, [t0 + timedelta(minutes=i) for i in range(n)])


def _promoted_prior_spearman(tmp_path: Path, targets: str) -> tuple[float, float]:
    """Retrain a seeded head on a placement world; (Spearman of the promoted head's prior like
    rate with the true like rate on fresh songs, the prior's mean)."""
    features, _, plays, likes = _placement_world(800, seed=1)
    observed = _observed(features, plays, likes)
    current = ScoringModel.from_seed(16, seed=0, encoder_id="test-enc", n_layers=4)
    report = retrain(
        current,
        features,
        observed,
        models_root=tmp_path / targets,
        holdout_fraction=0.2,
        margin=0.0,
        warm_start=True,
        train_config=TrainConfig(epochs=60, lr=1e-3, batch_size=32, patience=10, seed=0),
        targets=targets,  # type: ignore[arg-type]
        likes_model="head",  # the head's own likes output is what the targets shape
    )
    assert report.promoted and report.model_dir is not None, report  # the seeded head knows nothing
    candidate = ScoringModel.load(report.model_dir)
    fresh, true_rate, _, _ = _placement_world(600, seed=2)
    scores = candidate.predict(fresh.layers)
    transform = TargetTransform.from_dict(candidate.target_transform)  # type: ignore[arg-type]
    prior = transform.expected_rate(
        scores[:, candidate.tasks.index("likes")], scores[:, candidate.tasks.index("streams")]
    )
    return float(spearmanr(prior, true_rate).statistic), float(np.mean(prior))


def test_a_promotion_made_during_the_run_is_not_replaced(tmp_path: Path) -> None:
    """An operator promotes (or rolls back to) another model while a retrain trains: the candidate was
    judged against the model that served when the run began, so it is not promoted over the new one."""
    from ranker.model.registry import promote

    features, _, plays, likes = _placement_world(300, seed=1)
    root = tmp_path / "models"
    operator = ScoringModel.from_seed(16, seed=7, encoder_id="test-enc", n_layers=4)

    def judge(current: ScoringModel, candidate: ScoringModel) -> tuple[bool, str, dict[str, float]]:
        promote(root, operator.save_versioned(root))  # mid-run, from another shell
        return True, "off-policy: fine", {}

    report = retrain(
        ScoringModel.from_seed(16, seed=0, encoder_id="test-enc", n_layers=4),
        features,
        _observed(features, plays, likes),
        models_root=root,
        holdout_fraction=0.2,
        margin=0.0,  # the seeded head knows nothing: the candidate passes the Spearman gate
        warm_start=True,
        train_config=TrainConfig(epochs=5, lr=1e-3, batch_size=32, patience=5, seed=0),
        likes_model="head",
        judge=judge,
    )
    assert not report.promoted and "current moved" in report.reason, report.reason
    served = resolve_model_dir(root)
    assert served is not None and ScoringModel.load(served).version == operator.version
    assert pending(root) is None


def test_exposure_targets_learn_the_audiences_taste_where_counts_learn_the_placement(tmp_path: Path) -> None:
    _, _, plays, likes = _placement_world(800, seed=1)
    exposure, mean_prior = _promoted_prior_spearman(tmp_path, "exposure")
    counts, _ = _promoted_prior_spearman(tmp_path, "counts")
    # Measured: 0.89 against 0.57. Raw likes are mostly plays, so the counts head learns placement too.
    assert exposure > 0.75 and exposure > counts + 0.15, (exposure, counts)
    # The refitted curve calibrates the head's predictions: its mean prior is near the pooled rate.
    assert mean_prior == pytest.approx(likes.sum() / plays.sum(), rel=0.25)


def test_an_exposure_trained_candidate_is_calibrated_at_the_incumbents_level(tmp_path: Path) -> None:
    features, _, plays, likes = _placement_world(200, seed=3)
    rates = smoothed_like_rates(plays, likes, 20.0)
    seeded = ScoringModel.from_seed(16, seed=0, encoder_id="test-enc", n_layers=4)
    transform = TargetTransform.fit({"streams": plays, "likes": likes}).to_dict()
    incumbent = seeded.with_target_transform({**transform, "like_rate": {"x": [0.0, 100.0], "y": [0.05, 0.1]}})
    candidate = ScoringModel.from_seed(16, seed=1, encoder_id="test-enc", n_layers=4).with_target_transform(transform)

    def mean_prior(model: ScoringModel, tf: dict[str, object]) -> float:
        scores = model.predict(features.layers)
        likes_s, streams_s = scores[:, model.tasks.index("likes")], scores[:, model.tasks.index("streams")]
        return float(np.mean(TargetTransform.from_dict(tf).expected_rate(likes_s, streams_s)))

    # The shape is the candidate's own (fitted to the songs' rates, increasing), the level the incumbent's.
    old_scores, new_scores = incumbent.predict(features.layers), candidate.predict(features.layers)
    out = _exposure_like_rate(incumbent, candidate, old_scores, new_scores, rates)
    assert out["like_rate"] != incumbent.target_transform["like_rate"]  # type: ignore[index]
    assert np.all(np.diff(out["like_rate"]["y"]) >= 0)
    assert mean_prior(candidate, out) == pytest.approx(mean_prior(incumbent, incumbent.target_transform), rel=1e-3)  # type: ignore[arg-type]
    # A first head (no incumbent curve) keeps the fitted level: within the songs' rates.
    fitted = _exposure_like_rate(seeded, candidate, old_scores, new_scores, rates)["like_rate"]
    assert np.all(np.diff(fitted["y"]) >= 0)
    assert rates.min() <= fitted["y"][0] <= fitted["y"][-1] <= rates.max()
    # So does an incumbent whose transform predates the curve, or whose mean prior is zero.
    legacy = seeded.with_target_transform({k: v for k, v in transform.items() if k != "like_rate"})
    assert _exposure_like_rate(legacy, candidate, old_scores, new_scores, rates)["like_rate"] == fitted
    zero = seeded.with_target_transform({**transform, "like_rate": {"x": [0.0, 100.0], "y": [0.0, 0.0]}})
    assert _exposure_like_rate(zero, candidate, old_scores, new_scores, rates)["like_rate"] == fitted
    assert mean_prior(candidate, {**transform, "like_rate": fitted}) == pytest.approx(float(np.mean(rates)), rel=0.2)


def test_a_readout_candidate_keeps_a_small_sets_head_and_learns_from_songs_below_the_threshold(tmp_path: Path) -> None:
    features, rate, plays, likes = _placement_world(300, seed=4)
    plays[::3] = np.minimum(plays[::3], 3)  # a third of the songs below the exposure threshold
    likes[::3] = np.random.default_rng(6).binomial(plays[::3], rate[::3])
    observed = _observed(features, plays, likes)
    seeded = ScoringModel.from_seed(16, seed=0, encoder_id="test-enc", n_layers=4)
    transform = TargetTransform.fit({"streams": plays, "likes": likes}).to_dict()
    current = seeded.with_target_transform(transform, training={"note": "a trained head, for the test"})
    report = retrain(
        current,
        features,
        observed,
        models_root=tmp_path,
        holdout_fraction=0.2,
        margin=0.0,
        warm_start=True,
        train_config=TrainConfig(epochs=5, seed=0),
        min_plays=5,
    )
    assert report.promoted and report.model_dir is not None, report
    assert report.n_train + report.n_holdout == int((plays >= 5).sum())
    candidate = ScoringModel.load(report.model_dir)
    readout = candidate.like_readout
    assert readout is not None
    # Fitted on every played song created before the holdout's first, below the threshold too.
    first_held = sorted(np.flatnonzero(plays >= 5))[-report.n_holdout]
    assert readout.n_songs == first_held > report.n_train
    # Fewer songs than min_songs_head: the head is the incumbent's, only the likes output changed.
    before, after = current.predict(features.layers), candidate.predict(features.layers)
    streams = current.tasks.index("streams")
    np.testing.assert_array_equal(after[:, streams], before[:, streams])
    fresh, true_rate, _, _ = _placement_world(600, seed=5)
    scores = candidate.predict(fresh.layers)
    transform = TargetTransform.from_dict(candidate.target_transform)  # type: ignore[arg-type]
    prior = transform.expected_rate(scores[:, candidate.tasks.index("likes")], scores[:, streams])
    assert float(spearmanr(prior, true_rate).statistic) > 0.8
    # The prior is the read-out's rate (its curve), at the pooled level.
    np.testing.assert_allclose(prior, readout.rates(fresh.layers.reshape(600, -1)), atol=0.01)
    assert float(np.mean(prior)) == pytest.approx(likes.sum() / plays.sum(), rel=0.25)


def test_a_worse_readout_is_not_promoted_and_a_seeded_head_is_still_trained(tmp_path: Path) -> None:
    features, _, plays, likes = _placement_world(300, seed=4)
    seeded = ScoringModel.from_seed(16, seed=0, encoder_id="test-enc", n_layers=4)

    def run(model: ScoringModel, likes: np.ndarray) -> RetrainReport:
        return retrain(
            model,
            features,
            _observed(features, plays, likes),
            models_root=tmp_path,
            holdout_fraction=0.2,
            margin=0.0,
            warm_start=True,
            train_config=TrainConfig(epochs=3),
            min_plays=5,
        )

    first = run(seeded, likes)
    assert first.promoted and first.model_dir is not None, first
    good = ScoringModel.load(first.model_dir)
    # The seeded head was trained (its streams output moved), not kept with random outputs.
    streams = seeded.tasks.index("streams")
    assert not np.array_equal(good.predict(features.layers)[:, streams], seeded.predict(features.layers)[:, streams])
    # A read-out fitted on shuffled likes (the training songs' only: the holdout, the newest 20 %,
    # keeps its real likes) is worse there, and the gate keeps the good model.
    train = np.arange(240)
    shuffled = np.random.default_rng(0).permutation(likes[train] / plays[train])
    worse = likes.copy()
    worse[train] = np.minimum(np.round(shuffled * plays[train]), plays[train]).astype(np.int64)
    second = run(good, worse)
    assert not second.promoted, second
    assert second.candidate["likes"] < second.current["likes"], second
