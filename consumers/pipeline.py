"""One batch of ``songs.generated`` through the stages: parse -> audio -> encoder -> APEX head -> stores.

Independent of the Kafka client (the worker in :mod:`consumers.worker` drives it; tests
and benchmarks call it directly). Per batch: parse and validate every event, reuse stored
embeddings, fetch and decode the rest in waves bounded by ``worker.max_batch_audio_bytes``,
encode all segments of a wave in batches that cross song boundaries, score, then write in
this order: embedding store (durable), FAISS index, Redis records and feeds. Every write is
an upsert keyed by song_id, so a replayed batch creates no second feed entry and no second
vector. Bad input never blocks a partition: it becomes a dead letter with an error code, or,
when its audio fetch failed transiently or the encoder ran out of device memory, a retry the
worker schedules (:mod:`consumers.retries`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np

from consumers import metrics
from consumers.loop import (
    Message,
    dead_letter,
)
from consumers.retries import RetryState, origin_of
from indexes.base import EmbeddingRecord, ScoreStore, SongRecord, StoredSong
from indexes.embedding_index import EmbeddingIndex
from ranker.audio import AudioHTTPClient, DecodedAudio, load_song, segment_waveform
from ranker.encoders import Encoder
from ranker.errors import ErrorCode, InputError
from ranker.events import TASKS, DeadLetter, SongGenerated, SongScored
from ranker.model.artifact import ScoringModel
from ranker.scoring import (
    SongMeta,
    SongScore,
    audio_extra,
    encode_songs,
    score_predictions,
)
from ranker.serving.writer import write_scored
from ranker.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
Retry = Callable[[str, Callable[[], Any]], Any]  # the worker's retry of infrastructure errors


@dataclass
class BatchResult:
    scored: list[SongScored] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    #: Fetches that failed transiently (``InputError.transient``): the worker retries them later.
    transient: list[tuple[Message, InputError]] = field(default_factory=list)
    reused: int = 0
    tombstoned: int = 0  # events of songs taken down: no-ops
    expired: int = 0  # events of songs past the retention window: no-ops
    audio_waves: int = 0  # groups the batch's audio was decoded in (more than one: the byte cap split it)
    peak_audio_bytes: int = 0  # most decoded audio the batch held at once


@dataclass
class _Pending:
    """A song in flight through one batch."""

    msg: Message
    event: SongGenerated
    audio: DecodedAudio | None = None
    layers: np.ndarray | None = None
    vector: np.ndarray | None = None  # the index vector of a song encoded in this batch
    n_segments: int = 0
    n_frames: int = 0
    score: SongScore | None = None  # set when this batch's model scored it
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
        self.http = AudioHTTPClient()  # one connection pool for every fetch thread
        self._seen: tuple[str, frozenset[str] | None] = ("", None)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.http.close()

    def _seen_generators(self) -> frozenset[str] | None:
        """The generators the model's training songs came from (its card's), None where it does not say."""
        version, seen = self._seen
        if version != self.model.version:
            listed = (self.model.card.training or {}).get("generators") if self.model.trained else None
            seen = frozenset(map(str, listed)) if isinstance(listed, list) else None
            self._seen = (self.model.version, seen)
        return seen

    # -- stage 1: parse ---------------------------------------------------------------
    def dead_letter(self, msg: Message, code: ErrorCode | str, message: str) -> DeadLetter:
        """The letter names the record the event first came as (a retry's original, not the retry)."""
        return dead_letter(origin_of(msg), code, message, self.settings.kafka.dead_letter_original_bytes)

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
            # The last event for a song in a batch wins (earlier ones are the same upsert), unless it is
            # a retry of an event older than the one already here.
            held = pending.pop(event.song_id, None)
            if held is not None and is_older(msg, held.msg):
                pending[event.song_id] = held
                continue
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
        Dead letters and transient failures go straight into ``result``.
        """
        cap = self.settings.worker.max_batch_audio_bytes
        worst = self.song_audio_bytes()
        fetch = functools.partial(load_song, client=self.http)
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
                    if isinstance(err, InputError) and err.transient:
                        result.transient.append((p.msg, err))
                        continue
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
    def encode(self, songs: list[_Pending], result: BatchResult) -> list[_Pending]:
        """Encode the wave's songs together (see :func:`ranker.scoring.encode_songs`), then free their audio.

        Returns the songs with layers; dead letters go into ``result``, and so does, as a transient
        failure the worker tries again later, a song the encoder had no device memory for (another
        wave's load, not the song, is the likely cause). A device fault raises
        :class:`~ranker.errors.DeviceFault` instead: no song gets a letter for a broken device.
        """
        need = [p for p in songs if p.layers is None]
        if not need:
            return songs
        seg_s = self.settings.audio.segment_s
        segments = []
        for p in need:
            assert p.audio is not None
            segments.append(segment_waveform(p.audio.waveform, p.audio.sample_rate, seg_s))
        with metrics.STAGE_SECONDS.labels("encode").time():
            encoded = encode_songs(self.encoder, segments)
        del segments
        ok = [p for p in songs if p.layers is not None]
        failed: list[DeadLetter] = []
        non_finite: list[DeadLetter] = []
        for p, e in zip(need, encoded, strict=True):
            _drop_waveform(p)
            if e.layers is not None:
                p.layers, p.vector, p.n_segments, p.n_frames = e.layers, e.vector, e.n_segments, e.n_frames
                ok.append(p)
                continue
            if e.out_of_memory:
                log.warning("encoder out of device memory on song %s; it will be tried again", p.event.song_id)
                reason = f"the encoder ran out of device memory ({type(e.exception).__name__})"
                result.transient.append((p.msg, InputError(ErrorCode.DEVICE_OUT_OF_MEMORY, reason, transient=True)))
                continue
            letter = self.dead_letter(p.msg, ErrorCode.INTERNAL_ERROR, str(e.error))
            if e.exception is not None:  # the encoder raised on this song alone
                log.error("encoder failed on song %s", p.event.song_id, exc_info=e.exception)
                failed.append(letter)
            else:  # its features are not finite: it cannot be scored
                non_finite.append(letter)
        result.dead.extend(failed + non_finite)
        return ok

    # -- stage 4: score ---------------------------------------------------------------
    def score(self, songs: list[_Pending]) -> tuple[list[tuple[_Pending, SongScored]], list[DeadLetter]]:
        """Run the head; a replayed song already stored under this model keeps its record as is.

        A song the head gives a NaN or infinite output is dead-lettered: it cannot be stored or
        published, and retrying the batch would only meet it again.
        """
        if not songs:
            return [], []
        out: list[tuple[_Pending, SongScored]] = []
        fresh: list[_Pending] = []
        reused = [p for p in songs if p.reused]
        records = self.store.read_songs([p.event.song_id for p in reused]) if reused else []
        stored = {id(p): rec for p, rec in zip(reused, records, strict=True)}  # one round trip for all
        for p in songs:
            previous = self._previous(p, stored[id(p)]) if p.reused else None
            if previous is not None:
                p.unchanged = True
                out.append((p, previous))
            else:
                fresh.append(p)
        if not fresh:
            return out, []
        layers = np.stack([p.layers for p in fresh if p.layers is not None]).astype(np.float32)
        with metrics.STAGE_SECONDS.labels("score").time():
            pred = self.model.predict_full(layers)  # with the ensemble's spread and the OOD percentile, if any
        finite = np.isfinite(pred.mean).all(axis=1)
        dead: list[DeadLetter] = []
        if not finite.all():
            reason = "the model gave non-finite scores"
            for i in np.flatnonzero(~finite).tolist():
                dead.append(self.dead_letter(fresh[i].msg, ErrorCode.INTERNAL_ERROR, reason))
            fresh = [fresh[i] for i in np.flatnonzero(finite).tolist()]
            pred = pred.take(np.flatnonzero(finite))
        now = datetime.now(UTC)
        metas = [SongMeta(p.event.song_id, p.event.generator, p.event.created_at.isoformat()) for p in fresh]
        seen = self._seen_generators()
        for p, score in zip(fresh, score_predictions(self.settings, self.model, pred, metas), strict=True):
            p.score = score
            known = None if seen is None else score.generator in seen
            metrics.observe_scored(score.generator, score.scores.get("likes"), score.ood_percentile, known)
            out.append((p, score.event(now, truncated=p.audio is not None and bool(p.audio.truncated))))
        return out, dead

    def _previous(self, p: _Pending, rec: StoredSong | None) -> SongScored | None:
        """The stored record of a replayed song, when it was scored by this very model."""
        if rec is None or rec.model_version != self.model.version:
            return None
        if rec.rank_score is None or rec.scored_at is None or any(t not in rec.scores for t in TASKS):
            return None  # a partial or foreign record: rewrite it
        try:
            return SongScored(
                song_id=p.event.song_id,
                model_version=rec.model_version,
                rank_score=rec.rank_score,
                scored_at=datetime.fromisoformat(rec.scored_at),
                generator=rec.generator,
                truncated=rec.truncated,
                **{t: rec.scores[t] for t in TASKS},
            )
        except ValueError:
            return None

    # -- stage 5: write ---------------------------------------------------------------
    def write(self, scored: list[tuple[_Pending, SongScored]]) -> None:
        """Idempotent writes: embedding store + index, then Redis. Safe to repeat."""
        records = []
        for p, _ in scored:
            if p.reused:
                continue  # already in the store; the index reconciles from it on start
            assert p.layers is not None and p.vector is not None
            records.append(
                EmbeddingRecord(
                    song_id=p.event.song_id,
                    encoder_id=self.encoder.encoder_id,
                    layers=p.layers,
                    vector=p.vector,
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
                write_scored(self.store, self.settings, songs)

    def drop_gone(self, songs: list[_Pending], result: BatchResult) -> list[_Pending]:
        """A replayed event of a song taken down (a tombstone) or past the retention window is a
        no-op: scoring it would put its vector back in the store and the index."""
        if not songs:
            return songs
        gone = self.store.gone([p.event.song_id for p in songs])  # one round trip for both
        if not gone.deleted and not gone.expired:
            return songs
        result.tombstoned, result.expired = len(gone.deleted), len(gone.expired)
        metrics.SONGS_TOMBSTONED.inc(len(gone.deleted))
        return [p for p in songs if p.event.song_id not in gone]

    def process(self, messages: Sequence[Message]) -> tuple[BatchResult, Callable[[], None]]:
        """Everything but the writes; returns the result and a closure that performs the writes."""
        result = BatchResult()
        songs, dead = self.parse(messages)
        result.dead.extend(dead)
        songs = self.drop_gone(songs, result)
        todo = self.reuse_stored(songs)
        encoded = [p for p in songs if p.reused]
        waves = self.decoded_waves(todo, result)
        while True:
            with metrics.STAGE_SECONDS.labels("fetch_decode").time():
                wave = next(waves, None)
            if wave is None:
                break
            encoded.extend(self.encode(wave, result))
        order = {id(p): i for i, p in enumerate(songs)}
        return result, self._scored(sorted(encoded, key=lambda p: order[id(p)]), result)

    def finish(self, songs: list[_Pending], result: BatchResult, retry: Retry) -> Callable[[], None]:
        """The pipelined worker's group (:mod:`consumers.worker_stages`): songs already decoded or
        reused are checked for takedowns again (one may have come while they were in flight),
        encoded and scored into ``result``; returns the closure that performs the writes.

        ``retry`` repeats the store reads on infrastructure errors; the encoder runs once.
        """
        kept = retry("process", lambda: self.drop_gone(songs, result))
        ok = self.encode(kept, result)
        return retry("process", lambda: self._scored(ok, result))

    def _scored(self, encoded: list[_Pending], result: BatchResult) -> Callable[[], None]:
        scored, dead = self.score(encoded)
        result.dead.extend(dead)
        result.scored = [s for _, s in scored]
        result.reused = sum(1 for p, _ in scored if p.reused)
        return lambda: self.write(scored)


def is_older(msg: Message, than: Message) -> bool:
    """``msg`` carries an event published before ``than``'s: a retry record counts as the
    ``songs.generated`` record it first came as, so a retry that comes due after the song was
    republished never replaces the newer event. Records of different partitions are not ordered."""
    a, b = RetryState.of(msg).origin, RetryState.of(than).origin
    return a[:2] == b[:2] and a[2] < b[2]


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
    """The score-store record of a song this batch scored, with what its event and audio say of it."""
    assert p.score is not None
    extra = audio_extra(p.n_segments, p.audio, p.event.title, p.event.tags)
    return p.score.record(s.scored_at.isoformat(), extra)


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
