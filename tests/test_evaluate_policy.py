"""`apexrank evaluate-policy` on the real stack: the served and engagement logs on disk, the candidate
feed's prior scores from Redis (written with the score store), the estimate printed as JSON."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from consumers.cli import main
from indexes.base import ScoreStore, SongRecord
from indexes.engagement_log import EngagementLog
from indexes.served_log import ServedLog, impressions
from ranker.settings import Settings
from tests.test_cli_startup import env_for

NOW = datetime.now(UTC)
POOL = ["s0", "s1", "s2", "s3"]
FEEDS = {"cold-start": {}, "no-suno": {"filters": {"generators_exclude": ["suno-v5"]}}}


def song(song_id: str, prior: float, generator: str, **extra: str) -> SongRecord:
    at = (NOW - timedelta(days=1)).isoformat()
    return SongRecord(
        song_id, "test-1", {"likes": 50.0}, 0.5, generator, at, at, extra={"prior.like_rate": prior, **extra}
    )


def write_logs(settings: Settings) -> None:
    """Five one-explored-slot pages from pool s0..s3 (each with an exploit item); r0 is three days old."""
    pages = [  # request, hours ago, explored song, its propensity, plays, likes
        ("r0", 72, "s0", 0.5, 5, 0),
        ("r1", 1, "s0", 0.5, 1, 1),
        ("r2", 1, "s0", 0.25, 2, 0),
        ("r3", 1, "s1", 0.4, 1, 1),
        ("r4", 1, "s2", 0.2, 1, 0),
    ]
    served = ServedLog(settings.served_log_dir, settings.kafka.topics.feeds_served)
    served.append_columns(
        {
            "request_id": [p[0] for p in pages],
            "served_at": [NOW - timedelta(hours=p[1]) for p in pages],
            "kind": ["feed"] * len(pages),
            "feed": ["cold-start"] * len(pages),
            "user_id": [None] * len(pages),
            "arm": [None] * len(pages),
            "model_version": ["test-1"] * len(pages),
            "song_ids": [["x-exploit", p[2]] for p in pages],
            "explored": [[False, True] for _ in pages],
            "propensity": [[1.0, p[3]] for p in pages],
            "pool": [POOL for _ in pages],
            "partition": [0] * len(pages),
            "offset": list(range(len(pages))),
        }
    )
    events: list[tuple[str, str, str, int]] = []  # request, song, type, hours ago
    for request, hours, explored, _, plays, likes in pages:
        events += [(request, explored, "play", hours)] * plays + [(request, explored, "like", hours)] * likes
        events += [(request, "x-exploit", "play", hours), (request, "x-exploit", "like", hours)]  # not counted
    log = EngagementLog(settings.engagement_log_dir, settings.kafka.topics.engagement)
    log.append_columns(
        {
            "event_id": [f"e{i}" for i in range(len(events))],
            "song_id": [e[1] for e in events],
            "user_id": ["u1"] * len(events),
            "type": [e[2] for e in events],
            "ts": [NOW - timedelta(hours=e[3]) + timedelta(seconds=30) for e in events],
            "feed": ["cold-start"] * len(events),
            "position": [1] * len(events),
            "partition": [0] * len(events),
            "offset": list(range(len(events))),
            "request_id": [e[0] for e in events],
        }
    )


@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in env_for(settings).items():
        if name.startswith("APEXRANK_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("APEXRANK_FEED__FEEDS", json.dumps(FEEDS))
    return Settings()


def evaluate(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main(["evaluate-policy", "--since", "2d", "--json", "--resamples", "200", *argv]) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


def test_evaluate_policy_from_the_logs_and_the_store(
    cli_env: Settings,
    store: ScoreStore,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # s0 has the best prior, but its stored evidence (200 plays, no likes) would sink it: the candidate
    # is scored on its prior alone, since that evidence includes the likes being evaluated.
    store.write_songs(
        [
            song("s0", 0.30, "suno-v5", **{"eng.plays": "200", "eng.likes": "0"}),
            song("s1", 0.20, "udio"),
            song("s2", 0.10, "udio"),
            song("s3", 0.05, "udio"),
        ],
        "cold-start",
    )
    write_logs(cli_env)

    # cold-start picks s0 on every page: r1 (w 2: 1 play, 1 like) and r2 (w 4: 2 plays); r0 is before --since.
    est = evaluate(capsys, "--policy", "cold-start")
    assert est["value"] == pytest.approx((2 * 1 + 4 * 0) / (2 * 1 + 4 * 2))
    assert (est["n"], est["requests"], est["matched"], est["matched_plays"]) == (4, 4, 2, 3)
    assert est["logged_rate"] == pytest.approx(2 / 5)  # the exploit items' likes are not in it
    assert est["enough"] is False and est["min_matched"] == 200
    assert est["low"] is not None and est["low"] <= est["value"] <= est["high"]  # type: ignore[operator]

    # no-suno's filters refuse s0: it picks s1, matched on r3 only.
    est = evaluate(capsys, "--policy", "no-suno", "--min-matched", "1")
    assert (est["value"], est["matched"], est["enough"]) == (1.0, 1, True)

    # Against cold-start: both estimates on the same pages and their difference.
    cmp = evaluate(capsys, "--policy", "no-suno", "--against", "cold-start", "--min-matched", "1")
    assert (cmp["candidate"]["value"], cmp["incumbent"]["value"]) == (1.0, pytest.approx(0.2))  # type: ignore[index]
    assert cmp["difference"] == pytest.approx(0.8)
    assert cmp["low"] <= cmp["difference"] <= cmp["high"]  # type: ignore[operator]

    # --impressions: a joined table instead of the logs (here without page r1: only r2's 2 plays, no like).
    joined = impressions(
        ServedLog(cli_env.served_log_dir, cli_env.kafka.topics.feeds_served).read(),
        EngagementLog(cli_env.engagement_log_dir, cli_env.kafka.topics.engagement).read(),
    )
    pq.write_table(joined.filter(pc.not_equal(joined.column("request_id"), "r1")), tmp_path / "imp.parquet")
    est = evaluate(capsys, "--policy", "cold-start", "--impressions", str(tmp_path / "imp.parquet"))
    assert (est["value"], est["matched"], est["n"]) == (0.0, 1, 3)

    # The generators' calibration factors (a retrain's) scale each song's prior as the feed does:
    # suno-v5 x0.5 and udio x2 put s1 (0.20 x 2) above s0 (0.30 x 0.5), so cold-start now picks s1.
    store.set_generator_calibration({"suno-v5": 0.5, "udio": 2.0})
    est = evaluate(capsys, "--policy", "cold-start", "--min-matched", "1")
    assert (est["value"], est["matched"]) == (1.0, 1)
    # ... only where the feed applies them: with feed.like_rate.generator_calibration off, the stored
    # factors (a retrain's, from before it was turned off) are not the feed's, and cold-start picks s0.
    monkeypatch.setenv("APEXRANK_FEED__LIKE_RATE__GENERATOR_CALIBRATION", "false")
    est = evaluate(capsys, "--policy", "cold-start", "--min-matched", "1")
    assert (est["value"], est["matched"]) == (pytest.approx(0.2), 2)
    monkeypatch.delenv("APEXRANK_FEED__LIKE_RATE__GENERATOR_CALIBRATION")
    store.set_generator_calibration({})

    # The table form prints the same estimates.
    argv = ["evaluate-policy", "--policy", "cold-start", "--since", "2d", "--resamples", "50"]
    assert main([*argv, "--against", "no-suno"]) == 0
    out = capsys.readouterr().out
    assert "0.2000" in out and "1.0000" in out and "not enough for cold-start" in out and "-0.8000" in out


def test_bad_options_are_refused(cli_env: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["evaluate-policy", "--policy", "nope", "--since", "1d"]) == 2
    assert "no such feed" in capsys.readouterr().err
    assert main(["evaluate-policy", "--policy", "cold-start", "--since", "last tuesday"]) == 2
    assert "RFC 3339" in capsys.readouterr().err
    assert (
        main(["evaluate-policy", "--policy", "cold-start", "--since", "1d", "--impressions", str(tmp_path / "x")]) == 2
    )
    assert "no such file" in capsys.readouterr().err
