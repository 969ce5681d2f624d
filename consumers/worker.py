"""The scoring worker: ``songs.generated`` -> audio -> encoder -> APEX head -> Redis + FAISS.

Delivery is at-least-once with idempotent writes. For each polled batch the
worker parses, fetches and decodes every song, encodes all their segments in
batches that cross song boundaries, scores them, then writes in this order:
embedding store (durable), FAISS index, Redis records and feed, ``songs.scored``
and dead letters (flushed), and only then commits the offsets. A crash at any
point replays the batch; every write is an upsert keyed by song_id, so a replay
creates no second feed entry and no second vector. Songs whose embedding is
already stored under the same encoder are not decoded again.

Bad input never blocks a partition: it goes to the dead-letter topic with an
error code. Infrastructure failures (Redis, Kafka, disk) are retried with
backoff and nothing is committed until the batch's writes have landed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
import signal
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import numpy as np
import redis.exceptions
from kafka.errors import CommitFailedError, KafkaError

from consumers import metrics
from consumers.kafka_io import Publisher, all_topics, ensure_topics, log_size_limits, make_consumer, publish_outputs
from indexes import open_score_store
from indexes.base import EmbeddingRecord, ScoreStore, SongRecord
from indexes.embedding_index import EmbeddingIndex
from ranker import feeds
from ranker.audio import AudioHTTPClient, DecodedAudio, check_file_policy, load_song, segment_waveform
from ranker.encoders import Encoder, build_encoder, pool_song
from ranker.errors import ConfigError, ErrorCode, InputError
from ranker.events import DEFAULT_DEAD_LETTER_ORIGINAL_BYTES, TASKS, DeadLetter, SongGenerated, SongScored
from ranker.model.artifact import ScoringModel, load_or_init, resolve_model_dir
from ranker.settings import Settings, WorkerSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Errors that mean "a dependency is down", never "this input is bad": retried, not dead-lettered.
INFRA_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    KafkaError,
    sqlite3.OperationalError,
    OSError,
)


class Stopping(Exception):
    """Raised inside a retry loop when shutdown was requested: leave the batch uncommitted."""


@dataclass
class Message:
    """The parts of a Kafka record the worker needs (decoupled from the client library)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def dead_letter(
    msg: Message,
    code: ErrorCode | str,
    message: str,
    max_original_bytes: int = DEFAULT_DEAD_LETTER_ORIGINAL_BYTES,
) -> DeadLetter:
    """The dead letter for ``msg`` (the worker's and the feedback consumer's), its original bounded."""
    return DeadLetter.build(
        msg.value,
        key=msg.key,
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        code=code,
        message=message,
        max_original_bytes=max_original_bytes,
    )


@dataclass
class BatchResult:
    scored: list[SongScored] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    reused: int = 0
    audio_waves: int = 0  # groups the batch's audio was decoded in (more than one: the byte cap split it)
    peak_audio_bytes: int = 0  # most decoded audio the batch held at once


@dataclass
class WorkerStats:
    batches: int = 0
    messages: int = 0
    scored: int = 0
    dead_letters: int = 0
    reused_embeddings: int = 0
    dead_by_code: dict[str, int] = field(default_factory=dict)


@dataclass
class _Pending:
    """A song in flight through one batch."""

    msg: Message
    event: SongGenerated
    audio: DecodedAudio | None = None
    layers: np.ndarray | None = None
    n_segments: int = 0
    n_frames: int = 0
    reused: bool = False
    unchanged: bool = False  # already in Redis under the same model version: nothing to write


class ScoringPipeline:
    """Turns a batch of messages into embeddings, scores and dead letters, and writes them.

    Independent of the Kafka client so that benchmarks and tests can drive it directly.
    """

    def __init__(
        self,
        settings: Settings,
        encoder: Encoder,
        model: ScoringModel,
        index: EmbeddingIndex,
        store: ScoreStore,
    ) -> None:
        self.settings = settings
        self.encoder = encoder
        self.model = model
        self.index = index
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=settings.worker.fetch_threads, thread_name_prefix="fetch")
        self._http = AudioHTTPClient()  # one connection pool for every fetch thread

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()

    # -- stage 1: parse ---------------------------------------------------------------
    def dead_letter(self, msg: Message, code: ErrorCode | str, message: str) -> DeadLetter:
        return dead_letter(msg, code, message, self.settings.kafka.dead_letter_original_bytes)

    def parse(self, messages: Sequence[Message]) -> tuple[list[_Pending], list[DeadLetter]]:
        pending: dict[str, _Pending] = {}
        dead: list[DeadLetter] = []
        w = self.settings.worker
        now = datetime.now(UTC)
        for msg in messages:
            try:
                event = SongGenerated.parse(msg.value)  # type: ignore[arg-type]
                event.check_created_at(now, w.created_at_max_skew_s, w.created_at_min)
                _check_key(msg.key, event.song_id)
            except InputError as exc:
                dead.append(self.dead_letter(msg, exc.code, exc.message))
                continue
            # The last event for a song in a batch wins; earlier ones are the same upsert.
            pending.pop(event.song_id, None)
            pending[event.song_id] = _Pending(msg, event)
        return list(pending.values()), dead

    # -- stage 2: audio ---------------------------------------------------------------
    def reuse_stored(self, songs: list[_Pending]) -> list[_Pending]:
        """Take stored embeddings of songs seen before under this encoder; return the songs to decode."""
        stored = self.index.store.get_many([p.event.song_id for p in songs])
        todo: list[_Pending] = []
        for p in songs:
            hit = stored.get(p.event.song_id)
            if hit is not None and hit.record.encoder_id == self.encoder.encoder_id:
                p.layers = hit.record.layers
                p.n_segments = hit.record.n_segments
                p.n_frames = hit.record.n_frames
                p.reused = True
            else:
                todo.append(p)
        return todo

    def song_audio_bytes(self) -> int:
        """The most decoded audio one song can hold: ``max_duration_s`` of float32 at the encoder's rate."""
        a = self.settings.audio
        return (math.ceil(a.max_duration_s * a.sample_rate) + 1024) * 4

    def decoded_waves(self, todo: list[_Pending], result: BatchResult) -> Iterator[list[_Pending]]:
        """Fetch and decode ``todo`` in parallel, in waves that hold at most ``max_batch_audio_bytes``.

        A song is started only while the audio already decoded plus the worst case of every
        song in flight fits under the cap; when nothing more fits, the wave decoded so far is
        handed to the encoder (which drops the waveforms) before the next one starts. One song
        always fits an empty wave, so a cap below one song's worst case still makes progress.
        Dead letters go straight into ``result``.
        """
        cap = self.settings.worker.max_batch_audio_bytes
        worst = self.song_audio_bytes()
        fetch = functools.partial(load_song, client=self._http)
        audio_settings = self.settings.audio
        queue = deque(enumerate(todo))
        inflight: dict[Future[tuple[DecodedAudio | None, BaseException | None]], tuple[int, _Pending]] = {}
        held: list[tuple[int, _Pending]] = []
        held_bytes = 0
        while queue or inflight:
            while queue and ((not held and not inflight) or held_bytes + worst * (len(inflight) + 1) <= cap):
                i, p = queue.popleft()
                inflight[self._pool.submit(_try, fetch, p.event.audio_uri, audio_settings)] = (i, p)
            if inflight:
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in done:
                    i, p = inflight.pop(fut)
                    audio, err = fut.result()
                    if err is not None:
                        result.dead.append(self.dead_letter(p.msg, *_error_parts(err)))
                        continue
                    assert audio is not None
                    p.audio = audio
                    held.append((i, p))
                    held_bytes += audio.waveform.nbytes
                result.peak_audio_bytes = max(result.peak_audio_bytes, held_bytes)
                continue
            yield [p for _, p in sorted(held, key=lambda ip: ip[0])]  # nothing more fits: encode these
            result.audio_waves += 1
            held, held_bytes = [], 0
        if held:
            yield [p for _, p in sorted(held, key=lambda ip: ip[0])]
            result.audio_waves += 1

    # -- stage 3: encode --------------------------------------------------------------
    def encode(self, songs: list[_Pending]) -> tuple[list[_Pending], list[DeadLetter]]:
        """Encode every segment of every song together, then pool per song over real frames."""
        need = [p for p in songs if p.layers is None]
        if not need:
            return songs, []
        seg_size = self.settings.audio.segment_s
        segments: list[np.ndarray] = []
        owners: list[int] = []
        for i, p in enumerate(need):
            assert p.audio is not None
            segs = segment_waveform(p.audio.waveform, p.audio.sample_rate, seg_size)
            segments.extend(segs)
            owners.extend([i] * len(segs))
        try:
            with metrics.STAGE_SECONDS.labels("encode").time():
                feats, frames = self.encoder.encode(segments)
        except Exception:  # isolate the poison song: encode one song at a time
            log.exception("batch encode failed; retrying song by song")
            return self._encode_one_by_one(songs, need)
        owner_arr = np.asarray(owners)
        for i, p in enumerate(need):
            sel = owner_arr == i
            p.layers = pool_song(feats[sel], frames[sel])
            p.n_segments = int(sel.sum())
            p.n_frames = int(frames[sel].sum())
            _drop_waveform(p)
        return self._finite_only(songs)

    def _finite_only(self, songs: list[_Pending]) -> tuple[list[_Pending], list[DeadLetter]]:
        """A song whose features are not finite cannot be scored: dead-letter it, keep the rest."""
        ok: list[_Pending] = []
        dead: list[DeadLetter] = []
        for p in songs:
            if p.layers is not None and np.isfinite(p.layers).all():
                ok.append(p)
            else:
                reason = "encoder produced non-finite features"
                dead.append(self.dead_letter(p.msg, ErrorCode.INTERNAL_ERROR, reason))
        return ok, dead

    def _encode_one_by_one(
        self, songs: list[_Pending], need: list[_Pending]
    ) -> tuple[list[_Pending], list[DeadLetter]]:
        ok: list[_Pending] = [p for p in songs if p.layers is not None]
        dead: list[DeadLetter] = []
        for p in need:
            assert p.audio is not None
            try:
                segs = segment_waveform(p.audio.waveform, p.audio.sample_rate, self.settings.audio.segment_s)
                feats, frames = self.encoder.encode(segs)
                p.layers = pool_song(feats, frames)
                p.n_segments, p.n_frames = len(segs), int(frames.sum())
                ok.append(p)
            except Exception as exc:
                log.exception("encoder failed on song %s", p.event.song_id)
                dead.append(self.dead_letter(p.msg, ErrorCode.INTERNAL_ERROR, f"encoder failed: {type(exc).__name__}"))
            _drop_waveform(p)
        finite, bad = self._finite_only(ok)
        return finite, dead + bad

    # -- stage 4: score ---------------------------------------------------------------
    def score(self, songs: list[_Pending]) -> list[tuple[_Pending, SongScored]]:
        """Run the head; a replayed song already stored under this model keeps its record as is."""
        if not songs:
            return []
        out: list[tuple[_Pending, SongScored]] = []
        fresh: list[_Pending] = []
        reused = [p for p in songs if p.reused]
        records = self.store.get_songs([p.event.song_id for p in reused]) if reused else []
        stored = {id(p): rec for p, rec in zip(reused, records, strict=True)}  # one round trip for all
        for p in songs:
            previous = self._previous(p, stored[id(p)]) if p.reused else None
            if previous is not None:
                p.unchanged = True
                out.append((p, previous))
            else:
                fresh.append(p)
        if not fresh:
            return out
        layers = np.stack([p.layers for p in fresh if p.layers is not None]).astype(np.float32)
        with metrics.STAGE_SECONDS.labels("score").time():
            preds = self.model.predict(layers)
        now = datetime.now(UTC)
        transform = self.model.target_transform
        for p, row in zip(fresh, preds, strict=True):
            scores = {task: float(v) for task, v in zip(self.model.tasks, row, strict=True)}
            for task in TASKS:  # a popularity-only head leaves aesthetics at the scale's midpoint
                scores.setdefault(task, 3.0)
            out.append(
                (
                    p,
                    SongScored(
                        song_id=p.event.song_id,
                        model_version=self.model.version,
                        rank_score=feeds.cold_start_quality(
                            self.settings,
                            scores,
                            feeds.model_like_rate(transform, scores, p.event.generator, p.event.created_at.isoformat()),
                        ),
                        scored_at=now,
                        generator=p.event.generator,
                        truncated=bool(p.audio.truncated) if p.audio is not None else False,
                        **scores,
                    ),
                )
            )
        return out

    def _previous(self, p: _Pending, rec: dict[str, str] | None) -> SongScored | None:
        """The stored record of a replayed song, when it was scored by this very model."""
        if not rec or rec.get("model_version") != self.model.version:
            return None
        try:
            return SongScored(
                song_id=p.event.song_id,
                model_version=rec["model_version"],
                rank_score=float(rec["rank_score"]),
                scored_at=datetime.fromisoformat(rec["scored_at"]),
                generator=rec.get("generator"),
                truncated=rec.get("truncated", "0") in ("1", "true", "True"),
                **{t: float(rec[f"score.{t}"]) for t in TASKS},
            )
        except (KeyError, ValueError):
            return None  # a partial or foreign record: rewrite it

    # -- stage 5: write ---------------------------------------------------------------
    def write(self, scored: list[tuple[_Pending, SongScored]]) -> None:
        """Idempotent writes: embedding store + index, then Redis. Safe to repeat."""
        records = []
        for p, _ in scored:
            if p.reused:
                continue  # already in the store; the index reconciles from it on start
            assert p.layers is not None
            vec = self.encoder.song_vector(p.layers).astype(np.float32)
            vec /= max(float(np.linalg.norm(vec)), 1e-12)
            records.append(
                EmbeddingRecord(
                    song_id=p.event.song_id,
                    encoder_id=self.encoder.encoder_id,
                    layers=p.layers,
                    vector=vec,
                    n_segments=p.n_segments,
                    n_frames=p.n_frames,
                )
            )
        if records:
            with metrics.STAGE_SECONDS.labels("index").time():
                self.index.add(records)
        songs = [_song_record(p, s) for p, s in scored if not p.unchanged]
        if songs:
            with metrics.STAGE_SECONDS.labels("redis").time():
                # Song hashes plus an entry in every configured feed whose filters each song passes.
                feeds.write_scored(self.store, self.settings, feeds.with_prior(songs, self.model.target_transform))

    def process(self, messages: Sequence[Message]) -> tuple[BatchResult, Callable[[], None]]:
        """Everything but the writes; returns the result and a closure that performs the writes."""
        result = BatchResult()
        songs, dead = self.parse(messages)
        result.dead.extend(dead)
        todo = self.reuse_stored(songs)
        encoded = [p for p in songs if p.reused]
        waves = self.decoded_waves(todo, result)
        while True:
            with metrics.STAGE_SECONDS.labels("fetch_decode").time():
                wave = next(waves, None)
            if wave is None:
                break
            ok, dead = self.encode(wave)
            encoded.extend(ok)
            result.dead.extend(dead)
        order = {id(p): i for i, p in enumerate(songs)}
        scored = self.score(sorted(encoded, key=lambda p: order[id(p)]))
        result.scored = [s for _, s in scored]
        result.reused = sum(1 for p, _ in scored if p.reused)
        return result, lambda: self.write(scored)


def _drop_waveform(p: _Pending) -> None:
    """The encoder is done with the song's samples: release them (the wave's byte budget assumes it)."""
    if p.audio is not None:
        p.audio = dataclasses.replace(p.audio, waveform=np.empty(0, dtype=np.float32))


def _check_key(key: bytes | None, song_id: str) -> None:
    """``songs.generated`` is keyed by song_id so that one song's events keep their order on one partition.

    A message without a key is accepted (a producer that sets none loses only that ordering);
    a key naming another song is refused: it would race that song's own events.
    """
    if key is not None and key != song_id.encode():
        shown = key[:64].decode("utf-8", errors="backslashreplace")
        raise InputError(ErrorCode.KEY_MISMATCH, f"message key {shown!r} is not the event's song_id {song_id!r}")


def _song_record(p: _Pending, s: SongScored) -> SongRecord:
    extra: dict[str, Any] = {"n_segments": p.n_segments}
    if p.audio is not None:
        extra["duration_s"] = round(p.audio.duration_s, 3)
        extra["truncated"] = int(p.audio.truncated)
        if p.audio.truncated:
            extra["scored_duration_s"] = round(p.audio.scored_duration_s, 3)
    if p.event.title:
        extra["title"] = p.event.title
    if p.event.tags:
        extra["tags"] = ",".join(p.event.tags)
    return SongRecord(
        song_id=s.song_id,
        model_version=s.model_version,
        scores={t: getattr(s, t) for t in TASKS},
        rank_score=s.rank_score,
        generator=p.event.generator,
        created_at=p.event.created_at.isoformat(),
        scored_at=s.scored_at.isoformat(),
        extra=extra,
    )


def _model_dir(settings: Settings) -> Path | None:
    try:
        return resolve_model_dir(settings.head_dir)
    except ConfigError:
        return None


def _offset_ranges(messages: Sequence[Message]) -> dict[str, list[int]]:
    """``{"topic/partition": [first, last]}`` for structured logs."""
    out: dict[str, list[int]] = {}
    for m in messages:
        key = f"{m.topic}/{m.partition}"
        lo, hi = out.get(key, [m.offset, m.offset])
        out[key] = [min(lo, m.offset), max(hi, m.offset)]
    return out


def update_lag(consumer: Any) -> None:
    """Consumer lag per partition from the high watermark the broker reports in fetch responses."""
    for tp in consumer.assignment():
        high = consumer.highwater(tp)
        if high is None:
            continue
        try:
            position = consumer.position(tp, timeout_ms=100)
        except Exception:  # the position is unknown until the first fetch
            continue
        if position is not None:
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, high - position))


def retry_infra(what: str, fn: Callable[[], T], *, stop: threading.Event, settings: WorkerSettings) -> T:
    """Retry infrastructure failures with exponential backoff until they pass or ``stop`` is set.

    Raises :class:`Stopping` when shutdown is requested mid-retry, so the caller leaves the
    batch uncommitted (it will be redelivered) instead of committing what was not written.
    """
    delay = settings.retry_initial_s
    while True:
        try:
            return fn()
        except INFRA_ERRORS as exc:
            metrics.RETRIES.labels(what).inc()
            log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(exc).__name__, exc, delay)
            if stop.wait(delay):
                raise Stopping(what) from exc
            delay = min(delay * 2, settings.retry_max_s)


def commit(consumer: Any) -> None:
    """Commit the consumed positions; a commit refused after a rebalance is not retried.

    The partitions now belong to another member, which resumes from the last commit and
    replays the batch: harmless, since every write is idempotent.
    """
    try:
        consumer.commit()
    except CommitFailedError as exc:
        log.warning("commit refused after a rebalance (%s); the batch will be replayed by the new owner", exc)


def _try(fn: Callable[..., T], *args: Any) -> tuple[T | None, BaseException | None]:
    try:
        return fn(*args), None
    except Exception as exc:
        return None, exc


def _error_parts(exc: BaseException) -> tuple[ErrorCode, str]:
    if isinstance(exc, InputError):
        return exc.code, exc.message
    # No repr of objects: heap addresses say nothing to whoever reads the dead letter.
    return ErrorCode.INTERNAL_ERROR, _HEAP_ADDRESS.sub("0x...", f"unexpected {type(exc).__name__}: {exc}")


_HEAP_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")


class Worker:
    """The Kafka loop around :class:`ScoringPipeline`: poll, process, write, produce, commit."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = WorkerStats()
        self.assignment: frozenset[Any] = frozenset()  # partitions owned after the last poll
        self._stop = threading.Event()
        # Refuse what cannot be run safely before loading anything: file:// with no root outside development.
        check_file_policy(settings.audio, settings.dev_mode)
        # Build the encoder first: missing weights must stop the worker before it joins a group.
        self.encoder = build_encoder(settings)
        self.model = self._load_model()
        self._model_dir = _model_dir(settings)
        self._next_model_check = time.monotonic() + settings.worker.model_check_s
        self.index = EmbeddingIndex(
            settings.index_dir,
            dim=self.encoder.vector_dim,
            factory=settings.index.factory,
            use_gpu=settings.index.use_gpu,
            snapshot_every_songs=settings.index.snapshot_every_songs,
            snapshot_every_s=settings.index.snapshot_every_s,
        )
        self.store = open_score_store(
            settings.redis.url.get_secret_value(),
            key_prefix=settings.redis.key_prefix,
            socket_timeout_s=settings.redis.socket_timeout_s,
        )
        self.pipeline = ScoringPipeline(settings, self.encoder, self.model, self.index, self.store)
        metrics.MODEL_INFO.info({"model_version": self.model.version, "encoder": self.encoder.encoder_id})
        log.info(
            "worker ready: encoder=%s model=%s index=%d vectors",
            self.encoder.encoder_id,
            self.model.version,
            len(self.index),
        )

    def _load_model(self) -> ScoringModel:
        s = self.settings
        return load_or_init(
            s.head_dir,
            input_dim=self.encoder.dim,
            encoder_id=self.encoder.encoder_id,
            seed=s.model.seed,
            n_layers=self.encoder.n_layers,
            layers=s.model.layers if s.encoder == "mert" else None,
            device=s.model.device,
        )

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def maybe_reload_model(self, force: bool = False) -> bool:
        """Switch to a newly promoted head between batches (``models/current`` moved)."""
        now = time.monotonic()
        if not force and now < self._next_model_check:
            return False
        self._next_model_check = now + self.settings.worker.model_check_s
        directory = _model_dir(self.settings)
        if directory is None or directory == self._model_dir:
            return False
        try:
            model = self._load_model()
        except ConfigError as exc:
            log.error("not switching to %s: %s", directory, exc)
            return False
        log.info("switching model %s -> %s", self.model.version, model.version)
        self.model = self.pipeline.model = model
        self._model_dir = directory
        metrics.MODEL_INFO.info({"model_version": model.version, "encoder": self.encoder.encoder_id})
        return True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: finishing the batch in hand, then exiting", signum)
        self._stop.set()

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        return retry_infra(what, fn, stop=self._stop, settings=self.settings.worker)

    def run(self, until_idle_s: float | None = None) -> WorkerStats:
        """Consume until stopped (or until ``until_idle_s`` seconds pass with no message)."""
        s = self.settings
        topics = s.kafka.topics
        if s.kafka.auto_create_topics:
            self._retry("create topics", lambda: ensure_topics(s.kafka, all_topics(s.kafka)))
        self._retry("read size limits", lambda: log_size_limits(s.kafka, [topics.songs_scored, topics.dead_letter]))
        consumer = self._retry(
            "connect consumer",
            lambda: make_consumer(
                s.kafka, s.kafka.worker_group_id, [topics.songs_generated], s.worker.max_poll_records
            ),
        )
        producer = Publisher(s.kafka)
        last_message = time.monotonic()
        try:
            while not self._stop.is_set():
                polled = consumer.poll(timeout_ms=s.worker.poll_timeout_ms, max_records=s.worker.max_poll_records)
                self.assignment = frozenset(consumer.assignment())
                self.maybe_reload_model()
                messages = [
                    Message(r.topic, r.partition, r.offset, r.key, r.value)
                    for tp in sorted(polled, key=lambda t: (t.topic, t.partition))
                    for r in polled[tp]
                ]
                if not messages:
                    self.index.maybe_snapshot()
                    if not consumer.assignment():
                        # Still joining the group: idleness counts only once partitions are ours.
                        last_message = time.monotonic()
                        continue
                    if until_idle_s is not None and time.monotonic() - last_message >= until_idle_s:
                        log.info("idle for %.1fs; exiting", until_idle_s)
                        break
                    continue
                last_message = time.monotonic()
                try:
                    self._handle(messages, producer)
                except Stopping:
                    log.warning("stopping with a batch uncommitted; it will be redelivered")
                    break
                try:
                    self._retry("commit offsets", lambda: commit(consumer))
                except Stopping:
                    break
                metrics.COMMITS.inc()
                update_lag(consumer)
        finally:
            self.close(consumer, producer)
        return self.stats

    def _handle(self, messages: list[Message], producer: Publisher) -> None:
        t0 = time.perf_counter()
        metrics.EVENTS_IN.inc(len(messages))
        metrics.BATCH_SIZE.observe(len(messages))
        # Processing only reads shared state (the embedding store, Redis), so it is safe to retry.
        result, write = self._retry("process", lambda: self.pipeline.process(messages))
        self._retry("write stores", write)
        topics = self.settings.kafka.topics

        records: list[tuple[str, bytes | None, bytes]] = [
            (topics.songs_scored, s.song_id.encode(), s.to_bytes()) for s in result.scored
        ]
        dropped = self._retry("publish", lambda: publish_outputs(producer, records, result.dead, topics.dead_letter))
        metrics.RECORDS_DROPPED.inc(dropped)
        st = self.stats
        st.batches += 1
        st.messages += len(messages)
        st.scored += len(result.scored)
        st.reused_embeddings += result.reused
        st.dead_letters += len(result.dead)
        metrics.SONGS_SCORED.inc(len(result.scored))
        for d in result.dead:
            st.dead_by_code[d.error_code] = st.dead_by_code.get(d.error_code, 0) + 1
            metrics.DEAD_LETTERS.labels(d.error_code).inc()
            log.info(
                "dead letter %s at %s/%d@%d: %s",
                d.error_code,
                d.source_topic,
                d.partition,
                d.offset,
                d.message,
                extra={
                    "song_id": d.key,
                    "topic": d.source_topic,
                    "partition": d.partition,
                    "offset": d.offset,
                    "error_code": d.error_code,
                },
            )
        elapsed = time.perf_counter() - t0
        log.info(
            "batch: %d messages, %d scored, %d dead letters in %.3fs",
            len(messages),
            len(result.scored),
            len(result.dead),
            elapsed,
            extra={
                "offsets": _offset_ranges(messages),
                "song_ids": [s.song_id for s in result.scored][:50],
            },
        )
        metrics.INDEX_SIZE.set(len(self.index))
        metrics.STAGE_SECONDS.labels("batch").observe(elapsed)
        metrics.observe_device_memory()

    def close(self, consumer: Any = None, producer: Publisher | None = None) -> None:
        self.pipeline.close()
        try:
            self.index.close()
        except OSError:
            log.exception("final index snapshot failed; the next start rebuilds from the embedding store")
        if producer is not None:
            producer.close()
        if consumer is not None:
            consumer.close(autocommit=False)
        self.store.close()
