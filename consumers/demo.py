"""The end-to-end demo on the embedded stack: README command one.

It starts the embedded broker and Redis, synthesises a catalog of short songs
(clearly tagged ``synthetic``), publishes their ``songs.generated`` events plus
two deliberately bad messages, runs the worker until it is idle, and prints the
top of the cold-start feed with where everything can be inspected. It uses the
weightless ``logmel`` baseline encoder so that it runs offline.
"""

from __future__ import annotations

from pathlib import Path

from consumers.publish import catalog_events, publish_events
from consumers.report import print_feed, wide_console
from consumers.stack import EmbeddedStack
from consumers.worker import Worker
from ranker.settings import Settings


def run_demo(settings: Settings, *, songs: int, seed: int, out: Path) -> int:
    console = wide_console()
    if settings.encoder != "logmel":
        console.print("[yellow]demo: using the weightless logmel baseline encoder (no MERT weights offline)[/]")
        settings = settings.model_copy(update={"encoder": "logmel"})

    console.rule("1. embedded services")
    stack = EmbeddedStack(settings)
    for st in stack.up():
        console.print(f"{st.name:6s} {st.address:22s} pid {st.pid}  log {st.log}")

    console.rule("2. a synthetic catalog")
    from ranker.synth import simulate_catalog

    catalog_dir = out.resolve() / f"catalog-seed{seed}"
    result = simulate_catalog(catalog_dir, n_songs=songs, seed=seed)
    console.print(f"{songs} synthetic songs in {result.catalog_path}")

    console.rule("3. publish songs.generated")
    events = catalog_events(result.catalog_path)
    bad = [b'{"song_id": "broken-json"', b'{"song_id": "no-audio", "generator": "synthetic-x"}']
    n = publish_events(settings, events, raw=bad)
    topic = settings.kafka.topics.songs_generated
    console.print(f"published {n} messages ({len(bad)} of them deliberately invalid) to {topic}")

    console.rule("4. the worker, until idle")
    worker = Worker(settings)
    stats = worker.run(until_idle_s=3.0)
    console.print(
        f"scored {stats.scored} songs ({stats.reused_embeddings} from stored embeddings), "
        f"{stats.dead_letters} dead letters {stats.dead_by_code or ''}; model {worker.model.version}"
    )

    console.rule("5. the cold-start feed")
    print_feed(settings, limit=15, console=console)
    prefix = settings.redis.key_prefix
    console.print(
        "\nInspect:\n"
        f"  scores     redis-cli -p {settings.redis.url.get_secret_value().rsplit(':', 1)[-1].split('/')[0]} "
        f"HGETALL '{prefix}:song:{{{events[0].song_id}}}'\n"
        f"  feed       apexrank feed --limit 50   (Redis sorted set {prefix}:feed:{{{settings.feed.name}}})\n"
        f"  index      {settings.index_dir} (index.faiss + embeddings.sqlite)\n"
        f"  dead       topic {settings.kafka.topics.dead_letter}\n"
        "  stop       apexrank services down"
    )
    return 0
