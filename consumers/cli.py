"""The ``apexrank`` command line: one entry point over the services, the worker and the model tools."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ranker.errors import ConfigError

if TYPE_CHECKING:  # imported by the commands that read settings: `--help` loads no pydantic
    from ranker.settings import Settings

log = logging.getLogger("apexrank")


def _settings(args: argparse.Namespace) -> Settings:
    from ranker.settings import Settings

    return Settings()


# -- config ----------------------------------------------------------------------------
def cmd_config_show(args: argparse.Namespace) -> int:
    data = _settings(args).redacted()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for key, value in _flatten(data):
            print(f"APEXRANK_{key.upper()}={value}")
    return 0


def _flatten(data: dict[str, object], prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for key, value in data.items():
        name = f"{prefix}__{key}" if prefix else key
        if isinstance(value, dict) and key != "weights":
            out.extend(_flatten(value, name))
        else:
            out.append((name, json.dumps(value) if isinstance(value, list | dict) else value))
    return out


# -- services --------------------------------------------------------------------------
def cmd_services(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from consumers.stack import EmbeddedStack

    if args.storage is not None and args.action != "up":
        raise ConfigError("--durable and --memory go with 'services up'; 'down' and 'status' keep the saved mode")
    stack = EmbeddedStack(_settings(args), durable=args.storage)
    statuses = {"up": stack.up, "down": stack.down, "status": stack.status}[args.action]()
    table = Table(title=f"embedded services ({stack.dir})", caption=stack.describe_storage())
    for col in ("service", "state", "pid", "address", "log"):
        table.add_column(col)
    for st in statuses:
        table.add_row(st.name, "running" if st.running else "stopped", str(st.pid or "-"), st.address, str(st.log))
    Console().print(table)
    if args.action == "up":
        return 0 if all(s.running for s in statuses) else 1
    return 0


def cmd_topics_create(args: argparse.Namespace) -> int:
    from consumers.kafka_io import all_topics, ensure_topics

    s = _settings(args)
    created = ensure_topics(s.kafka, all_topics(s.kafka))
    print("created: " + (", ".join(created) if created else "nothing (all topics exist)"))
    return 0


# -- worker ----------------------------------------------------------------------------
def _serve_metrics(args: argparse.Namespace) -> None:
    """Prometheus metrics on ``--metrics-host:--metrics-port`` (loopback unless told otherwise)."""
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=args.metrics_host)
        log.info("metrics on http://%s:%d/metrics", args.metrics_host, args.metrics_port)


def cmd_worker(args: argparse.Namespace) -> int:
    from consumers.worker import Worker

    s = _settings(args)
    _serve_metrics(args)
    worker = Worker(s)
    worker.install_signal_handlers()
    stats = worker.run(until_idle_s=args.until_idle, until_caught_up=args.until_caught_up)
    log.info("worker done: %s", stats)
    print(json.dumps(stats.__dict__))
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    from consumers.feedback import FeedbackConsumer
    from consumers.loop import stop_on_signals

    _serve_metrics(args)
    consumer = FeedbackConsumer(_settings(args))
    stop_on_signals(consumer.request_stop)
    stats = consumer.run(until_idle_s=args.until_idle, until_caught_up=args.until_caught_up)
    print(json.dumps(stats.__dict__))
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from consumers.publish import publish_catalog
    from ranker.catalog import CatalogError

    s = _settings(args)
    try:
        n = publish_catalog(s, Path(args.catalog), limit=args.limit)
    except CatalogError as exc:  # the message names the file, columns or rows to fix
        raise ConfigError(str(exc)) from exc
    print(f"published {n} events to {s.kafka.topics.songs_generated}")
    return 0


def cmd_feed(args: argparse.Namespace) -> int:
    from consumers.report import print_feed

    print_feed(_settings(args), limit=args.limit)
    return 0


def cmd_report_arms(args: argparse.Namespace) -> int:
    from consumers.report import print_arms

    return print_arms(_settings(args), as_json=args.json)


def cmd_report_generators(args: argparse.Namespace) -> int:
    from consumers.generator_report import print_generators

    if not (math.isfinite(args.window_h) and args.window_h > 0):
        raise ConfigError(f"--window-h {args.window_h}: give a positive number of hours")
    return print_generators(_settings(args), args.window_h, args.json)


def cmd_demo(args: argparse.Namespace) -> int:
    from consumers.demo import run_demo

    return run_demo(_settings(args), songs=args.songs, seed=args.seed, out=Path(args.out))


# -- simulate ------------------------------------------------------------------------
def cmd_simulate_catalog(args: argparse.Namespace) -> int:
    from ranker.synth import DEFAULT_GENERATORS, WITH_NOVEL_GENERATOR, simulate_catalog

    result = simulate_catalog(
        Path(args.out),
        n_songs=args.songs,
        seed=args.seed,
        duration_s=args.duration,
        workers=args.workers,
        generators=WITH_NOVEL_GENERATOR if args.novel_generator else DEFAULT_GENERATORS,
    )
    print(f"{result.n_songs} synthetic songs in {result.audio_dir}; catalog {result.catalog_path}")
    return 0


def cmd_simulate_loop(args: argparse.Namespace) -> int:
    from consumers.simulate_loop import cmd_simulate_loop as run

    return run(args)


# -- retrain -------------------------------------------------------------------------
def cmd_retrain(args: argparse.Namespace) -> int:
    import signal
    import threading

    from consumers.durations import parse_duration
    from consumers.retrain import run_every, run_once

    every_s = parse_duration(args.every, "--every") if args.every else None
    s = _settings(args)
    if every_s is not None:
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        run_every(s, every_s, stop, progress=sys.stderr.isatty())
        return 0
    report = run_once(s, progress=sys.stderr.isatty())  # a bar per training epoch on a terminal
    print(json.dumps(report.to_dict(), indent=2, default=str))
    return 0


# -- dead letters --------------------------------------------------------------------
def cmd_dead_letters(args: argparse.Namespace) -> int:
    from consumers.dead_letters import run

    return run(_settings(args), args)


# -- songs ---------------------------------------------------------------------------
def cmd_songs_delete(args: argparse.Namespace) -> int:
    from consumers.takedown import run

    return run(_settings(args), args)


# -- serve ---------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from consumers.serve import serve

    s = _settings(args)
    host = args.host or s.api.host
    port = args.port if args.port is not None else s.api.port
    return serve(s, host, port, args.workers, args.log_level.lower())


# -- parser ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apexrank", description=__doc__)
    p.add_argument("--config", help="TOML settings file (same as APEXRANK_CONFIG)")
    p.add_argument("--log-level", default=os.environ.get("APEXRANK_LOG_LEVEL", "INFO"))
    p.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("APEXRANK_LOG_FORMAT", "text"))
    sub = p.add_subparsers(dest="command", required=True)

    def add(
        name: str, fn: Callable[[argparse.Namespace], int], help_: str, parent: object = sub
    ) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)  # type: ignore[attr-defined]
        sp.set_defaults(fn=fn)
        return sp

    config = sub.add_parser("config", help="inspect settings").add_subparsers(dest="config_cmd", required=True)
    show = add("show", cmd_config_show, "print the effective settings (secrets masked)", config)
    show.add_argument("--json", action="store_true")

    services = add("services", cmd_services, "start, stop or inspect the embedded Kafka broker and Redis")
    services.add_argument("action", choices=["up", "down", "status"])
    mode = services.add_mutually_exclusive_group()
    mode.add_argument(
        "--durable",
        dest="storage",
        action="store_const",
        const=True,
        help="keep the broker's topics and offsets on disk under the state directory (a local S3 server); "
        "later 'up's keep this mode",
    )
    mode.add_argument(
        "--memory", dest="storage", action="store_const", const=False, help="back to the in-memory broker (the default)"
    )

    topics = sub.add_parser("topics", help="manage Kafka topics").add_subparsers(dest="topics_cmd", required=True)
    add("create", cmd_topics_create, "create every apexrank topic that does not exist", topics)

    worker = add("worker", cmd_worker, "score songs from songs.generated into Redis and the index")
    worker.add_argument("--until-idle", type=float, metavar="SECONDS", help="exit after SECONDS with no messages")
    worker.add_argument(
        "--until-caught-up",
        action="store_true",
        help="exit once everything published before is processed (a backfill), without waiting out --until-idle",
    )
    worker.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    worker.add_argument("--metrics-host", default="127.0.0.1", help="address metrics listen on (default loopback)")

    feedback = add("feedback", cmd_feedback, "count engagement events into Redis, the log and the feeds")
    feedback.add_argument("--until-idle", type=float, metavar="SECONDS", help="exit after SECONDS with no messages")
    feedback.add_argument(
        "--until-caught-up",
        action="store_true",
        help="exit once everything published before is processed (a backfill), without waiting out --until-idle",
    )
    feedback.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    feedback.add_argument("--metrics-host", default="127.0.0.1", help="address metrics listen on (default loopback)")

    publish = add("publish", cmd_publish, "publish songs.generated events for a catalog (Parquet or CSV)")
    publish.add_argument("--catalog", required=True)
    publish.add_argument("--limit", type=int)

    feed = add("feed", cmd_feed, "print the top of the cold-start feed")
    feed.add_argument("--limit", type=int, default=20)

    report = sub.add_parser("report", help="reports on what is served and how it does")
    report_sub = report.add_subparsers(dest="report_cmd", required=True)
    arms = add(
        "arms",
        cmd_report_arms,
        "each A/B arm (arms.*): feed, model version, share of users, plays, likes, like rate and its 95% interval",
        report_sub,
    )
    arms.add_argument("--json", action="store_true", help="print the report as JSON")
    gens = add(
        "generators",
        cmd_report_generators,
        "each generator's songs over a recent window against the model's training: OOD, mean and score shifts",
        report_sub,
    )
    gens.add_argument("--window-h", type=float, default=24.0, help="songs scored in the last this many hours")
    gens.add_argument("--json", action="store_true", help="print the report as JSON")

    demo = add("demo", cmd_demo, "the end-to-end demo on the embedded stack (logmel encoder, synthetic songs)")
    demo.add_argument("--songs", type=int, default=48)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--out", default="demo-out")
    simulate = sub.add_parser("simulate", help="synthetic worlds (never to be confused with real data)")
    simulate_sub = simulate.add_subparsers(dest="simulate_cmd", required=True)
    sim_catalog = add(
        "catalog",
        cmd_simulate_catalog,
        "synthesise songs with audible hidden qualities",
        simulate_sub,
    )
    sim_catalog.add_argument("--songs", type=int, required=True)
    sim_catalog.add_argument("--seed", type=int, default=0)
    sim_catalog.add_argument("--out", required=True)
    sim_catalog.add_argument("--duration", type=float, default=6.0, help="seconds per song")
    sim_catalog.add_argument("--workers", type=int, default=1, help="processes used to synthesise")
    sim_catalog.add_argument(
        "--novel-generator", action="store_true", help="add synthetic-novel, the held-out generator of docs/model.md"
    )
    loop = add(
        "loop",
        cmd_simulate_loop,
        "the seeded feedback-loop simulation of the feed policies (synthetic; docs/loop-simulation.md)",
        simulate_sub,
    )
    loop.add_argument("--songs", type=int, default=120)
    loop.add_argument("--users", type=int, default=100)
    loop.add_argument("--hours", type=int, default=6)
    loop.add_argument("--seed", type=int, default=1)
    loop.add_argument("--out", default="loop-out")
    loop.add_argument(
        "--policies",
        default="random,newest,prior-only,prior+evidence,prior+evidence+retrain",
        help="comma-separated policies to run (also: plain-evidence, personal; docs/loop-simulation.md)",
    )
    loop.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a LoopConfig field (repeatable), e.g. history_songs=60, half_life_hours=72, "
        "audience_weights=history (the listeners share the history's taste) or "
        "audience_weights=consonance:1.2,clean:1.0",
    )

    retrain = add("retrain", cmd_retrain, "retrain the APEX head from engagement; promote it only if better")
    retrain.add_argument("--every", metavar="DURATION", help="run on a schedule, e.g. 30m, 6h, 1d, 1w (default: once)")

    serve = add("serve", cmd_serve, "serve the feed/rank/similar HTTP API (settings: api.*)")
    serve.add_argument("--host", help="bind address (default api.host)")
    serve.add_argument("--port", type=int, help="port (default api.port)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the port (SO_REUSEPORT); each loads the table and index",
    )
    dead = sub.add_parser("dead-letters", help="summarise dead letters; replay them once the cause is fixed")
    dead_sub = dead.add_subparsers(dest="dead_letters_cmd", required=True)
    dl_list = add(
        "list", cmd_dead_letters, "dead letters per error code: count, first and last time, reasons", dead_sub
    )
    dl_replay = add(
        "replay",
        cmd_dead_letters,
        "republish the original events of the matching dead letters to their source topic, with their key; "
        "truncated or unparseable originals are skipped and counted. Replaying twice republishes twice "
        "(the worker and the feedback consumer are idempotent per song id and event id)",
        dead_sub,
    )
    for dl in (dl_list, dl_replay):
        dl.add_argument("--topic", choices=["songs", "engagement"], help="songs.generated or engagement (default both)")
        dl.add_argument("--code", action="append", help="only this error code (repeatable), e.g. http_error")
        dl.add_argument("--since", metavar="T", help="failed at or after T: RFC 3339 (2026-01-31T12:00:00Z) or 2h, 3d")
        dl.add_argument("--json", action="store_true", help="print the report as JSON")
    dl_replay.add_argument("--dry-run", action="store_true", help="report what would be republished; publish nothing")

    songs = sub.add_parser("songs", help="manage scored songs").add_subparsers(dest="songs_cmd", required=True)
    delete = add(
        "delete",
        cmd_songs_delete,
        "take songs down (rights claim, abuse): out of every feed, hash, counter and API table now, a tombstone "
        "against replays, and songs.deleted so the workers drop the vectors; idempotent",
        songs,
    )
    delete.add_argument("song_ids", nargs="*", metavar="ID", help="song ids to take down")
    delete.add_argument("--file", metavar="F", help="a file of song ids, one a line ('#' starts a comment)")
    delete.add_argument("--reason", default="takedown", help="kept in each tombstone and event (1-256 characters)")
    delete.add_argument("--json", action="store_true", help="print the report as JSON")

    from consumers.model_cli import register

    register(sub)
    return p


def _settings_errors() -> tuple[type[Exception], ...]:
    """What building :class:`Settings` raises on a bad file or value. Called only once a command has
    failed (an ``except`` clause evaluates it then), so that a command that succeeds loads no more."""
    import tomllib

    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    return (tomllib.TOMLDecodeError, ValidationError, SettingsError)


def _settings_problem(exc: Exception) -> str | None:
    """One line naming what to fix in the settings, or None when ``exc`` is not about the settings."""
    import tomllib

    from pydantic import ValidationError

    if isinstance(exc, tomllib.TOMLDecodeError):
        return f"settings file {os.environ.get('APEXRANK_CONFIG')}: {exc}"
    if isinstance(exc, ValidationError):
        if exc.title != "Settings":  # some other model's data: a bug to see whole, not a setting to fix
            return None
        # No input values: the value of a secret (a token, a URL's password) must not reach a log.
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors())
        return f"invalid settings (APEXRANK_* variables or the --config file): {problems}"
    cause = f": {exc.__cause__}" if exc.__cause__ else ""
    return f'settings: {exc}{cause} (lists and tables are JSON in a variable, e.g. \'["a", "b"]\')'


def _check_options(args: argparse.Namespace) -> None:
    """Refuse, before any work, a config file that is not there and a log level logging does not know."""
    config = os.environ.get("APEXRANK_CONFIG")
    if config and not Path(config).is_file():
        raise ConfigError(f"{'--config' if args.config else 'APEXRANK_CONFIG'} {config}: no such file")
    if args.log_level.upper() not in logging.getLevelNamesMapping():
        raise ConfigError(f"--log-level {args.log_level!r}: give DEBUG, INFO, WARNING, ERROR or CRITICAL")


def main(argv: Sequence[str] | None = None) -> int:
    from consumers.logs import setup_logging

    args = build_parser().parse_args(argv)
    if args.config:
        os.environ["APEXRANK_CONFIG"] = args.config
    try:
        _check_options(args)
        setup_logging(args.log_level, args.log_format)
        return int(args.fn(args))
    except ConfigError as exc:
        print(f"apexrank: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except _settings_errors() as exc:
        problem = _settings_problem(exc)
        if problem is None:
            raise
        print(f"apexrank: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
