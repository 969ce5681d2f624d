"""The Redis layout of the score store and the engagement counters, in one place: keys, fields, parsing.

Keys (Redis Cluster ready: the braces are hash tags, so each key's slot depends only
on the song id or feed name, and a client can route it)::

    {prefix}:song:{<song_id>}   hash: one per song (fields below)
    {prefix}:feed:{<feed>}      sorted set: member song_id, score = the feed's stored score
    {prefix}:feedage:{<feed>}   sorted set: member song_id, score created_at (epoch s); only for
                                feeds with an age limit, so old songs can be trimmed
    {prefix}:calibration        hash: likes, expected (totals behind the like-rate calibration)
    {prefix}:changes            stream: the change log, one entry per write batch, appended after
                                the write: ``ids`` (comma-joined song ids whose hash or feed
                                entries changed) and ``feeds`` (comma-joined feeds replaced or
                                trimmed as a whole); entries older than ``changes_retention_s`` are trimmed.
                                The API's song tables follow it (:mod:`ranker.serving.table_sync`)
    {prefix}:evt:{<song_id>}:<event_id>
                                string: an engagement event's dedup key (value: the message
                                that counted it), in its song's slot
    {prefix}:gone:{<song_id>}   string: the song's tombstone (JSON: reason, deleted_at), in its
                                song's slot: the song was taken down, and writes and engagement
                                for it are no-ops (:mod:`indexes.redis_tombstones`)
    {prefix}:user:{<user>}      hash: a listener's taste (:data:`TASTE_FIELDS`), by the feedback
                                consumer (:mod:`indexes.redis_listeners`); <user> is :func:`user_tag`
    {prefix}:heard:{<user>}     sorted set: member song_id, score the event time (epoch s) of the
                                listener's latest play/like/skip..., capped and with a TTL
    {prefix}:uevt:{<user>}:<event_id>
                                string: the event's dedup key for the listener's taste and heard
                                set, in the user's slot
    {prefix}:arm:{<experiment>:<arm>}
                                hash: an A/B arm's engagement totals (:data:`ARM_FIELDS`) in one
                                experiment, by the feedback consumer (:mod:`indexes.redis_arms`);
                                <experiment> is :func:`experiment_tag`. No TTL: a new experiment
                                starts from zero, an old one's totals stay until deleted
    {prefix}:aevt:{<experiment>:<arm>}:<event_id>
                                string: the event's dedup key for its arm's totals, in the arm's slot
    {prefix}:examination        string (JSON): the examination weight of each page position
                                (position-aware evidence), written by ``apexrank retrain``

Fields of a song hash:

* written with the scores: ``song_id``, ``model_version``, ``rank_score``, ``generator``,
  ``created_at``, ``scored_at`` (:data:`RESERVED_FIELDS`), ``score.<task>`` per task (so a
  task name can never collide with a metadata field), and the record's extra fields under
  their own names (``tags``, ``duration_s``, ``truncated``, ``prior.like_rate``: the model's
  predicted like rate, ``untrained``: 1 when the head that scored the song was an untrained,
  seeded one, absent otherwise, ...): strings as-is, anything else JSON-encoded;
* the engagement counters ``eng.<counter>`` (:data:`ENGAGEMENT_COUNTERS`) and ``eng.updated``,
  written by the feedback consumer (the hash may exist before its scores do);
* ``eng.eplays``: examined plays, each play counted at its page position's examination weight
  (a float; position-aware evidence, docs/ranking.md). Absent on hashes counted before it existed:
  a read then takes the plays, and the first play counted after starts from them;
* ``cal.likes`` and ``cal.expected``: what of this song the calibration totals already count;
* ``expired_at``: when retention took the song off the hot path (:mod:`indexes.redis_retention`).
  Such a hash keeps only :data:`RETAINED_FIELDS` and the ``eng.*`` / ``cal.*`` fields: no
  scores, so it is no rankable song (no feed entry, no row in the API's table).

A write merges fields (HSET): a replay changes nothing, and fields written by other
components into the same hash survive. Only the model's optional fields
(:data:`MODEL_OPTIONAL_FIELDS`, and those under :data:`MODEL_OPTIONAL_PREFIXES`) that the new
record lacks are deleted, in the same step: a rescore under another model keeps none of the old
one's flags, uncertainty or prior.

Task names are data here (``indexes`` knows nothing of the model): a score field is any
``score.<name>``, and :func:`hydration_fields` takes the task names from its caller.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from string import Template

from indexes.base import SongRecord, StoredSong

# Song ids and feed names go inside a {hash tag}: a brace would end it early.
_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,256}$")
# An experiment's name shares its arms' hash tag with the arm's name, before a colon: so no colon in it.
_EXPERIMENT = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_PREFIX = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

# -- fields of a song hash ------------------------------------------------------------------------
SONG_ID = "song_id"
MODEL_VERSION = "model_version"
RANK_SCORE = "rank_score"
GENERATOR = "generator"
CREATED_AT = "created_at"  # RFC 3339
SCORED_AT = "scored_at"  # RFC 3339
RESERVED_FIELDS = frozenset({SONG_ID, MODEL_VERSION, RANK_SCORE, GENERATOR, CREATED_AT, SCORED_AT})
SCORE_FIELD_PREFIX = "score."
#: Extra fields the worker writes: the song's tags (comma-joined; a JSON list is read too), its length,
#: whether its audio was cut.
TAGS = "tags"
DURATION_S = "duration_s"
TRUNCATED = "truncated"
#: The model's predicted like rate (written when the model has a target transform; absent otherwise).
PRIOR_FIELD = "prior.like_rate"
#: 1 when an untrained (seeded) head scored the song (``model.allow_untrained``); absent otherwise.
UNTRAINED = "untrained"
#: Uncertainty (issue 17), written when the model has them, absent otherwise: the ensemble's spread
#: (standard deviation over its heads) of the predicted like rate, and of each task's score
#: (``spread.<task>``); the song's distance to the training distribution as a percentile of the
#: held-out training songs' (0-100), and 1 when it is above the model's OOD percentile.
PRIOR_SD_FIELD = "prior.like_rate_sd"
SPREAD_FIELD_PREFIX = "spread."
OOD_PERCENTILE = "ood.pct"
OOD_FLAG = "ood"
#: What the model that scored a song writes only sometimes (per model: a target transform, an untrained
#: head, an ensemble, an OOD model): a song's write deletes those its record lacks, or a rescore would
#: keep the previous model's. The scores are always written (every task) and left alone, as is all else
#: (the worker's extras, engagement, calibration claims, retention).
MODEL_OPTIONAL_FIELDS: tuple[str, ...] = (PRIOR_FIELD, UNTRAINED, PRIOR_SD_FIELD, OOD_PERCENTILE, OOD_FLAG)
MODEL_OPTIONAL_PREFIXES: tuple[str, ...] = (SPREAD_FIELD_PREFIX,)

ENGAGEMENT_FIELD_PREFIX = "eng."
ENGAGEMENT_COUNTERS = ("plays", "likes", "skips", "completes", "shares")
PLAYS_FIELD = f"{ENGAGEMENT_FIELD_PREFIX}plays"
LIKES_FIELD = f"{ENGAGEMENT_FIELD_PREFIX}likes"
#: Examined plays: the sum of each play's examination weight (1 for a play of unknown position).
EXAMINED_PLAYS_FIELD = f"{ENGAGEMENT_FIELD_PREFIX}eplays"
ENGAGEMENT_UPDATED_FIELD = f"{ENGAGEMENT_FIELD_PREFIX}updated"
#: Engagement event type -> (hash field, delta).
COUNTER_FIELDS: dict[str, tuple[str, int]] = {
    "play": (PLAYS_FIELD, 1),
    "complete": (f"{ENGAGEMENT_FIELD_PREFIX}completes", 1),
    "like": (LIKES_FIELD, 1),
    "unlike": (LIKES_FIELD, -1),
    "skip": (f"{ENGAGEMENT_FIELD_PREFIX}skips", 1),
    "share": (f"{ENGAGEMENT_FIELD_PREFIX}shares", 1),
}

#: What of a song the calibration totals count (in the song hash), and the totals' fields.
CLAIMED_LIKES_FIELD = "cal.likes"
CLAIMED_EXPECTED_FIELD = "cal.expected"
CALIBRATION_FIELDS = ("likes", "expected")

#: Retention (:mod:`indexes.redis_retention`): when the song expired (epoch s), and what its hash
#: keeps besides the fields under :data:`RETAINED_PREFIXES` (what retraining and the engagement
#: history read: the cohort, the creation time, the prior the calibration claimed at).
EXPIRED_AT = "expired_at"
CALIBRATION_FIELD_PREFIX = "cal."
RETAINED_FIELDS: tuple[str, ...] = (SONG_ID, MODEL_VERSION, GENERATOR, CREATED_AT, SCORED_AT, PRIOR_FIELD, UNTRAINED)
RETAINED_PREFIXES: tuple[str, ...] = (ENGAGEMENT_FIELD_PREFIX, CALIBRATION_FIELD_PREFIX)

#: Fields of a song's tombstone value (JSON).
TOMBSTONE_REASON = "reason"
TOMBSTONE_AT = "deleted_at"

#: Fields of a listener's hash: the decayed taste sum (float32 little-endian bytes), its decayed
#: evidence (sum of |weights|) and the time both are decayed to (epoch s, the latest event's).
TASTE_VECTOR = "taste.vec"
TASTE_EVIDENCE = "taste.evidence"
TASTE_AT = "taste.at"
TASTE_FIELDS: tuple[str, ...] = (TASTE_VECTOR, TASTE_EVIDENCE, TASTE_AT)

#: Fields of an arm's hash: plays and likes counted for the arm's users (each event once).
ARM_PLAYS = "plays"
ARM_LIKES = "likes"
ARM_FIELDS: tuple[str, ...] = (ARM_PLAYS, ARM_LIKES)

#: Fields of a change log entry: the songs written, the feeds replaced or trimmed whole.
CHANGE_IDS = "ids"
CHANGE_FEEDS = "feeds"

#: After the score fields, what a feed read hydrates per song (in this order), and what a feed
#: write additionally needs for the feeds' filters.
STATE_FIELDS: tuple[str, ...] = (
    PRIOR_FIELD,
    PLAYS_FIELD,
    LIKES_FIELD,
    CREATED_AT,
    GENERATOR,
    SCORED_AT,
    EXAMINED_PLAYS_FIELD,
    PRIOR_SD_FIELD,
    OOD_FLAG,
)
FILTER_FIELDS: tuple[str, ...] = (TAGS, DURATION_S)
#: What the API's song table keeps of the model that scored a song.
MODEL_FIELDS: tuple[str, ...] = (MODEL_VERSION, UNTRAINED)


def flag(value: str | None) -> bool:
    """A stored boolean field (``1``, ``true``; absent, empty, ``0`` or ``false`` are False)."""
    return value is not None and value.strip().lower() not in ("", "0", "false")


def score_field(task: str) -> str:
    return SCORE_FIELD_PREFIX + task


def counter_field(counter: str) -> str:
    """The hash field of an engagement counter (``plays`` -> ``eng.plays``)."""
    return ENGAGEMENT_FIELD_PREFIX + counter


def hydration_fields(tasks: Iterable[str]) -> tuple[str, ...]:
    """``score.<task>`` for each task, in order, then :data:`STATE_FIELDS`."""
    return (*(score_field(t) for t in tasks), *STATE_FIELDS)


def lua(source: str) -> str:
    """A Lua script with ``$plays``, ``$eplays``, ``$likes``, ``$claimed_likes``, ``$claimed_expected``, ``$updated``,
    ``$total_likes`` and ``$total_expected`` replaced by the field names above (scripts name fields
    literally)."""
    return Template(source).substitute(
        plays=PLAYS_FIELD,
        eplays=EXAMINED_PLAYS_FIELD,
        likes=LIKES_FIELD,
        claimed_likes=CLAIMED_LIKES_FIELD,
        claimed_expected=CLAIMED_EXPECTED_FIELD,
        updated=ENGAGEMENT_UPDATED_FIELD,
        total_likes=CALIBRATION_FIELDS[0],
        total_expected=CALIBRATION_FIELDS[1],
    )


# -- keys -----------------------------------------------------------------------------------------
def check_name(kind: str, value: str) -> str:
    """``value`` if it can sit in a hash tag (a song id, a feed name); ValueError otherwise."""
    if not _NAME.fullmatch(value):
        raise ValueError(f"{kind} {value!r} must be 1-256 letters, digits or ._:- (it sits in a Redis hash tag)")
    return value


def check_prefix(value: str) -> str:
    if not _PREFIX.fullmatch(value):
        raise ValueError("key_prefix may hold only letters, digits and ._:- (1-64 characters)")
    return value


def user_tag(user_id: str) -> str:
    """What of a user id goes in its keys' hash tag: the id itself when it may sit there, else ``~`` and a
    digest (user ids are free text; ``~`` never starts a plain one, so two users never share keys)."""
    if _NAME.fullmatch(user_id):
        return user_id
    return "~" + hashlib.blake2b(user_id.encode("utf-8"), digest_size=16).hexdigest()


def experiment_tag(experiment: str) -> str:
    """What of an A/B experiment's name goes in its arms' keys: the name itself when it is 1-64 letters,
    digits or ._-, else ``~`` and a digest (the name is free text; ``~`` never starts a plain one)."""
    if _EXPERIMENT.fullmatch(experiment):
        return experiment
    return "~" + hashlib.blake2b(experiment.encode("utf-8"), digest_size=16).hexdigest()


@dataclass(frozen=True)
class RedisKeys:
    """The key names under one prefix (see the module docstring)."""

    prefix: str

    def song(self, song_id: str, *, check: bool = True) -> str:
        """The song's hash. ``check=False`` skips the name check (for ids already validated upstream)."""
        return f"{self.prefix}:song:{{{check_name('song id', song_id) if check else song_id}}}"

    def feed(self, feed: str) -> str:
        return f"{self.prefix}:feed:{{{check_name('feed', feed)}}}"

    def feed_age(self, feed: str) -> str:
        return f"{self.prefix}:feedage:{{{check_name('feed', feed)}}}"

    @staticmethod
    def rebuild(key: str) -> str:
        """Where a feed (or its age index) is built before it is renamed over ``key`` (same slot)."""
        return f"{key}:rebuild"

    def calibration(self) -> str:
        return f"{self.prefix}:calibration"

    def generator_calibration(self) -> str:
        """Each generator's factor on the calibration scale (a hash: generator -> factor), set by retrain."""
        return f"{self.prefix}:calibration:generators"

    def changes(self) -> str:
        """The change log stream (see the module docstring)."""
        return f"{self.prefix}:changes"

    def event(self, song_id: str, event_id: str) -> str:
        """An engagement event's dedup key, in its song's slot (ids validated upstream)."""
        return f"{self.prefix}:evt:{{{song_id}}}:{event_id}"

    def tombstone(self, song_id: str, *, check: bool = True) -> str:
        """The song's tombstone, in its slot (see the module docstring)."""
        return f"{self.prefix}:gone:{{{check_name('song id', song_id) if check else song_id}}}"

    def user(self, user_id: str) -> str:
        """A listener's taste hash, in the user's slot (see the module docstring)."""
        return f"{self.prefix}:user:{{{user_tag(user_id)}}}"

    def heard(self, user_id: str) -> str:
        """A listener's heard set, in the user's slot."""
        return f"{self.prefix}:heard:{{{user_tag(user_id)}}}"

    def user_event(self, user_id: str, event_id: str) -> str:
        """An event's dedup key for the listener's state, in the user's slot (event ids validated upstream)."""
        return f"{self.prefix}:uevt:{{{user_tag(user_id)}}}:{event_id}"

    def arm(self, experiment: str, arm: str) -> str:
        """An A/B arm's totals in ``experiment`` (the arm's name is checked like a feed name). The experiment
        is in the key so that a new one, reusing the arms' names, starts from zero."""
        return f"{self.prefix}:arm:{{{experiment_tag(experiment)}:{check_name('arm', arm)}}}"

    def arm_event(self, experiment: str, arm: str, event_id: str) -> str:
        """An event's dedup key for its arm's totals in ``experiment``, in the arm's slot."""
        return f"{self.prefix}:aevt:{{{experiment_tag(experiment)}:{check_name('arm', arm)}}}:{event_id}"

    def examination(self) -> str:
        """The examination weights of the page positions (JSON)."""
        return f"{self.prefix}:examination"

    def song_pattern(self) -> str:
        """A SCAN pattern matching every song hash (and possibly more: check with :meth:`song_id_of`)."""
        return f"{self.prefix}:song:*"

    def song_id_of(self, key: str) -> str | None:
        """The song id of a song hash's key; None for another key."""
        head = f"{self.prefix}:song:{{"
        if key.startswith(head) and key.endswith("}"):
            return key[len(head) : -1]
        return None


# -- records <-> hashes ---------------------------------------------------------------------------
def song_fields(song: SongRecord) -> dict[str, str]:
    """The hash fields written for one song (all strings: what ``get_song`` reads back)."""
    fields: dict[str, str] = {
        SONG_ID: song.song_id,
        MODEL_VERSION: song.model_version,
        RANK_SCORE: repr(float(song.rank_score)),
        GENERATOR: song.generator,
        CREATED_AT: song.created_at,
        SCORED_AT: song.scored_at,
    }
    for task, value in song.scores.items():
        fields[score_field(task)] = repr(float(value))
    for name, value in song.extra.items():
        if name in RESERVED_FIELDS or name.startswith(SCORE_FIELD_PREFIX):
            raise ValueError(f"song {song.song_id!r}: extra field {name!r} clashes with a reserved field")
        if isinstance(value, str):
            fields[name] = value
        else:
            try:
                fields[name] = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"song {song.song_id!r}: extra field {name!r} is not JSON: {exc}") from exc
    return fields


def _float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _count(value: str | None) -> int:
    number = _float(value)
    return int(number) if number is not None and math.isfinite(number) else 0


def parse_song(song_id: str, raw: Mapping[str, str | None]) -> StoredSong | None:
    """The typed record of a song hash (HGETALL, or the fields an HMGET asked for); None if it holds nothing."""
    fields = {name: value for name, value in raw.items() if value is not None}
    if not fields:
        return None
    scores: dict[str, float] = {}
    for name, value in fields.items():
        if name.startswith(SCORE_FIELD_PREFIX):
            number = _float(value)
            if number is not None:
                scores[name[len(SCORE_FIELD_PREFIX) :]] = number
    return StoredSong(
        song_id=song_id,
        model_version=fields.get(MODEL_VERSION),
        rank_score=_float(fields.get(RANK_SCORE)),
        scores=scores,
        generator=fields.get(GENERATOR),
        created_at=fields.get(CREATED_AT),
        scored_at=fields.get(SCORED_AT),
        truncated=fields.get(TRUNCATED, "0") in ("1", "true", "True"),
        prior_like_rate=_float(fields.get(PRIOR_FIELD)),
        counters={c: _count(fields.get(counter_field(c))) for c in ENGAGEMENT_COUNTERS},
        fields=fields,
    )


# -- the examination weights ----------------------------------------------------------------------
def examination_json(weights: Iterable[float]) -> str:
    """The stored value of :meth:`RedisKeys.examination`: ``{"weights": [w_0, w_1, ...]}``."""
    values = [float(w) for w in weights]
    if not values or not all(math.isfinite(w) and w > 0 for w in values):
        raise ValueError(f"examination weights must be a non-empty list of positive finite numbers, got {values}")
    return json.dumps({"weights": values}, separators=(",", ":"))


def parse_examination(raw: str | bytes | None) -> list[float] | None:
    """The weights of a stored value; None when absent or unreadable (a reader then counts every play as 1)."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
        weights = [float(w) for w in value["weights"]]
    except (ValueError, TypeError, KeyError):
        return None
    if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
        return None
    return weights
