"""The end-to-end demo on the embedded stack: README command one.

1. start the embedded broker and Redis;
2. synthesise a training catalog (songs with hidden, audible qualities and
   engagement counts, all tagged ``synthetic``), cache its features and train an
   APEX head on them, printing held-out metrics, and promote it;
3. synthesise a fresh batch of new songs, publish their ``songs.generated``
   events plus two deliberately bad messages;
4. run the scoring worker until it is idle;
5. serve the HTTP API on a free loopback port and print the top of the
   cold-start feed through it, with one item's explanation.

It uses the weightless ``logmel`` baseline encoder so that it runs offline.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table

from consumers.publish import catalog_events, publish_events
from consumers.report import wide_console
from consumers.stack import EmbeddedStack, free_port
from consumers.worker import Worker
from ranker.settings import Settings


def run_demo(settings: Settings, *, songs: int, seed: int, out: Path, train_songs: int = 800) -> int:
    console = wide_console()
    if settings.encoder != "logmel":
        console.print("[yellow]demo: using the weightless logmel baseline encoder (no MERT weights offline)[/]")
        settings = settings.model_copy(update={"encoder": "logmel"})
    # The demo's songs are local files it writes itself: development mode reads them with no file_root.
    settings = settings.model_copy(update={"dev_mode": True})

    console.rule("1. embedded services")
    stack = EmbeddedStack(settings)
    for st in stack.up():
        console.print(f"{st.name:6s} {st.address:22s} pid {st.pid}  log {st.log}")

    console.rule("2. train an APEX head on a synthetic catalog")
    version = train_demo_head(settings, console, out=out.resolve(), n_songs=train_songs, seed=seed + 1000)

    console.rule("3. publish new songs to songs.generated")
    from ranker.synth import simulate_catalog

    # New songs are new: generated over the last hour, so that freshness favours them.
    result = simulate_catalog(
        out.resolve() / f"new-songs-seed{seed}",
        n_songs=songs,
        seed=seed,
        duration_s=6.0,
        start=datetime.now(UTC) - timedelta(hours=1),
        span_days=1 / 24,
    )
    events = catalog_events(result.catalog_path)
    bad = [b'{"song_id": "broken-json"', b'{"song_id": "no-audio", "generator": "synthetic-x"}']
    n = publish_events(settings, events, raw=bad)
    topic = settings.kafka.topics.songs_generated
    console.print(f"published {n} messages ({len(bad)} of them deliberately invalid) to {topic}")

    console.rule("4. the scoring worker, until it has read everything published")
    worker = Worker(settings)
    stats = worker.run(until_idle_s=3.0, until_caught_up=True)
    console.print(
        f"scored {stats.scored} songs ({stats.reused_embeddings} from stored embeddings), "
        f"{stats.dead_letters} dead letters {stats.dead_by_code or ''}; model {worker.model.version}"
    )
    if worker.model.version != version:
        console.print(f"[red]expected the worker to serve {version}[/]")
        return 1

    console.rule("5. the cold-start feed, through the HTTP API")
    show_feed_via_api(settings, console)
    prefix = settings.redis.key_prefix
    redis_port = settings.redis.url.get_secret_value().rsplit(":", 1)[-1].split("/")[0]
    console.print(
        "\nInspect:\n"
        f"  scores     redis-cli -p {redis_port} HGETALL '{prefix}:song:{{{events[0].song_id}}}'\n"
        f"  feed       apexrank feed --limit 50, or apexrank serve and GET /v1/feeds/{settings.feed.name}\n"
        f"  index      {settings.index_dir} (index.faiss + embeddings.sqlite)\n"
        f"  model      {settings.head_dir} -> {version}\n"
        f"  dead       topic {settings.kafka.topics.dead_letter}\n"
        f"  served     topic {settings.kafka.topics.feeds_served} (the API's served records, docs/served-log.md)\n"
        "  stop       apexrank services down"
    )
    return 0


def train_demo_head(settings: Settings, console: Console, *, out: Path, n_songs: int, seed: int) -> str:
    """Synthesise, embed, train on all but a held-out fifth, print its metrics, promote it."""
    from ranker.embed import embed_catalog
    from ranker.features import load_features
    from ranker.model.evaluate import evaluate
    from ranker.model.registry import promote
    from ranker.model.report import metrics_table
    from ranker.model.train import train_head
    from ranker.model.train_config import TrainConfig
    from ranker.synth import simulate_catalog

    started = time.perf_counter()
    world = simulate_catalog(out / f"train-catalog-seed{seed}", n_songs=n_songs, seed=seed, duration_s=3.0)
    features_dir = settings.state_dir / "features" / f"demo-seed{seed}"
    report = embed_catalog(world.catalog_path, features_dir, settings, progress=False)
    features = load_features(features_dir)
    ids = sorted(features.song_ids)
    held_out = ids[::5]
    train_ids = [s for s in ids if s not in set(held_out)]
    result = train_head(
        features, world.catalog_path, TrainConfig(epochs=60, patience=15, threads=1), song_ids=train_ids
    )
    metrics = evaluate(result.model, features, world.catalog_path, song_ids=held_out)
    models_root = settings.head_dir.parent
    directory = result.model.save_versioned(models_root)
    version = promote(models_root, directory)
    console.print(
        f"{n_songs} synthetic songs, {report.summary()}; trained on {len(train_ids)} "
        f"in {time.perf_counter() - started:.1f}s total"
    )
    console.print(metrics_table(metrics, title=f"held-out metrics ({len(held_out)} songs), model {version}"))
    return version


def show_feed_via_api(settings: Settings, console: Console, limit: int = 12) -> None:
    """Start the API on a free loopback port, read the feed with the Python client, stop it."""
    import uvicorn

    from ranker.serving.api import create_app
    from ranker.serving.client import ApexRankClient

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with ApexRankClient(f"http://127.0.0.1:{port}", timeout_s=5.0, retries=20, backoff_s=0.1) as client:
            deadline = time.monotonic() + 20
            while not client.ready() and time.monotonic() < deadline:
                time.sleep(0.1)
            page = client.feed(settings.feed.name, limit=limit)
            table = Table(title=f"GET /v1/feeds/{settings.feed.name}?limit={limit}")
            for col in ("#", "song_id", "score", "quality", "freshness", "prior rate", "explore"):
                table.add_column(col, justify="left" if col == "song_id" else "right")
            for i, item in enumerate(page.items, 1):
                c = item.components
                table.add_row(
                    str(i),
                    item.song_id,
                    f"{item.score:.4f}",
                    _fmt(c.get("quality")),
                    _fmt(c.get("freshness")),
                    _fmt(c.get("prior_rate")),
                    "yes" if item.explore else "",
                )
            console.print(table)
            if page.items:
                first = page.items[0]
                console.print(f"why is {first.song_id} first? (components of its score)")
                console.print_json(json.dumps(first.components, default=str))
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"
