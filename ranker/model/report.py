"""Writing measurements out: metric tables for the terminal and JSON without NaN.

Kept apart from the measuring (:mod:`ranker.model.evaluate`, :mod:`ranker.model.battles`) so
that training, ablations and the CLI can write their results without importing the
evaluation code, and so that both kinds of report format numbers the same way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ranker.events import TASKS

if TYPE_CHECKING:
    from rich.table import Table

#: The song-level metrics per task (:func:`ranker.model.evaluate.regression_metrics`), in table order.
METRICS: tuple[str, ...] = ("pearson", "spearman", "mae", "mse")


def metrics_table(metrics: Mapping[str, Mapping[str, float]], *, title: str = "APEX evaluation") -> Table:
    """A rich table: one row per task, one column per metric."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("task")
    for m in METRICS:
        table.add_column(m, justify="right")
    for task in [t for t in TASKS if t in metrics] + [t for t in metrics if t not in TASKS]:
        row = metrics[task]
        table.add_row(task, *(_fmt(row.get(m, math.nan)) for m in METRICS))
    return table


def print_metrics(metrics: Mapping[str, Mapping[str, float]], *, title: str = "APEX evaluation") -> None:
    from rich.console import Console

    Console().print(metrics_table(metrics, title=title))


def _fmt(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"


def json_safe(obj: Any) -> Any:
    """JSON has no NaN: undefined metrics become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (NaN -> null), atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(target)
    return target
