"""Personal feeds: a listener's taste blended into a feed's order, and their heard songs left out.

The feed orders by a time-invariant log-score (:mod:`ranker.serving.policy`), so the taste is added
in log space, where it keeps that invariance::

    key = stored + taste_weight * w(E) * cos(song, taste),   w(E) = E / (E + taste_evidence_half)

with E the listener's decayed taste evidence (:mod:`indexes.listeners`). On a page the blend re-orders
a block of the feed's first ``api.personal_window`` eligible songs (:func:`block_order`); the served
score is multiplied by ``e^(taste_weight * w * cos)``, the same term. A listener with no taste
direction, or no evidence, and nothing heard is new: their page is the cold-start page, bit for bit.
docs/ranking.md, "Personal feeds", says what a cursor means when the taste moves between pages.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from indexes.listeners import Listener
from ranker.serving.cursor import _after
from ranker.serving.filters import FilterError
from ranker.settings import FeedSettings

if TYPE_CHECKING:
    from ranker.serving.page_cache import _Window
    from ranker.serving.table import SongTable

#: User ids the API takes: what the engagement contract takes (1-128 characters), less control characters.
_USER = re.compile(r"^[^\x00-\x1f\x7f]{1,128}$")


def check_user(user: str | None) -> str | None:
    """The user id of a request, checked (:class:`FilterError` ``bad_user``: 422); None: no user."""
    if user is None:
        return None
    if not _USER.fullmatch(user):
        raise FilterError("bad_user", f"user must be 1-128 characters without control characters, got {user[:40]!r}")
    return user


def user_tag(user: str | None) -> int:
    """64 bits of a hash of the user id, carried by the cursors of their pages; 0 for none."""
    if not user:
        return 0
    return int.from_bytes(hashlib.blake2b(user.encode(), digest_size=8).digest(), "big") or 1


@dataclass(frozen=True)
class Personal:
    """One listener as a page sees them: the blend's direction and scale, and the songs to leave out."""

    user: str
    vector: np.ndarray | None  # unit taste; None: no direction
    evidence: float
    weight: float  # w(E), 0-1
    scale: float  # taste_weight * w(E): the log-space weight of the cosine
    heard: tuple[str, ...]

    @property
    def tag(self) -> int:
        return user_tag(self.user)

    @property
    def blends(self) -> bool:
        return self.vector is not None and self.scale > 0.0

    @property
    def new(self) -> bool:
        """Nothing to personalise: the cold-start page, exactly."""
        return not self.blends and not self.heard

    def cosines(self, found: Mapping[str, np.ndarray], song_ids: Sequence[str]) -> np.ndarray:
        """Each song's cosine with the taste; 0 for a song without a vector (or no taste)."""
        out = np.zeros(len(song_ids))
        if self.vector is None or not found:
            return out
        at = [i for i, sid in enumerate(song_ids) if sid in found]
        if not at:
            return out
        matrix = np.stack([found[song_ids[i]] for i in at])
        if matrix.shape[1] != len(self.vector):  # a taste of another encoder's dimension: no direction here
            return out
        norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
        dots = matrix @ self.vector.astype(matrix.dtype)
        out[at] = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
        return out

    def explain(self, cosine: float) -> dict[str, Any]:
        """The taste term of one song's explanation."""
        return {"cosine": cosine, "weight": self.weight, "contribution": self.scale * cosine}


def personal(user: str, listener: Listener, feed: FeedSettings) -> Personal:
    """The listener's blend from their stored state and the feed settings."""
    taste = listener.taste
    evidence = max(0.0, float(taste.evidence))
    weight = evidence / (evidence + feed.taste_evidence_half) if taste.vector is not None else 0.0
    return Personal(user, taste.vector, evidence, weight, feed.taste_weight * weight, listener.heard)


def block_order(stored: np.ndarray, cosines: np.ndarray, scale: float) -> np.ndarray:
    """The block's rows (given in feed order) by blended key, descending; ties keep the feed's order."""
    return np.argsort(-(stored + scale * cosines), kind="stable")


def reorder_block(
    found: _Window,
    table: SongTable,
    person: Personal,
    size: int,
    read: Callable[[Sequence[str], Sequence[int]], dict[str, np.ndarray]] | None,
) -> dict[str, np.ndarray]:
    """Re-order a personal window's taste block in place (see :meth:`FeedReader._personal_window
    <ranker.serving.reader.FeedReader._personal_window>`); the block's vectors read (``read``: the
    index's; None: every cosine is 0).

    ``found.block`` is the block's end the cursor carried, or None: the block starts here, as the first
    ``size`` eligible rows. The block's rows lead the window in blended order, the rest follow in
    the feed's; ``found.cosine`` holds each row's cosine (NaN below the block)."""
    batch = found.batch
    assert batch is not None
    places = found.eligible
    if not len(batch):
        return {}
    end = found.block
    if end is None:
        n = min(size, len(places))
        found.block = (found.stored[places[n - 1]], found.ids[places[n - 1]], n)
    else:  # the eligible rows at or above the block's end lead (feed order)
        n = len(places)
        for k, place in enumerate(places):
            if _after(found.stored[place], found.ids[place], end[0], end[1]):
                n = k
                break
    ids = batch.song_ids[:n]
    keys = table.key[np.fromiter(map(table.row_of.__getitem__, ids), np.intp, n)]
    vectors = read(ids, keys.tolist()) if read is not None else {}
    cosine = person.cosines(vectors, ids)
    stored = np.asarray([found.stored[place] for place in places[:n]])
    perm = np.concatenate([block_order(stored, cosine, person.scale), np.arange(n, len(batch))])
    found.cosine = np.concatenate([cosine, np.full(len(batch) - n, np.nan)])[perm]
    found.eligible = [places[j] for j in perm.tolist()]
    found.batch = batch.take(perm)
    return vectors
