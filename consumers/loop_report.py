"""What the loop simulation measures and shows: each policy's outcome, the result, its table and plot.

:mod:`consumers.simulate_loop` fills these in hour by hour and writes them at the end; they
are kept apart from the run loop so that each module stays short.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from consumers.loop_world import LoopConfig, _World, audience_like_rates

log = logging.getLogger(__name__)


@dataclass
class PolicyOutcome:
    """One policy's engagement, hour by hour."""

    plays: list[int] = field(default_factory=list)
    likes: list[int] = field(default_factory=list)
    expected_likes: list[float] = field(default_factory=list)  # sum of the true like probabilities played
    promotions: int = 0
    retrains: int = 0
    #: After each promotion: Spearman(the new head's prior like rate, audience like rate) over the songs so far
    #: (including the songs it was trained on).
    promoted_prior_spearman: list[float | None] = field(default_factory=list)
    first_promotion_hour: int | None = None
    #: At the end: Spearman(this policy's prior like rate, audience like rate) over the songs that arrived after
    #: the retrain policy's first promotion, which the first promoted head was not trained on (a later promotion
    #: may have trained on some of them; None without a promotion).
    late_prior_spearman: float | None = None

    @property
    def like_rate(self) -> float:
        plays = sum(self.plays)
        return sum(self.likes) / plays if plays else 0.0

    @property
    def expected_like_rate(self) -> float:
        """The mean true like probability of the songs played: the like rate without the coin flips."""
        plays = sum(self.plays)
        return sum(self.expected_likes) / plays if plays else 0.0

    def hourly_rates(self) -> list[float]:
        return [lk / p if p else 0.0 for p, lk in zip(self.plays, self.likes, strict=True)]

    def hourly_expected_rates(self) -> list[float]:
        return [lk / p if p else 0.0 for p, lk in zip(self.plays, self.expected_likes, strict=True)]


@dataclass
class LoopResult:
    """What :func:`~consumers.simulate_loop.run_loop_simulation` measured, and where it wrote it."""

    seed: int
    songs: int
    users: int
    hours: int
    outcomes: dict[str, PolicyOutcome]
    prior_spearman: float | None = None  # Spearman(prior like rate, true like probability) over the songs
    json_path: Path | None = None
    png_path: Path | None = None

    def like_rates(self) -> dict[str, float]:
        return {p: o.like_rate for p, o in self.outcomes.items()}

    def expected_like_rates(self) -> dict[str, float]:
        return {p: o.expected_like_rate for p, o in self.outcomes.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "songs": self.songs,
            "users": self.users,
            "hours": self.hours,
            "prior_spearman": self.prior_spearman,
            "like_rate": self.like_rates(),
            "expected_like_rate": self.expected_like_rates(),
            "hourly_like_rate": {p: o.hourly_rates() for p, o in self.outcomes.items()},
            "outcomes": {p: asdict(o) for p, o in self.outcomes.items()},
        }


def _prior_spearman(items: list[dict[str, Any]], world: _World, cfg: LoopConfig) -> float | None:
    """How well a head's prior like rate orders these songs by the audience's like rate."""
    truth = audience_like_rates(world, cfg)
    pairs = [(float(it["components"]["prior_rate"]), truth[it["song_id"]]) for it in items if it["song_id"] in truth]
    if len(pairs) < 3:
        return None
    a, b = (np.argsort(np.argsort(np.array(col))).astype(np.float64) for col in zip(*pairs, strict=True))
    return float(np.corrcoef(a, b)[0, 1])


def print_result(result: LoopResult) -> None:
    """The like rate per simulated hour per policy, and overall, as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"like rate per simulated hour (seed {result.seed}, {result.songs} songs, {result.users} users)"
    )
    table.add_column("policy")
    for h in range(result.hours):
        table.add_column(f"h{h}", justify="right")
    table.add_column("overall", justify="right", style="bold")
    table.add_column("plays", justify="right")
    for p, o in result.outcomes.items():
        table.add_row(p, *(f"{r:.3f}" for r in o.hourly_rates()), f"{o.like_rate:.3f}", str(sum(o.plays)))
    Console(width=max(100, 40 + 8 * result.hours)).print(table)


def plot_like_rates(result: LoopResult, path: Path) -> Path | None:
    """A PNG of the like rate per simulated hour per policy; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot written")
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for p, o in result.outcomes.items():
        ax.plot(range(result.hours), o.hourly_rates(), marker="o", label=f"{p} ({o.like_rate:.3f})")
    ax.set_xlabel("simulated hour")
    ax.set_ylabel("like rate (likes / plays)")
    ax.set_title(f"apexrank loop simulation (synthetic; seed {result.seed})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
