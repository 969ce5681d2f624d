"""``apexrank report generators``: each generator's drift over the recent window (ranker.model.drift).

Reads the songs scored within ``--window-h`` from the score store (one scan of the song keys and a
read of their generator, scores and OOD fields: an offline report, not a request path), their
embeddings from the embedding stores (for the mean shift), and the serving model's card (its
training generators and score quantiles) and OOD model. Prints a table, or JSON; flags generators
the model never saw in training and those whose songs drifted.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.table import Table

from ranker import stores
from ranker.events import TASKS
from ranker.settings import Settings

if TYPE_CHECKING:
    from ranker.model.artifact import ScoringModel

#: A generator is flagged as drifted past either bar (documented in docs/model.md).
MEAN_SHIFT_FLAG = 1.0
SCORE_SHIFT_FLAG = 0.25


def generator_rows(
    settings: Settings, window_h: float, now: datetime | None = None, model: ScoringModel | None = None
) -> dict[str, Any]:
    """The report's content: the window, the model it was read against (``model``; None: the serving one),
    and each generator's drift."""
    from consumers.retrain import current_model
    from consumers.shard_embeddings import ShardEmbeddings
    from indexes.redis_schema import GENERATOR, OOD_FLAG, OOD_PERCENTILE, SCORED_AT, flag, score_field
    from ranker.model.drift import generator_drift
    from ranker.serving.policy import to_timestamp
    from ranker.serving.state import _float

    since = (now or datetime.now(UTC)) - timedelta(hours=window_h)
    fields = [GENERATOR, SCORED_AT, OOD_PERCENTILE, OOD_FLAG, *(score_field(t) for t in TASKS)]
    ids: list[str] = []
    rows: list[list[str | None]] = []
    store = stores.score_store(settings)
    try:
        batch: list[str] = []

        def read() -> None:
            for sid, values in zip(batch, store.read_fields(batch, fields), strict=True):
                at = to_timestamp(values[1])
                if values[0] and at is not None and at >= since.timestamp():
                    ids.append(sid)
                    rows.append(values)
            batch.clear()

        for sid in store.scan_song_ids(1000):
            batch.append(sid)
            if len(batch) >= 1000:
                read()
        read()
    finally:
        store.close()
    model = model or current_model(settings)
    training = (model.card.training or {}) if model.trained else {}
    inputs = None
    if ids and model.ood is not None:
        with ShardEmbeddings(settings) as emb:
            stored = emb.get_many(ids)
        shape = (model.n_layers, model.input_dim)
        inputs = np.full((len(ids), *shape), np.nan, dtype=np.float32)
        for i, sid in enumerate(ids):
            got = stored.get(sid)
            if got is not None and got.record.layers.shape == shape:
                inputs[i] = got.record.layers

    def column(k: int) -> np.ndarray:
        return np.array([_float(r[k], math.nan) for r in rows], dtype=np.float64)

    drift = generator_drift(
        [str(r[0]) for r in rows],
        {t: column(4 + j) for j, t in enumerate(TASKS)},
        training=training,
        ood_percentile=column(2),
        ood_flag=np.array([flag(r[3]) for r in rows], dtype=np.bool_),
        inputs=inputs,
        ood=model.ood,
    )
    return {
        "window_h": window_h,
        "since": since.isoformat(),
        "model_version": model.version,
        "songs": len(ids),
        "generators": [d.to_dict() for d in drift],
    }


def print_generators(settings: Settings, window_h: float, as_json: bool, console: Console | None = None) -> int:
    body = generator_rows(settings, window_h)
    if as_json:
        print(json.dumps(body, indent=2))
        return 0
    out = console or Console(width=140)
    table = Table(
        title=f"generators, songs scored in the last {window_h:g} h (model {body['model_version']})",
        caption=f"flag: never seen in training, mean shift >= {MEAN_SHIFT_FLAG:g} or a score shift >= "
        f"{SCORE_SHIFT_FLAG:g} (docs/model.md, 'Drift per generator')",
    )
    for col in ("generator", "songs", "seen", "OOD pct", "OOD share", "mean shift", "largest score shift", "flag"):
        table.add_column(col, justify="left" if col in ("generator", "largest score shift", "flag") else "right")
    for g in body["generators"]:
        shifts = g["score_shift"]
        task = max(shifts, key=shifts.get) if shifts else None
        flags = drift_flags(g)
        table.add_row(
            g["generator"],
            str(g["songs"]),
            {True: "yes", False: "NO", None: "?"}[g["seen"]],
            _fmt(g["ood_percentile"], "{:.1f}"),
            _fmt(g["ood_share"], "{:.0%}"),
            _fmt(g["mean_shift"], "{:.2f}"),
            "-" if task is None else f"{task} {shifts[task]:.2f}",
            ", ".join(flags) or "-",
        )
    out.print(table)
    return 0


def drift_flags(g: dict[str, Any]) -> list[str]:
    """Why a generator's row is flagged (empty: it is not)."""
    out: list[str] = []
    if g["seen"] is False:
        out.append("never seen in training")
    if g["mean_shift"] is not None and g["mean_shift"] >= MEAN_SHIFT_FLAG:
        out.append("mean shifted")
    if any(v >= SCORE_SHIFT_FLAG for v in g["score_shift"].values()):
        out.append("scores shifted")
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)
