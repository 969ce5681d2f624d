"""The retrain gate's second question (issue 16, item 8): would the candidate's picks be liked more?

Spearman on a few held-out songs says whether a candidate orders songs' engagement better; it does
not say whether a feed run on it would be liked more. The served log answers that off-policy: on the
exploration slots of the recent pages (Thompson draws from a logged pool, with their propensities),
each model picks from every pool the songs it scores best at their prior (the default feed's quality
at the model's like-rate prior: the ``rank_score`` the worker writes), and self-normalised IPS
estimates the like rate of each model's picks (:mod:`ranker.model.offpolicy`, docs/off-policy.md).
A candidate passes when the paired difference's interval lies above zero and both estimates rest on
at least ``retrain.off_policy_min_matched`` matched impressions; with fewer, it does not pass: the
gate asks for evidence, not for its absence.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa

from consumers.evaluate_policy import load_impressions, pool_songs
from consumers.shard_embeddings import ShardEmbeddings
from ranker.model.artifact import ScoringModel
from ranker.model.examination import in_window
from ranker.model.offpolicy import ExploredSlots, compare_slots
from ranker.scoring import SongMeta, score_predictions
from ranker.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class OffPolicyJudge:
    """Judges a candidate against the incumbent on the explored slots served since ``since``."""

    settings: Settings
    slots: ExploredSlots | None
    layers: dict[str, np.ndarray]  # the pool songs' pooled encoder layers (what a head predicts from)
    meta: Mapping[str, tuple[str, datetime]]  # song -> (generator, created_at)

    def scores(self, model: ScoringModel) -> dict[str, float]:
        """Each pool song's place in the default feed's order at ``model``'s prior (its rank_score)."""
        ids = [s for s in self.layers if s in self.meta]
        if not ids:
            return {}
        preds = model.predict(np.stack([self.layers[s] for s in ids]).astype(np.float32))
        songs = [SongMeta(s, self.meta[s][0], self.meta[s][1].isoformat()) for s in ids]
        return {sc.song_id: float(sc.rank_score) for sc in score_predictions(self.settings, model, preds, songs)}

    def __call__(self, current: ScoringModel, candidate: ScoringModel) -> tuple[bool, str, dict[str, Any]]:
        if self.slots is None or not len(self.slots.request):
            return False, "off-policy: no explored impressions in the served log yet", {}
        return verdict(self.slots, self.scores(candidate), self.scores(current), self.settings)


def verdict(
    slots: ExploredSlots, candidate: Mapping[str, float], incumbent: Mapping[str, float], settings: Settings
) -> tuple[bool, str, dict[str, Any]]:
    """Promote? Both estimates on enough matched impressions, and the paired difference's interval above 0."""
    need = settings.retrain.off_policy_min_matched
    cmp = compare_slots(slots, candidate, incumbent, min_matched=need, seed=settings.model.seed)
    c, i = cmp.candidate, cmp.incumbent
    what = (
        f"off-policy like rate {c.value:.4f} vs {i.value:.4f} (difference {cmp.difference:+.4f}, "
        f"{cmp.level:.0%} interval {cmp.low:+.4f} to {cmp.high:+.4f}; matched {c.matched} / {i.matched})"
    )
    if not (c.enough and i.enough):
        return False, f"{what}: fewer than {need} matched impressions", cmp.to_dict()
    if not cmp.better:
        return False, f"{what}: not better beyond the interval", cmp.to_dict()
    return True, what, cmp.to_dict()


def off_policy_judge(
    settings: Settings, meta_of: Any, now: datetime, impressions: pa.Table | None = None
) -> OffPolicyJudge:
    """The judge over the last ``retrain.off_policy_window_days`` of the served and engagement logs
    (read here, or cut from ``impressions`` the caller read already).

    ``meta_of(song_ids) -> {song: (generator, created_at)}`` reads what the scores need (the retrain
    job's store read).
    """
    days = settings.retrain.off_policy_window_days
    if impressions is None:
        table = load_impressions(settings, now - timedelta(days=days), now)
    else:
        table = in_window(impressions, days, now)
    try:
        slots = ExploredSlots.from_impressions(table)
    except ValueError:  # nothing explored in the window
        return OffPolicyJudge(settings, None, {}, {})
    songs: Sequence[str] = pool_songs(table)
    with ShardEmbeddings(settings) as emb:
        stored = emb.get_many(list(songs))
    layers = {s: e.record.layers for s, e in stored.items()}
    meta = meta_of(sorted(layers))
    log.info("off-policy gate: %d explored impressions, %d pool songs with embeddings", len(slots.request), len(layers))
    return OffPolicyJudge(settings, slots, layers, meta)
