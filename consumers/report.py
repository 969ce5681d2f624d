"""Readable tables for people at a terminal: the top of a feed, a song's record, the A/B arms."""

from __future__ import annotations

import json
import time

from rich.console import Console
from rich.table import Table

from ranker import stores
from ranker.serving.policy import Policy
from ranker.settings import Settings


def wide_console() -> Console:
    """A console that does not squeeze tables to 80 columns when output is piped or logged."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=140)


def print_feed(settings: Settings, limit: int = 20, console: Console | None = None) -> None:
    store = stores.score_store(settings)
    try:
        feed = settings.feed.name
        # The sorted set holds time-invariant scores; show what the API serves now.
        policy = Policy(feed, settings.feed.default, settings.feed.like_rate)
        now = time.time()
        page = [(song_id, policy.served_score(stored, now)) for song_id, stored in store.feed_page(feed, 0, limit)]
        table = Table(title=f"feed '{feed}': top {len(page)} of {store.feed_size(feed)}")
        for col in (
            "#",
            "song_id",
            "generator",
            "rank",
            "streams",
            "likes",
            "coher.",
            "music.",
            "memor.",
            "clarity",
            "natur.",
        ):
            table.add_column(col, justify="right" if col not in ("song_id", "generator") else "left")
        records = store.read_songs([song_id for song_id, _ in page])
        for i, ((song_id, score), rec) in enumerate(zip(page, records, strict=True), 1):
            scores = rec.scores if rec is not None else {}

            def f(task: str, scores: dict[str, float] = scores) -> str:
                v = scores.get(task)
                return f"{v:.1f}" if v is not None else "-"

            table.add_row(
                str(i),
                song_id,
                rec.generator if rec is not None and rec.generator is not None else "?",
                f"{score:.3f}",
                f("streams"),
                f("likes"),
                f("coherence"),
                f("musicality"),
                f("memorability"),
                f("clarity"),
                f("naturalness"),
            )
        (console or wide_console()).print(table)
    finally:
        store.close()


def print_arms(settings: Settings, as_json: bool = False, console: Console | None = None) -> int:
    """``apexrank report arms``: each A/B arm's share of users, plays, likes, like rate and its 95% interval."""
    from ranker.serving.arm_metrics import arm_rows

    store = stores.arm_store(settings)
    try:
        rows = arm_rows(store, settings)
    finally:
        store.close()
    if as_json:
        body = {"experiment": settings.arms.experiment, "arms": [row.to_dict() for row in rows]}
        print(json.dumps(body, indent=2))
        return 0
    out = console or wide_console()
    if not rows:
        out.print("no A/B arms configured (arms.arms is empty)")
        return 0
    table = Table(title=f"A/B arms of experiment '{settings.arms.experiment}'", caption="interval: 95% Wilson")
    for col in ("arm", "feed", "model version", "users", "plays", "likes", "like rate", "interval"):
        table.add_column(col, justify="left" if col in ("arm", "feed", "model version") else "right")
    for row in rows:
        table.add_row(
            row.arm,
            row.feed,
            row.model_version or "-",
            f"{row.share:.1%}",
            str(row.plays),
            str(row.likes),
            "-" if row.like_rate is None else f"{row.like_rate:.4f}",
            f"[{row.low:.4f}, {row.high:.4f}]",
        )
    out.print(table)
    return 0
