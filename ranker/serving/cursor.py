"""The opaque keyset cursor of a feed page (see docs/ranking.md for what stays stable while a feed changes)."""

from __future__ import annotations

import base64
import binascii
import math
import struct
import zlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from indexes.base import faiss_id

MAX_SKIP = 512


class CursorError(ValueError):
    """A cursor that is malformed or belongs to another feed (400 with ``code``)."""

    code = "bad_cursor"


class CursorFiltersError(CursorError):
    """A cursor made under other request filters: its walk is not this request's."""

    code = "cursor_filters_mismatch"


class CursorUserError(CursorError):
    """A personal page's cursor used by another user (or without one)."""

    code = "cursor_user_mismatch"


# -- cursors ------------------------------------------------------------------------------------
_CURSOR_VERSION = 2
_PERSONAL_VERSION = 3  # a personal page's: the user tag after the filters tag, and the taste block's end
_HEAD = struct.Struct(">BIQd")  # version, feed tag, filters tag, boundary score
_HEAD_V3 = struct.Struct(">BIQQd")  # version, feed tag, filters tag, user tag, boundary score
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
    0 for none). Version 1 cursors, made before filters, decode as unfiltered. A personal page's
    cursor (version 3) is also bound to its user (``user``: :func:`~ranker.serving.personal.user_tag`)
    and carries where the taste block ends (``block``: the (score, song_id) of its last row, and how
    many of its songs are left to serve: a page reads that many rows plus its own, not a whole block).
    """

    feed: str
    score: float
    song_id: str
    skip: frozenset[int] = field(default_factory=frozenset)
    filters: int = 0
    user: int = 0
    block: tuple[float, str, int] | None = None

    @cached_property
    def _skip_sorted(self) -> np.ndarray:
        return np.sort(np.fromiter(self.skip, np.int64, len(self.skip)))

    def skips(self, keys: np.ndarray) -> np.ndarray:
        """Which of these skip keys the cursor skips (a sorted search: a page asks once per range read)."""
        known = self._skip_sorted
        if not len(known):
            return np.zeros(len(keys), np.bool_)
        at = np.minimum(np.searchsorted(known, keys), len(known) - 1)
        return known[at] == keys

    def encode(self) -> str:
        sid = self.song_id.encode("ascii")
        personal = self.user or self.block is not None
        if personal:
            head = _HEAD_V3.pack(_PERSONAL_VERSION, _feed_tag(self.feed), self.filters, self.user, self.score)
        else:
            head = _HEAD.pack(_CURSOR_VERSION, _feed_tag(self.feed), self.filters, self.score)
        raw = head + struct.pack(">B", len(sid)) + sid + struct.pack(">H", len(self.skip)) + _skip_bytes(self.skip)
        if personal:
            end_score, end_id, left = self.block or (math.nan, "", 0)
            end = end_id.encode("ascii")
            raw += struct.pack(">dHB", end_score, max(0, min(left, 0xFFFF)), len(end)) + end
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    @classmethod
    def decode(cls, token: str, feed: str, filters: int = 0, user: int = 0) -> Cursor:
        """The cursor ``token`` encodes, checked against the feed, the filters tag and the user tag of this
        request. A cursor of no user continues with a user (a new listener's walk: theirs from then on)."""
        made_by, block = 0, None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            if raw[:1] == b"\x01":
                version, tag, score = _HEAD_V1.unpack_from(raw, 0)
                made_under, pos = 0, _HEAD_V1.size
            elif raw[:1] == bytes([_PERSONAL_VERSION]):
                version, tag, made_under, made_by, score = _HEAD_V3.unpack_from(raw, 0)
                pos = _HEAD_V3.size
            else:
                version, tag, made_under, score = _HEAD.unpack_from(raw, 0)
                pos = _HEAD.size
            (n_id,) = struct.unpack_from(">B", raw, pos)
            pos += 1
            sid = raw[pos : pos + n_id].decode("ascii")
            pos += n_id
            (n_skip,) = struct.unpack_from(">H", raw, pos)
            pos += 2
            body = raw[pos : pos + n_skip * _SKIP_BYTES]
            pos += len(body)
            if version == _PERSONAL_VERSION:
                end_score, left, n_end = struct.unpack_from(">dHB", raw, pos)
                pos += 11
                end_id = raw[pos : pos + n_end].decode("ascii")
                pos += n_end
                if len(end_id) != n_end:
                    raise ValueError("truncated")
                block = None if math.isnan(end_score) else (end_score, end_id, left)
        except (binascii.Error, struct.error, UnicodeDecodeError, ValueError) as exc:
            raise CursorError("malformed cursor: pass back next_cursor exactly as received") from exc
        known = (1, _CURSOR_VERSION, _PERSONAL_VERSION)
        if version not in known or len(sid) != n_id or len(body) != n_skip * _SKIP_BYTES or pos != len(raw):
            raise CursorError("malformed cursor: pass back next_cursor exactly as received")
        # Past what any page writes (api.personal_window is at most 400): a forged cursor must not make
        # a page scan and re-order tens of thousands of rows.
        if n_skip > MAX_SKIP or (block is not None and block[2] > MAX_SKIP):
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
        if made_by and made_by != user:
            raise CursorUserError(
                "this cursor belongs to another user's personal feed: pass the user of the request that returned it, "
                "or start again without a cursor"
            )
        skip = frozenset(_skip_keys(body))
        return cls(feed, score, sid, skip, filters, made_by, block)


def _skip_bytes(skip: frozenset[int]) -> bytes:
    """The skip keys, sorted, as big-endian ``_SKIP_BYTES``-byte integers (one numpy pass, not one per key)."""
    keys = np.sort(np.fromiter(skip, np.uint64, len(skip))).astype(">u8")
    return keys.view(np.uint8).reshape(-1, 8)[:, 8 - _SKIP_BYTES :].tobytes()


def _skip_keys(body: bytes) -> list[int]:
    """:func:`_skip_bytes` read back."""
    n = len(body) // _SKIP_BYTES
    wide = np.zeros((n, 8), np.uint8)
    wide[:, 8 - _SKIP_BYTES :] = np.frombuffer(body, np.uint8, n * _SKIP_BYTES).reshape(n, _SKIP_BYTES)
    return wide.view(">u8").ravel().tolist()


def _after(score: float, song_id: str, b_score: float, b_id: str) -> bool:
    """Whether (score, song_id) comes after the boundary in ZRANGE REV order (score desc, id desc)."""
    return score < b_score or (score == b_score and song_id < b_id)
