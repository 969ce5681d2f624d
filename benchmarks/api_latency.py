"""Latency of the feed API under load, its overhead over raw Redis, reranking, and similar-song search.

What is measured, and why (issue 14's targets; every figure beside the raw Redis reads and the
previous implementation, in one run):

a. **Feed pages of 50, sequential, against the raw Redis reads of the same page.** ``apexrank
   serve`` runs in its own process (the default ``cold-start`` policy: 10% exploration by
   Thompson sampling, near-duplicate suppression on 768-d vectors) over N scored songs in a
   private Redis, serving pages from its in-memory song table. On one keep-alive connection
   the API's page alternates call by call with the page done directly (ZREVRANGE 0 49
   WITHSCORES + one pipelined HMGET of the same fields for the 50 songs, redis.asyncio +
   hiredis, one connection): first pages, then cursor pages 2-4. Target: API p50 <= raw p50.
b. **Feed throughput under load**, one server per ``--server-workers`` value (1,2: uvicorn
   ``--workers``). A load generator in this process (asyncio or ``--client-loop uvloop``, raw
   HTTP/1.1 keep-alive on loopback, bounded in time) sends an **open-loop** stream at each
   fixed rate: latency is measured from each request's scheduled send time, so a stalled
   server is charged for the queue it causes (no coordinated omission). Requests mix first
   pages (70%) and pages 2-4 through cursors (30%). The CPU share of each server process and
   of the load generator is recorded, and which HTTP parser and event loop the server loaded
   (from /proc/PID/maps). Target: >= 1,000 req/s with p99 <= 10 ms on 2 workers. A
   closed-loop run (C connections back to back) gives the saturation throughput.
c. **POST /v1/rank with 500 candidates**, sequential (explain on and off), then open loop at
   100 req/s. Target: p99 <= 8 ms with explanations.
d. **The previous implementation, in this process** (before any server starts): the same 500
   candidates through ``FeedReader.rank_response`` (song table) and through the per-song
   reference that reads Redis (tests/reference_rank.py), and feed pages (first and cursor)
   through ``FeedReader.page`` (song table) and the per-page store reads it replaced
   (tests/reference_feed.py), alternating call by call on the same data, with the same
   Thompson seed (``--profile-rank FILE``, ``--profile-page FILE``: pyinstrument profiles of
   the new paths). ``--old-server DIR`` also serves a checkout of the previous whole server
   (``git worktree add DIR 16af7d4``: it reads Redis on every request) over HTTP, with the
   same sequential figures and a throughput run at ``--old-rates``.
e. **Similar songs, k=10, over 1M clustered vectors**, through the project's
   ``FaissVectorIndex`` (what the API searches): the flat index and the approximate
   IVF index for each nprobe, one query at a time (the API's access pattern), with
   recall@10 against the flat index's exact answers. Vectors are L2-normalised two-level
   Gaussian clusters (random Gaussian vectors make every ANN index look broken, tight
   clusters make every one look perfect; see ``clustered``).

Run from the repository root (writes its own Redis, index and state under a temp dir)::

    .venv/bin/python benchmarks/api_latency.py --json bench-api.json
    .venv/bin/python benchmarks/api_latency.py --skip-ann --page-cache-ttl 0 --old-server /tmp/old16
    .venv/bin/python benchmarks/api_latency.py --quick      # a smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

# One BLAS thread, as ``apexrank serve`` sets before numpy loads: the in-process pages' 70 x 768
# Gram product takes 0.1 ms on one thread and several ms with idle BLAS threads spinning on a
# busy 2-core machine (measured here: the in-process page p50 went from 1 to 9.6 ms at load 4).
# The ANN part's batched flat search then runs on one BLAS thread too.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import redis.asyncio  # noqa: E402
from _common import loadavg, private_redis  # noqa: E402
from _common import machine_info as common_machine_info  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from consumers.stack import free_port  # noqa: E402
from indexes import EmbeddingIndex, EmbeddingRecord, RedisScoreStore, RedisStoreConfig, SongRecord  # noqa: E402
from indexes.faiss_index import FaissIndexConfig, FaissVectorIndex  # noqa: E402
from ranker.events import TASKS  # noqa: E402
from ranker.serving.state import READ_FIELDS  # noqa: E402
from ranker.serving.writer import FeedWriter  # noqa: E402
from ranker.settings import IndexSettings, RedisSettings, Settings  # noqa: E402

PREFIX = "bench"


# -- small helpers -------------------------------------------------------------------------------
def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


def summary(lat_s: Sequence[float], wall_s: float, errors: int = 0) -> dict[str, Any]:
    ms = [1000 * v for v in lat_s]
    return {
        "requests": len(ms),
        "errors": errors,
        "req_per_s": len(ms) / wall_s if wall_s > 0 else float("nan"),
        "p50_ms": pct(ms, 50),
        "p90_ms": pct(ms, 90),
        "p99_ms": pct(ms, 99),
        "max_ms": max(ms) if ms else float("nan"),
    }


def machine_info() -> dict[str, Any]:
    import faiss
    import fastapi
    import uvicorn

    return {
        **common_machine_info(),
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "faiss": faiss.__version__,
        "http_parser": "httptools" if _has("httptools") else "h11 (pure Python)",
        "event_loop": "uvloop" if _has("uvloop") else "asyncio",
    }


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def cpu_by_process(pid: int) -> dict[int, float]:
    """User + system CPU seconds of a process and of each of its children (uvicorn's workers), from /proc."""
    out: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if stat.parent.name == str(pid) or int(fields[1]) == pid:
                out[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children, from /proc."""
    return sum(cpu_by_process(pid).values())


def server_runtime(pid: int) -> dict[str, Any]:
    """What the server processes actually loaded: the HTTP parser and event loop (from /proc/PID/maps)."""
    procs = sorted(cpu_by_process(pid))
    maps = ""
    for p in procs:
        with contextlib.suppress(OSError):
            maps += Path(f"/proc/{p}/maps").read_text()
    return {
        "processes": len(procs),
        "http_parser": "httptools" if "httptools" in maps else "h11 (pure Python)",
        "event_loop": "uvloop" if "uvloop" in maps else "asyncio",
    }


# -- services ------------------------------------------------------------------------------------
@contextlib.contextmanager
def api_server(
    settings: Settings,
    state: Path,
    workers: int = 1,
    pythonpath: str | None = None,
    page_cache_ttl_s: float = 1.0,
    code: Path = ROOT,
) -> Iterator[tuple[str, int, subprocess.Popen[bytes]]]:
    """``apexrank serve`` in a subprocess, configured through APEXRANK_* variables.

    ``code``: the source tree to run (another checkout: the previous implementation), first on
    the server's ``sys.path``. Ready once ``/readyz`` answers 200 (Redis, the song table and the
    index) and every process of the server has gone idle (with ``workers > 1`` a worker that is
    still loading accepts no connection, so one 200 does not say the others are ready).
    """
    port = free_port()
    env = {
        **os.environ,
        "APEXRANK_REDIS__URL": settings.redis.url.get_secret_value(),
        "APEXRANK_REDIS__KEY_PREFIX": PREFIX,
        "APEXRANK_INDEX__PATH": str(settings.index_dir),
        "APEXRANK_STATE_DIR": str(state),
        "APEXRANK_API__PAGE_CACHE_TTL_S": str(page_cache_ttl_s),
    }
    paths = [str(code)] if code != ROOT else []
    if pythonpath:  # e.g. a --target directory holding httptools and uvloop, to compare
        paths.append(pythonpath)
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (*paths, env.get("PYTHONPATH")) if p)
    log = open(state / f"serve-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "consumers.cli",
            "--log-level",
            "WARNING",
            "serve",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
        cwd=code,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r,
            ):
                if r.status == 200:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"apexrank serve did not become ready; see {log.name}")
            time.sleep(0.2)
        before = cpu_by_process(proc.pid)
        while True:  # every worker loaded: none of the processes is still busy, and there are all of them
            time.sleep(0.5)
            now = cpu_by_process(proc.pid)
            busy = any(now.get(p, 0.0) - before.get(p, 0.0) > 0.05 for p in now)
            if not busy and len(now) >= (workers + 1 if workers > 1 else 1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"apexrank serve's workers did not all settle; see {log.name}")
            before = now
        yield "127.0.0.1", port, proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


# -- data ----------------------------------------------------------------------------------------
#: Songs come from GENERATORS generators and carry 2 of TAGS tags (t0...), at random. The filtered page
#: asks for one generator, any of 2 tags, and excludes 50 of the songs that pass (the first filtered
#: page's, so the scan must read past them): about 2.3% of the feed passes.
GENERATORS, TAGS = 20, 8
FILTER_QUERY = "&generator=gen-3&tag=t1&tag=t4"
#: The personal page's listener: LISTENER_LIKES likes on songs of one style, and LISTENER_HEARD songs heard.
LISTENER, LISTENER_LIKES, LISTENER_HEARD = "bench-listener", 40, 300


def populate(settings: Settings, n: int, dim: int, seed: int) -> list[str]:
    """N scored songs over the last week (10% with engagement) in Redis, and their vectors in the index."""
    rng = np.random.default_rng(seed)
    now = time.time()
    ids = [f"song-{i:07d}" for i in range(n)]
    store = RedisScoreStore(RedisStoreConfig(url=settings.redis.url.get_secret_value(), key_prefix=PREFIX))
    writer = FeedWriter(settings, store)
    for start in range(0, n, 2000):
        batch = []
        for sid in ids[start : start + 2000]:
            scores = {t: float(rng.uniform(0, 100) if t in ("streams", "likes") else rng.uniform(1, 5)) for t in TASKS}
            created = now - float(rng.uniform(0, 7 * 24 * 3600))
            batch.append(
                SongRecord(
                    song_id=sid,
                    model_version="bench",
                    scores=scores,
                    rank_score=0.5,
                    generator=f"gen-{int(rng.integers(0, GENERATORS))}",
                    created_at=datetime.fromtimestamp(created, UTC).isoformat(),
                    scored_at=datetime.fromtimestamp(now, UTC).isoformat(),
                    extra={"tags": ",".join(f"t{t}" for t in rng.choice(TAGS, 2, replace=False)), "duration_s": 120.0},
                )
            )
        writer.on_scored(batch, now=now)
    engaged = rng.choice(n, size=n // 10, replace=False)
    pipe = store.client.pipeline(transaction=False)
    for i in engaged:
        plays = int(rng.integers(1, 500))
        pipe.hincrby(store.song_key(ids[i]), "eng.plays", plays)
        pipe.hincrby(store.song_key(ids[i]), "eng.likes", int(rng.binomial(plays, 0.1)))
    pipe.execute()
    writer.on_engagement([ids[i] for i in engaged], now=now)
    store.close()
    vectors = clustered(n, dim, max(8, n // 50), rng)
    index = EmbeddingIndex(settings.index_dir, dim=dim, factory="Flat", use_gpu="never")
    try:
        for start in range(0, n, 2000):
            index.add(
                [
                    EmbeddingRecord(ids[i], "bench", np.zeros((1, 1), np.float32), vectors[i], 1, 1)
                    for i in range(start, min(n, start + 2000))
                ]
            )
    finally:
        index.close()
    add_listener(settings, ids, vectors, rng)
    return ids


def add_listener(settings: Settings, ids: list[str], vectors: np.ndarray, rng: np.random.Generator) -> None:
    """The personal page's listener, written through the listener store as the feedback consumer writes:
    likes on the songs nearest one song (so the taste has a direction), plays on random others."""
    from indexes.listeners import ListenerEvent
    from ranker.stores import listener_store

    near = np.argsort(-(vectors @ vectors[0]))[:LISTENER_LIKES]
    played = rng.choice(len(ids), size=LISTENER_HEARD - LISTENER_LIKES, replace=False)
    now = time.time()
    events = [ListenerEvent(f"like-{i}", LISTENER, ids[i], "like", now - 60) for i in near.tolist()]
    events += [ListenerEvent(f"play-{i}", LISTENER, ids[i], "play", now - 60) for i in played.tolist()]
    store = listener_store(settings)
    try:
        store.record(events, {ids[i]: vectors[i] for i in near.tolist()})
    finally:
        store.close()


def clustered(n: int, dim: int, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """L2-normalised vectors in two levels of Gaussian clusters (float32), built in chunks.

    ``clusters`` styles in ``clusters / 200`` genres, with point noise larger than the
    style offsets: neighbourhoods overlap across IVF cell borders, as real embeddings do.
    (Tight one-level clusters give every index a recall of 1.0 and say nothing; at 100k
    vectors and 256 lists these parameters give recall@10 0.54 / 0.87 / 0.996 at nprobe
    1 / 4 / 16.)
    """

    def noise(m: int, norm: float) -> np.ndarray:
        return (norm / np.sqrt(dim)) * rng.standard_normal((m, dim), dtype=np.float32)

    genres = noise(max(2, clusters // 200), 1.0)
    styles = genres[rng.integers(0, len(genres), size=clusters)] + noise(clusters, 0.5)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(n, start + 100_000) - start
        chunk = styles[rng.integers(0, clusters, size=m)] + noise(m, 1.0)
        out[start : start + m] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


# -- HTTP load generation --------------------------------------------------------------------------
class Conn:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> Conn:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await self.reader.readexactly(length)
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()


def post(path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def open_loop(
    host: str, port: int, requests: Sequence[bytes], rate: float, duration_s: float, conns: int
) -> dict[str, Any]:
    """Send at ``rate`` req/s for ``duration_s``; latency counted from each scheduled send time."""
    pool: asyncio.Queue[Conn] = asyncio.Queue()
    for _ in range(conns):
        pool.put_nowait(await Conn(host, port).open())
    n = int(rate * duration_s)
    lat: list[float] = []
    errors = 0
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        nonlocal errors
        due = t0 + i / rate
        conn = await pool.get()
        try:
            status, _ = await conn.send(requests[i % len(requests)])
            if status != 200:
                errors += 1
            lat.append(time.perf_counter() - due)
        finally:
            pool.put_nowait(conn)

    tasks = []
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    while not pool.empty():
        await pool.get_nowait().close()
    return {"offered_req_per_s": rate, **summary(lat, wall, errors)}


async def closed_loop(host: str, port: int, requests: Sequence[bytes], duration_s: float, conns: int) -> dict[str, Any]:
    """``conns`` connections sending back to back: the saturation throughput."""
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration_s

    async def worker(k: int) -> None:
        nonlocal errors
        conn = await Conn(host, port).open()
        i = k
        while time.perf_counter() < stop:
            t = time.perf_counter()
            status, _ = await conn.send(requests[i % len(requests)])
            lat.append(time.perf_counter() - t)
            errors += status != 200
            i += conns
        await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(conns)))
    return {"connections": conns, **summary(lat, time.perf_counter() - t0, errors)}


async def sequential(host: str, port: int, requests: Sequence[bytes], n: int) -> dict[str, Any]:
    conn = await Conn(host, port).open()
    lat: list[float] = []
    errors = 0
    for i in range(n):
        t = time.perf_counter()
        status, _ = await conn.send(requests[i % len(requests)])
        lat.append(time.perf_counter() - t)
        errors += status != 200
    await conn.close()
    return summary(lat, sum(lat), errors)


async def raw_vs_api(url: str, host: str, port: int, requests: Sequence[bytes], n: int) -> dict[str, Any]:
    """The raw Redis reads of a page and the API's page, alternating one by one (same load on both).

    Raw: ZREVRANGE 0 49 WITHSCORES + one pipelined HMGET of the page's fields for the 50 songs
    (redis.asyncio + hiredis, one connection); API: ``requests`` in turn on one keep-alive connection.
    """
    client = redis.asyncio.Redis.from_url(url, decode_responses=True)
    store = RedisScoreStore(RedisStoreConfig(url=url, key_prefix=PREFIX))
    key = store.feed_key("cold-start")
    fields = list(READ_FIELDS)
    conn = await Conn(host, port).open()
    raw: list[float] = []
    api: list[float] = []
    errors = 0
    for i in range(n):
        for which in ("raw", "api") if i % 2 == 0 else ("api", "raw"):
            t = time.perf_counter()
            if which == "raw":
                rows: list[Any] = await client.zrevrange(key, 0, 49, withscores=True)
                pipe = client.pipeline(transaction=False)
                for member, _score in rows:
                    pipe.hmget(store.song_key(str(member)), fields)
                await pipe.execute()
                raw.append(time.perf_counter() - t)
            else:
                status, _ = await conn.send(requests[i % len(requests)])
                api.append(time.perf_counter() - t)
                errors += status != 200
    await conn.close()
    await client.aclose()
    store.close()
    return {"raw": summary(raw, sum(raw)), "api": summary(api, sum(api), errors)}


async def paired(host: str, port: int, a: Sequence[bytes], b: Sequence[bytes], n: int) -> dict[str, Any]:
    """Requests ``a`` and ``b`` alternating one by one on one keep-alive connection (same load on both)."""
    conn = await Conn(host, port).open()
    lat: dict[str, list[float]] = {"a": [], "b": []}
    errors = 0
    for i in range(n):
        for which in ("a", "b") if i % 2 == 0 else ("b", "a"):
            raw = (a if which == "a" else b)[i % len(a if which == "a" else b)]
            t = time.perf_counter()
            status, _ = await conn.send(raw)
            lat[which].append(time.perf_counter() - t)
            errors += status != 200
    await conn.close()
    return {"a": summary(lat["a"], sum(lat["a"]), errors), "b": summary(lat["b"], sum(lat["b"]))}


def fetch_json(host: str, port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as r:
        return json.loads(r.read())


# -- rank in-process: the vectorised path against the per-song reference ---------------------------
def bench_rank_inprocess(
    settings: Settings, url: str, samples: Sequence[list[str]], n: int, profile: str | None = None
) -> dict[str, Any]:
    """``n`` calls of each path per explain setting, alternating which goes first; the body serialised
    as the API does (new: ``_json`` on the checked arrays, orjson when installed; reference: json.dumps)."""
    from ranker.serving.reader import FeedReader
    from ranker.serving.responses import json_response as _json
    from tests.reference_rank import reference_rank

    async def run() -> dict[str, Any]:
        store = RedisScoreStore(RedisStoreConfig(url=url, key_prefix=PREFIX))
        reads = store.async_reads()
        reader = FeedReader(settings, reads)
        t = time.perf_counter()
        await reader.sync.load()  # the song table the vectorised path reads; the reference reads Redis
        table_load_s = time.perf_counter() - t
        policy = reader.policy(settings.feed.name)

        async def new(candidates: list[str], explain: bool) -> tuple[float, float]:
            t = time.perf_counter()
            ranked = await reader.rank_response(candidates, policy, explain=explain)
            t1 = time.perf_counter()
            assert ranked.non_finite is None
            _json(ranked.body, finite=True)
            return t1 - t, time.perf_counter() - t

        async def old(candidates: list[str], explain: bool) -> tuple[float, float]:
            t = time.perf_counter()
            body = await reference_rank(reader, candidates, policy, explain=explain)
            t1 = time.perf_counter()
            json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
            return t1 - t, time.perf_counter() - t

        paths = {"vectorised": new, "reference": old}
        lat: dict[str, list[tuple[float, float]]] = {f"{p}_{e}": [] for p in paths for e in ("explain", "lean")}
        for i in range(20):  # warm up (and check the two agree on the order)
            a = await reader.rank(samples[i % len(samples)], policy)
            b = await reference_rank(reader, samples[i % len(samples)], policy)
            assert [x["song_id"] for x in a["items"]] == [x["song_id"] for x in b["items"]]
        for i in range(n):
            names = list(paths) if i % 2 == 0 else list(paths)[::-1]
            for explain in (True, False):
                for name in names:
                    key = f"{name}_{'explain' if explain else 'lean'}"
                    lat[key].append(await paths[name](samples[i % len(samples)], explain))
        out: dict[str, Any] = {"calls_per_path": n, "candidates": len(samples[0]), "table_load_s": table_load_s}
        for key, pairs in lat.items():
            calls, bodies = [r for r, _ in pairs], [b for _, b in pairs]
            out[key] = {"rank": summary(calls, sum(calls)), "with_body": summary(bodies, sum(bodies))}
        if profile:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0002, async_mode="enabled")
            profiler.start()
            for i in range(n):
                await new(samples[i % len(samples)], True)
            profiler.stop()
            Path(profile).write_text(profiler.output_text(unicode=False, color=False, show_all=False))
        await reads.close()
        store.close()
        return out

    return asyncio.run(run())


# -- feed pages in-process: the song table against the per-song store path --------------------------
def bench_page_inprocess(settings: Settings, url: str, n: int, profile: str | None = None) -> dict[str, Any]:
    """``n`` pages of each path and kind (first page, cursor pages 2-4), alternating which goes first.

    New: ``FeedReader.page`` over the loaded song table, then the API's ``_json``. Reference:
    tests/reference_feed.py (a ZRANGE and an HMGET of the window per page, a SongState per song),
    then ``_json`` too (the API served it so). Both with the index's vectors for the
    near-duplicate check and the page cache off; the same Thompson seed per call.
    """
    from ranker.serving.reader import FeedReader
    from ranker.serving.responses import json_response as _json
    from ranker.stores import index_reader
    from tests.reference_feed import ReferencePages

    settings = settings.model_copy(update={"api": settings.api.model_copy(update={"page_cache_ttl_s": 0.0})})

    async def run() -> dict[str, Any]:
        store = RedisScoreStore(RedisStoreConfig(url=url, key_prefix=PREFIX))
        reads = store.async_reads()
        index = index_reader(settings)
        index.load()
        reader = FeedReader(settings, reads, index)
        t = time.perf_counter()
        await reader.sync.load()
        table_load_s = time.perf_counter() - t
        reference = ReferencePages(reader)
        feed = settings.feed.name
        cursors: list[str] = []
        cursor = None
        for _ in range(3):
            cursor = (await reader.page(feed, 50, cursor, rng=np.random.default_rng(0))).next_cursor
            assert cursor is not None
            cursors.append(cursor)
        kinds: dict[str, list[str | None]] = {"first": [None], "cursor": list(cursors)}

        async def new(c: str | None, seed: int) -> tuple[float, float, list[str]]:
            t = time.perf_counter()
            page = await reader.page(feed, 50, c, rng=np.random.default_rng(seed))
            t1 = time.perf_counter()
            _json({"feed": page.feed, "items": page.items, "next_cursor": page.next_cursor})
            return t1 - t, time.perf_counter() - t, [i["song_id"] for i in page.items]

        async def old(c: str | None, seed: int) -> tuple[float, float, list[str]]:
            t = time.perf_counter()
            page = await reference.page(feed, 50, c, rng=np.random.default_rng(seed))
            t1 = time.perf_counter()
            _json({"feed": page.feed, "items": page.items, "next_cursor": page.next_cursor})
            return t1 - t, time.perf_counter() - t, [i["song_id"] for i in page.items]

        paths = {"table": new, "reference": old}
        same = compared = 0
        for i in range(20):  # warm up, and check the two serve the same pages
            c = ([None, *cursors])[i % 4]
            a, b = await new(c, i), await old(c, i)
            same += a[2] == b[2]
            compared += 1
        lat: dict[str, list[tuple[float, float]]] = {f"{p}_{k}": [] for p in paths for k in kinds}
        for i in range(n):
            names = list(paths) if i % 2 == 0 else list(paths)[::-1]
            for kind, tokens in kinds.items():
                c = tokens[i % len(tokens)]
                for name in names:
                    t_call, t_body, _ = await paths[name](c, i)
                    lat[f"{name}_{kind}"].append((t_call, t_body))
        out: dict[str, Any] = {
            "calls_per_path": n,
            "table_load_s": table_load_s,
            "table_songs": len(reader.table),
            "same_pages": f"{same}/{compared}",
        }
        for key, pairs in lat.items():
            calls, bodies = [r for r, _ in pairs], [b for _, b in pairs]
            out[key] = {"page": summary(calls, sum(calls)), "with_body": summary(bodies, sum(bodies))}
        if profile:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0002, async_mode="enabled")
            profiler.start()
            for i in range(n):
                await new(([None, *cursors])[i % 4], i)
            profiler.stop()
            Path(profile).write_text(profiler.output_text(unicode=False, color=False, show_all=False))
        index.close()
        await reads.close()
        store.close()
        return out

    return asyncio.run(run())


# -- the API benchmark ---------------------------------------------------------------------------
def run_client(main: Any, loop: str) -> Any:
    """Run the load generator's coroutine on the stock asyncio loop or on uvloop (``--client-loop``)."""
    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


async def throughput(
    host: str,
    port: int,
    proc: subprocess.Popen[bytes],
    mix: Sequence[bytes],
    args: argparse.Namespace,
    rates: Sequence[float],
) -> dict[str, Any]:
    """Open loop at each rate, then the closed loop; the CPU share of the server's processes and of this one."""
    out: dict[str, Any] = {"open_loop": []}
    for rate in rates:
        cpu0, own0 = cpu_by_process(proc.pid), time.process_time()
        res = await open_loop(host, port, mix, rate, args.duration, args.conns)
        cpu1, own1 = cpu_by_process(proc.pid), time.process_time()
        wall = res["requests"] / res["req_per_s"]
        shares = {pid: (cpu1[pid] - cpu0.get(pid, 0.0)) / wall for pid in sorted(cpu1)}
        res["server_cpu_share"] = sum(shares.values())
        # uvicorn's supervisor (with --workers > 1) serves nothing: the workers' shares alone
        res["worker_cpu_shares"] = [v for pid, v in shares.items() if pid != proc.pid or len(shares) == 1]
        res["client_cpu_share"] = (own1 - own0) / wall
        out["open_loop"].append(res)
        print(f"  feed open loop {rate:>6.0f}/s: {res}", flush=True)
    out["closed_loop"] = await closed_loop(host, port, mix, args.duration, args.conns)
    print(f"  feed closed loop: {out['closed_loop']}", flush=True)
    return out


def bench_api(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"servers": {}}
    with private_redis(work) as (url, _pid):
        settings = Settings(
            state_dir=work / "state",
            redis=RedisSettings(url=SecretStr(url), key_prefix=PREFIX),
            index=IndexSettings(path=work / "index"),
        )
        t = time.perf_counter()
        ids = populate(settings, args.songs, args.dim, args.seed)
        out["songs"], out["populate_s"] = len(ids), time.perf_counter() - t
        print(f"populated {len(ids)} songs ({args.dim}-d vectors) in {out['populate_s']:.1f}s", flush=True)
        pick = random.Random(args.seed)
        samples = [pick.sample(ids, 500) for _ in range(20)]
        out["rank500_inprocess"] = bench_rank_inprocess(
            settings, url, samples, max(100, args.seq // 2), args.profile_rank
        )
        print(f"rank 500 in-process: {out['rank500_inprocess']}", flush=True)
        out["page_inprocess"] = bench_page_inprocess(settings, url, max(100, args.seq // 2), args.profile_page)
        print(f"feed page in-process: {out['page_inprocess']}", flush=True)
        (work / "state").mkdir(exist_ok=True)
        rank_bodies = [post("/v1/rank", json.dumps({"candidates": c}).encode()) for c in samples]
        lean_bodies = [post("/v1/rank", json.dumps({"candidates": c, "explain": False}).encode()) for c in samples]
        first = get("/v1/feeds/cold-start?limit=50")
        pages: list[bytes] = []  # pages 2-4 through cursors, collected from the first server
        filtered: list[bytes] = []  # the filtered first page, then its pages 2-4
        personal: list[bytes] = []  # the listener's first page, then their pages 2-4

        def latency(host: str, port: int, full: bool) -> dict[str, Any]:
            """Sequential figures on one keep-alive connection (the raw Redis reads alternating with the page)."""
            res: dict[str, Any] = {}
            mix = [first] * 7 + pages

            async def run() -> None:
                await sequential(host, port, mix, 200)  # warm up
                await sequential(host, port, rank_bodies, 20)
                res["page_vs_raw"] = await raw_vs_api(url, host, port, [first], args.seq)
                res["cursor_vs_raw"] = await raw_vs_api(url, host, port, pages, args.seq // 2)
                res["page_mix_seq"] = await sequential(host, port, mix, args.seq)
                if filtered:
                    res["filtered_first"] = await paired(host, port, [first], filtered[:1], args.seq // 2)
                    if filtered[1:]:  # a small feed's filtered walk may be one page
                        res["filtered_cursor"] = await paired(host, port, pages, filtered[1:], args.seq // 2)
                if personal:
                    res["personal_first"] = await paired(host, port, [first], personal[:1], args.seq // 2)
                    res["personal_cursor"] = await paired(host, port, pages, personal[1:], args.seq // 2)
                res["rank500_seq"] = await sequential(host, port, rank_bodies, max(100, args.seq // 2))
                res["rank500_noexplain_seq"] = await sequential(host, port, lean_bodies, max(100, args.seq // 2))
                if full:
                    res["rank500_open_loop_100"] = await open_loop(
                        host, port, rank_bodies, 100, args.duration, args.conns
                    )
                    sim = [get(f"/v1/songs/{ids[i]}/similar?k=10") for i in range(0, len(ids), max(1, len(ids) // 200))]
                    res["similar_api_seq"] = await sequential(host, port, sim, 200)

            run_client(run(), args.client_loop)
            return res

        for k, workers in enumerate(args.server_workers):
            label = f"new, {workers} worker{'s' if workers > 1 else ''}"
            print(f"server: {label}", flush=True)
            server = api_server(settings, work / "state", workers, args.server_pythonpath, args.page_cache_ttl)
            with server as (host, port, proc):
                res: dict[str, Any] = {"workers": workers, **server_runtime(proc.pid)}
                if not pages:
                    cursor = None
                    for _ in range(3):
                        q = "/v1/feeds/cold-start?limit=50" + (f"&cursor={cursor}" if cursor else "")
                        cursor = fetch_json(host, port, q)["next_cursor"]
                        pages.append(get(f"/v1/feeds/cold-start?limit=50&cursor={cursor}"))
                    page = fetch_json(host, port, "/v1/feeds/cold-start?limit=50")
                    out["explore_items_per_page"] = sum(1 for i in page["items"] if i["explore"])
                    top = fetch_json(host, port, "/v1/feeds/cold-start?limit=50" + FILTER_QUERY)
                    query = FILTER_QUERY + "&exclude=" + ",".join(i["song_id"] for i in top["items"])
                    cursor = None
                    for _ in range(4):
                        q = "/v1/feeds/cold-start?limit=50" + query + (f"&cursor={cursor}" if cursor else "")
                        filtered.append(get(q))
                        body = fetch_json(host, port, q)
                        cursor = body["next_cursor"]
                        out.setdefault("filtered_items_per_page", []).append(len(body["items"]))
                        if not cursor:
                            break
                    cursor = None
                    for _ in range(4):
                        q = f"/v1/feeds/cold-start?limit=50&user={LISTENER}" + (f"&cursor={cursor}" if cursor else "")
                        personal.append(get(q))
                        body = fetch_json(host, port, q)
                        cursor = body["next_cursor"]
                        out.setdefault("personal_taste_items_per_page", []).append(
                            sum(1 for i in body["items"] if "taste" in i["components"])
                        )
                res.update(latency(host, port, full=k == 0))
                print(
                    f"  sequential: { {key: v for key, v in res.items() if key.endswith(('seq', 'raw'))} }", flush=True
                )
                mix = [first] * 7 + pages
                res.update(run_client(throughput(host, port, proc, mix, args, args.rates), args.client_loop))
                out["servers"][label] = res
        if args.old_server:
            label = f"previous ({git_short(Path(args.old_server))}), {args.old_server_workers} worker(s)"
            print(f"server: {label}", flush=True)
            server = api_server(
                settings, work / "state", args.old_server_workers, args.server_pythonpath, args.page_cache_ttl,
                code=Path(args.old_server).resolve(),
            )  # fmt: skip
            with server as (host, port, proc):
                res = {"workers": args.old_server_workers, "previous": True, **server_runtime(proc.pid)}
                res.update(latency(host, port, full=False))
                mix = [first] * 7 + pages
                res.update(run_client(throughput(host, port, proc, mix, args, args.old_rates), args.client_loop))
                out["servers"][label] = res
    return out


def git_short(tree: Path) -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True, check=True
        ).stdout.strip()
    return str(tree)


# -- similar songs over many vectors -------------------------------------------------------------
def bench_ann(n: int, dim: int, nlist: int, nprobes: Sequence[int], queries: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    data = clustered(n, dim, max(16, n // 50), rng)
    keys = np.arange(1, n + 1, dtype=np.int64)
    out: dict[str, Any] = {"n": n, "dim": dim, "gen_s": time.perf_counter() - t}
    qi = rng.choice(n, size=queries, replace=False)
    q = data[qi]
    flat = FaissVectorIndex(FaissIndexConfig(dim=dim, factory="Flat", use_gpu="never"))
    t = time.perf_counter()
    for start in range(0, n, 200_000):
        flat.upsert(keys[start : start + 200_000], data[start : start + 200_000])
    out["flat_build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    _, truth = flat.search(q, 11)
    out["flat_batch_ms_per_query"] = 1000 * (time.perf_counter() - t) / queries
    lat = []
    for i in range(min(queries, 50)):
        t = time.perf_counter()
        flat.search(q[i], 11)
        lat.append(time.perf_counter() - t)
    out["flat_single"] = summary(lat, sum(lat))
    del flat
    truth_sets = [set(row[row != keys[qi[j]]][:10].tolist()) for j, row in enumerate(truth)]
    factory = f"IVF{nlist},Flat"
    ivf = FaissVectorIndex(FaissIndexConfig(dim=dim, factory=factory, use_gpu="never"))
    t = time.perf_counter()
    for start in range(0, n, 200_000):
        ivf.upsert(keys[start : start + 200_000], data[start : start + 200_000])
    ivf.train_now()
    out["ivf_factory"], out["ivf_build_s"], out["ivf_train_size"] = factory, time.perf_counter() - t, ivf.train_size
    import faiss

    inner = faiss.extract_index_ivf(ivf._cpu)  # the knob the API's index config sets (nprobe)
    out["ivf"] = []
    for nprobe in nprobes:
        inner.nprobe = nprobe
        lat = []
        hits = 0
        for j in range(queries):
            t = time.perf_counter()
            _, found = ivf.search(q[j], 11)
            lat.append(time.perf_counter() - t)
            got = [k for k in found[0].tolist() if k != keys[qi[j]]][:10]
            hits += len(truth_sets[j] & set(got))
        out["ivf"].append({"nprobe": nprobe, "recall_at_10": hits / (10 * queries), **summary(lat, sum(lat))})
        print(f"ivf nprobe={nprobe}: {out['ivf'][-1]}", flush=True)
    return out


# -- report --------------------------------------------------------------------------------------
def _pp(r: dict[str, Any]) -> str:
    return f"{r['p50_ms']:6.2f} / {r['p99_ms']:6.2f}"


def verdicts(api: dict[str, Any]) -> list[str]:
    """The issue's three serving targets against the new server's figures (first server for sequential)."""
    servers = [(k, v) for k, v in api["servers"].items() if not v.get("previous")]
    if not servers:
        return []
    first = servers[0][1]
    lines = []
    r = first["rank500_seq"]
    miss = r["p99_ms"] - 8
    lines.append(
        f"target rank 500 sequential p99 <= 8 ms (explain on): {r['p99_ms']:.2f} ms"
        f" -> {'met' if miss <= 0 else f'missed by {miss:.2f} ms'}"
    )
    pv = first["page_vs_raw"]
    a, b = pv["api"]["p50_ms"], pv["raw"]["p50_ms"]
    lines.append(
        f"target feed page p50 <= raw Redis p50: {a:.2f} vs {b:.2f} ms (x{a / b:.2f})"
        f" -> {'met' if a <= b else f'missed by {a - b:.2f} ms'}"
    )
    for kind in ("first", "cursor"):
        f = first.get(f"personal_{kind}")
        if f:
            ratio = f["b"]["p50_ms"] / f["a"]["p50_ms"]
            lines.append(
                f"target personal {kind} page p50 <= 1.5 x cold-start p50: x{ratio:.2f}"
                f" -> {'met' if ratio <= 1.5 else 'missed'}"
            )
    for label, res in servers:
        best = [o for o in res["open_loop"] if o["offered_req_per_s"] >= 1000]
        for o in best:
            ok = o["req_per_s"] >= 0.98 * o["offered_req_per_s"] and o["p99_ms"] <= 10 and not o["errors"]
            lines.append(
                f"target >= 1,000 req/s open loop, p99 <= 10 ms ({label}): offered {o['offered_req_per_s']:.0f},"
                f" achieved {o['req_per_s']:.0f}, p99 {o['p99_ms']:.1f} ms -> {'met' if ok else 'missed'}"
            )
    return lines


def report(result: dict[str, Any]) -> str:
    a = result["args"]
    lines = [
        f"page cache {a['page_cache_ttl']} s, client loop {a['client_loop']}, extra server path"
        f" {a['server_pythonpath'] or '-'}",
        f"machine: {result['machine']}",
        f"load average before/after: {result['loadavg_before']} / {result.get('loadavg_after')}",
    ]
    api = result.get("api")
    if api:
        lines.append(f"songs: {api['songs']}; explore items on a page of 50: {api.get('explore_items_per_page')}")
        lines.append(
            f"filtered page: {FILTER_QUERY[1:]} + exclude of the 50 songs of its first page; items on its pages"
            f" 1-4: {api.get('filtered_items_per_page')}"
        )
        lines.append(
            f"personal page: user={LISTENER} ({LISTENER_LIKES} likes near one song, {LISTENER_HEARD} songs heard);"
            f" items with the taste term on its pages 1-4: {api.get('personal_taste_items_per_page')}"
        )
        inproc = api.get("rank500_inprocess")
        if inproc:
            lines.append(
                f"rank 500 in-process ({inproc['calls_per_path']} calls per path, alternating; table load"
                f" {inproc['table_load_s']:.2f} s), p50 / p99 ms, call | call + JSON body:"
            )
            for key in ("vectorised_explain", "reference_explain", "vectorised_lean", "reference_lean"):
                lines.append(f"  {key:<19} {_pp(inproc[key]['rank'])}  |  {_pp(inproc[key]['with_body'])}")
        pages = api.get("page_inprocess")
        if pages:
            lines.append(
                f"feed page of 50 in-process ({pages['calls_per_path']} per path and kind, alternating; same pages"
                f" {pages['same_pages']}), p50 / p99 ms, call | call + JSON body:"
            )
            for key in ("table_first", "reference_first", "table_cursor", "reference_cursor"):
                lines.append(f"  {key:<19} {_pp(pages[key]['page'])}  |  {_pp(pages[key]['with_body'])}")
        for label, res in api["servers"].items():
            lines.append(
                f"server {label}: {res['processes']} process(es), {res['http_parser']}, {res['event_loop']}"
                " (p50 / p99 ms)"
            )
            pv, cv = res["page_vs_raw"], res["cursor_vs_raw"]
            lines.append(
                f"  first page, sequential: API {_pp(pv['api'])}  raw Redis {_pp(pv['raw'])}"
                f"  -> x{pv['api']['p50_ms'] / pv['raw']['p50_ms']:.2f} (p50)"
            )
            lines.append(
                f"  cursor pages 2-4:       API {_pp(cv['api'])}  raw Redis {_pp(cv['raw'])}"
                f"  -> x{cv['api']['p50_ms'] / cv['raw']['p50_ms']:.2f} (p50)"
            )
            lines.append(f"  feed mix, sequential:   API {_pp(res['page_mix_seq'])}")
            for kind in ("first", "cursor"):
                f = res.get(f"filtered_{kind}")
                if f:
                    lines.append(
                        f"  filtered vs unfiltered, {kind:<6} pages (alternating): unfiltered {_pp(f['a'])}"
                        f"  filtered {_pp(f['b'])}  -> x{f['b']['p50_ms'] / f['a']['p50_ms']:.2f} (p50)"
                    )
            for kind in ("first", "cursor"):
                f = res.get(f"personal_{kind}")
                if f:
                    lines.append(
                        f"  personal vs cold-start, {kind:<6} pages (alternating): cold {_pp(f['a'])}"
                        f"  personal {_pp(f['b'])}  -> x{f['b']['p50_ms'] / f['a']['p50_ms']:.2f} (p50)"
                    )
            lines.append(
                f"  rank 500 sequential:    explain {_pp(res['rank500_seq'])}"
                f"  explain=false {_pp(res['rank500_noexplain_seq'])}"
            )
            if "rank500_open_loop_100" in res:
                r = res["rank500_open_loop_100"]
                lines.append(f"  rank 500 at 100 req/s:  {r['req_per_s']:.1f} achieved, {_pp(r)}")
            if "similar_api_seq" in res:
                lines.append(f"  similar k=10:           {_pp(res['similar_api_seq'])}")
            lines.append("  feed open loop (offered -> achieved, p50 / p90 / p99 / max ms, CPU: workers | client):")
            for r in res["open_loop"]:
                shares = " ".join(f"{v:.2f}" for v in r["worker_cpu_shares"])
                lines.append(
                    f"    {r['offered_req_per_s']:>6.0f} -> {r['req_per_s']:7.1f}  {r['p50_ms']:.2f} /"
                    f" {r['p90_ms']:.2f} / {r['p99_ms']:.2f} / {r['max_ms']:.1f}"
                    f"  cpu {shares} | {r['client_cpu_share']:.2f}"
                    f"  errors {r['errors']}"
                )
            c = res["closed_loop"]
            lines.append(
                f"  feed closed loop ({c['connections']} conns): {c['req_per_s']:.0f} req/s, p50 {c['p50_ms']:.1f}"
                f" p99 {c['p99_ms']:.1f} ms"
            )
        lines += verdicts(api)
    ann = result.get("ann")
    if ann:
        f = ann["flat_single"]
        lines.append(
            f"ANN {ann['n']:,} x {ann['dim']}: flat build {ann['flat_build_s']:.1f}s,"
            f" single query p50 {f['p50_ms']:.1f} ms p99 {f['p99_ms']:.1f} ms"
            f" (batched {ann['flat_batch_ms_per_query']:.1f} ms/query)"
        )
        lines.append(f"  {ann['ivf_factory']} build {ann['ivf_build_s']:.1f}s (trained on {ann['ivf_train_size']:,})")
        for r in ann["ivf"]:
            lines.append(
                f"  nprobe {r['nprobe']:>3}: recall@10 {r['recall_at_10']:.3f},"
                f" p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms"
            )
    return "\n".join(lines)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--songs", type=int, default=20_000, help="songs in the feed")
    p.add_argument("--dim", type=int, default=768, help="vector size of the feed's songs")
    p.add_argument("--rates", type=_floats, default=[250, 500, 750, 1000, 1250])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--seq", type=int, default=2000, help="sequential requests per latency comparison")
    p.add_argument("--ann-n", type=int, default=1_000_000)
    p.add_argument("--ann-dim", type=int, default=768)
    p.add_argument("--ann-nlist", type=int, default=1024)
    p.add_argument("--ann-nprobe", type=_ints, default=[4, 8, 16, 32, 64])
    p.add_argument("--ann-queries", type=int, default=200)
    p.add_argument(
        "--server-workers", type=_ints, default=[1, 2],
        help="apexrank serve --workers, one server per value (e.g. 1,2): every figure on the first, throughput on each",
    )  # fmt: skip
    p.add_argument("--server-pythonpath", help="extra PYTHONPATH for the server (e.g. httptools + uvloop)")
    p.add_argument("--page-cache-ttl", type=float, default=1.0, help="api.page_cache_ttl_s of the server")
    p.add_argument(
        "--old-server", metavar="DIR",
        help="also serve the previous implementation from this checkout (git worktree add DIR 16af7d4)",
    )  # fmt: skip
    p.add_argument("--old-server-workers", type=int, default=1)
    p.add_argument("--old-rates", type=_floats, default=[250, 500], help="open-loop rates for --old-server")
    p.add_argument("--client-loop", choices=("asyncio", "uvloop"), default="asyncio", help="the load generator's loop")
    p.add_argument("--profile-rank", help="write a pyinstrument profile of the in-process vectorised rank here")
    p.add_argument("--profile-page", help="write a pyinstrument profile of the in-process table page here")
    p.add_argument("--skip-api", action="store_true")
    p.add_argument("--skip-ann", action="store_true")
    p.add_argument("--quick", action="store_true", help="small sizes, short runs")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.songs, args.duration, args.seq, args.rates = 3000, 3.0, 300, [250, 1000]
        args.old_rates = [250]
        args.ann_n, args.ann_nlist, args.ann_queries, args.ann_nprobe = 50_000, 64, 50, [4, 16]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "loadavg_before": loadavg()}
    work = Path(tempfile.mkdtemp(prefix="apexrank-bench-api-"))
    try:
        if not args.skip_api:
            result["api"] = bench_api(args, work)
        if not args.skip_ann:
            result["ann"] = bench_ann(
                args.ann_n, args.ann_dim, args.ann_nlist, args.ann_nprobe, args.ann_queries, args.seed
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["loadavg_after"] = loadavg()
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
