"""A synthetic served log with known truth, for the off-policy estimator's tests.

Songs have true like rates (likes per play) and play probabilities. Pages draw their
exploration pool from a few fixed pools (the feed's "songs just below the exploit slots"
moves slowly); a Thompson sampler whose posterior means follow the true rates fills the
page's explored slots, so the logged propensity correlates with quality, as in the service.
Inclusion propensities are computed once per pool by Monte Carlo (200k draws: error ~0.001).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

N_SONGS = 30
POOL_SIZE = 8
#: (first song of the pool window, explored slots on pages drawn from it)
POOLS = ((0, 2), (6, 3), (12, 2), (20, 1), (22, 3))
PRIOR_STRENGTH = 10.0


@dataclass(frozen=True)
class World:
    rate: np.ndarray  # true likes per play, per song
    play: np.ndarray  # probability an impression is played
    alpha: np.ndarray  # the logging sampler's Beta posterior
    beta: np.ndarray
    pools: np.ndarray  # (pools, POOL_SIZE) song indices, in the feed's order
    slots: np.ndarray  # (pools,)
    propensity: np.ndarray  # (pools, POOL_SIZE): P(song in the page's explored songs | pool)

    @property
    def ids(self) -> list[str]:
        return [f"song-{j:02d}" for j in range(N_SONGS)]

    def picks(self, scores: Mapping[str, float]) -> list[np.ndarray]:
        """Per pool, the song indices a deterministic candidate with these scores puts in the slots."""
        ids = self.ids
        out = []
        for pool, n in zip(self.pools, self.slots, strict=True):
            s = np.array([scores.get(ids[j], -np.inf) for j in pool])
            order = np.lexsort((np.arange(len(pool)), -s))
            out.append(pool[order[:n]])
        return out

    def true_rate(self, scores: Mapping[str, float], pool_counts: np.ndarray) -> float:
        """Expected likes / expected plays of the candidate's picks over pages with these pool counts."""
        likes = plays = 0.0
        for count, picked in zip(pool_counts, self.picks(scores), strict=True):
            likes += count * float((self.play[picked] * self.rate[picked]).sum())
            plays += count * float(self.play[picked].sum())
        return likes / plays

    def serve(self, pages: int, rng: np.random.Generator) -> tuple[pa.Table, np.ndarray]:
        """An impressions table of ``pages`` pages (explored rows plus two exploit rows each), and the pool counts."""
        which = rng.integers(0, len(self.pools), pages)
        pool = self.pools[which]  # (pages, POOL_SIZE)
        draws = rng.beta(self.alpha[pool], self.beta[pool])
        ranked = np.argsort(-draws, axis=1, kind="stable")
        ids = np.array(self.ids)
        req: list[str] = []
        song: list[str] = []
        prop: list[float] = []
        pools: list[list[str]] = []
        played: list[int] = []
        for p in range(pages):
            k = which[p]
            for col in ranked[p, : self.slots[k]]:
                j = pool[p, col]
                req.append(f"r{p}")
                song.append(ids[j])
                prop.append(self.propensity[k, col])
                pools.append(list(ids[pool[p]]))
                played.append(j)
        js = np.array(played)
        plays = (rng.random(len(js)) < self.play[js]).astype(np.int32)
        likes = (plays * (rng.random(len(js)) < self.rate[js])).astype(np.int32)
        exploit = [f"r{p}" for p in range(pages) for _ in range(2)]
        n_e = len(exploit)
        table = pa.table(
            {
                "request_id": req + exploit,
                "song_id": song + [ids[0]] * n_e,
                "position": pa.array(list(range(len(req))) + [0] * n_e, pa.int32()),
                "explored": [True] * len(req) + [False] * n_e,
                "propensity": prop + [1.0] * n_e,
                "pool": pa.array(pools + [None] * n_e, pa.list_(pa.string())),
                "plays": pa.array(list(plays) + [1] * n_e, pa.int32()),
                "likes": pa.array(list(likes) + [1] * n_e, pa.int32()),  # exploit likes: must not count
                "skips": pa.array([0] * (len(req) + n_e), pa.int32()),
            }
        )
        return table, np.bincount(which, minlength=len(self.pools))


def make_world(seed: int = 7, mc_draws: int = 200_000) -> World:
    rng = np.random.default_rng(seed)
    rate = rng.uniform(0.04, 0.4, N_SONGS)
    play = rng.uniform(0.4, 0.95, N_SONGS)
    belief = np.clip(rate + rng.normal(0.0, 0.03, N_SONGS), 0.01, 0.9)
    alpha, beta = PRIOR_STRENGTH * belief, PRIOR_STRENGTH * (1.0 - belief)
    pools = np.array([np.arange(start, start + POOL_SIZE) for start, _ in POOLS])
    slots = np.array([n for _, n in POOLS])
    propensity = np.empty(pools.shape)
    for k, (pool, n) in enumerate(zip(pools, slots, strict=True)):
        draws = rng.beta(alpha[pool], beta[pool], size=(mc_draws, POOL_SIZE))
        top = np.argsort(-draws, axis=1)[:, :n]
        propensity[k] = np.bincount(top.ravel(), minlength=POOL_SIZE) / mc_draws
    return World(rate, play, alpha, beta, pools, slots, propensity)
