"""Request-time filters of feed pages and reranks: what a request may ask, its checks, its masks.

A request narrows the feed it reads, never widens it: a feed's order holds only the songs its
configured filters admit, and the request's filters are ANDed on top (the age bound is the
smaller of the two; :func:`~ranker.serving.policy.tags_match` says what a tag filter means for
both). They are evaluated as numpy masks over the song table's columns (generator and tag-set
codes, creation time, rows), inside the page's one scan of the feed; a tag filter is decided
once per distinct tag set (:meth:`~ranker.serving.table.SongTable.tag_mask`).

A cursor is bound to the filters it was made under (:attr:`RequestFilters.tag`, a hash of their
normalised form, travels inside it): the same filters in any order or spelling continue the walk,
other filters are refused (``cursor_filters_mismatch``) instead of serving a page of another walk.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ranker.events import SONG_ID_PATTERN

if TYPE_CHECKING:
    from ranker.serving.table import SongTable

TagMode = Literal["any", "all"]
TAG_MODES: tuple[str, ...] = ("any", "all")
_SONG_ID = re.compile(SONG_ID_PATTERN)
#: Generator names and tags: printable, no comma (tags are stored comma-joined), at most 128 characters.
_NAME = re.compile(r"^[^,\x00-\x1f\x7f]{1,128}$")


class FilterError(ValueError):
    """A filter value the API refuses (422 with ``code``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class FiltersIn(BaseModel):
    """``POST /v1/rank``'s ``filters``: the feed page's query parameters as a JSON object."""

    model_config = ConfigDict(extra="forbid")

    generators: list[str] = Field(default_factory=list, description="Only songs of these generators.")
    tags: list[str] = Field(default_factory=list, description="Only songs with these tags (tag_mode).")
    tag_mode: str = Field("any", description="any: at least one of the tags; all: every one.")
    max_age_hours: float | None = Field(None, description="Only songs younger than this (> 0).")
    exclude: list[str] = Field(default_factory=list, description="Song ids never returned.")


@dataclass(frozen=True)
class RequestFilters:
    """Normalised request filters: sorted, without repeats (so equal filters hash equal)."""

    generators: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    tag_mode: TagMode = "any"
    max_age_hours: float | None = None
    exclude: tuple[str, ...] = ()
    #: A listener's heard songs (personal feeds): excluded exactly as ``exclude`` is, but not part of the
    #: filters a cursor is bound to (the set grows as the listener plays; :meth:`excluding`).
    heard: tuple[str, ...] = field(default=(), compare=False)

    @property
    def empty(self) -> bool:
        """Nothing to mask: no request filter and no heard song."""
        return self.requested_none and not self.heard

    @property
    def requested_none(self) -> bool:
        return not (self.generators or self.tags or self.exclude) and self.max_age_hours is None

    def excluding(self, heard: Sequence[str]) -> RequestFilters:
        """These filters, also leaving out a listener's heard songs (the cursor binding is unchanged)."""
        return replace(self, heard=tuple(heard)) if heard else self

    @property
    def requested(self) -> RequestFilters:
        """These filters without the heard songs: what a page can mask before the listener's state lands."""
        return replace(self, heard=()) if self.heard else self

    def heard_flags(self, table: SongTable) -> np.ndarray | None:
        """A flag per table row: a heard song; None when none is."""
        return RequestFilters(heard=self.heard).excluded(table) if self.heard else None

    @cached_property
    def tag(self) -> int:
        """64 bits of a hash of the normalised filters, carried by cursors; 0 for no filters (as
        cursors made before filters existed say)."""
        if self.requested_none:
            return 0
        text = json.dumps(
            [self.generators, self.tags, self.tag_mode, self.max_age_hours, self.exclude], separators=(",", ":")
        )
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") or 1

    @property
    def max_age_s(self) -> float | None:
        return None if self.max_age_hours is None else self.max_age_hours * 3600.0

    def excluded(self, table: SongTable) -> np.ndarray | None:
        """A flag per table row: excluded (``exclude`` or heard); None when nothing is. One lookup of the ids
        per request: a page's scan masks each range it reads with it (no await in between)."""
        if not (self.exclude or self.heard):
            return None
        out = table.rows(self.exclude + self.heard)
        flags = np.zeros(table.capacity, np.bool_)
        flags[out[out >= 0]] = True
        return flags

    def mask(self, table: SongTable, rows: np.ndarray, excluded: np.ndarray | None = None) -> np.ndarray:
        """Which of these table rows pass the generator, tag and exclude filters (the age bound is
        applied with the feed's window, :func:`~ranker.serving.batch.in_age_window`); ``excluded``:
        :meth:`excluded`'s flags for this table, when the caller has them."""
        ok = np.ones(len(rows), np.bool_)
        if self.generators:
            allowed = np.zeros(len(table.generator_names), np.bool_)
            allowed[table.generator_codes(self.generators)] = True
            ok &= allowed[table.generator[rows]]
        if self.tags:
            ok &= table.tag_mask(frozenset(self.tags), self.tag_mode)[table.tag_code[rows]]
        if self.exclude or self.heard:  # one meaning of "excluded", for exclude= and heard songs alike
            flags = self.excluded(table) if excluded is None else excluded
            assert flags is not None
            ok &= ~flags[rows]
        return ok


NO_FILTERS = RequestFilters()


def parse_filters(
    *,
    generators: Sequence[str] = (),
    tags: Sequence[str] = (),
    tag_mode: str = "any",
    max_age_hours: float | None = None,
    exclude: Sequence[str] = (),
    max_values: int,
    max_exclude: int,
) -> RequestFilters:
    """Check and normalise a request's filters; :class:`FilterError` names the first problem.

    ``exclude`` values may each be a comma list (song ids have no commas); ``max_values`` bounds
    the generators and the tags, ``max_exclude`` the excluded ids, after splitting.
    """
    if tag_mode not in TAG_MODES:
        raise FilterError("bad_tag_mode", f"tag_mode must be one of {list(TAG_MODES)}, got {tag_mode[:40]!r}")
    if max_age_hours is not None and not (math.isfinite(max_age_hours) and max_age_hours > 0):
        raise FilterError("bad_max_age", f"max_age_hours must be a finite number above 0, got {max_age_hours!r}")
    for name, values in (("generator", generators), ("tag", tags)):
        if len(values) > max_values:
            raise FilterError("too_many_filter_values", f"{len(values)} {name} values; at most {max_values}")
        bad = [v for v in values if not _NAME.fullmatch(v)]
        if bad:
            message = f"{name} must be 1-128 printable characters without commas: {bad[0][:40]!r}"
            raise FilterError("bad_filter_value", message)
    ids = [part for value in exclude for part in value.split(",") if part]
    if len(ids) > max_exclude:
        raise FilterError("too_many_filter_values", f"{len(ids)} exclude ids; at most {max_exclude}")
    bad = [v for v in ids if not _SONG_ID.fullmatch(v)]
    if bad:
        raise FilterError("bad_filter_value", f"exclude: not a song id: {bad[0][:40]!r}")
    if not tags:
        tag_mode = "any"  # without tags the mode means nothing: one normal form
    mode: TagMode = "all" if tag_mode == "all" else "any"
    return RequestFilters(
        generators=tuple(sorted(set(generators))),
        tags=tuple(sorted(set(tags))),
        tag_mode=mode,
        max_age_hours=None if max_age_hours is None else float(max_age_hours),
        exclude=tuple(sorted(set(ids))),
    )
