"""Throughput of the scoring worker and of the plumbing around it, on the embedded stack.

What is measured, and why:

a. **Raw Kafka rates** (kafka-python against the embedded Tansu broker, small JSON
   messages): produce (``acks=all``, ``linger_ms=5``, as the worker's producer) and
   consume (a group member, ``max_poll_records=500``). They bound everything below: a
   worker can never move songs faster than the broker hands them over. A third row,
   the *Kafka loop*, is the worker's Kafka work per batch with no processing at all
   (poll, produce one small message per record, flush, commit), for each
   ``max_poll_records`` tried: the ceiling of a worker whose pipeline costs nothing.
b. **End to end with the logmel encoder**: 30 s WAV files are written up front, one
   ``songs.generated`` event per song is published, then ``Worker.run`` is timed from
   the first polled batch to the last offset commit (the idle tail before the worker
   exits is not counted, nor is the group join). Every song is fetched, decoded,
   encoded, scored and written to SQLite + FAISS + Redis, and ``songs.scored`` is
   published. ``--pipeline off,on`` runs the worker's one-batch path and its pipelined
   path (``worker.pipelined``: decode pool + encoder groups) side by side, interleaved.
   Then the *decode bound*: fetch + decode + resample + segment of the same WAVs alone,
   in each ``--decode-pools`` pool (threads or processes), no encoder and no stores.
c. **The plumbing's ceiling**: the embedding store is filled beforehand under the
   worker's encoder id, so the worker reuses each stored embedding and skips
   fetch/decode/encode; a fresh Redis prefix makes it score and write every song.
   Swept over ``max_poll_records`` and torch thread counts, ``--repeats`` times each.
   Target: at least 2,000 songs/s on 2 cores, judged on the median of the best
   configuration. ``--profile`` adds one run under cProfile (slower, not counted) and
   prints where the project's code spends a batch.
d. **The store path alone**: ``EmbeddingIndex.add`` (durable SQLite commit + FAISS
   upsert + periodic snapshots) and ``RedisScoreStore.write_songs`` for N songs in
   batches of 64 and 256, with logmel-sized and MERT-sized records; plus the cost of
   one FAISS snapshot as the index grows (a snapshot rewrites, hashes and fsyncs the
   whole index every ``snapshot_every_songs`` songs).

The script starts its own embedded stack (Tansu + Redis) on free loopback ports with
benchmark-only topic names and Redis prefixes, and stops it at the end. Every timed window
also records the share of the cores used by this process, by the stack's servers and by
any other process (``/proc/stat``), because a shared 2-core machine makes contention the
largest source of error. About 3.5 minutes on a quiet machine. Run from the repository
root::

    .venv/bin/python benchmarks/worker_throughput.py --json bench-worker.json
    .venv/bin/python benchmarks/worker_throughput.py --quick          # a smoke run (~1.5 min)
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import io
import json
import logging
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from _common import loadavg, table  # noqa: E402
from _common import machine_info as common_machine_info  # noqa: E402
from kafka import KafkaConsumer, KafkaProducer  # noqa: E402
from prometheus_client import REGISTRY  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from consumers.kafka_io import ensure_topics  # noqa: E402
from consumers.loop import Message  # noqa: E402
from consumers.publish import publish_events  # noqa: E402
from consumers.stack import EmbeddedStack, free_port  # noqa: E402
from consumers.worker import Worker  # noqa: E402
from indexes import open_score_store  # noqa: E402
from indexes.base import EmbeddingRecord, SongRecord  # noqa: E402
from indexes.embedding_index import EmbeddingIndex  # noqa: E402
from indexes.faiss_index import FaissIndexConfig, FaissVectorIndex  # noqa: E402
from ranker.audio import load_song, segment_waveform  # noqa: E402
from ranker.encoders import build_encoder  # noqa: E402
from ranker.events import TASKS, SongGenerated  # noqa: E402
from ranker.settings import (  # noqa: E402
    AudioSettings,
    IndexSettings,
    KafkaSettings,
    ModelSettings,
    RedisSettings,
    Settings,
    TopicSettings,
    WorkerSettings,
)

log = logging.getLogger("bench.worker")

STAGES = ("fetch_decode", "encode", "score", "index", "redis", "batch")
SAMPLE_RATE = 24_000
PLUMBING_TARGET = 2_000.0  # songs/s on 2 cores


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    return {
        **common_machine_info(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------
# Stack and settings
# --------------------------------------------------------------------------------------


@dataclass
class Stack:
    """The running embedded stack and the settings that point at it."""

    embedded: EmbeddedStack
    settings: Settings

    def pids(self) -> list[int]:
        return [st.pid for st in self.embedded.status() if st.pid is not None]


@contextlib.contextmanager
def embedded_stack(state_dir: Path) -> Iterator[Stack]:
    """Tansu + Redis on free loopback ports (as tests/conftest.py does); stopped on exit."""
    base = Settings(
        state_dir=state_dir,
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"),
        redis=RedisSettings(url=SecretStr(f"redis://127.0.0.1:{free_port()}/0")),
    )
    embedded = EmbeddedStack(base)
    embedded.up()
    try:
        yield Stack(embedded, base)
    finally:
        embedded.down()


def bench_settings(
    base: Settings,
    root: Path,
    *,
    input_tag: str,
    run_tag: str,
    index_dir: Path,
    max_poll_records: int,
    partitions: int,
    pipelined: bool = False,
) -> Settings:
    """Settings for one worker run: input topic ``input_tag``, everything else private to ``run_tag``."""
    topics = TopicSettings(
        songs_generated=f"bench{input_tag}.songs.generated",
        songs_scored=f"bench{run_tag}.songs.scored",
        dead_letter=f"bench{run_tag}.songs.dead-letter",
        engagement=f"bench{run_tag}.engagement",
        engagement_dead_letter=f"bench{run_tag}.engagement.dead-letter",
        models_promoted=f"bench{run_tag}.models.promoted",
        partitions=partitions,
    )
    return Settings(
        state_dir=root / f"state-{run_tag}",
        dev_mode=True,  # the benchmark's songs are local files
        encoder="logmel",
        kafka=base.kafka.model_copy(
            update={
                "topics": topics,
                "worker_group_id": f"bench-worker-{run_tag}",
                "feedback_group_id": f"bench-feedback-{run_tag}",
            }
        ),
        redis=RedisSettings(url=base.redis.url, key_prefix=f"bench{run_tag}"),
        index=IndexSettings(path=index_dir, use_gpu="never"),
        model=ModelSettings(device="cpu", allow_untrained=True),  # plumbing: the seeded head will do
        worker=WorkerSettings(max_poll_records=max_poll_records, pipelined=pipelined),
    )


def tag() -> str:
    return uuid.uuid4().hex[:10]


# --------------------------------------------------------------------------------------
# (a) raw Kafka
# --------------------------------------------------------------------------------------


def small_json(i: int) -> bytes:
    """A ``songs.generated``-sized JSON message (about 200 bytes)."""
    return json.dumps(
        {
            "schema_version": 1,
            "song_id": f"raw-{i:08d}",
            "audio_uri": f"file:///data/songs/2026/05/raw-{i:08d}.wav",
            "generator": "suno-v5",
            "created_at": "2026-05-01T12:00:00.000000Z",
            "title": f"Song number {i}",
        }
    ).encode()


def consumer_for(kafka: KafkaSettings, topic: str, max_poll_records: int) -> KafkaConsumer:
    consumer = KafkaConsumer(
        group_id=f"bench-raw-{tag()}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
        max_poll_records=max_poll_records,
        **kafka.client_kwargs(),
    )
    consumer.subscribe([topic])
    return consumer


def produce_rate(kafka: KafkaSettings, topic: str, n: int) -> dict[str, Any]:
    producer = KafkaProducer(acks="all", linger_ms=5, retries=5, **kafka.client_kwargs())
    payloads = [small_json(i) for i in range(n)]
    try:
        producer.send(topic, key=b"warm-up", value=payloads[0]).get(timeout=30)  # metadata, connection
        t0 = time.perf_counter()
        for i, value in enumerate(payloads):
            producer.send(topic, key=f"raw-{i:08d}".encode(), value=value)
        producer.flush(timeout=120)
        dt = time.perf_counter() - t0
    finally:
        producer.close(timeout=10)
    return {"what": "produce (acks=all, linger 5 ms)", "messages": n, "seconds": dt, "msg_per_s": n / dt}


def consume_rate(kafka: KafkaSettings, topic: str, n: int, timeout_s: float) -> dict[str, Any]:
    """Read ``n`` messages; timed from the first non-empty poll (the group join is excluded)."""
    consumer = consumer_for(kafka, topic, 500)
    got = 0
    first = 0
    t0: float | None = None
    deadline = time.monotonic() + timeout_s
    try:
        while got < n and time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=500, max_records=500)
            count = sum(len(v) for v in polled.values())
            if count and t0 is None:
                t0, first = time.perf_counter(), count  # the first batch arrives at t0
            got += count
        dt = time.perf_counter() - t0 if t0 is not None else 0.0
    finally:
        consumer.close(autocommit=False)
    return {
        "what": "consume (group member, max_poll_records 500)",
        "messages": got,
        "seconds": dt,
        "msg_per_s": (got - first) / dt if dt > 0 else 0.0,
    }


def kafka_loop_rate(kafka: KafkaSettings, topic: str, out_topic: str, n: int, poll_records: int) -> dict[str, Any]:
    """The worker's Kafka work alone: poll, produce one message per record, flush, commit."""
    consumer = consumer_for(kafka, topic, poll_records)
    producer = KafkaProducer(acks="all", linger_ms=5, retries=5, **kafka.client_kwargs())
    got = 0
    batches = 0
    t0: float | None = None
    t_last = 0.0
    deadline = time.monotonic() + 120
    payload = b'{"song_id":"x","rank_score":0.5,"model_version":"bench"}'
    try:
        while got < n and time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=500, max_records=poll_records)
            records = [r for recs in polled.values() for r in recs]
            if not records:
                continue
            if t0 is None:
                t0 = time.perf_counter()
            for r in records:
                producer.send(out_topic, key=r.key, value=payload)
            producer.flush(timeout=30)
            consumer.commit()
            got += len(records)
            batches += 1
            t_last = time.perf_counter()
    finally:
        producer.close(timeout=10)
        consumer.close(autocommit=False)
    dt = t_last - (t0 or t_last)
    return {
        "what": f"Kafka loop: poll+produce+flush+commit, max_poll_records {poll_records}",
        "messages": got,
        "seconds": dt,
        "msg_per_s": got / dt if dt > 0 else 0.0,
        "batches": batches,
    }


def bench_raw_kafka(base: Settings, n: int, poll_sweep: Sequence[int], partitions: int) -> list[dict[str, Any]]:
    t = tag()
    topic, out_topic = f"bench{t}.raw", f"bench{t}.raw-out"
    kafka = base.kafka.model_copy(update={"topics": TopicSettings(partitions=partitions)})
    ensure_topics(kafka, [topic, out_topic])
    rows = [produce_rate(kafka, topic, n), consume_rate(kafka, topic, n + 1, timeout_s=120)]
    rows += [kafka_loop_rate(kafka, topic, out_topic, n + 1, p) for p in poll_sweep]
    return rows


# --------------------------------------------------------------------------------------
# CPU accounting: who used the cores during a timed window
# --------------------------------------------------------------------------------------

_HZ = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    """Machine busy time, this process's CPU time and the stack servers' CPU time, in seconds."""

    at: float
    machine_busy_s: float
    own_s: float
    stack_s: float

    @classmethod
    def take(cls, stack_pids: Sequence[int]) -> CpuSample:
        busy = 0.0
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
            # user nice system idle iowait irq softirq steal: everything but idle and iowait
            busy = (sum(fields[:8]) - fields[3] - fields[4]) / _HZ
        stack = 0.0
        for pid in stack_pids:
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                stack += (int(stat[11]) + int(stat[12])) / _HZ  # utime, stime
        return cls(time.perf_counter(), busy, time.process_time(), stack)


def cpu_share(start: CpuSample, end: CpuSample) -> dict[str, float]:
    """Percent of the machine's cores used by us, by the stack servers and by anything else."""
    wall = max(end.at - start.at, 1e-9)
    cores = (os.cpu_count() or 1) * wall / 100.0
    own = end.own_s - start.own_s
    stack = end.stack_s - start.stack_s
    other = max(end.machine_busy_s - start.machine_busy_s - own - stack, 0.0)
    return {
        "own_pct": own / cores,
        "stack_pct": stack / cores,
        "other_pct": other / cores,
        "own_cpu_s": own,
        "stack_cpu_s": stack,
    }


# --------------------------------------------------------------------------------------
# Timed worker runs
# --------------------------------------------------------------------------------------


class TimedWorker(Worker):
    """The real worker, with timestamps at its first batch and at each offset commit."""

    def __init__(self, settings: Settings, stack_pids: Sequence[int]) -> None:
        super().__init__(settings)
        self.stack_pids = list(stack_pids)
        self.first_batch: CpuSample | None = None
        self.last_commit: CpuSample | None = None

    def _received(self, messages: list[Message]) -> None:
        if self.first_batch is None:
            self.first_batch = CpuSample.take(self.stack_pids)
        super()._received(messages)

    def _retry(self, what: str, fn: Callable[[], Any]) -> Any:
        out = super()._retry(what, fn)
        if what == "commit offsets":
            self.last_commit = CpuSample.take(self.stack_pids)
        return out


def stage_sums() -> dict[str, float]:
    return {s: REGISTRY.get_sample_value("apexrank_worker_stage_seconds_sum", {"stage": s}) or 0.0 for s in STAGES}


@dataclass
class RunResult:
    label: str
    pipelined: bool
    torch_threads: int
    max_poll_records: int
    songs: int
    scored: int
    reused: int
    dead: int
    batches: int
    seconds: float
    songs_per_s: float
    feed_size: int
    stage_s: dict[str, float] = field(default_factory=dict)
    cpu_pct: dict[str, float] = field(default_factory=dict)
    songs_per_cpu_s: float = 0.0
    profile_top: list[str] = field(default_factory=list)


def timed_run(
    stack: Stack,
    settings: Settings,
    label: str,
    expect: int,
    *,
    torch_threads: int,
    idle_s: float,
    timeout_s: float,
    profile: bool = False,
) -> RunResult:
    torch.set_num_threads(torch_threads)  # process-wide: the encoder's and the head's intra-op pool
    worker = TimedWorker(settings, stack.pids())
    before = stage_sums()
    timer = threading.Timer(timeout_s, worker.request_stop)  # bounded even if something stalls
    timer.daemon = True
    timer.start()
    prof = cProfile.Profile() if profile else None
    try:
        if prof is not None:
            prof.enable()
        stats = worker.run(until_idle_s=idle_s)
    finally:
        if prof is not None:
            prof.disable()
        timer.cancel()
    after = stage_sums()
    if worker.first_batch is None or worker.last_commit is None:
        raise RuntimeError(f"{label}: the worker consumed nothing within {timeout_s:.0f} s")
    seconds = worker.last_commit.at - worker.first_batch.at
    share = cpu_share(worker.first_batch, worker.last_commit)
    store = open_score_store(settings.redis.url.get_secret_value(), settings.redis.key_prefix)
    try:
        feed_size = store.feed_size(settings.feed.name)
    finally:
        store.close()
    top: list[str] = []
    if prof is not None:
        out = io.StringIO()
        # Cumulative time of the project's own functions: where a batch's wall time goes.
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(r"(consumers|indexes|ranker)/", 30)
        top = [line for line in out.getvalue().splitlines() if line.strip()]
    if stats.scored != expect or feed_size != expect:
        log.warning("%s: expected %d songs, scored %d, feed holds %d", label, expect, stats.scored, feed_size)
    return RunResult(
        label=label,
        pipelined=settings.worker.pipelined,
        torch_threads=torch_threads,
        max_poll_records=settings.worker.max_poll_records,
        songs=stats.messages,
        scored=stats.scored,
        reused=stats.reused_embeddings,
        dead=stats.dead_letters,
        batches=stats.batches,
        seconds=seconds,
        songs_per_s=stats.scored / seconds if seconds > 0 else 0.0,
        feed_size=feed_size,
        stage_s={s: after[s] - before[s] for s in STAGES},
        cpu_pct=share,
        songs_per_cpu_s=stats.scored / max(share["own_cpu_s"] + share["stack_cpu_s"], 1e-9),
        profile_top=top,
    )


def make_events(prefix: str, uris: Sequence[str]) -> list[SongGenerated]:
    now = datetime.now(UTC)
    return [
        SongGenerated(song_id=f"{prefix}-{i:06d}", audio_uri=uri, generator="suno-v5", created_at=now)
        for i, uri in enumerate(uris)
    ]


# --------------------------------------------------------------------------------------
# (b) end to end, logmel
# --------------------------------------------------------------------------------------


def write_songs(directory: Path, n: int, seconds: float, sample_rate: int) -> list[str]:
    """``n`` distinct 30 s 16-bit mono WAVs (tones, harmonics, noise, a pulse); returns file URIs."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    pool: list[np.ndarray] = []
    for k in range(8):
        f0 = 110.0 * 2 ** (k / 12)
        tone = np.zeros_like(t)
        for h in range(1, 5):
            tone += 0.25 / h * np.sin(2 * np.pi * f0 * h * t)
        pulse = 0.6 + 0.4 * (np.sin(2 * np.pi * (1 + k / 4) * t) > 0)  # a rhythmic pulse
        pool.append((tone * pulse).astype(np.float32))
    uris = []
    for i in range(n):
        song = pool[i % len(pool)] * np.float32(0.5 + 0.5 * rng.random())
        song += np.float32(0.01) * rng.standard_normal(len(t)).astype(np.float32)
        path = directory / f"song-{i:06d}.wav"
        sf.write(path, song, sample_rate, subtype="PCM_16")
        uris.append(path.as_uri())
    return uris


def bench_e2e(
    stack: Stack, root: Path, args: argparse.Namespace, combos: Sequence[tuple[int, int]]
) -> tuple[list[RunResult], float]:
    t0 = time.perf_counter()
    uris = write_songs(root / "wav", args.e2e_songs, args.song_seconds, args.wav_rate)
    gen_s = time.perf_counter() - t0
    input_tag = tag()
    results: list[RunResult] = []
    # Old and new path side by side: each configuration once per mode, per repeat, interleaved.
    runs = [(c, mode) for _ in range(args.e2e_repeats) for c in combos for mode in pipeline_modes(args)]
    for (threads, poll), pipelined in runs:
        run_tag = tag()
        settings = bench_settings(
            stack.settings,
            root,
            input_tag=input_tag,
            run_tag=run_tag,
            index_dir=root / f"index-e2e-{run_tag}",
            max_poll_records=poll,
            partitions=args.partitions,
            pipelined=pipelined,
        )
        if not results:
            publish_events(settings, make_events("e2e", uris))
        results.append(
            timed_run(
                stack,
                settings,
                "end to end, logmel" + (", pipelined" if pipelined else ""),
                args.e2e_songs,
                torch_threads=threads,
                idle_s=2.0,
                timeout_s=60 + args.e2e_songs,
            )
        )
    return results, gen_s


def pipeline_modes(args: argparse.Namespace) -> list[bool]:
    """``--pipeline off,on``: the worker's one-batch-at-a-time path, its pipelined path, or both."""
    return [{"off": False, "on": True}[m.strip()] for m in args.pipeline.split(",") if m.strip()]


# --------------------------------------------------------------------------------------
# (b') the decode bound: fetch + decode + resample + segment alone, no encoder, no stores
# --------------------------------------------------------------------------------------


def _decode_one(uri: str, audio: AudioSettings) -> int:
    decoded = load_song(uri, audio)
    return len(segment_waveform(decoded.waveform, decoded.sample_rate, audio.segment_s))


def bench_decode(uris: Sequence[str], pools: Sequence[str], stack_pids: Sequence[int]) -> list[dict[str, Any]]:
    """Songs/s of the pipelined worker's pool stage alone, for ``threads:N`` and ``processes:N`` pools.

    Threads show whether soundfile, numpy and torchaudio release the GIL (the rate grows with N up
    to the cores); processes pay a pickled copy of every waveform back to the parent.
    """
    audio = Settings(dev_mode=True).audio
    rows = []
    for pool in pools:
        kind, n = pool.split(":")
        executor: Executor = (
            ThreadPoolExecutor(int(n)) if kind == "threads" else ProcessPoolExecutor(int(n), mp_context=_spawn())
        )
        with executor:
            list(executor.map(_decode_one, uris[: int(n)], [audio] * int(n)))  # warm: imports, first reads
            start = CpuSample.take(stack_pids)
            segments = sum(executor.map(_decode_one, uris, [audio] * len(uris)))
            end = CpuSample.take(stack_pids)
        seconds = end.at - start.at
        rows.append(
            {
                "pool": pool,
                "songs": len(uris),
                "segments": segments,
                "seconds": seconds,
                "songs_per_s": len(uris) / seconds,
                "cpu_pct": cpu_share(start, end),
            }
        )
    return rows


def _spawn() -> Any:
    import multiprocessing

    return multiprocessing.get_context("forkserver")


# --------------------------------------------------------------------------------------
# (c) plumbing: stored embeddings reused, everything else written
# --------------------------------------------------------------------------------------


def random_records(
    ids: Sequence[str], encoder_id: str, n_layers: int, dim: int, vector_dim: int, rng: np.random.Generator
) -> list[EmbeddingRecord]:
    layers = rng.standard_normal((len(ids), n_layers, dim)).astype(np.float32)
    vectors = rng.standard_normal((len(ids), vector_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [
        EmbeddingRecord(
            song_id=s, encoder_id=encoder_id, layers=layers[i], vector=vectors[i], n_segments=1, n_frames=2249
        )
        for i, s in enumerate(ids)
    ]


def bench_plumbing(
    stack: Stack, root: Path, args: argparse.Namespace, combos: Sequence[tuple[int, int]]
) -> tuple[list[RunResult], float]:
    n = args.plumbing_songs
    input_tag = tag()
    index_dir = root / "index-plumbing"

    def settings_for(poll: int, pipelined: bool) -> Settings:
        return bench_settings(
            stack.settings,
            root,
            input_tag=input_tag,
            run_tag=tag(),
            index_dir=index_dir,
            max_poll_records=poll,
            partitions=args.partitions,
            pipelined=pipelined,
        )

    modes = pipeline_modes(args)
    first = settings_for(combos[0][1], modes[0])
    encoder = build_encoder(first)
    events = make_events("plumb", [f"file:///nonexistent/plumb-{i:06d}.wav" for i in range(n)])
    t0 = time.perf_counter()
    rng = np.random.default_rng(1)
    with EmbeddingIndex(index_dir, dim=encoder.vector_dim, use_gpu="never", snapshot_every_songs=10**9) as idx:
        for start in range(0, n, 2000):
            ids = [e.song_id for e in events[start : start + 2000]]
            dims = (encoder.n_layers, encoder.dim, encoder.vector_dim)
            idx.add(random_records(ids, encoder.encoder_id, *dims, rng))
    fill_s = time.perf_counter() - t0
    publish_events(first, events)
    results: list[RunResult] = []
    runs = [(c, m, False) for _ in range(args.repeats) for c in combos for m in modes]
    if args.profile:  # one extra run under cProfile (slower: not counted in the verdict)
        runs.append((combos[-1], modes[-1], True))
    for i, ((threads, poll), pipelined, profiled) in enumerate(runs):
        results.append(
            timed_run(
                stack,
                first if i == 0 else settings_for(poll, pipelined),
                "plumbing, profiled" if profiled else "plumbing (stored embeddings)",
                n,
                torch_threads=threads,
                idle_s=2.0,
                timeout_s=60 + n / 100,
                profile=profiled,
            )
        )
    return results, fill_s


# --------------------------------------------------------------------------------------
# (d) the store path alone
# --------------------------------------------------------------------------------------


def song_records(ids: Sequence[str], rng: np.random.Generator) -> list[SongRecord]:
    now = datetime.now(UTC).isoformat()
    scores = rng.random((len(ids), len(TASKS)))
    return [
        SongRecord(
            song_id=s,
            model_version="bench-v1",
            scores={t: float(v) for t, v in zip(TASKS, scores[i], strict=True)},
            rank_score=float(scores[i].mean()),
            generator="suno-v5",
            created_at=now,
            scored_at=now,
            extra={"n_segments": 1, "duration_s": 30.0, "truncated": 0},
        )
        for i, s in enumerate(ids)
    ]


def bench_store_path(
    base: Settings, root: Path, n: int, batches: Sequence[int], shapes: dict[str, tuple[int, int, int]]
) -> list[dict[str, Any]]:
    rows = []
    for shape_name, (n_layers, dim, vector_dim) in shapes.items():
        for batch in batches:
            run = tag()
            rng = np.random.default_rng(2)
            ids = [f"store-{run}-{i:07d}" for i in range(n)]
            embeddings = random_records(ids, f"bench-{shape_name}", n_layers, dim, vector_dim, rng)
            songs = song_records(ids, rng)
            store = open_score_store(base.redis.url.get_secret_value(), key_prefix=f"bench{run}")
            add_times: list[float] = []
            redis_times: list[float] = []
            with EmbeddingIndex(root / f"index-store-{run}", dim=vector_dim, use_gpu="never") as idx:
                for start in range(0, n, batch):
                    t0 = time.perf_counter()
                    idx.add(embeddings[start : start + batch])
                    t1 = time.perf_counter()
                    store.write_songs(songs[start : start + batch], "bench")
                    t2 = time.perf_counter()
                    add_times.append(t1 - t0)
                    redis_times.append(t2 - t1)
            store.close()
            add_s, redis_s = sum(add_times), sum(redis_times)
            rows.append(
                {
                    "shape": f"{shape_name} ({n_layers}x{dim} layers, {vector_dim}-d vector)",
                    "batch": batch,
                    "songs": n,
                    "index_add_songs_per_s": n / add_s,
                    "redis_songs_per_s": n / redis_s,
                    "both_songs_per_s": n / (add_s + redis_s),
                    "index_add_ms_p50": 1000 * float(np.median(add_times)),
                    "index_add_ms_max": 1000 * max(add_times),
                    "redis_ms_p50": 1000 * float(np.median(redis_times)),
                }
            )
    return rows


def bench_snapshot(root: Path, sizes: Sequence[int], dim: int) -> list[dict[str, Any]]:
    """What ``EmbeddingIndex.snapshot`` does to the index file (write + sha256 + fsync), by index size."""
    rows = []
    rng = np.random.default_rng(3)
    index = FaissVectorIndex(FaissIndexConfig(dim=dim, factory="Flat", use_gpu="never"))
    have = 0
    for size in sizes:
        add = size - have
        vecs = rng.standard_normal((add, dim)).astype(np.float32)
        keys = np.arange(have + 1, size + 1, dtype=np.int64)
        index.upsert(keys, vecs)
        have = size
        path = root / f"snapshot-{dim}-{size}.faiss"
        t0 = time.perf_counter()
        hasher = hashlib.sha256()
        with open(path, "wb") as f:

            def write(chunk: bytes, f: Any = f, hasher: Any = hasher) -> None:
                f.write(chunk)
                hasher.update(chunk)

            index.write_to(write)
            f.flush()
            os.fsync(f.fileno())
        seconds = time.perf_counter() - t0
        mib = path.stat().st_size / 2**20
        path.unlink()
        rows.append(
            {
                "dim": dim,
                "vectors": size,
                "mib": mib,
                "seconds": seconds,
                "ms_per_song_at_every_1000": 1000 * seconds / 1000,
            }
        )
    return rows


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--json", type=Path, help="write all figures to this JSON file")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every part")
    p.add_argument("--raw-messages", type=int, default=50_000)
    p.add_argument("--e2e-songs", type=int, default=300)
    p.add_argument("--song-seconds", type=float, default=30.0)
    p.add_argument("--wav-rate", type=int, default=SAMPLE_RATE, help="WAV sample rate (not 24000: resampled)")
    p.add_argument("--e2e-poll-records", default="64,256")
    p.add_argument("--e2e-repeats", type=int, default=1, help="repeats of each end-to-end configuration and mode")
    p.add_argument(
        "--pipeline",
        default="off,on",
        help="worker paths for the end-to-end runs, side by side: off (one polled batch at a time), on "
        "(pipelined: decode pool + encoder groups, consumers.worker_stages)",
    )
    p.add_argument(
        "--decode-pools",
        default="threads:1,threads:2,threads:4,processes:2",
        help="pools for the decode bound (fetch + decode + resample + segment of the end-to-end WAVs alone)",
    )
    p.add_argument("--plumbing-songs", type=int, default=10_000)
    p.add_argument("--poll-records", default="64,256,500", help="max_poll_records values for the sweeps")
    p.add_argument(
        "--torch-threads",
        default=f"{torch.get_num_threads()},1",
        help="torch intra-op thread counts to sweep (torch.set_num_threads before each worker run)",
    )
    p.add_argument("--repeats", type=int, default=2, help="repeats of each plumbing configuration")
    p.add_argument("--store-songs", type=int, default=10_000)
    p.add_argument("--snapshot-sizes", default="10000,50000,100000")
    p.add_argument("--partitions", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="cProfile the last plumbing run, print the top")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: raw,e2e,plumbing,store")
    args = p.parse_args(argv)
    if args.quick:
        args.raw_messages, args.e2e_songs, args.plumbing_songs, args.store_songs = 5000, 40, 3000, 2000
        args.snapshot_sizes, args.repeats = "10000", 1
    return args


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def sweep(args: argparse.Namespace, polls: str) -> list[tuple[int, int]]:
    """(torch threads, max_poll_records) pairs: every poll size at each thread count."""
    return [(t, p) for t in ints(args.torch_threads) for p in ints(polls)]


def part_raw(stack: Stack, args: argparse.Namespace, report: dict[str, Any]) -> None:
    start = CpuSample.take(stack.pids())
    rows = bench_raw_kafka(stack.settings, args.raw_messages, ints(args.poll_records), args.partitions)
    share = cpu_share(start, CpuSample.take(stack.pids()))
    report["raw_kafka"] = {"rows": rows, "cpu_pct": share}
    title = f"(a) raw Kafka, kafka-python vs embedded Tansu, {args.partitions} partitions"
    body = [[r["what"], r["messages"], r["seconds"], r["msg_per_s"]] for r in rows]
    print("\n" + table(title, ["what", "messages", "s", "msg/s"], body))
    print(f"    other processes used {share['other_pct']:.0f}% of the cores meanwhile")


def part_e2e(stack: Stack, root: Path, args: argparse.Namespace, report: dict[str, Any]) -> None:
    runs, gen_s = bench_e2e(stack, root, args, sweep(args, args.e2e_poll_records))
    report["e2e_logmel"] = {"wav_generation_s": gen_s, "runs": [asdict(r) for r in runs]}
    title = f"(b) end to end, logmel encoder, {args.e2e_songs} songs of {args.song_seconds:g} s at {args.wav_rate} Hz"
    print("\n" + run_table(title, runs))
    for mode in sorted({r.pipelined for r in runs}):
        best = max((r for r in runs if r.pipelined == mode), key=lambda r: r.songs_per_s)
        audio_s = best.scored * args.song_seconds / best.seconds
        name = "pipelined" if mode else "one batch at a time"
        print(f"    best, {name}: {best.songs_per_s:,.1f} songs/s = {audio_s:,.0f} audio-s/s")
    uris = [path.as_uri() for path in sorted((root / "wav").glob("*.wav"))]
    rows = bench_decode(uris, [p for p in args.decode_pools.split(",") if p], stack.pids())
    report["decode_bound"] = rows
    title = "(b') the decode bound: fetch + decode + resample + segment alone (no encoder, no stores)"
    body = [
        [
            r["pool"],
            r["songs"],
            r["seconds"],
            r["songs_per_s"],
            f"{r['cpu_pct']['own_pct']:.0f}/{r['cpu_pct']['other_pct']:.0f}",
        ]
        for r in rows
    ]
    print("\n" + table(title, ["pool", "songs", "s", "songs/s", "cpu% us/other"], body))


def part_plumbing(stack: Stack, root: Path, args: argparse.Namespace, report: dict[str, Any]) -> None:
    runs, fill_s = bench_plumbing(stack, root, args, sweep(args, args.poll_records))
    counted = [r for r in runs if not r.profile_top]
    by_config: dict[tuple[int, int, bool], list[float]] = {}
    for r in counted:
        by_config.setdefault((r.torch_threads, r.max_poll_records, r.pipelined), []).append(r.songs_per_s)
    medians = {k: statistics.median(v) for k, v in by_config.items()}
    best_config = max(medians, key=medians.__getitem__)
    best_median = medians[best_config]
    verdict = "PASS" if best_median >= PLUMBING_TARGET else "FAIL"
    top = max(counted, key=lambda r: r.songs_per_s)
    report["plumbing"] = {
        "store_fill_s": fill_s,
        "runs": [asdict(r) for r in runs],
        "target_songs_per_s": PLUMBING_TARGET,
        "median_songs_per_s_by_config": {
            f"threads={t} poll={p} pipelined={pl}": m for (t, p, pl), m in medians.items()
        },
        "best_config": {
            "torch_threads": best_config[0],
            "max_poll_records": best_config[1],
            "pipelined": best_config[2],
        },
        "best_config_median_songs_per_s": best_median,
        "best_single_run_songs_per_s": top.songs_per_s,
        "median_all_runs_songs_per_s": statistics.median(r.songs_per_s for r in counted),
        "verdict": verdict,
    }
    title = f"(c) plumbing ceiling, {args.plumbing_songs} songs: stored embeddings reused, fresh Redis prefix"
    print("\n" + run_table(title, runs))
    print(
        "    median songs/s by (threads, poll, pipelined): "
        + ", ".join(f"({t}, {p}, {'on' if pl else 'off'}) {m:,.0f}" for (t, p, pl), m in sorted(medians.items()))
    )
    print(
        f"    target >= {PLUMBING_TARGET:,.0f} songs/s: best configuration (threads {best_config[0]}, "
        f"max_poll_records {best_config[1]}, pipelined {best_config[2]}) median {best_median:,.0f} -> {verdict}; "
        f"best single run {top.songs_per_s:,.0f} (other processes {top.cpu_pct.get('other_pct', 0):.0f}%)"
    )
    for r in runs:
        if r.profile_top:
            print(f"\n    cProfile, max_poll_records={r.max_poll_records}: project code by cumulative time")
            print("    (the profiled span includes the group join and the idle tail)")
            print("\n".join("    " + line for line in r.profile_top[:40]))


def part_store(stack: Stack, root: Path, args: argparse.Namespace, report: dict[str, Any]) -> None:
    shapes = {"logmel": (4, 96, 192), "mert": (4, 768, 768)}
    start = CpuSample.take(stack.pids())
    rows = bench_store_path(stack.settings, root, args.store_songs, [64, 256], shapes)
    share = cpu_share(start, CpuSample.take(stack.pids()))
    snaps = bench_snapshot(root, ints(args.snapshot_sizes), 768)
    report["store_path"] = {"rows": rows, "cpu_pct": share}
    report["snapshot"] = snaps
    headers = ["records", "batch", "songs", "index.add", "redis", "both", "add p50 ms", "add max ms"]
    keys = [
        "shape",
        "batch",
        "songs",
        "index_add_songs_per_s",
        "redis_songs_per_s",
        "both_songs_per_s",
        "index_add_ms_p50",
        "index_add_ms_max",
    ]
    title = "(d) store path alone: EmbeddingIndex.add + RedisScoreStore.write_songs (songs/s)"
    print("\n" + table(title, headers, [[r[k] for k in keys] for r in rows]))
    print(f"    other processes used {share['other_pct']:.0f}% of the cores meanwhile")
    title = "    one FAISS snapshot (write + sha256 + fsync of the whole Flat index)"
    headers = ["dim", "vectors", "MiB", "s", "ms/song if every 1000 songs"]
    keys = ["dim", "vectors", "mib", "seconds", "ms_per_song_at_every_1000"]
    print("\n" + table(title, headers, [[r[k] for k in keys] for r in snaps]))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ranker.model.registry").setLevel(logging.ERROR)  # "untrained head" on every start
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)  # slow-task notes under CPU contention
    logging.getLogger("ranker.audio").setLevel(logging.ERROR)  # the file:// advice (benchmark WAVs are local)
    skip = set(args.skip.split(","))
    report: dict[str, Any] = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}}
    report["loadavg_before"] = loadavg()
    print(json.dumps(report["machine"]), "loadavg", report["loadavg_before"])
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="apexrank-bench-") as tmp:
        root = Path(tmp)
        with embedded_stack(root / "stack") as stack:
            if "raw" not in skip:
                part_raw(stack, args, report)
            if "e2e" not in skip:
                part_e2e(stack, root, args, report)
            if "plumbing" not in skip:
                part_plumbing(stack, root, args, report)
            if "store" not in skip:
                part_store(stack, root, args, report)
    report["total_s"] = time.perf_counter() - t_start
    report["loadavg_after"] = loadavg()
    print(f"\ntotal {report['total_s']:.0f} s; loadavg {report['loadavg_after']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


def run_table(title: str, runs: Sequence[RunResult]) -> str:
    rows = []
    for r in runs:
        st = r.stage_s
        rows.append(
            [
                "on" if r.pipelined else "off",
                r.torch_threads,
                f"{r.max_poll_records}{'*' if r.profile_top else ''}",
                r.scored,
                r.reused,
                r.dead,
                r.batches,
                r.seconds,
                r.songs_per_s,
                st.get("fetch_decode", 0.0),
                st.get("encode", 0.0),
                st.get("score", 0.0),
                st.get("index", 0.0),
                st.get("redis", 0.0),
                st.get("batch", 0.0),
                r.seconds - st.get("batch", 0.0),
                f"{r.cpu_pct.get('own_pct', 0):.0f}/{r.cpu_pct.get('stack_pct', 0):.0f}/"
                f"{r.cpu_pct.get('other_pct', 0):.0f}",
                r.songs_per_cpu_s,
            ]
        )
    headers = [
        "pipelined",
        "thr",
        "poll",
        "scored",
        "reused",
        "dead",
        "batches",
        "s",
        "songs/s",
        "fetch",
        "encode",
        "head",
        "index",
        "redis",
        "batch",
        "poll+commit",
        "cpu% us/stack/other",
        "songs/cpu-s",
    ]
    return table(title, headers, rows) + (
        "\n    stage columns: seconds summed over batches (worker's Prometheus histograms); "
        "'batch' = whole batch incl. publish;\n    cpu%: share of all cores used by this process, by Tansu + "
        "Redis and by other processes; songs/cpu-s: songs per CPU second of this process + Tansu + Redis;\n"
        "    *: run under cProfile (slower; not counted); pipelined runs time fetch+decode in pool threads, "
        "outside the 'fetch' column"
    )


if __name__ == "__main__":
    sys.exit(main())
