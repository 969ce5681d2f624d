"""The HTTP API that recommender backends call: feed pages, reranking, songs, similar songs.

``create_app(settings)`` builds the FastAPI app; ``apexrank serve`` runs it under
uvicorn. OpenAPI is served at ``/openapi.json`` (``/docs`` renders it).

Every bad request gets a 4xx with a JSON body ``{"error": <code>, "message": <text>}``:
422 for parameters and bodies that fail validation, 400 for a bad cursor, 401 without
a valid bearer token (when tokens are configured; ``DELETE /v1/songs/{id}`` takes an admin token
of ``api.admin_tokens`` only, and answers 403 when none is configured), 404 for an unknown feed or song,
413 for a body over ``api.max_body_bytes``. An inline policy (``POST /v1/rank``) with a
number out of its range, or one that would give a NaN or infinite value for the songs
asked about, is a 422 ``invalid_policy``. Redis being unreachable is a 503, never a 500,
for what needs it (once the song table is loaded, pages and reranks go on from memory),
and so is a feed or rank request while the song table loads (``table_loading``).
Feed pages and reranks are served from the process's in-memory song table
(:mod:`ranker.serving.table`), which follows the store's change log; similar-song searches
run in the thread pool (FAISS releases the GIL). ``POST /v1/events`` (:mod:`ranker.serving.ingest`)
answers for each engagement event it produces. /healthz, /readyz, /metrics and the
OpenAPI documents need no token.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import numpy as np
import redis.exceptions
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from threadpoolctl import threadpool_limits

from indexes.redis_client import UNREACHABLE
from ranker.events import SONG_ID_PATTERN, SongDeleted
from ranker.serving.api_models import ERRORS, FeedPageOut, RankIn, RankOut, SimilarOut
from ranker.serving.arm_metrics import refresh_arm_gauges
from ranker.serving.arms import resolve
from ranker.serving.coalesce import Coalesced
from ranker.serving.cursor import CursorError
from ranker.serving.edge import Edge
from ranker.serving.edge import error_response as _error
from ranker.serving.exposure import ModelVersion, ServedRecorder, served_record
from ranker.serving.filters import FilterError
from ranker.serving.ingest import events_router
from ranker.serving.producer import ApiProducer
from ranker.serving.reader import UNAVAILABLE, FeedReader, TableNotReady, UnknownFeedError
from ranker.serving.requests import REQUEST_ID_HEADER, body_filters, check_user, new_request_id, query_filters
from ranker.serving.responses import json_response
from ranker.serving.takedown import publish_deleted, token_matches
from ranker.settings import Settings, get_settings
from ranker.stores import arm_store, index_reader, listener_store, score_store

log = logging.getLogger(__name__)

PAGE_CACHE_BYTES = Gauge(
    "apexrank_api_page_cache_bytes", "Estimated bytes the feed page cache holds (at most api.page_cache_max_bytes)"
)
MODEL_SONGS = Gauge(
    "apexrank_api_model_songs",
    "Songs in this process's song table by the model version that scored them, and whether it was trained",
    ["model_version", "trained"],
)


class ApiError(HTTPException):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers)
        self.code = code


# -- the app -------------------------------------------------------------------------------------
def create_app(
    settings: Settings | None = None,
    *,
    explore_rng: np.random.Generator | None = None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The API app for ``settings`` (default: the process settings).

    ``explore_rng`` drives Thompson exploration on every page (seeded simulations and tests
    pass one for reproducible pages); by default each page draws from fresh OS entropy.
    ``clock`` is the wall clock pages are scored at (a simulation passes its simulated time).
    """
    settings = settings or get_settings()
    api = settings.api
    store = score_store(settings)
    index = index_reader(settings)
    listeners = listener_store(settings)  # taste and heard sets for ?user= (docs/ranking.md, "Personal feeds")
    arms = arm_store(settings)  # A/B arms' totals for /metrics (docs/arms.md); the null store without arms
    holder: dict[str, FeedReader] = {}
    producer = ApiProducer(settings.kafka)  # connects on the first takedown, POST /v1/events or served record
    served = (  # every feed and rank response served, spooled then shipped (docs/served-log.md)
        ServedRecorder.open(
            settings.served_spool_dir,
            producer,
            settings.kafka.topics.feeds_served,
            api.served_ship_interval_s,
            api.served_spool_max_bytes,
        )
        if api.served_log
        else ServedRecorder.off()
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A page's cosines are one product of at most a few hundred vectors: on one thread it takes
        # tens of microseconds, while OpenBLAS's thread pool, contending with the event loop and
        # the other workers for the cores, made it tens of milliseconds at the tail.
        threadpool_limits(1, user_api="blas")
        reads, listener_reads = store.async_reads(), listeners.async_reads()
        holder["reader"] = app.state.reader = FeedReader(settings, reads, index, listeners=listener_reads, clock=clock)
        sync = app.state.reader.sync
        sync.start()  # loads the song table, then follows the store's change log
        if not await sync.wait_loaded(api.table_startup_wait_s):
            log.warning("the song table is not loaded yet; serving, /readyz says so while it loads")
        try:
            await run_in_threadpool(index.load)
        except Exception:
            log.exception("could not load the embedding index from %s; /readyz says so", settings.index_dir)
        index.start(api.index_refresh_s)
        served.start()
        try:
            yield
        finally:
            served.close()
            await sync.close()
            index.close()
            await reads.close()
            await listener_reads.close()
            listeners.close()
            arms.close()
            store.close()
            producer.close()

    app = FastAPI(
        title="apexrank",
        version="1",
        summary="Cold-start ranking of AI-generated songs: feeds, reranking, similar songs.",
        lifespan=lifespan,
    )
    app.add_middleware(Edge, max_body_bytes=api.max_body_bytes)
    bearer = HTTPBearer(auto_error=False, description="One of api.tokens, when any are configured.")

    # A default, not Annotated: with postponed annotations FastAPI cannot see a closure's ``bearer``.
    async def authorised(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if api.tokens and not token_matches(creds.credentials if creds is not None else None, api.tokens):
            raise ApiError(401, "unauthorized", "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})

    def admin(action: str) -> Any:
        """A dependency asking for an admin token (``api.admin_tokens``, never a read token); 403
        ``<action>_disabled`` when none is configured."""

        async def check(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
            if not api.admin_tokens:
                raise ApiError(403, f"{action}_disabled", "no admin token is configured (api.admin_tokens)")
            if not token_matches(creds.credentials if creds is not None else None, api.admin_tokens):
                why = "missing or invalid admin bearer token"
                raise ApiError(401, "unauthorized", why, {"WWW-Authenticate": "Bearer"})

        return Depends(check)

    def reader() -> FeedReader:
        return holder["reader"]

    model_version = ModelVersion(lambda: holder["reader"].sync.table if "reader" in holder else None)

    # -- errors ----------------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", ""))} for err in exc.errors()
        ]
        message = "; ".join(f"{'.'.join(p['loc'])}: {p['msg']}" for p in problems) or "invalid request"
        return JSONResponse({"error": "invalid_request", "message": message, "detail": problems}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        return _error(exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(TableNotReady)
    async def loading(_: Request, exc: TableNotReady) -> JSONResponse:
        return _error(503, "table_loading", "the song table is still loading; retry shortly", {"Retry-After": "1"})

    async def store_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("Redis unavailable: %s", exc)
        return _error(503, "store_unavailable", "the score store (Redis) is unavailable; retry later")

    # A cluster none of whose nodes answers raises RedisClusterException, not a ConnectionError.
    for unreachable in (*UNREACHABLE, redis.exceptions.ClusterDownError):
        app.add_exception_handler(unreachable, store_down)

    # -- probes ----------------------------------------------------------------------------------
    @app.get("/healthz", tags=["probes"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"], responses={503: {"description": "the table or the index is not loaded"}})
    async def readyz() -> JSONResponse:
        """The song table and the embedding index are loaded. Redis's state is reported, not required:
        once loaded, pages and reranks are served from memory through a Redis outage, which should
        not take every API process out of its load balancer at once."""
        redis_ok = await reader().reads.ping()
        status = index.status()
        sync = reader().sync
        table = sync.table
        models = table.models() if table is not None else {}
        body = {
            "redis": redis_ok,
            "table": {"ready": table is not None, "songs": len(table) if table is not None else 0},
            "models": [
                {"version": version, "songs": songs, "trained": untrained == 0, "untrained_songs": untrained}
                for version, (songs, untrained) in sorted(models.items())
            ],
            "index": {
                "ready": status.ready,
                "vectors": status.vectors,
                "source": status.source,
                "reason": status.reason,
            },
        }
        return JSONResponse(body, status_code=200 if status.ready and table is not None else 503)

    @app.get("/metrics", tags=["probes"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics."""
        current = holder.get("reader")
        if current is not None:
            current.page_cache.expire()
            PAGE_CACHE_BYTES.set(current.page_cache.nbytes)
            table = current.sync.table
            MODEL_SONGS.clear()  # a version no longer served leaves the metric
            for version, (songs, untrained) in (table.models() if table is not None else {}).items():
                if songs - untrained:
                    MODEL_SONGS.labels(version, "true").set(songs - untrained)
                if untrained:
                    MODEL_SONGS.labels(version, "false").set(untrained)
        if arms.keeps_state:  # one Redis round trip, off the event loop; Redis down: the last figures stay
            await run_in_threadpool(refresh_arm_gauges, arms, settings)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # -- feeds -----------------------------------------------------------------------------------
    auth = [Depends(authorised)]

    @app.get("/v1/feeds", tags=["feeds"], dependencies=auth)
    async def feeds() -> dict[str, Any]:
        """The configured feeds and their policies."""
        return {
            "default": settings.feed.name,
            "feeds": {name: p.model_dump(mode="json") for name, p in settings.feed.feeds.items()},
        }

    @app.get(
        "/v1/feeds/{feed}",
        tags=["feeds"],
        dependencies=auth,
        response_model=FeedPageOut,
        responses=ERRORS,
    )
    async def feed_page(
        feed: str = Path(description="A configured feed name."),
        limit: int = Query(min(50, api.max_limit), ge=1, le=api.max_limit),
        cursor: str | None = Query(None, min_length=1, max_length=8192, description="next_cursor of the last page."),
        generator: list[str] = Query([], description="Only these generators (repeat the parameter)."),  # noqa: B008
        tag: list[str] = Query([], description="Only songs with these tags (repeat; see tag_mode)."),  # noqa: B008
        tag_mode: str = Query("any", description="any: at least one of the tags; all: every one."),
        max_age_hours: float | None = Query(None, description="Only songs younger than this many hours."),
        exclude: list[str] = Query([], description="Song ids never served (repeat, or comma lists)."),  # noqa: B008
        user: str | None = Query(None, description="A listener: their personal feed (docs/ranking.md)."),
    ) -> Response:
        """A page of a feed, best first, with each score's components; exploration slots are marked.

        Filters narrow the feed; a cursor continues only the walk of the same filters (400
        ``cursor_filters_mismatch`` otherwise). docs/ranking.md: "Request-time filters". ``user``: the
        listener's personal feed, its cursor theirs (400 ``cursor_user_mismatch``; "Personal feeds")."""
        try:
            wanted = query_filters(api, generator, tag, tag_mode, max_age_hours, exclude)
            who = check_user(user)
            served_feed, arm = resolve(feed, who, settings)  # an A/B arm's users get its feed (docs/arms.md)
            page = await reader().page(served_feed, limit, cursor, rng=explore_rng, filters=wanted, user=who)
        except FilterError as exc:
            raise ApiError(422, exc.code, str(exc)) from None
        except UnknownFeedError:
            raise ApiError(404, "unknown_feed", f"no feed named {feed!r}; see GET /v1/feeds") from None
        except CursorError as exc:
            raise ApiError(400, exc.code, str(exc)) from None
        rid = new_request_id()
        items = page.items
        served.record(
            served_record(
                rid,
                "feed",
                page.feed,
                [i["song_id"] for i in items],
                user_id=who,
                arm=arm.name if arm else None,
                model_version=(arm.model_version if arm else None) or model_version(),
                explored=[bool(i["explore"]) for i in items],
                propensity=page.propensity,
                pool=page.pool,
                served_at=datetime.fromtimestamp(clock(), UTC),
            )
        )
        body = {"feed": page.feed, "items": items, "next_cursor": page.next_cursor, "request_id": rid}
        if arm is not None:
            body["arm"] = arm.name
        if page.listener_unavailable:  # served as the cold-start page (docs/ranking.md, "Personal feeds")
            body["listener_state"] = UNAVAILABLE
        return json_response(body, headers={REQUEST_ID_HEADER: rid})

    @app.post("/v1/rank", tags=["feeds"], dependencies=auth, response_model=RankOut, responses=ERRORS)
    async def rank(body: RankIn) -> Response:
        """Order candidate songs by a feed policy (named, or with inline weights)."""
        if len(body.candidates) > api.max_candidates:
            raise ApiError(
                422, "too_many_candidates", f"{len(body.candidates)} candidates; at most {api.max_candidates}"
            )
        dupes = sorted(c for c, n in Counter(body.candidates).items() if n > 1)
        if dupes:
            raise ApiError(422, "duplicate_candidates", f"candidates repeat: {dupes[:10]}")
        overrides: dict[str, Any] = {
            k: getattr(body, k) for k in ("weights", "half_life_hours", "prior_strength") if k in body.model_fields_set
        }
        try:
            arm = None
            if overrides:
                policy = reader().inline_policy(body.feed, overrides)
            else:  # an A/B arm's users get its feed (docs/arms.md); an inline policy is the caller's own
                name, arm = resolve(body.feed, body.user, settings)
                policy = reader().policy(name)
        except UnknownFeedError:
            raise ApiError(404, "unknown_feed", f"no feed named {body.feed!r}; see GET /v1/feeds") from None
        except ValidationError as exc:
            message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise ApiError(422, "invalid_policy", message) from None
        except ValueError as exc:
            raise ApiError(422, "invalid_policy", str(exc)) from None
        try:
            wanted, who = body_filters(api, body.filters), check_user(body.user)
        except FilterError as exc:
            raise ApiError(422, exc.code, str(exc)) from None
        ranked = await reader().rank_response(
            body.candidates, policy, apply_filters=body.apply_filters, explain=body.explain, filters=wanted, user=who
        )
        where = ranked.non_finite  # NaN and infinities, found on the score arrays before serialising
        if where is None:
            rid = new_request_id()
            ids = [i["song_id"] for i in ranked.body["items"]]
            version = (arm.model_version if arm else None) or model_version()
            at = datetime.fromtimestamp(clock(), UTC)
            record = served_record(
                rid,
                "rank",
                policy.name,
                ids,
                user_id=who,
                arm=arm.name if arm else None,
                model_version=version,
                served_at=at,
            )
            served.record(record)
            extra = {"arm": arm.name} if arm is not None else {}
            return json_response(
                {**ranked.body, **extra, "request_id": rid}, finite=True, headers={REQUEST_ID_HEADER: rid}
            )
        if not overrides:  # the configured feed's own policy: not the caller's doing
            raise ValueError(f"non-finite value at items.{where} from feed {policy.name!r}")
        raise ApiError(
            422,
            "invalid_policy",
            f"this inline policy gives a non-finite value at items.{where}: "
            "use less extreme weights, half_life_hours or prior_strength",
        )

    # -- songs -----------------------------------------------------------------------------------
    song_path = Path(pattern=SONG_ID_PATTERN, description="1-128 letters, digits or ._:-")

    @app.get("/v1/songs/{song_id}", tags=["songs"], dependencies=auth, responses=ERRORS)
    async def song(song_id: str = song_path) -> Response:
        """A song's scores, engagement counts, like-rate prior and posterior, model version."""
        found = await reader().song(song_id)
        if found is None:
            raise ApiError(404, "unknown_song", f"no scored song {song_id!r}")
        return json_response(found)

    @app.get(
        "/v1/songs/{song_id}/similar",
        tags=["songs"],
        dependencies=auth,
        response_model=SimilarOut,
        responses=ERRORS,
    )
    async def similar(song_id: str = song_path, k: int = Query(10, ge=1, le=api.max_k)) -> Response:
        """The k nearest songs by embedding (cosine similarity), from the FAISS index."""
        try:
            hits = await run_in_threadpool(index.similar, song_id, k)
        except LookupError as exc:
            if isinstance(exc, KeyError):
                raise ApiError(404, "unknown_song", f"song {song_id!r} is not in the index") from None
            raise ApiError(503, "index_unavailable", str(exc)) from None
        return json_response({"song_id": song_id, "items": [{"song_id": s, "similarity": sim} for s, sim in hits]})

    @app.delete("/v1/songs/{song_id}", tags=["songs"], dependencies=[admin("takedown")], responses=ERRORS)
    async def delete_song(
        song_id: str = song_path,
        reason: str = Query("takedown", min_length=1, max_length=256, description="Kept in the tombstone."),
    ) -> Response:
        """Take a song down (admin token): out of every feed, its record and counters, this process's
        song table now and the others' through the change log; a tombstone makes a replay of it a
        no-op; ``songs.deleted`` tells the workers to drop its vector. Idempotent: 200 every time,
        for a song never seen too (it stays out if it arrives later)."""
        feeds = list(settings.feed.feeds)
        deletion = (await run_in_threadpool(store.delete_songs, [song_id], reason, feeds))[0]
        holder["reader"].forget([song_id])
        event = SongDeleted(song_id=song_id, reason=reason, deleted_at=datetime.now(UTC))
        try:
            await run_in_threadpool(publish_deleted, producer, settings.kafka.topics.songs_deleted, [event])
        except Exception as exc:
            log.warning("songs.deleted for %s not published: %s: %s", song_id, type(exc).__name__, exc)
            raise ApiError(
                503,
                "event_not_published",
                "the song is out of the score store, but songs.deleted could not be published, so its vector "
                "stays in the index: retry the DELETE",
            ) from None
        body = {
            "song_id": song_id,
            "deleted": True,
            "had_record": deletion.had_record,
            "already_deleted": deletion.already_deleted,
            "feeds": list(deletion.feeds),
            "reason": reason,
            "deleted_at": event.deleted_at.isoformat(),
        }
        return json_response(body, finite=True)

    reload = Coalesced(index.load)  # a full reload costs a snapshot read and, briefly, two indexes

    @app.post("/v1/index/reload", tags=["songs"], dependencies=[admin("reload")], responses=ERRORS)
    async def reload_index() -> dict[str, Any]:
        """Reload the index from the newest snapshot and the store now (it also catches up every
        ``api.index_refresh_s``); an admin action, and calls during a reload share the next one."""
        status = await reload()
        return {"ready": status.ready, "vectors": status.vectors, "source": status.source, "reason": status.reason}

    app.include_router(events_router(settings, producer, auth))  # POST /v1/events (ranker.serving.ingest)

    app.state.index = index
    app.state.producer = producer
    app.state.served = served
    return app
