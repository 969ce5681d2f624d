"""Turning a feed or rank request's parameters into what the reader takes: filters and the user, checked.

The feed page's query parameters and ``POST /v1/rank``'s ``filters`` object say the same thing, and
are checked in one place (:func:`~ranker.serving.filters.parse_filters`); a bad value is a
:class:`~ranker.serving.filters.FilterError`, which the API answers with a 422 and its code.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from ranker.serving.filters import FiltersIn, RequestFilters, parse_filters
from ranker.serving.personal import check_user
from ranker.settings import ApiSettings

__all__ = ["REQUEST_ID_HEADER", "body_filters", "check_user", "new_request_id", "query_filters"]

#: The response header that repeats a feed or rank response's ``request_id``.
REQUEST_ID_HEADER = "X-Request-ID"


def new_request_id() -> str:
    """A feed or rank response's id: engagement events name it (``request_id``) to join what was served."""
    return uuid.uuid4().hex


def query_filters(
    api: ApiSettings,
    generator: Sequence[str],
    tag: Sequence[str],
    tag_mode: str,
    max_age_hours: float | None,
    exclude: Sequence[str],
) -> RequestFilters:
    """A feed page's filter parameters, checked and normalised."""
    return parse_filters(
        generators=generator,
        tags=tag,
        tag_mode=tag_mode,
        max_age_hours=max_age_hours,
        exclude=exclude,
        max_values=api.max_filter_values,
        max_exclude=api.max_exclude,
    )


def body_filters(api: ApiSettings, filters: FiltersIn | None) -> RequestFilters:
    """``POST /v1/rank``'s ``filters`` object (absent: none), checked and normalised."""
    f = filters or FiltersIn()
    return query_filters(api, f.generators, f.tags, f.tag_mode, f.max_age_hours, f.exclude)
