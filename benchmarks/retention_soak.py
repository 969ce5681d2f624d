"""Retention soak on a simulated clock: songs keep coming, memory and disk stay flat once the window fills.

    nice -n 10 python benchmarks/retention_soak.py --days 20 --songs-per-day 10000 --window-days 3 \
        --png docs/retention-soak.png --json /tmp/retention-soak.json

Every simulated hour a worker's shard takes that hour's songs through the real store APIs
(``EmbeddingIndex.add``: SQLite store then FAISS; ``FeedWriter.on_scored``: song hashes and the
feed), engagement arrives for songs of the window (``EngagementCounters.count`` then
``FeedWriter.on_engagement``: counters, calibration claims, feed entries), and the retention
sweeper (``consumers.retention.RetentionSweeper``, the worker's) runs with the simulated clock.
Vectors are synthetic (no audio): 768-d unit vectors and MERT-shaped pooled layers (13 x 768
float32, 39 KB a song), so the store and the archive hold what a MERT worker's would.

After each simulated day it records Redis ``used_memory`` (INFO), the FAISS index's vectors and
serialized bytes (its snapshot), the SQLite store's file and WAL bytes and live pages
(page_count - freelist_count), the archive's bytes and the wall time.

Three things expire on Redis's own (real) clock, not the simulated one: the engagement dedup
keys (``feedback.dedup_window_s``, at least 60 s), the change log (``changes_retention_s``, at
least 60 s, here 60 s) and, with ``retention.history_days``, the shrunk hashes of expired songs.
The first and the last are set from ``--real-ttl-s`` (60 s by default), and the
simulation is paced (``--real-day-s``: each simulated hour is padded to its share of a real
day's seconds), so that a real TTL is a fixed simulated time (60 s at 25 s a day: 2.4 days). An
hour whose work overran its share is counted (``late_hours``). ``--real-ttl-s 0`` keeps the
expired hashes for ever, to measure what they cost.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from _common import ROOT, loadavg, machine_info, print_figures, private_redis, table
from pydantic import SecretStr

from consumers.retention import DAY_S, RetentionSweeper
from indexes import open_score_store
from indexes.base import EmbeddingRecord, SongRecord, message_marker
from ranker import stores
from ranker.events import POPULARITY_TASKS, TASKS
from ranker.serving.writer import FeedWriter
from ranker.settings import FeedbackSettings, IndexSettings, RedisSettings, RetentionSettings, Settings

T0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
HOUR_S = 3600.0


class SimClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def songs_for_hour(
    rng: np.random.Generator, first: int, n: int, at: float, dim: int, n_layers: int
) -> tuple[list[EmbeddingRecord], list[SongRecord]]:
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    layers = rng.standard_normal((n, n_layers, dim), dtype=np.float32)
    embeddings, records = [], []
    for j in range(n):
        song_id = f"suno-{first + j:012d}"
        embeddings.append(EmbeddingRecord(song_id, "mert-v1-95m-synthetic", layers[j], vectors[j], 6, 4500))
        scores = {t: float(rng.uniform(0, 100) if t in POPULARITY_TASKS else rng.uniform(1, 5)) for t in TASKS}
        extra = {"tags": "pop,synthwave", "duration_s": 183.2, "truncated": 0, "prior.like_rate": 0.04}
        records.append(SongRecord(song_id, "apex-0123456789ab", scores, 0.5, "suno-v5", iso(at), iso(at), extra=extra))
    return embeddings, records


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--days", type=int, default=20)
    ap.add_argument("--songs-per-day", type=int, default=10_000)
    ap.add_argument("--window-days", type=float, default=3.0)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=13, help="Pooled layers per song (MERT-v1-95M: 13).")
    ap.add_argument("--plays-per-hour", type=int, default=500, help="Engagement events per simulated hour.")
    ap.add_argument(
        "--real-ttl-s", type=float, default=60.0, help="Dedup window and expired-hash history, real seconds."
    )
    ap.add_argument("--real-day-s", type=float, default=25.0, help="Real seconds a simulated day takes (0: no pacing).")
    ap.add_argument("--dir", type=Path, default=None, help="Where the shard lives (default: a temporary folder).")
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--replot", type=Path, default=None, help="Only draw --png from a --json of an earlier run.")
    args = ap.parse_args()
    if args.replot:
        earlier = json.loads(args.replot.read_text())
        plot(earlier["days"], float(earlier["args"]["window_days"]), args.png)
        return
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rng = np.random.default_rng(0)
    clock = SimClock(T0)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, private_redis(Path(tmp)) as (url, _pid):
        base = Path(tmp)
        settings = Settings(
            state_dir=base / "state",
            redis=RedisSettings(url=SecretStr(url)),
            index=IndexSettings(path=base / "index", factory="Flat", use_gpu="never"),
            feedback=FeedbackSettings(dedup_window_s=max(60, int(args.real_ttl_s))),
            retention=RetentionSettings(
                window_days=args.window_days,
                history_days=args.real_ttl_s / DAY_S if args.real_ttl_s > 0 else None,
                sweep_every_s=HOUR_S,
                batch=1000,
            ),
        )
        # The change log is trimmed by Redis's real clock too (10 minutes by default): the least it keeps.
        store = open_score_store(url, key_prefix=settings.redis.key_prefix, changes_retention_s=60)
        counters = stores.engagement_counters(settings)
        index = stores.embedding_index(settings, args.dim)
        index.store.clock = clock
        writer = FeedWriter(settings, store)
        sweeper = RetentionSweeper(settings, index, store, clock)
        client = store.client  # type: ignore[attr-defined]  # INFO, MEMORY USAGE and key counts only
        prefix = settings.redis.key_prefix
        written = 0
        events = 0
        sweep_s = 0.0
        late_hours = 0
        try:
            for day in range(1, args.days + 1):
                for hour in range(24):
                    hour_ends = started + ((day - 1) * 24 + hour + 1) * args.real_day_s / 24
                    clock.now += HOUR_S
                    n = (hour + 1) * args.songs_per_day // 24 - hour * args.songs_per_day // 24  # exact a day
                    embeddings, records = songs_for_hour(rng, written, n, clock.now, args.dim, args.layers)
                    index.add(embeddings)
                    writer.on_scored(records, now=clock.now)
                    written += n
                    # Engagement for songs of the window (younger songs more often).
                    live_from = max(0, written - int(args.window_days * args.songs_per_day))
                    picks = written - 1 - (rng.exponential(args.songs_per_day / 2, args.plays_per_hour).astype(int))
                    picks = np.clip(picks, live_from, written - 1)
                    ids = [f"suno-{i:012d}" for i in picks.tolist()]
                    kinds = ["like" if u < 0.05 else "play" for u in rng.uniform(size=len(ids))]
                    marks = [message_marker(0, events + k) for k in range(len(ids))]
                    counters.count(ids, [f"e{events + k}" for k in range(len(ids))], kinds, marks, iso(clock.now))
                    writer.on_engagement(ids, now=clock.now)
                    events += len(ids)
                    report = sweeper.maybe_sweep()
                    sweep_s += report.seconds if report is not None else 0.0
                    if args.real_day_s > 0:
                        wait = hour_ends - time.perf_counter()
                        late_hours += wait < 0
                        time.sleep(max(0.0, wait))
                index.snapshot()
                stats = index.store.file_stats()
                mem = client.info("memory")
                row = {
                    "day": day,
                    "songs_written": written,
                    "redis_used_memory": int(mem["used_memory"]),
                    "redis_keys": int(client.dbsize()),
                    "song_hashes": sum(1 for _ in store.scan_song_ids(10_000)),
                    "change_log_entries": int(client.xlen(f"{prefix}:changes")),
                    "dedup_keys": sum(1 for _ in client.scan_iter(match=f"{prefix}:evt:*", count=10_000)),
                    "feed_songs": store.feed_size(settings.feed.name),
                    "index_vectors": len(index),
                    "index_bytes": index.index_path.stat().st_size,
                    "store_rows": index.store.count(),
                    "store_file_bytes": stats["file_bytes"],
                    "store_wal_bytes": stats["wal_bytes"],
                    "store_live_bytes": stats["live_pages"] * stats["page_size"],
                    "archive_bytes": sweeper.archive.size_bytes(),
                    "sweep_s": round(sweep_s, 2),
                    "late_hours": late_hours,
                    "wall_s": round(time.perf_counter() - started, 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            last = f"suno-{written - 1:012d}"
            just_expired = written - int(args.window_days * args.songs_per_day) - args.songs_per_day // 8
            first = f"suno-{max(0, just_expired):012d}"
            hash_bytes = {
                "live": int(client.memory_usage(store.song_key(last)) or 0),  # type: ignore[attr-defined]
                "expired": int(client.memory_usage(store.song_key(first)) or 0),  # type: ignore[attr-defined]
            }
        finally:
            index.close()
            counters.close()
            store.close()
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    summary = summarize(rows, args.window_days)
    out = {
        "machine": machine_info(),
        "uptime_before": uptime_before,
        "uptime_after": uptime_after,
        "loadavg_after": loadavg(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "hash_bytes": hash_bytes,
        "events": events,
        "days": rows,
        "after_the_window": summary,
    }
    headers = ["day", "songs", "redis MB", "keys", "vectors", "index MB", "store MB", "live MB", "archive MB", "wall s"]
    mb = 1e6
    print(
        table(
            "retention soak (per simulated day)",
            headers,
            [
                [
                    r["day"],
                    r["songs_written"],
                    r["redis_used_memory"] / mb,
                    r["redis_keys"],
                    r["index_vectors"],
                    r["index_bytes"] / mb,
                    (r["store_file_bytes"] + r["store_wal_bytes"]) / mb,
                    r["store_live_bytes"] / mb,
                    r["archive_bytes"] / mb,
                    r["wall_s"],
                ]
                for r in rows
            ],
        )
    )
    print_figures({"hash bytes (live, expired)": hash_bytes, **summary})
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    if args.png:
        plot(rows, args.window_days, args.png)


def summarize(rows: list[dict[str, Any]], window_days: float) -> dict[str, Any]:
    """Per metric: its value when the window had filled (one day after), at the end, and the mean change a day."""
    start = next((r for r in rows if r["day"] >= window_days + 1), None)
    if start is None or start is rows[-1]:
        return {}
    end = rows[-1]
    days = end["day"] - start["day"]
    out = {}
    for key in ("redis_used_memory", "index_vectors", "index_bytes", "store_file_bytes", "store_live_bytes"):
        out[key] = {"filled": start[key], "end": end[key], "per_day": round((end[key] - start[key]) / days)}
    return out


def plot(rows: list[dict[str, Any]], window_days: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = [r["day"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    series = [
        (axes[0][0], "Redis used_memory (MB)", [("used_memory", "redis_used_memory")]),
        (axes[0][1], "FAISS index", [("serialized MB", "index_bytes")]),
        (
            axes[1][0],
            "SQLite embedding store (MB)",
            [("file + WAL", "store_total"), ("live pages", "store_live_bytes")],
        ),
        (axes[1][1], "Archive (MB, grows by design)", [("archive", "archive_bytes")]),
    ]
    for r in rows:
        r["store_total"] = r["store_file_bytes"] + r["store_wal_bytes"]
    for ax, title, lines in series:
        for label, key in lines:
            ax.plot(days, [r[key] / 1e6 for r in rows], marker="o", ms=3, label=label)
        ax.axvline(window_days, color="grey", ls="--", lw=1)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.legend(loc="lower right")
    keys = axes[0][0].twinx()
    for label, key, style in (("song hashes", "song_hashes", ":"), ("dedup keys", "dedup_keys", "-.")):
        if all(key in r for r in rows):
            keys.plot(days, [r[key] for r in rows], ls=style, label=label)
    keys.set_ylim(bottom=0)
    keys.legend(loc="center right")
    twin = axes[0][1].twinx()
    twin.plot(days, [r["index_vectors"] for r in rows], color="tab:red", ls=":", label="vectors")
    twin.set_ylim(bottom=0)
    twin.legend(loc="center right")
    for ax in axes[1]:
        ax.set_xlabel("simulated day")
    songs = rows[-1]["songs_written"]
    fig.suptitle(f"Retention soak: {songs:,} songs over {len(rows)} simulated days, {window_days:g}-day window")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    print(f"repo: {ROOT}")
    main()
