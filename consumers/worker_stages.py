"""The pipelined worker's stages: decode in a pool, encode in groups, commit what is written.

The plain worker handles one polled batch at a time, so fetch/decode and the encoder never
overlap. Here a pool of threads fetches, decodes and resamples songs (soundfile, numpy and
torchaudio release the GIL; a process pool measured 6-7x slower, pickling every waveform
back: docs/benchmarks.md) while the worker's own thread encodes, scores and writes the songs already
decoded. Songs wait in a bounded set between poll and write (``worker.pipeline_songs``,
and never more than ``worker.max_batch_audio_bytes`` of worst-case audio); the encoder takes
a group as soon as ``worker.group_songs`` are ready or the oldest ready song has waited
``worker.group_deadline_ms``. Groups finish out of poll order, so offsets are committed per
partition only up to the lowest one still in flight (:class:`CommitTracker`).
"""

from __future__ import annotations

import functools
import logging
import queue
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kafka import TopicPartition
from kafka.errors import CommitFailedError
from kafka.structs import OffsetAndMetadata

from consumers.loop import Message
from consumers.pipeline import BatchResult, Retry, ScoringPipeline, _error_parts, _Pending, _try, is_older
from ranker.audio import DecodedAudio, load_song
from ranker.errors import InputError

log = logging.getLogger(__name__)
Partition = tuple[str, int]  # (topic, partition)


class CommitTracker:
    """Which offset each partition may commit when messages finish out of order.

    Every message handed to the stages is :meth:`add`-ed and later :meth:`done` (written,
    dead-lettered, or scheduled for retry). A partition's commit is its lowest offset still
    in flight, or one past the offset last read when none is: never past an unwritten song.
    An offset in flight twice (a seek back re-read it) counts twice. After a seek back (a lost
    commit: an emptied broker reads the partition again from its start) the offsets read before it
    no longer count: committing them would point past the end of the partition as it is now.
    The copies still in flight when their partition is revoked finish without counting, even
    once it is assigned back and the same offsets read again (:meth:`forget`).
    """

    def __init__(self) -> None:
        self._pending: dict[Partition, Counter[int]] = {}
        self._revoked: dict[Partition, Counter[int]] = {}  # copies in flight when their partition was forgotten
        self._next: dict[Partition, int] = {}  # one past the offset last added (polls read in order)
        self._committed: dict[Partition, int] = {}  # what was last committed, per partition

    def add(self, messages: Iterable[Message]) -> None:
        for m in messages:
            tp = (m.topic, m.partition)
            self._pending.setdefault(tp, Counter())[m.offset] += 1
            if m.offset < self._next.get(tp, 0):  # a seek back: what was committed may be lost, commit again
                self._committed.pop(tp, None)
            self._next[tp] = m.offset + 1

    def done(self, messages: Iterable[Message]) -> None:
        for m in messages:
            if _take_one(self._revoked, (m.topic, m.partition), m.offset):
                continue  # a copy from before a revocation: it must not finish one read since
            pending = self._pending.get((m.topic, m.partition))
            if pending is None or pending[m.offset] <= 0:
                continue  # not counted in flight: nothing to finish
            pending[m.offset] -= 1
            if pending[m.offset] == 0:
                del pending[m.offset]

    def in_flight(self) -> int:
        return sum(sum(c.values()) for c in self._pending.values())

    def committable(self) -> dict[Partition, int]:
        """The offset to commit per partition (Kafka's convention: the next one to read)."""
        return {tp: min(self._pending[tp]) if self._pending[tp] else nxt for tp, nxt in self._next.items()}

    def due(self) -> dict[Partition, int]:
        """:meth:`committable` where it differs from what was last committed (:meth:`committed`)."""
        return {tp: o for tp, o in self.committable().items() if self._committed.get(tp) != o}

    def committed(self, offsets: dict[Partition, int]) -> None:
        """These offsets were committed."""
        self._committed.update(offsets)

    def forget(self, keep: Iterable[Partition]) -> None:
        """Drop partitions not in ``keep`` (revoked: their new owner resumes from the last commit).

        Their copies in flight are set aside: when one finishes, it uses up its own count there,
        never that of the same offset read again after the partition came back. (Which copy of an
        offset finishes first cannot be told apart, so the commit may wait for both: never less.)
        """
        kept = set(keep)
        for tp in [tp for tp in self._next if tp not in kept]:
            left = self._pending.pop(tp, None)
            if left:
                self._revoked.setdefault(tp, Counter()).update(left)
            self._committed.pop(tp, None)
            del self._next[tp]


def _take_one(counts: dict[Partition, Counter[int]], tp: Partition, offset: int) -> bool:
    """Take one from ``counts[tp][offset]`` where there is one; say whether there was."""
    c = counts.get(tp)
    if c is None or c[offset] <= 0:
        return False
    c[offset] -= 1
    if c[offset] == 0:
        del c[offset]
        if not c:
            del counts[tp]
    return True


@dataclass
class Group:
    """Songs the encoder takes at once (decoded or reused), and the messages that finish with them."""

    messages: list[Message]
    result: BatchResult
    songs: list[_Pending]
    nbytes: int = 0  # their decoded audio, held until :meth:`StagedScoring.release`


@dataclass
class _Ready:
    """A song out of the pool (decoded, or failed) and when it got there."""

    song: _Pending
    at: float
    error: BaseException | None = None


@dataclass
class StagedScoring:
    """Admit polled messages, decode in the pool, hand the encoder full or overdue groups.

    Single consumer: only the worker's thread calls these methods; pool threads only put
    finished decodes on ``_done``.
    """

    pipeline: ScoringPipeline
    tracker: CommitTracker = field(default_factory=CommitTracker)
    #: The worker's retry of infrastructure errors, around the store reads at admission (tests: none).
    retry: Retry = field(default=lambda what, fn: fn())

    def __post_init__(self) -> None:
        w = self.pipeline.settings.worker
        self.group_songs = w.group_songs
        self.deadline_s = w.group_deadline_ms / 1000
        self.limit = w.pipeline_songs
        self._cap = w.max_batch_audio_bytes
        self._worst = self.pipeline.song_audio_bytes()
        self._pool = ThreadPoolExecutor(max_workers=w.fetch_threads, thread_name_prefix="decode")
        self._fetch = functools.partial(load_song, client=self.pipeline.http)
        self._done: queue.SimpleQueue[_Ready] = queue.SimpleQueue()
        self._ready: list[_Ready] = []
        self._waiting: deque[_Pending] = deque()  # admitted, not yet in the pool (the byte cap)
        self._decoding = 0
        self._held_bytes = 0  # decoded audio waiting for or in the encoder
        self._songs = 0  # admitted, not yet finished
        self._order: dict[int, int] = {}  # id(song) -> admission number: groups go in poll order
        self._admitted = 0
        self._latest: dict[str, _Pending] = {}  # song_id -> its newest admitted event
        self._early: list[Message] = []  # finished at admission (parse errors, events superseded in the poll)
        self._early_result = BatchResult()

    # -- admission ------------------------------------------------------------------
    def room(self) -> int:
        """How many more messages may be polled without passing the in-flight bound."""
        return max(0, self.limit - self._songs)

    @property
    def held_bytes(self) -> int:
        """Decoded audio waiting for the encoder or in it (groups not yet released)."""
        return self._held_bytes

    @property
    def busy(self) -> bool:
        return self._songs > 0 or bool(self._early)

    def admit(self, messages: Sequence[Message]) -> None:
        """Parse ``messages``; reused embeddings are ready at once, the rest go to the pool.

        A newer event of a song already in flight supersedes it: the older one finishes
        without writing (the newer is uncommitted until written, so nothing is lost). A retry
        of an event older than the one in flight finishes at once instead (:func:`is_older`).
        """
        self.tracker.add(messages)
        songs, dead = self.pipeline.parse(messages)
        self._early_result.dead.extend(dead)
        songs = [p for p in songs if not self._stale(p)]
        winners = {id(p.msg) for p in songs}
        self._early += [m for m in messages if id(m) not in winners]
        now = time.monotonic()
        for p in songs:
            self._latest[p.event.song_id] = p
            self._songs += 1
            self._order[id(p)] = self._admitted
            self._admitted += 1
        todo = self.retry("process", lambda: self.pipeline.reuse_stored(songs))
        stored = set(map(id, songs)) - set(map(id, todo))
        for p in songs:
            if id(p) in stored:
                self._ready.append(_Ready(p, now))
            else:
                self._waiting.append(p)
        self._submit()

    def _stale(self, p: _Pending) -> bool:
        """A retry of an event older than the song's event in flight: it must not replace that one."""
        held = self._latest.get(p.event.song_id)
        return held is not None and is_older(p.msg, held.msg)

    def _submit(self) -> None:
        """Start decodes while the audio held plus the worst case of every decode in flight fits
        ``max_batch_audio_bytes`` (as the one-batch path's waves do); one always starts when idle."""
        while self._waiting and (
            (not self._decoding and not self._held_bytes)
            or self._held_bytes + self._worst * (self._decoding + 1) <= self._cap
        ):
            p = self._waiting.popleft()
            self._decoding += 1
            fut = self._pool.submit(_try, self._fetch, p.event.audio_uri, self.pipeline.settings.audio)
            fut.add_done_callback(functools.partial(self._decoded, p))

    def _decoded(self, p: _Pending, fut: Future[tuple[DecodedAudio | None, BaseException | None]]) -> None:
        """In a pool thread: hand the decoded song (or its error) to the worker's thread."""
        audio, err = fut.result()
        p.audio = audio
        self._done.put(_Ready(p, time.monotonic(), err))

    # -- groups -----------------------------------------------------------------------
    def next_group(self, wait_s: float) -> Group | None:
        """The next group for the encoder, waiting at most ``wait_s`` for one to fill or fall due."""
        end = time.monotonic() + wait_s
        while True:
            self._drain()
            if self._due():
                return self._take()
            left = end - time.monotonic()
            if self._ready:
                left = min(left, self._oldest() + self.deadline_s - time.monotonic())
            if left <= 0 or self._decoding == 0:
                return None
            try:
                item = self._done.get(timeout=left)
            except queue.Empty:
                continue
            self._arrived(item)

    def _drain(self) -> None:
        while True:
            try:
                self._arrived(self._done.get_nowait())
            except queue.Empty:
                return

    def _arrived(self, item: _Ready) -> None:
        self._decoding -= 1
        self._held_bytes += _nbytes(item.song)
        self._ready.append(item)
        self._submit()

    def _due(self) -> bool:
        """A full group, an overdue song, or nothing left to wait for."""
        if not self._ready:
            return bool(self._early) and self._decoding == 0
        overdue = time.monotonic() - self._oldest() >= self.deadline_s
        # Nothing decoding: nothing more arrives (or starts: the byte cap) until a group is taken.
        return len(self._ready) >= self.group_songs or overdue or self._decoding == 0

    def _oldest(self) -> float:
        return min(r.at for r in self._ready)

    def _take(self) -> Group:
        """Take up to ``group_songs`` ready songs (and everything finished at admission) as a group.

        The earliest admitted go first: decodes finish out of order, and a partition's commit
        advances only past a contiguous run of finished offsets.
        """
        self._ready.sort(key=lambda r: self._order[id(r.song)])
        taken, self._ready = self._ready[: self.group_songs], self._ready[self.group_songs :]
        result, self._early_result = self._early_result, BatchResult()
        messages, self._early = self._early, []
        ok: list[_Pending] = []
        nbytes = 0
        for r in taken:
            p = r.song
            self._songs -= 1
            del self._order[id(p)]
            nbytes += _nbytes(p)
            messages.append(p.msg)
            if self._latest.get(p.event.song_id) is not p:
                continue  # superseded by a newer event of the song, still in flight
            del self._latest[p.event.song_id]
            if r.error is None:
                ok.append(p)
            elif isinstance(r.error, InputError) and r.error.transient:
                result.transient.append((p.msg, r.error))
            else:
                result.dead.append(self.pipeline.dead_letter(p.msg, *_error_parts(r.error)))
        return Group(messages, result, ok, nbytes)

    def release(self, group: Group) -> None:
        """The encoder is done with the group's audio: more decodes may start in its place."""
        self._held_bytes -= group.nbytes
        group.nbytes = 0
        self._submit()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def commit_offsets(consumer: Any, offsets: dict[Partition, int]) -> None:
    """Commit ``offsets`` of the partitions still assigned; a commit refused after a rebalance is
    not retried (the new owner replays from the last commit, and every write is idempotent)."""
    assigned = consumer.assignment()
    out = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
    out = {tp: o for tp, o in out.items() if tp in assigned}
    if not out:
        return
    try:
        consumer.commit(out)
    except CommitFailedError as exc:
        log.warning("commit refused after a rebalance (%s); the new owner replays from the last commit", exc)


def _nbytes(p: _Pending) -> int:
    return p.audio.waveform.nbytes if p.audio is not None else 0
