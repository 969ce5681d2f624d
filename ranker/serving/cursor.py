"""The opaque keyset cursor of a feed page (see docs/ranking.md for what stays stable while a feed changes)."""

from __future__ import annotations

import base64
import binascii
import math
import struct
import zlib
from dataclasses import dataclass, field

from indexes.base import faiss_id

MAX_SKIP = 512


class CursorError(ValueError):
    """A cursor that is malformed or belongs to another feed (400 with ``code``)."""

    code = "bad_cursor"


class CursorFiltersError(CursorError):
    """A cursor made under other request filters: its walk is not this request's."""

    code = "cursor_filters_mismatch"


# -- cursors ------------------------------------------------------------------------------------
_CURSOR_VERSION = 2
_HEAD = struct.Struct(">BIQd")  # version, feed tag, filters tag, boundary score
_HEAD_V1 = struct.Struct(">BId")  # version 1 (before request filters): no filters tag
_SKIP_BYTES = 6


def _feed_tag(feed: str) -> int:
    return zlib.crc32(feed.encode("utf-8"))


def skip_key(key: int) -> int:
    """48 bits of a song's :func:`~indexes.base.faiss_id` (``key``): enough to tell apart the few
    hundred ids a cursor skips. The song table keeps the faiss ids, so pages never hash for it."""
    return key >> 15


def _skip_key(song_id: str) -> int:
    """:func:`skip_key` of a song id (hashing it)."""
    return skip_key(faiss_id(song_id))


@dataclass(frozen=True)
class Cursor:
    """Where a walk through a feed stands: the last (score, song_id) passed, plus songs served
    out of order (exploration picks and songs served past a pushed-down one) to skip later.

    Encoded as url-safe base64 of a small binary record; bound to its feed and to the request
    filters it was made under (``filters``: :attr:`~ranker.serving.filters.RequestFilters.tag`,
    0 for none). Version 1 cursors, made before filters, decode as unfiltered.
    """

    feed: str
    score: float
    song_id: str
    skip: frozenset[int] = field(default_factory=frozenset)
    filters: int = 0

    def encode(self) -> str:
        sid = self.song_id.encode("ascii")
        raw = (
            _HEAD.pack(_CURSOR_VERSION, _feed_tag(self.feed), self.filters, self.score)
            + struct.pack(">B", len(sid))
            + sid
            + struct.pack(">H", len(self.skip))
            + b"".join(k.to_bytes(_SKIP_BYTES, "big") for k in sorted(self.skip))
        )
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    @classmethod
    def decode(cls, token: str, feed: str, filters: int = 0) -> Cursor:
        """The cursor ``token`` encodes, checked against the feed and the filters tag of this request."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            if raw[:1] == b"\x01":
                version, tag, score = _HEAD_V1.unpack_from(raw, 0)
                made_under, pos = 0, _HEAD_V1.size
            else:
                version, tag, made_under, score = _HEAD.unpack_from(raw, 0)
                pos = _HEAD.size
            (n_id,) = struct.unpack_from(">B", raw, pos)
            pos += 1
            sid = raw[pos : pos + n_id].decode("ascii")
            pos += n_id
            (n_skip,) = struct.unpack_from(">H", raw, pos)
            pos += 2
            body = raw[pos:]
        except (binascii.Error, struct.error, UnicodeDecodeError, ValueError) as exc:
            raise CursorError("malformed cursor: pass back next_cursor exactly as received") from exc
        if version not in (1, _CURSOR_VERSION) or len(sid) != n_id or len(body) != n_skip * _SKIP_BYTES:
            raise CursorError("malformed cursor: pass back next_cursor exactly as received")
        if tag != _feed_tag(feed):
            raise CursorError(f"this cursor belongs to another feed than {feed!r}")
        if math.isnan(score):
            raise CursorError("malformed cursor: pass back next_cursor exactly as received")
        if made_under != filters:
            raise CursorFiltersError(
                "this cursor was made under other filters: repeat the filters of the request that returned it "
                "(generator, tag, tag_mode, max_age_hours, exclude), or start again without a cursor"
            )
        skip = frozenset(int.from_bytes(body[i : i + _SKIP_BYTES], "big") for i in range(0, len(body), _SKIP_BYTES))
        return cls(feed, score, sid, skip, filters)


def _after(score: float, song_id: str, b_score: float, b_id: str) -> bool:
    """Whether (score, song_id) comes after the boundary in ZRANGE REV order (score desc, id desc)."""
    return score < b_score or (score == b_score and song_id < b_id)
