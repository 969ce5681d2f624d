"""Readable tables for people at a terminal: the top of a feed, a song's record."""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from indexes import open_score_store
from ranker.policy import Policy
from ranker.settings import Settings


def wide_console() -> Console:
    """A console that does not squeeze tables to 80 columns when output is piped or logged."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=140)


def print_feed(settings: Settings, limit: int = 20, console: Console | None = None) -> None:
    store = open_score_store(
        settings.redis.url.get_secret_value(),
        key_prefix=settings.redis.key_prefix,
        socket_timeout_s=settings.redis.socket_timeout_s,
    )
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
        for i, (song_id, score) in enumerate(page, 1):
            rec = store.get_song(song_id) or {}

            def f(task: str, rec: dict[str, str] = rec) -> str:
                v = rec.get(f"score.{task}")
                return f"{float(v):.1f}" if v is not None else "-"

            table.add_row(
                str(i),
                song_id,
                rec.get("generator", "?"),
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
