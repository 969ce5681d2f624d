"""``FeedReader.rank`` (one vectorised pass over a columnar batch) gives what the per-song rank gave.

The reference is the old implementation, kept unchanged in tests/reference_rank.py. Both
run on the real Redis over a seeded catalog of a few hundred hashes written field by field
(missing aesthetics, absent priors, engagement counters, future and unreadable dates, old
songs, several generators and tags, "inf"/"nan"/"abc" in fields, hashes with engagement
only), with unknown ids among the candidates, filters on and off, explanations on and
off, every named feed and inline policies: same orders, same unknown and filtered lists,
every score and component within 1e-9 (relative), and the same first non-finite value.
"""

from __future__ import annotations

import asyncio
import math
import random
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from indexes import RedisScoreStore
from indexes.redis_schema import CALIBRATION_FIELDS
from ranker.events import TASKS
from ranker.serving.batch import SongBatch, builtin_sum, evaluate
from ranker.serving.policy import Policy
from ranker.serving.reader import FeedReader
from ranker.serving.responses import first_non_finite
from ranker.serving.state import READ_FIELDS, WRITE_FIELDS, state_from_fields
from ranker.settings import FeedFilters, Settings
from tests.reference_rank import reference_rank
from tests.test_policy import plain, with_feeds

NOW = 1_760_000_000.0  # the readers' clock: fixed, so both paths score at the same instant
HOUR = 3600.0
BAD = ["inf", "-inf", "nan", "NaN", "abc", "", "1e400", " 3.5 ", "1_0", "-0.0", "+4"]
GENERATORS = ["suno-v5", "udio-2", "riffusion", "stable-audio", ""]
TAGS = ["pop,rock", "chill, lofi", '["pop", "chill"]', "[not json", "rock", "", '{"a": 1}', "ambient"]


def iso(ts: float, naive: bool = False) -> str:
    stamp = datetime.fromtimestamp(ts, UTC)
    return (stamp.replace(tzinfo=None) if naive else stamp).isoformat()


def song_hash(rng: random.Random, kind: int) -> dict[str, str]:
    """One song's hash, drawn to hit every branch of the parsing and the policy."""
    fields: dict[str, str] = {}
    for task in TASKS:
        if rng.random() < (0.05 if task in ("streams", "likes") else 0.2):
            continue  # absent: left out of the quality, or the fallback's likes score 0
        if rng.random() < 0.05:
            fields[f"score.{task}"] = rng.choice(BAD)
        elif task in ("streams", "likes"):
            fields[f"score.{task}"] = repr(rng.uniform(-5, 105))
        else:
            fields[f"score.{task}"] = repr(rng.uniform(0.5, 5.5))  # outside 1-5 too: clipped
    roll = rng.random()
    if roll < 0.35:
        fields["prior.like_rate"] = repr(rng.uniform(0.0, 0.35))
    elif roll < 0.42:
        fields["prior.like_rate"] = rng.choice([*BAD, "7", "-1", "0"])
    if rng.random() < 0.5:
        plays = rng.choice([0, 1, 3, 20, 400, 10**6])
        fields["eng.plays"] = str(plays)
        fields["eng.likes"] = str(rng.choice([0, 1, plays // 10, plays, plays + 5]))  # likes > plays too
        roll = rng.random()  # examined plays; absent (roll >= 0.7): counted before they existed
        if roll < 0.6:
            fields["eng.eplays"] = repr(plays * rng.uniform(0.05, 2.5))
        elif roll < 0.7:
            fields["eng.eplays"] = rng.choice([*BAD, "-3", "1e300", "0.3"])
    if rng.random() < 0.05:
        fields[rng.choice(["eng.plays", "eng.likes"])] = rng.choice([*BAD, "-7"])
    age_h = rng.choice([0.0, 0.5, 2.0, 30.0, 24 * 40.0, 24 * 365 * 3.0, rng.uniform(0, 24 * 14)])
    scored = NOW - rng.choice([0.0, 60.0, 3 * HOUR])
    roll = rng.random()
    if roll < 0.06:
        fields["created_at"] = iso(NOW + rng.choice([HOUR, 24 * 365 * HOUR]))  # future: capped
    elif roll < 0.1:
        fields["created_at"] = rng.choice(["yesterday", "", "2025-13-01T00:00:00"])
    elif roll < 0.15:
        fields["created_at"] = iso(NOW - age_h * HOUR, naive=True)
    elif roll < 0.97:
        fields["created_at"] = iso(NOW - age_h * HOUR)
    roll = rng.random()
    if roll < 0.05:
        scored = NOW + 2 * HOUR  # clock skew: scored ahead of the reader's clock
    if roll < 0.93:
        fields["scored_at"] = iso(scored)
    elif roll < 0.96:
        fields["scored_at"] = "not a date"
    if rng.random() < 0.95:
        fields["generator"] = rng.choice(GENERATORS)
    if rng.random() < 0.85:
        fields["tags"] = rng.choice(TAGS)
    roll = rng.random()
    if roll < 0.8:
        fields["duration_s"] = repr(rng.uniform(10, 400))
    elif roll < 0.85:
        fields["duration_s"] = rng.choice(BAD)
    roll = rng.random()  # an ensemble's spread of the prior (issue 17): tiny to huge, zero, damaged
    if roll < 0.4:
        fields["prior.like_rate_sd"] = repr(rng.choice([1e-4, 0.005, 0.02, 0.08, 0.3, rng.uniform(0, 0.2)]))
    elif roll < 0.46:
        fields["prior.like_rate_sd"] = rng.choice([*BAD, "0", "-0.1", "1e300"])
    roll = rng.random()
    if roll < 0.2:
        fields["ood"] = rng.choice(["1", "true", "0", "", "no"])
    if kind == 1:  # only one aesthetic score: renormalised over what is there
        fields = {k: v for k, v in fields.items() if not k.startswith("score.") or k == "score.clarity"}
    if kind == 2:  # engagement only (counted before the scores arrived): not a scored song
        fields = {"eng.plays": "10", "eng.likes": "2"}
    if kind == 3:  # no popularity score at all
        fields = {k: v for k, v in fields.items() if k not in ("score.likes", "score.streams")}
    return fields


def seed_catalog(store: RedisScoreStore, n: int = 360, seed: int = 14) -> list[str]:
    """``n`` songs (a few exact twins: ties broken by id) and the calibration totals; their ids."""
    rng = random.Random(seed)
    pipe = store.client.pipeline(transaction=False)
    ids: list[str] = []
    twin: dict[str, str] = {}
    for i in range(n):
        sid = f"s{rng.randrange(10**6):06d}-{i}"
        kind = 2 if i % 37 == 5 else 1 if i % 23 == 3 else 3 if i % 29 == 7 else 0
        fields = twin if i % 41 == 40 and twin else song_hash(rng, kind)
        if i % 41 == 0:
            twin = fields
        if fields:
            pipe.hset(store.song_key(sid), mapping=fields)
        ids.append(sid)
    pipe.hset(store.calibration_key(), mapping=dict(zip(CALIBRATION_FIELDS, ("30", "61.5"), strict=True)))
    pipe.execute()
    # Two generators with their own calibration factors (issue 17); a damaged one reads as absent.
    store.set_generator_calibration({GENERATORS[0]: 1.7, GENERATORS[1]: 0.6})
    store.client.hset(store.keys.generator_calibration(), GENERATORS[2], "nan")
    return ids


def feed_settings(settings: Settings) -> Settings:
    return with_feeds(
        settings,
        {
            "main": plain(
                half_life_hours=72,
                filters=FeedFilters(generators_exclude=["riffusion"], min_duration_s=60, max_age_hours=24 * 365),
            ),
            "fresh": plain(
                weights={"likes": 2.0, "coherence": 1.0, "clarity": 0.5},
                half_life_hours=6,
                prior_strength=5,
                filters=FeedFilters(
                    generators_include=["suno-v5", "udio-2"], tags_any=["pop", "chill"], min_age_hours=1
                ),
            ),
            "evergreen": plain(
                weights={"musicality": 1.0, "memorability": 1.0},  # no popularity: the quality can be 0
                half_life_hours=None,
                filters=FeedFilters(tags_exclude=["rock"]),
            ),
        },
    )


INLINE: list[tuple[str | None, dict[str, Any]]] = [
    (None, {"weights": {"streams": 1.0, "naturalness": 3.0}}),
    ("fresh", {"half_life_hours": None}),
    ("main", {"half_life_hours": 0}),
    ("evergreen", {"half_life_hours": 0.5, "prior_strength": 1000}),
    ("main", {"prior_strength": 1e-300}),
    ("main", {"weights": {"likes": 5e-324}}),
    ("fresh", {"weights": {"clarity": 1e-9, "coherence": 1e6}, "half_life_hours": 1e-9}),  # |norm - 1| < 1e-12
    ("evergreen", {"weights": {"clarity": 1e-3, "coherence": 1e6}}),  # |norm - 1| ~ 1e-9: renormalised
    ("main", {"prior_strength": 5e-324}),  # likes without plays: an infinite posterior
    ("main", {"evidence": "plain"}),  # plays, not examined plays
    ("fresh", {"evidence": "plain", "prior_strength": 2}),
]


def close(a: Any, b: Any, path: str) -> None:
    """Same structure, same keys in the same order, floats within 1e-9 (NaN equals NaN)."""
    assert type(a) is type(b), (path, a, b)
    if isinstance(a, dict):
        assert list(a) == list(b), (path, list(a), list(b))
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            close(x, y, f"{path}.{i}")
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or a == b or math.isclose(a, b, rel_tol=1e-9), (path, a, b)
    else:
        assert a == b, (path, a, b)


async def compare(reader: FeedReader, cases: list[tuple[list[str], Policy, bool, bool]]) -> dict[str, int]:
    """Both implementations over every case; a tally of what was compared."""
    tally = {"cases": 0, "items": 0, "unknown": 0, "filtered": 0, "non_finite": 0, "exact": 0, "floats": 0}
    for candidates, policy, apply_filters, explain in cases:
        want = await reference_rank(reader, candidates, policy, apply_filters=apply_filters, explain=explain)
        got = await reader.rank_response(candidates, policy, apply_filters=apply_filters, explain=explain)
        label = f"{policy.name} filters={apply_filters} explain={explain} {policy.config.model_dump()}"
        assert [i["song_id"] for i in got.body["items"]] == [i["song_id"] for i in want["items"]], label
        assert got.body["unknown"] == want["unknown"] and got.body["filtered"] == want["filtered"], label
        close(got.body, want, label)
        assert got.non_finite == first_non_finite(want["items"]), label
        tally["cases"] += 1
        tally["items"] += len(want["items"])
        tally["unknown"] += len(want["unknown"])
        tally["filtered"] += len(want["filtered"])
        tally["non_finite"] += got.non_finite is not None
        for x, y in zip(floats(got.body), floats(want), strict=True):
            tally["floats"] += 1
            tally["exact"] += x == y or (math.isnan(x) and math.isnan(y))
    return tally


def floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in floats(v)]
    if isinstance(value, list):
        return [f for v in value for f in floats(v)]
    return []


def test_rank_equals_the_per_song_reference(settings: Settings, store: RedisScoreStore) -> None:
    ids = seed_catalog(store)
    s = feed_settings(settings)
    rng = random.Random(3)
    ghosts = [f"ghost-{i}" for i in range(12)]
    everything = ids + ghosts
    rng.shuffle(everything)
    subsets = [everything, rng.sample(everything, 40), rng.sample(ids, 7), [ids[0]], ghosts[:3], []]

    async def run() -> dict[str, int]:
        reads = store.async_reads()  # made inside the loop that uses it
        try:
            reader = FeedReader(s, reads, clock=lambda: NOW)
            await reader.sync.load()
            policies = [reader.policy(name) for name in s.feed.feeds]
            policies += [reader.inline_policy(base, overrides) for base, overrides in INLINE]
            cases = [
                (subset, policy, apply_filters, explain)
                for policy in policies
                for subset in subsets
                for apply_filters in (False, True)
                for explain in (True, False)
            ]
            return await compare(reader, cases)
        finally:
            await reads.close()

    tally = asyncio.run(run())
    assert tally["cases"] == (3 + len(INLINE)) * len(subsets) * 4
    # The catalog reaches what it is meant to: unknown ids, filtered songs, non-finite inline results.
    assert tally["unknown"] > 50 and tally["filtered"] > 100 and tally["items"] > 5000, tally
    assert tally["non_finite"] > 0, tally
    assert tally["exact"] == tally["floats"], tally  # bit for bit on this Python, not only within 1e-9


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_builtin_sum_mirrors_sum(count: int) -> None:
    rng = np.random.default_rng(count)
    columns = [rng.choice([0.0, 1e-300, 1e-17, 0.1, 1 / 3, 2.5, 1e16, 1e308], 400) for _ in range(count)]
    present = [None] + [rng.random(400) < 0.7 for _ in range(count - 1)]
    with np.errstate(over="ignore"):  # 1e308 + 1e308: inf, as in Python
        got = builtin_sum(list(zip(columns, present, strict=True)))
    for i in range(400):
        terms = [float(c[i]) for c, p in zip(columns, present, strict=True) if p is None or p[i]]
        assert got[i] == sum(terms) or (math.isnan(got[i]) and math.isnan(sum(terms))), (i, terms)


def test_batch_parses_as_state_from_fields(store: RedisScoreStore, settings: Settings) -> None:
    """Column by column, the batch holds what each SongState holds (WRITE_FIELDS, now-capped)."""
    ids = [*seed_catalog(store, n=200, seed=5), "ghost"]
    rows = store.read_fields(ids, WRITE_FIELDS)
    batch = SongBatch.from_fields(ids, rows, NOW)
    assert SongBatch.from_fields(ids, [r[: len(READ_FIELDS)] for r in rows], NOW).raw_tags is None
    for i, (sid, row) in enumerate(zip(ids, rows, strict=True)):
        state = state_from_fields(sid, row, NOW)
        assert bool(batch.scored[i]) == (state is not None), sid
        if state is None:
            continue
        for t, task in enumerate(TASKS):
            value = batch.scores[i, t]
            assert (math.isnan(value) and task not in state.scores) or state.scores.get(task) == value, (sid, task)
        rate = batch.model_rate[i]
        assert (math.isnan(rate) and state.model_rate is None) or rate == state.model_rate, sid
        assert (batch.plays[i], batch.likes[i], batch.created_ts[i]) == (state.plays, state.likes, state.created_ts)
        assert batch.eplays is not None
        eplays = batch.eplays[i]
        assert (math.isnan(eplays) and state.eplays is None) or eplays == state.eplays, sid
        assert batch.generators[i] == state.generator and batch.tags[i] == state.tags, sid
        assert batch.duration_s is not None
        duration = batch.duration_s[i]
        assert (math.isnan(duration) and state.duration_s is None) or duration == state.duration_s, sid
    empty = SongBatch.from_fields([], [], NOW)
    assert len(empty) == 0 and evaluate(Policy("x", plain(), settings.feed.like_rate), empty, 1.0, NOW).score.size == 0
