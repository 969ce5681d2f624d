"""Memory and load time of the API's in-memory song table (ranker.serving.table) at N songs.

Populates a private redis-server with N scored songs through the worker's own write path
(``FeedWriter.on_scored``, batches of 1000: song hashes, feed entries, change log), with
realistic fields: 7 scores, ``prior.like_rate``, tags, duration, one of a few generators,
engagement counters on 10% of the songs. Three feeds are configured for the write (the
default ``cold-start``, ``no-riffusion``: generators_exclude, ``fresh``: max_age_hours=24),
so one population serves both measurements: then, for the default feed alone and for all
three, a fresh subprocess (clean RSS) imports everything, reads its RSS, runs
``TableSync(...).load()`` and reads it again. It reports the RSS growth, the peak, the
RSS after ``malloc_trim`` (what the load's temporaries left in the allocator), a size
breakdown of what the table holds (numpy columns; ids and row_of; tags; per feed the
dict, the score floats, the (score, id) tuples, the SortedList's lists and the id strings
it does not share with the table), the load time, and bytes per song. ``--tracemalloc``
adds the top allocation sites of the load (slow: for the small size).

    python benchmarks/table_memory.py --songs 100000 1000000 --json table_memory.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import loadavg, machine_info, print_figures, private_redis, table, write_json

PREFIX = "tbl"
GENERATORS = ("suno-v5", "udio-2", "riffusion", "stable-audio")
TAG_WORDS = [
    "pop",
    "rock",
    "hip-hop",
    "electronic",
    "house",
    "techno",
    "ambient",
    "jazz",
    "blues",
    "folk",
    "country",
    "metal",
    "punk",
    "indie",
    "lo-fi",
    "classical",
    "orchestral",
    "cinematic",
    "synthwave",
    "r-n-b",
    "soul",
    "funk",
    "reggae",
    "latin",
    "k-pop",
    "edm",
    "trap",
    "drill",
    "acoustic",
    "piano",
    "guitar",
    "vocal",
    "instrumental",
    "chill",
    "upbeat",
    "sad",
    "happy",
    "dark",
    "epic",
]


# -- the parent: redis, population, one subprocess per measurement ---------------------------------
def bench_settings(url: str, state: Path) -> Any:
    from ranker.settings import FeedFilters, FeedPolicy, FeedSettings, RedisSettings, Settings

    feeds = {
        "cold-start": FeedPolicy(),
        "no-riffusion": FeedPolicy(filters=FeedFilters(generators_exclude=["riffusion"])),
        "fresh": FeedPolicy(filters=FeedFilters(max_age_hours=24)),
    }
    return Settings(
        state_dir=state,
        redis=RedisSettings(url=url, key_prefix=PREFIX),  # type: ignore[arg-type]
        feed=FeedSettings(feeds=feeds),
    )


def populate(settings: Any, songs: int, seed: int, batch: int = 1000) -> dict[str, Any]:
    """N songs through FeedWriter.on_scored (engagement counters first for 10% of them)."""
    import numpy as np
    import redis

    from indexes.base import SongRecord
    from indexes.redis_schema import ENGAGEMENT_UPDATED_FIELD, counter_field
    from ranker import stores
    from ranker.events import POPULARITY_TASKS, TASKS
    from ranker.serving.writer import FeedWriter

    rng = np.random.default_rng(seed)
    store = stores.score_store(settings)
    writer = FeedWriter(settings, store)
    raw = redis.Redis.from_url(settings.redis.url.get_secret_value())
    now = time.time()
    scored_at = datetime.fromtimestamp(now, UTC).isoformat()
    start = time.perf_counter()
    try:
        for lo in range(0, songs, batch):
            n = min(batch, songs - lo)
            ids = [f"song-{lo + j:09d}" for j in range(n)]
            engaged = rng.random(n) < 0.10
            if engaged.any():
                pipe = raw.pipeline(transaction=False)
                for j in np.flatnonzero(engaged).tolist():
                    plays = int(rng.integers(1, 500))
                    likes = int(rng.binomial(plays, 0.06))
                    pipe.hset(
                        store.song_key(ids[j]),
                        mapping={
                            counter_field("plays"): plays,
                            counter_field("likes"): likes,
                            counter_field("skips"): int(rng.binomial(plays, 0.2)),
                            counter_field("completes"): int(rng.binomial(plays, 0.5)),
                            counter_field("shares"): int(rng.binomial(plays, 0.01)),
                            ENGAGEMENT_UPDATED_FIELD: scored_at,
                        },
                    )
                pipe.execute()
            pop = rng.uniform(0, 100, (n, len(POPULARITY_TASKS)))
            aes = rng.uniform(1, 5, (n, len(TASKS) - len(POPULARITY_TASKS)))
            age_s = rng.uniform(0, 48 * 3600, n)
            n_tags = rng.integers(1, 5, n)
            records = []
            for j in range(n):
                pi, ai = iter(pop[j].tolist()), iter(aes[j].tolist())
                scores = {t: next(pi) if t in POPULARITY_TASKS else next(ai) for t in TASKS}
                tags = ",".join(sorted(rng.choice(TAG_WORDS, n_tags[j], replace=False).tolist()))
                records.append(
                    SongRecord(
                        song_id=ids[j],
                        model_version="apex-0123456789ab",
                        scores=scores,
                        rank_score=float(rng.uniform()),
                        generator=GENERATORS[int(rng.integers(len(GENERATORS)))],
                        created_at=datetime.fromtimestamp(now - age_s[j], UTC).isoformat(),
                        scored_at=scored_at,
                        extra={
                            "tags": tags,
                            "duration_s": round(float(rng.uniform(30, 300)), 1),
                            "truncated": 0,
                            "n_segments": 6,
                            "prior.like_rate": round(float(rng.uniform(0.005, 0.25)), 6),
                        },
                    )
                )
            writer.on_scored(records, now)
        elapsed = time.perf_counter() - start
        info = raw.info("memory")
        sizes = {f: int(raw.zcard(store.feed_key(f))) for f in settings.feed.feeds}
    finally:
        raw.close()
        store.close()
    return {
        "populate_s": round(elapsed, 1),
        "populate_songs_per_s": round(songs / elapsed),
        "redis_used_memory_mib": round(int(info["used_memory"]) / 2**20, 1),
        "feed_sizes": sizes,
    }


def measure_in_subprocess(url: str, feeds: list[str], trace: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--measure", url, "--feeds", ",".join(feeds)]
    if trace:
        cmd.append("--tracemalloc")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the child: one load, measured ------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _sortedlist_bytes(keys: Any) -> int:
    lists = keys._lists
    size = sys.getsizeof(lists) + sum(sys.getsizeof(sub) for sub in lists)
    size += sys.getsizeof(keys._maxes) + sys.getsizeof(keys._index)
    return size


def breakdown(tbl: Any) -> dict[str, int]:
    """Bytes of what the table holds (sys.getsizeof; objects shared between parts counted once)."""
    getsize = sys.getsizeof
    ids = tbl.ids
    out: dict[str, int] = {}
    out["numpy columns"] = tbl.nbytes()
    out["ids list + id strings"] = getsize(ids) + sum(getsize(s) for s in ids if s is not None)
    out["row_of dict + row ints"] = getsize(tbl.row_of) + sum(getsize(r) for r in tbl.row_of.values() if r > 256)
    out["raw_tags list + distinct tag strings"] = (
        getsize(tbl.raw_tags) + getsize(tbl._tags) + sum(getsize(t) for t in tbl._tags.values())
    )
    row_of = tbl.row_of
    for name, order in tbl.feeds.items():
        score = order._score
        own_ids = sum(getsize(k) for k in score if (r := row_of.get(k)) is None or ids[r] is not k)
        out[f"feed {name}: dict"] = getsize(score)
        out[f"feed {name}: score floats"] = sum(getsize(v) for v in score.values())
        out[f"feed {name}: (score, id) tuples"] = sum(getsize(t) for t in order._keys)
        out[f"feed {name}: SortedList lists"] = _sortedlist_bytes(order._keys)
        out[f"feed {name}: id strings not shared with the table"] = own_ids
    return out


def child(url: str, feeds: list[str], trace: bool) -> None:
    import tracemalloc

    from indexes.redis_store import RedisScoreStore, RedisStoreConfig
    from ranker.serving.table import FeedOrder
    from ranker.serving.table_sync import FEED_BATCH, TableSync

    libc = ctypes.CDLL("libc.so.6")
    store = RedisScoreStore(RedisStoreConfig(url=url, key_prefix=PREFIX, socket_timeout_s=60))

    async def go() -> dict[str, Any]:
        reads = store.async_reads()
        await reads.ping()
        sync = TableSync(reads, feeds)
        gc.collect()
        libc.malloc_trim(0)
        rss0 = _status_kib("VmRSS")
        _reset_peak()
        if trace:
            tracemalloc.start(5)
        t0, c0 = time.perf_counter(), time.process_time()
        tbl = await sync.load()
        load_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        top: list[str] = []
        if trace:
            snap = tracemalloc.take_snapshot()
            tracemalloc.stop()
            top = [str(s) for s in snap.statistics("lineno")[:12]]
        peak = _status_kib("VmHWM")
        rss1 = _status_kib("VmRSS")
        gc.collect()
        libc.malloc_trim(0)
        rss2 = _status_kib("VmRSS")
        parts = breakdown(tbl)
        n = len(tbl)
        # What a change log entry naming a feed whole (trim_feed, replace_feed) costs a follower:
        # the feed read again with a scan, then one FeedOrder built (one blocking call).
        feed = feeds[0]
        t0 = time.perf_counter()
        pairs: list[tuple[str, float]] = []
        async for chunk in reads.scan_feed(feed, FEED_BATCH):
            pairs.extend(chunk)
        t1 = time.perf_counter()
        tbl.set_feed(feed, FeedOrder(pairs))
        t2 = time.perf_counter()
        del pairs
        fig = {
            "songs": n,
            "feeds": {name: len(o) for name, o in tbl.feeds.items()},
            "capacity_rows": tbl.capacity,
            "rss_before_mib": round(rss0 / 1024, 1),
            "rss_growth_mib": round((rss1 - rss0) / 1024, 1),
            "rss_growth_after_trim_mib": round((rss2 - rss0) / 1024, 1),
            "peak_growth_mib": round((peak - rss0) / 1024, 1),
            "process_rss_after_trim_mib": round(rss2 / 1024, 1),
            "bytes_per_song": round((rss2 - rss0) * 1024 / max(n, 1)),
            "accounted_bytes_per_song": round(sum(parts.values()) / max(n, 1)),
            "load_s": round(load_s, 2),
            "load_cpu_s": round(cpu_s, 2),
            "songs_per_s": round(n / load_s),
            "whole_feed_read_s": round(t1 - t0, 2),
            "whole_feed_build_s (blocks the loop)": round(t2 - t1, 2),
            "breakdown_bytes": parts,
            "tracemalloc_top": top,
        }
        await reads.close()
        return fig

    print(json.dumps(asyncio.run(go())))


# -- main ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--songs", type=int, nargs="+", default=[100_000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tracemalloc", action="store_true", help="top allocation sites of the load (slow)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--measure", metavar="URL", help=argparse.SUPPRESS)  # the child's mode
    ap.add_argument("--feeds", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        child(args.measure, args.feeds.split(","), args.tracemalloc)
        return

    runs: list[dict[str, Any]] = []
    meta = {**machine_info(), "load_avg_before": loadavg()}
    for n in args.songs:
        with tempfile.TemporaryDirectory() as tmp, private_redis(Path(tmp)) as (url, _pid):
            settings = bench_settings(url, Path(tmp))
            print(f"populating {n:,} songs ...", flush=True)
            pop = populate(settings, n, args.seed)
            print_figures(pop)
            for feeds in (["cold-start"], list(settings.feed.feeds)):
                fig = measure_in_subprocess(url, feeds, args.tracemalloc)
                fig.update(pop, feeds_loaded=len(feeds))
                runs.append(fig)
                print(f"\n{n:,} songs, {len(feeds)} feed(s) loaded {fig['feeds']}:")
                print_figures({k: v for k, v in fig.items() if k not in ("breakdown_bytes", "tracemalloc_top")})
                print(
                    table(
                        "what the table holds (sys.getsizeof)",
                        ["part", "MiB", "bytes/song"],
                        [
                            (k, round(v / 2**20, 1), round(v / max(fig["songs"], 1), 1))
                            for k, v in fig["breakdown_bytes"].items()
                        ],
                    )
                )
                for line in fig["tracemalloc_top"]:
                    print("  ", line)
    meta["load_avg_after"] = loadavg()
    print()
    rows = [
        (
            r["songs"],
            r["feeds_loaded"],
            r["rss_growth_after_trim_mib"],
            r["peak_growth_mib"],
            r["bytes_per_song"],
            round(r["bytes_per_song"] * 1e6 / 2**30, 2),
            r["load_s"],
        )
        for r in runs
    ]
    print(
        table(
            "song table memory (RSS growth of the load, after malloc_trim)",
            ["songs", "feeds", "MiB", "peak MiB", "B/song", "GiB per 1M", "load s"],
            rows,
        )
    )
    print_figures(meta)
    if args.json:
        write_json({"machine": meta, "runs": runs}, args.json)


if __name__ == "__main__":
    main()
