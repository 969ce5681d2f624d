"""Which FAISS index at which collection size: Flat, IVF, IVF-PQ and HNSW over N x 768 vectors.

Measures what ``docs/indexes.md`` tabulates (issue 15, item 8). Per candidate factory:

* **build**: training time (IVF/PQ train on the first ``--train-size`` vectors of the stream,
  as the product does: ``FaissVectorIndex`` buffers them, then trains), fill time and add rate;
* **recall@10** against exact top 10 (by streaming the vectors through numpy) for
  ``--queries`` held-out queries, after a sweep of ``nprobe`` / ``efSearch`` that picks the
  smallest value reaching ``--target-recall`` (the sweep is printed too);
* **latency**: one query at a time, k=10, one thread (the API's per-request call), p50/p99;
  and batched throughput (all queries in one call, one thread);
* **bytes per vector**: the serialized size / N (what a snapshot writes) and the growth of
  the process's anonymous RSS while the index was filled / N (what it costs in RAM);
* **removal**: whether ``remove_ids`` works (takedown and retention need it) and what a
  1,000-key removal costs; HNSW cannot remove: its check shows ``remove_ids`` raising and
  search-time exclusion (an ``IDSelectorNot`` in the search parameters) working instead.

Every candidate except the IVF-PQ rerank variant goes through the product's
``FaissVectorIndex`` (what ships: its ID mapping, its training buffer, its checks). The
rerank variant takes IVF-PQ's top ``--rerank`` candidates and reorders them by exact inner
product with the stored float32 vectors (here a page-cached memmap; in the product the
embedding store would serve them).

Vectors: L2-normalised two-level Gaussian clusters (``--clusters`` styles in
``--clusters / 100`` genres; styles ``--style-spread`` from their genre, points 1.0 from their
style, so neighbourhoods cross IVF cell borders), the model of ``api_latency.clustered``, streamed to a float32
memmap in chunks so that only one index and one chunk are in RAM at a time. Random
Gaussian vectors would make every approximate index look broken and tight clusters make
every one look perfect. Queries are fresh draws from the same mixture, not in the index.

Run (from the repository root; the vectors go to a temporary directory, 3 GB at 1M)::

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python benchmarks/index_modes.py --n 100000
    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python benchmarks/index_modes.py --n 1000000 \\
        --build-threads 2 --json index_modes.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's packages, run as a script

from _common import loadavg, machine_info, table, write_json

K = 10
CHUNK = 50_000
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
EF_SEARCHES = (16, 32, 64, 128, 256, 512)


# -- data -----------------------------------------------------------------------------------------
class Mixture:
    """The two-level cluster model; draws any number of vectors in chunks from fixed centres."""

    def __init__(self, dim: int, clusters: int, spread: float, seed: int) -> None:
        self.dim = dim
        rng = np.random.default_rng(seed)
        genres = self._noise(rng, max(2, clusters // 100), 1.0)
        self.styles = genres[rng.integers(0, len(genres), size=clusters)] + self._noise(rng, clusters, spread)

    def _noise(self, rng: np.random.Generator, m: int, norm: float) -> np.ndarray:
        return (norm / np.sqrt(self.dim)) * rng.standard_normal((m, self.dim), dtype=np.float32)

    def draw(self, m: int, rng: np.random.Generator) -> np.ndarray:
        chunk = self.styles[rng.integers(0, len(self.styles), size=m)] + self._noise(rng, m, 1.0)
        return (chunk / np.linalg.norm(chunk, axis=1, keepdims=True)).astype(np.float32)


def write_base(path: Path, n: int, mixture: Mixture, seed: int) -> np.memmap:
    base = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, mixture.dim))
    rng = np.random.default_rng(seed)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        base[start:stop] = mixture.draw(stop - start, rng)
    base.flush()
    return base


def exact_top_k(base: np.ndarray, n: int, queries: np.ndarray) -> np.ndarray:
    """Row numbers of the exact top K by inner product over ``base[:n]`` (streamed in chunks)."""
    best_s = np.full((len(queries), K), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), K), -1, dtype=np.int64)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        sims = queries @ np.asarray(base[start:stop]).T
        top = np.argpartition(-sims, K - 1, axis=1)[:, :K]
        cand_s = np.concatenate([best_s, np.take_along_axis(sims, top, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, top + start], axis=1)
        keep = np.argsort(-cand_s, axis=1, kind="stable")[:, :K]
        best_s, best_i = np.take_along_axis(cand_s, keep, axis=1), np.take_along_axis(cand_i, keep, axis=1)
    return best_i


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[:K].tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


# -- measuring ------------------------------------------------------------------------------------
def rss_anon() -> int:
    """Anonymous resident memory (the memmapped vectors are file pages and do not count).

    ``malloc_trim`` first: the training buffer's freed vectors would otherwise stay in the heap.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def serialized_bytes(index: Any) -> int:
    size = 0

    def count(chunk: bytes) -> None:
        nonlocal size
        size += len(chunk)

    index.write_to(count)
    return size


def single_query_latency(
    search: Callable[[np.ndarray], object], queries: np.ndarray, budget_s: float
) -> dict[str, Any]:
    """One query at a time until every query ran or ``budget_s`` passed (at least 20 queries)."""
    lat: list[float] = []
    started = time.perf_counter()
    for i in range(len(queries)):
        t = time.perf_counter()
        search(queries[i : i + 1])
        lat.append(time.perf_counter() - t)
        if i >= 19 and time.perf_counter() - started > budget_s:
            break
    ms = np.array(lat) * 1000
    return {
        "latency_queries": len(lat),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


def pick(sweep: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The cheapest setting reaching ``target``; else the one with the best recall."""
    for row in sweep:
        if row["recall"] >= target:
            return row
    return max(sweep, key=lambda r: r["recall"])


def fill(index: Any, base: np.ndarray, n: int, max_s: float | None) -> tuple[int, float, float]:
    """Upsert base[:n] in chunks through the product's path; (vectors added, train_s, total_s)."""
    keys = np.arange(n, dtype=np.int64)
    train_s = 0.0
    started = time.perf_counter()
    added = 0
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        was_trained = index.is_trained
        t = time.perf_counter()
        index.upsert(keys[start:stop], np.ascontiguousarray(base[start:stop]))
        if not was_trained and index.is_trained:
            train_s = time.perf_counter() - t  # this chunk trained on the buffered sample, then added it
        added = stop
        if max_s is not None and time.perf_counter() - started > max_s and stop < n:
            print(f"  build cap of {max_s:.0f} s reached at {added:,} vectors: stopping there", flush=True)
            break
    if not index.is_trained:  # fewer vectors than the training sample: train on all of them
        t = time.perf_counter()
        index.train_now()
        train_s = time.perf_counter() - t
    return added, train_s, time.perf_counter() - started


# -- candidates -----------------------------------------------------------------------------------
def measure(
    name: str,
    factory: str,
    base: np.ndarray,
    n: int,
    queries: np.ndarray,
    truth_for: Callable[[int], np.ndarray],
    args: argparse.Namespace,
) -> dict[str, Any]:
    from indexes.faiss_index import FaissIndexConfig, FaissVectorIndex, faiss

    print(f"\n== {name}: {factory} over {n:,} vectors", flush=True)
    faiss.omp_set_num_threads(args.build_threads)
    gc.collect()
    rss0 = rss_anon()
    config = FaissIndexConfig(dim=base.shape[1], factory=factory, use_gpu="never", train_size=args.train_size)
    index = FaissVectorIndex(config)
    max_s = args.hnsw_max_build_s if factory.startswith("HNSW") else None
    added, train_s, build_s = fill(index, base, n, max_s)
    gc.collect()
    out: dict[str, Any] = {
        "name": name,
        "factory": factory,
        "n": added,
        "train_size": index.train_size if train_s else None,
        "train_s": train_s or None,
        "build_s": build_s,
        "add_per_s": added / build_s,
        "ram_bytes_per_vector": (rss_anon() - rss0) / added,
        "file_bytes_per_vector": serialized_bytes(index) / added,
        "removable": index.removable,
    }
    print(
        f"  built in {build_s:.1f} s (training {train_s:.1f} s); {out['file_bytes_per_vector']:.0f} B/vector",
        flush=True,
    )
    truth = truth_for(added)
    faiss.omp_set_num_threads(1)
    inner: Any = faiss.extract_index_ivf(index._cpu) if "IVF" in factory else None  # the search knob
    hnsw: Any = index._hnsw(index._cpu) if factory.startswith("HNSW") else None
    sweep: list[dict[str, Any]] = []
    rerank: list[dict[str, Any]] = []
    for value in NPROBES if inner is not None else EF_SEARCHES if hnsw is not None else ():
        if inner is not None:
            if value > inner.nlist:
                break
            inner.nprobe = value
        else:
            hnsw.hnsw.efSearch = value
        t = time.perf_counter()
        _, found = index.search(queries, K)
        row = {"knob": value, "recall": recall(found, truth), "batch_qps": len(queries) / (time.perf_counter() - t)}
        sweep.append(row)
        if "PQ" in factory and args.rerank:
            _, cands = index.search(queries, args.rerank)
            rerank.append({"knob": value, "recall": recall(exact_rerank(base, queries, cands), truth)})
        print(f"  {'nprobe' if inner is not None else 'efSearch'} {value}: recall@10 {row['recall']:.3f}"
              + (f", reranked {rerank[-1]['recall']:.3f}" if rerank else ""), flush=True)  # fmt: skip
        if row["recall"] >= 0.999 or (rerank and rerank[-1]["recall"] >= 0.999):
            break
    out["sweep"] = sweep
    if sweep:
        chosen = pick(sweep, args.target_recall)
        out["knob"] = ("nprobe" if inner is not None else "efSearch", chosen["knob"])
        if inner is not None:
            inner.nprobe = chosen["knob"]
        else:
            hnsw.hnsw.efSearch = chosen["knob"]
    t = time.perf_counter()
    _, found = index.search(queries, K)
    out["batch_qps"] = len(queries) / (time.perf_counter() - t)
    out["recall_at_10"] = recall(found, truth)
    out.update(single_query_latency(lambda q: index.search(q, K), queries, args.latency_budget_s))
    print(f"  recall@10 {out['recall_at_10']:.3f}, p50 {out['p50_ms']:.2f} ms, p99 {out['p99_ms']:.2f} ms", flush=True)
    if rerank:
        best = pick(rerank, args.target_recall)
        inner.nprobe = best["knob"]
        out["rerank"] = {"top": args.rerank, "nprobe": best["knob"], "sweep": rerank, "recall_at_10": best["recall"]}
        out["rerank"].update(
            single_query_latency(
                lambda q: exact_rerank(base, q, index.search(q, args.rerank)[1]), queries, args.latency_budget_s
            )
        )
        print(f"  reranked top {args.rerank}: {out['rerank']}", flush=True)
    if index.removable:
        t = time.perf_counter()
        removed = index.remove(np.arange(0, added, max(1, added // 1000), dtype=np.int64)[:1000])
        out["remove_1000_s"] = time.perf_counter() - t
        out["removed"] = removed
    out["peak_rss_gib"] = peak_rss() / 2**30
    return out


def exact_rerank(base: np.ndarray, queries: np.ndarray, cands: np.ndarray) -> np.ndarray:
    """Candidates reordered by exact inner product with their stored vectors; top K row numbers."""
    out = np.full((len(queries), K), -1, dtype=np.int64)
    for i, row in enumerate(cands):
        ids = np.sort(row[row >= 0])
        sims = np.asarray(base[ids]) @ queries[i]
        out[i, : min(K, ids.size)] = ids[np.argsort(-sims)[:K]]
    return out


def hnsw_removal_check(base: np.ndarray, queries: np.ndarray, m: int) -> dict[str, Any]:
    """Raw FAISS on 20k vectors: HNSW's remove_ids raises; an IDSelectorNot at search excludes instead."""
    from indexes.faiss_index import faiss  # typed loosely there (partial stubs)

    n = min(20_000, base.shape[0])
    index = faiss.IndexIDMap2(faiss.index_factory(base.shape[1], f"HNSW{m}", faiss.METRIC_INNER_PRODUCT))
    keys = np.arange(n, dtype=np.int64)
    index.add_with_ids(np.ascontiguousarray(base[:n]), keys)
    try:
        index.remove_ids(np.array([0], dtype=np.int64))
        raised = None
    except RuntimeError as exc:
        raised = str(exc).strip().splitlines()[-1][:160]
    _, before = index.search(queries, K)
    gone = np.unique(before[:, :3])  # every query's top 3, "taken down"
    gone = gone[gone >= 0].astype(np.int64)
    params = faiss.SearchParametersHNSW(sel=faiss.IDSelectorNot(faiss.IDSelectorBatch(gone)), efSearch=64)
    _, after = index.search(queries, K, params=params)
    return {
        "n": n,
        "remove_ids_raises": raised,
        "excluded": int(gone.size),
        "excluded_returned_after_filter": int(np.isin(after, gone).sum()),
        "full_rows_after_filter": int((after >= 0).all(axis=1).sum()),
    }


# -- main -----------------------------------------------------------------------------------------
def default_nlist(n: int) -> int:
    """A power of two near 4·sqrt(n), FAISS's rule of thumb for IVF (4096 at 1M)."""
    return int(2 ** round(math.log2(max(64, 4 * math.sqrt(n)))))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--clusters", type=int, default=4000, help="styles in the mixture (genres: a hundredth)")
    p.add_argument("--style-spread", type=float, default=0.3, help="style offsets from their genre (point noise: 1.0)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists; default a power of two near 4*sqrt(n)")
    p.add_argument("--pq", type=int, default=96, help="PQ sub-quantizers (bytes per code)")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--train-size", type=int, default=None, help="default 39*nlist (FAISS's minimum per list)")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--rerank", type=int, default=100, help="IVF-PQ candidates reranked exactly (0: none)")
    p.add_argument("--indexes", default="flat,ivf,ivfpq,hnsw,ivfsq")
    p.add_argument("--latency-budget-s", type=float, default=60.0, help="per candidate, single queries")
    p.add_argument("--build-threads", type=int, default=1, help="FAISS threads while building (search: 1)")
    p.add_argument("--hnsw-max-build-s", type=float, default=1500.0, help="stop HNSW adds here; measure at that N")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    nlist = args.nlist or default_nlist(args.n)
    args.train_size = args.train_size or 39 * nlist
    factories = {
        "flat": ("Flat", "Flat"),
        "ivf": ("IVF", f"IVF{nlist},Flat"),
        "ivfpq": ("IVF-PQ", f"IVF{nlist},PQ{args.pq}np"),
        "ivfsq": ("IVF-SQ8", f"IVF{nlist},SQ8"),
        "hnsw": ("HNSW", f"HNSW{args.hnsw_m}"),
    }
    chosen = [factories[name] for name in args.indexes.split(",")]
    result: dict[str, Any] = {"machine": machine_info(), "load_before": loadavg(), "args": vars(args), "runs": []}
    print(f"machine {result['machine']}; load {result['load_before']}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="index-modes-") as tmp:
        mixture = Mixture(args.dim, args.clusters, args.style_spread, args.seed)
        t = time.perf_counter()
        base = write_base(Path(tmp) / "base.npy", args.n, mixture, args.seed + 1)
        queries = mixture.draw(args.queries, np.random.default_rng(args.seed + 2))
        result["gen_s"] = time.perf_counter() - t
        truths: dict[int, np.ndarray] = {}

        def truth_for(n: int) -> np.ndarray:
            if n not in truths:
                t = time.perf_counter()
                truths[n] = exact_top_k(base, n, queries)
                print(f"  exact top {K} over {n:,} vectors in {time.perf_counter() - t:.1f} s", flush=True)
            return truths[n]

        print(f"{args.n:,} x {args.dim} vectors written in {result['gen_s']:.1f} s", flush=True)
        for name, factory in chosen:
            result["runs"].append(measure(name, factory, base, args.n, queries, truth_for, args))
            if args.json:
                write_json(result, args.json)
        if any(f.startswith("HNSW") for _, f in chosen):
            result["hnsw_removal"] = hnsw_removal_check(base, queries, args.hnsw_m)
            print(f"\nHNSW removal check: {result['hnsw_removal']}", flush=True)
    result["load_after"] = loadavg()
    report(result)
    if args.json:
        write_json(result, args.json)
    return 0


def report(result: dict[str, Any]) -> None:
    rows = []
    for r in result["runs"]:
        knob = f"{r['knob'][0]} {r['knob'][1]}" if "knob" in r else "-"
        rows.append([r["name"], r["factory"], r["n"], knob, r["recall_at_10"], r["p50_ms"], r["p99_ms"],
                     r["batch_qps"], r["file_bytes_per_vector"], r["ram_bytes_per_vector"], r["train_s"],
                     r["build_s"], r["add_per_s"], "yes" if r["removable"] else "no"])  # fmt: skip
        if "rerank" in r:
            rr = r["rerank"]
            rows.append([f"{r['name']} +rerank {rr['top']}", r["factory"], r["n"], f"nprobe {rr['nprobe']}",
                         rr["recall_at_10"], rr["p50_ms"], rr["p99_ms"], None, None, None, None, None, None,
                         "yes"])  # fmt: skip
    headers = ["index", "factory", "N", "knob", "recall@10", "p50 ms", "p99 ms", "batch q/s", "file B/vec",
               "RAM B/vec", "train s", "build s", "adds/s", "remove"]  # fmt: skip
    print()
    print(table(f"k={K}, one thread for searches; load {result['load_before']} -> {result['load_after']}",
                headers, rows))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
