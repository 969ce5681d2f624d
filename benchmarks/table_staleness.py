"""How far an API process's song table lags the score store while the feedback consumer runs.

Reuses ``feedback_throughput``'s setup on the embedded Kafka + Redis stack: ``--songs``
scored through the worker's write path, ``--events`` engagement events published to a fresh
topic. Then a follower process (what an API process runs: ``TableSync.load()``, then the
``run()`` loop on its own asyncio loop) loads the table, and the real feedback consumer
(parse, dedup, log, counters, the feed updater, which appends to the change log) processes
the events, held to ``--rate`` events/s (0: as fast as it goes, the feedback benchmark's own
load). A batch is at most ``--max-poll`` events (default: a tenth of a second's worth, about
what a consumer keeping up with live traffic polls).

Staleness is observed in the follower per applied change log entry, exactly as the
``apexrank_table_staleness_seconds`` histogram observes it (now - the entry's stream id
time, after the entry's songs are written into the table); the histogram's buckets are
read as well. Reported: p50/p90/p99/max, the change log entries and song ids applied per
second, the follower's CPU, the CPU of every process, and at the end an exact check that
the table's plays, likes and feed scores equal Redis's for every song.

    python benchmarks/table_staleness.py --events 600000 --rate 20000
    python benchmarks/table_staleness.py --events 600000 --rate 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import loadavg, machine_info, print_figures, table, write_json

# -- the follower: an API process's table sync, recording staleness ----------------------------------


def follower(url: str, prefix: str, feeds: list[str], poll_s: float, profile: Path | None) -> None:
    import redis.asyncio

    from indexes.redis_schema import LIKES_FIELD, PLAYS_FIELD
    from indexes.redis_store import RedisScoreStore, RedisStoreConfig
    from ranker.serving.table_sync import TABLE_STALENESS, TableSync

    class Recording(TableSync):
        """TableSync that also keeps every observation the staleness histogram gets."""

        lags: list[tuple[float, float]]
        ids_in_entries = 0
        distinct_ids = 0
        applies = 0
        apply_s = 0.0

        async def apply(self, changes: Any) -> None:
            t0 = time.perf_counter()
            await super().apply(changes)
            now = time.time()
            self.apply_s += time.perf_counter() - t0
            self.applies += 1
            self.lags.extend((c.at, now - c.at) for c in changes)
            self.ids_in_entries += sum(len(c.song_ids) for c in changes)
            self.distinct_ids += len({s for c in changes for s in c.song_ids})

    store = RedisScoreStore(RedisStoreConfig(url=url, key_prefix=prefix, socket_timeout_s=60))
    profiler = None

    async def go() -> dict[str, Any]:
        nonlocal profiler
        reads = store.async_reads()
        sync = Recording(reads, feeds, poll_s=poll_s)
        sync.lags = []
        t0 = time.perf_counter()
        await sync.load()
        load_s = time.perf_counter() - t0
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, stop.set)
        if profile is not None:
            from pyinstrument import Profiler

            profiler = Profiler(async_mode="disabled")
            profiler.start()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        sync.start()
        print("ready", flush=True)
        await stop.wait()
        caught_up = await sync.caught_up(120.0)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        await sync.close()
        if profiler is not None:
            profiler.stop()
        # The exact check: every song's plays, likes and feed scores, table against Redis.
        tbl = sync.table
        assert tbl is not None
        r = redis.asyncio.Redis.from_url(url, decode_responses=True)
        ids = [s for s in tbl.ids if s is not None]
        mismatched = 0
        for lo in range(0, len(ids), 5000):
            chunk = ids[lo : lo + 5000]
            pipe = r.pipeline(transaction=False)
            for sid in chunk:
                pipe.hmget(store.song_key(sid), [PLAYS_FIELD, LIKES_FIELD])
            rows = await pipe.execute()
            scores = {f: await r.zmscore(store.feed_key(f), chunk) for f in feeds}
            t_rows = tbl.rows(chunk)
            for i, (sid, (plays, likes)) in enumerate(zip(chunk, rows, strict=True)):
                row = int(t_rows[i])
                same = tbl.plays[row] == max(0.0, float(plays or 0)) and tbl.likes[row] == max(0.0, float(likes or 0))
                same = same and all(tbl.feeds[f].get(sid) == scores[f][i] for f in feeds)
                mismatched += not same
        engaged = int((tbl.plays > 0).sum())
        await r.aclose()
        await reads.close()
        hist = {s.labels["le"]: s.value for s in TABLE_STALENESS.collect()[0].samples if s.name.endswith("_bucket")}
        return {
            "load_s": round(load_s, 2),
            "songs_in_table": len(tbl),
            "songs_with_plays": engaged,
            "caught_up": caught_up,
            "follow_wall_s": round(wall, 2),
            "follow_cpu_s": round(cpu, 2),
            "applied_entries": sync.applied,
            "applies": sync.applies,
            "apply_s": round(sync.apply_s, 2),
            "ids_in_entries": sync.ids_in_entries,
            "distinct_ids_per_apply_sum": sync.distinct_ids,
            "lags": sync.lags,
            "histogram_cumulative": hist,
            "songs_checked": len(ids),
            "songs_mismatched": mismatched,
        }

    out = asyncio.run(go())
    if profiler is not None and profile is not None:
        profile.write_text(profiler.output_text(unicode=False, color=False, show_all=False))
    print(json.dumps(out))


# -- the parent ---------------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values)
    return {
        "p50_s": round(float(np.percentile(a, 50)), 4),
        "p90_s": round(float(np.percentile(a, 90)), 4),
        "p99_s": round(float(np.percentile(a, 99)), 4),
        "max_s": round(float(a.max()), 4),
        "share_over_1s": round(float((a > 1.0).mean()), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--events", type=int, default=600_000)
    ap.add_argument("--songs", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=20_000, help="events/s the consumer is held to; 0: unpaced")
    ap.add_argument("--max-poll", type=int, help="events per batch (default: rate/10, or the setting when unpaced)")
    ap.add_argument("--duplicates", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile-follower", type=Path, help="pyinstrument text profile of the follower")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--follow", nargs=4, metavar=("URL", "PREFIX", "FEEDS", "POLL_S"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.follow:
        url, prefix, feeds, poll_s = args.follow
        follower(url, prefix, feeds.split(","), float(poll_s), args.profile_follower)
        return

    import feedback_throughput as fb

    from consumers.feedback import FeedbackConsumer
    from consumers.stack import EmbeddedStack
    from ranker import stores
    from ranker.settings import FeedbackSettings

    max_poll = args.max_poll or (max(100, int(args.rate / 10)) if args.rate else FeedbackSettings().max_poll_records)

    class Paced(FeedbackConsumer):
        """The feedback consumer, sleeping after each batch so that it processes ``rate`` events/s."""

        started: float | None = None
        done = 0

        def process(self, messages: Any) -> Any:
            if self.started is None:
                self.started = time.perf_counter()
            dead = super().process(messages)
            self.done += len(messages)
            if args.rate:
                wait = self.started + self.done / args.rate - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            return dead

    meta: dict[str, Any] = {**machine_info(), "load_avg_before": loadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        settings = fb.build_settings(Path(tmp), max_poll)
        stack = EmbeddedStack(settings)
        stack.up()
        proc = None
        try:
            score_s = fb.score_songs(settings, args.songs, args.seed)
            produce_s, expected = fb.produce(settings, args.events, args.songs, args.duplicates, args.seed)
            print(
                f"scored {args.songs:,} songs in {score_s:.1f} s; produced {args.events:,} events in {produce_s:.1f} s"
            )
            feeds = list(settings.feed.feeds)
            cmd = [sys.executable, __file__, "--follow", settings.redis.url.get_secret_value(),
                   settings.redis.key_prefix, ",".join(feeds), str(settings.api.table_poll_s)]  # fmt: skip
            if args.profile_follower:
                cmd += ["--profile-follower", str(args.profile_follower)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("the follower did not start")
            pids = {s.name: s.pid for s in stack.status() if s.pid is not None}
            pids["follower"] = proc.pid
            cpu_before, wall0 = fb.cpu_seconds(pids), time.perf_counter()
            consumer = Paced(settings)
            stats = consumer.run(until_idle_s=3.0)
            cpu_after, wall = fb.cpu_seconds(pids), time.perf_counter() - wall0
            proc.send_signal(signal.SIGUSR1)
            out, _ = proc.communicate(timeout=600)
            result = json.loads(out.strip().splitlines()[-1])
            counters = stores.engagement_counters(settings)
            exact = counters.counts(sorted(expected)) == expected
            counters.close()
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
            stack.down()
    meta["load_avg_after"] = loadavg()

    lags = result.pop("lags")
    stale = [lag for _, lag in lags]
    rate = stats.messages / stats.busy_s if stats.busy_s else 0.0
    span = (lags[-1][0] - lags[0][0]) if len(lags) > 1 else 0.0
    cpu = {k: round(cpu_after[k] - cpu_before[k], 1) for k in cpu_after if k in cpu_before}
    if "machine" in cpu:
        cpu["other processes"] = round(max(0.0, cpu.pop("machine") - sum(cpu.values())), 1)
    # p99 and max per 5 s of the run (does it fall behind over time?)
    windows: list[tuple[int, int, float, float]] = []
    if lags:
        at = np.array([a for a, _ in lags])
        lag = np.array(stale)
        edges = np.arange(at[0], at[-1] + 5.0, 5.0)
        for i, lo in enumerate(edges):
            sel = (at >= lo) & (at < lo + 5.0)
            if sel.any():
                windows.append((i * 5, int(sel.sum()), float(np.percentile(lag[sel], 99)), float(lag[sel].max())))
    figures: dict[str, Any] = {
        "events": args.events,
        "songs_scored": args.songs,
        "target_rate_per_s": args.rate or "unpaced",
        "max_poll_records": max_poll,
        "consumer_events_per_s": round(rate),
        "consumer_batches": stats.batches,
        "counters_exact": exact,
        "staleness": percentiles(stale),
        "change_entries_applied": result["applied_entries"],
        "change_entries_per_s": round(len(lags) / span, 1) if span else None,
        "song_ids_in_entries_per_s": round(result["ids_in_entries"] / span) if span else None,
        "songs_reread_per_s": round(result["distinct_ids_per_apply_sum"] / span) if span else None,
        "follower_applies": result["applies"],
        "follower_apply_busy_s": result["apply_s"],
        "follower_cpu_s": result["follow_cpu_s"],
        "follower_wall_s": result["follow_wall_s"],
        "follower_cpu_share_of_a_core": round(result["follow_cpu_s"] / result["follow_wall_s"], 3),
        "follower_load_s": result["load_s"],
        "table_matches_redis": result["songs_mismatched"] == 0 and result["caught_up"],
        "songs_checked": result["songs_checked"],
        "songs_mismatched": result["songs_mismatched"],
        "songs_with_plays": result["songs_with_plays"],
        "histogram_cumulative": result["histogram_cumulative"],
        "cpu_s_during_consumer_run": cpu,
        "consumer_run_wall_s": round(wall, 1),
        "per_5s_window": [{"t_s": t, "n": n, "p99_s": round(p, 4), "max_s": round(m, 4)} for t, n, p, m in windows],
        **meta,
    }
    print_figures({k: v for k, v in figures.items() if k not in ("per_5s_window", "histogram_cumulative")})
    print(table("staleness per 5 s of the run", ["t s", "entries", "p99 s", "max s"], windows))
    if args.json:
        write_json(figures, args.json)
    if not exact:
        raise SystemExit("counters do not match the distinct events")
    if not figures["table_matches_redis"]:
        raise SystemExit("the table does not hold what Redis holds")


if __name__ == "__main__":
    main()
