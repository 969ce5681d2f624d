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
from collections.abc import Callable, Sequence
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

#: User ids the API takes: what the engagement contract takes (1-128 characters), less control characters
#: and lone surrogates (valid in a JSON string as an escape, but not encodable as a Redis key).
_USER = re.compile(r"^[^\x00-\x1f\x7f\ud800-\udfff]{1,128}$")


def check_user(user: str | None) -> str | None:
    """The user id of a request, checked (:class:`FilterError` ``bad_user``: 422); None: no user."""
    if user is None:
        return None
    if not _USER.fullmatch(user):
        why = "user must be 1-128 characters without control characters or lone surrogates"
        raise FilterError("bad_user", f"{why}, got {user[:40]!r}")
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
    #: The catalog's mean direction (unit; IndexReader.mean_direction), taken out of the taste and of every
    #: song before their cosine; None: raw cosines.
    centre: np.ndarray | None = None
    #: The listener's state could not be read: served as a new listener (the cold-start answer).
    unavailable: bool = False

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

    def cosines(self, found: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        """Each row's cosine with the taste (``matrix``: the songs' vectors, ``found``: which rows hold
        one); 0 for a song without a vector (or no taste).

        With a ``centre``, both sides lose their component along it first: every song shares that
        direction, and compared along it a taste says more about the catalog than about the listener
        (on the loop simulation's listeners the cosine's correlation with their true taste rose from
        0.10 to 0.31; docs/listeners.md)."""
        out = np.zeros(len(found))
        if self.vector is None or not found.any():
            return out
        if matrix.shape[1] != len(self.vector):  # a taste of another encoder's dimension: no direction here
            return out
        norms2 = np.einsum("ij,ij->i", matrix, matrix)
        taste = self.vector.astype(np.float64)
        centre = self.centre
        if centre is not None and len(centre) == len(taste):
            c = centre.astype(np.float64)
            taste = taste - float(taste @ c) * c
            length = float(np.linalg.norm(taste))
            if length < 1e-9:  # a taste along the centre alone: no direction of its own
                return out
            taste /= length
            along = matrix @ c.astype(matrix.dtype)
            norms2 = norms2 - along * along  # what is left of each song off the centre
        dots = matrix @ taste.astype(matrix.dtype)
        ok = found & (norms2 > 1e-12)
        out[ok] = dots[ok] / np.sqrt(norms2[ok])
        return out

    def explain(self, cosine: float) -> dict[str, Any]:
        """The taste term of one song's explanation."""
        return {"cosine": cosine, "weight": self.weight, "contribution": self.scale * cosine}


def personal(
    user: str, listener: Listener, feed: FeedSettings, centre: np.ndarray | None = None, *, unavailable: bool = False
) -> Personal:
    """The listener's blend from their stored state and the feed settings (``centre``, ``unavailable``: Personal)."""
    taste = listener.taste
    evidence = max(0.0, float(taste.evidence))
    weight = evidence / (evidence + feed.taste_evidence_half) if taste.vector is not None else 0.0
    return Personal(
        user, taste.vector, evidence, weight, feed.taste_weight * weight, listener.heard, centre, unavailable
    )


def block_order(stored: np.ndarray, cosines: np.ndarray, scale: float) -> np.ndarray:
    """The block's rows (given in feed order) by blended key, descending; ties keep the feed's order."""
    return np.argsort(-(stored + scale * cosines), kind="stable")


@dataclass(frozen=True)
class BlockVectors:
    """The taste block's vectors as read for its re-order, kept for the page's near-duplicate check:
    batch row ``j`` of the re-ordered block is matrix row ``order[j]``."""

    order: np.ndarray
    found: np.ndarray
    matrix: np.ndarray


def reorder_block(
    found: _Window,
    person: Personal,
    size: int,
    read: Callable[[Sequence[int]], tuple[np.ndarray, np.ndarray]] | None,
) -> tuple[np.ndarray, BlockVectors] | None:
    """Re-order a personal window's taste block (see :meth:`FeedReader._personal_window
    <ranker.serving.reader.FeedReader._personal_window>`) before its columns are taken: the
    permutation of its eligible rows, and the block's vectors, read as one matrix (``read``: the
    index's ``vector_matrix``; None: every cosine is 0). None: nothing eligible.

    ``found.block`` is the block's end the cursor carried, or None: the block starts here, as the first
    ``size`` eligible rows. The block's rows lead the window in blended order, the rest follow in
    the feed's; ``found.eligible`` is re-ordered in place and ``found.cosine`` holds each row's cosine
    (NaN below the block)."""
    places = found.eligible
    if not places:
        return None
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
    keys = [found.keys[place] for place in places[:n]]
    got, matrix = read(keys) if read is not None else (np.zeros(n, np.bool_), np.zeros((n, 0), np.float32))
    cosine = person.cosines(got, matrix)
    stored = np.asarray([found.stored[place] for place in places[:n]])
    order = block_order(stored, cosine, person.scale)
    perm = np.concatenate([order, np.arange(n, len(places))])
    found.cosine = np.concatenate([cosine, np.full(len(places) - n, np.nan)])[perm]
    found.eligible = [places[j] for j in perm.tolist()]
    return perm, BlockVectors(order, got, matrix)


def block_gram(
    table: SongTable,
    ids: list[str],
    block: BlockVectors,
    read: Callable[[Sequence[int]], tuple[np.ndarray, np.ndarray]],
) -> tuple[dict[str, int], np.ndarray]:
    """The near-duplicate check's slots and Gram matrix for a personal window's first rows ``ids``, from the
    block's matrix (its rows lead the window); rows past the block are read as one matrix too."""
    m = min(len(ids), len(block.order))
    src = block.order[:m]
    have, matrix = block.found[src], block.matrix[src]
    if m < len(ids):
        rest = ids[m:]
        got, more = read(table.key[np.fromiter(map(table.row_of.__getitem__, rest), np.intp, len(rest))].tolist())
        if more.shape[1] == matrix.shape[1]:
            have, matrix = np.concatenate([have, got]), np.concatenate([matrix, more])
    rows = np.flatnonzero(have)
    if not len(rows):
        return {}, np.empty((0, 0), dtype=np.float32)
    matrix = matrix[rows] if len(rows) < len(matrix) else matrix
    return {ids[j]: n for n, j in enumerate(rows.tolist())}, matrix @ matrix.T
