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
    promotion_hours: list[int] = field(default_factory=list)  # the hours after which a promotion happened
    #: consumers.loop_offpolicy: the off-policy estimate of the prior order on this policy's exploration slots,
    #: its interval and the true value.
    off_policy: dict[str, Any] | None = None
    #: At the end: Spearman(this policy's prior like rate, audience like rate) over the songs that arrived after
    #: the retrain policy's first promotion, which the first promoted head was not trained on (a later promotion
    #: may have trained on some of them; None without a promotion).
    late_prior_spearman: float | None = None
    #: At the end: Spearman(this policy's posterior like rate, audience like rate) over every song of the world.
    posterior_spearman: float | None = None
    #: The new generator's songs (LoopConfig.novel_from_h): plays of them, the sum of their true like
    #: probabilities, and the posterior Spearman over them alone at the end.
    novel_plays: int = 0
    novel_expected_likes: float = 0.0
    novel_posterior_spearman: float | None = None
    #: At the end: the feed's songs whose explanation carries the model's spread (an ensemble head scored them).
    songs_with_spread: int = 0

    @property
    def novel_expected_like_rate(self) -> float | None:
        return self.novel_expected_likes / self.novel_plays if self.novel_plays else None

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

    def promotion_effects(self, policy: str, baseline: str = "prior+evidence") -> list[tuple[int, float]]:
        """For each promotion of ``policy`` (after hour h): the expected like rate it served in hour h + 1 minus
        ``baseline``'s in the same hour (evidence alone, same users, same draws): did the promotion raise or
        lower the feed's like rate? Hours after a later promotion carry both."""
        mine, base = self.outcomes.get(policy), self.outcomes.get(baseline)
        if mine is None or base is None:
            return []
        a, b = mine.hourly_expected_rates(), base.hourly_expected_rates()
        return [(h, a[h + 1] - b[h + 1]) for h in mine.promotion_hours if h + 1 < len(a)]

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
            "promotion_effects": {p: self.promotion_effects(p) for p in self.outcomes if self.outcomes[p].promotions},
        }


def _prior_spearman(items: list[dict[str, Any]], world: _World, cfg: LoopConfig) -> float | None:
    """How well a head's prior like rate orders these songs by the audience's like rate."""
    return _spearman(items, world, cfg, "prior_rate")


def _posterior_spearman(items: list[dict[str, Any]], world: _World, cfg: LoopConfig) -> float | None:
    """How well a feed's posterior like rate (prior and evidence) orders these songs by the audience's like rate."""
    return _spearman(items, world, cfg, "posterior_rate")


def _spearman(items: list[dict[str, Any]], world: _World, cfg: LoopConfig, component: str) -> float | None:
    truth = audience_like_rates(world, cfg)
    pairs = [(float(it["components"][component]), truth[it["song_id"]]) for it in items if it["song_id"] in truth]
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
    console = Console(width=max(100, 40 + 8 * result.hours))
    console.print(table)
    more = Table(title="expected like rate, posterior Spearman, off-policy check (synthetic)")
    for name in ("policy", "expected like rate", "posterior Spearman", "promotions", "off-policy estimate", "truth"):
        more.add_column(name, justify="left" if name == "policy" else "right")
    for p, o in result.outcomes.items():
        op = o.off_policy or {}
        estimate = f"{op['value']:.3f} [{op['low']:.3f}, {op['high']:.3f}]" if "value" in op else "-"
        more.add_row(
            p,
            f"{o.expected_like_rate:.4f}",
            "-" if o.posterior_spearman is None else f"{o.posterior_spearman:.3f}",
            f"{o.promotions} / {o.retrains}" if o.retrains else "-",
            estimate,
            f"{op['truth']:.3f}" if "truth" in op else "-",
        )
    console.print(more)
    if any(o.novel_plays for o in result.outcomes.values()):
        new = Table(title="the new generator's songs (synthetic-novel): expected like rate, posterior Spearman")
        for name in ("policy", "plays", "expected like rate", "posterior Spearman"):
            new.add_column(name, justify="left" if name == "policy" else "right")
        for p, o in result.outcomes.items():
            rate, rho = o.novel_expected_like_rate, o.novel_posterior_spearman
            new.add_row(
                p, str(o.novel_plays), "-" if rate is None else f"{rate:.4f}", "-" if rho is None else f"{rho:.3f}"
            )
        console.print(new)


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
