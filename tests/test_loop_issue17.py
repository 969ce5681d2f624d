"""The loop simulation's issue-17 scenario: a generator the initial head never saw starts publishing mid-run,
served with a fixed w, with uncertainty- and OOD-aware w, and with the generators' calibration too."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumers.loop_world import NOVEL, LoopConfig, _build_world, loop_config
from ranker.settings import Settings


def test_the_new_generator_arrives_from_its_hour_and_leaves_the_rest_of_the_world_as_it_was(tmp_path: Path) -> None:
    def world(name: str, **knobs: object) -> list:  # type: ignore[type-arg]
        cfg = LoopConfig(duration_s=1.0, **knobs)  # type: ignore[arg-type]
        return _build_world(songs=12, users=4, hours=2, seed=5, out_dir=tmp_path / name, cfg=cfg).songs

    before = world("plain")
    after = world("novel", novel_from_h=1, novel_share=1.0)
    assert [s.song_id for s in after] == [s.song_id for s in before]
    assert [(s.style, s.hour, s.like_prob) for s in after] == [(s.style, s.hour, s.like_prob) for s in before]
    assert {s.generator for s in after if s.hour == 1} == {NOVEL} and NOVEL not in {s.generator for s in before}
    assert all(a.generator == b.generator for a, b in zip(after, before, strict=True) if a.hour == 0)
    changed = [a.path.read_bytes() != b.path.read_bytes() for a, b in zip(after, before, strict=True)]
    assert changed == [s.hour == 1 for s in after]  # the new generator's audio: inverted consonance, 8 kHz
    half = world("half", novel_from_h=0, novel_share=0.5)
    assert 0 < sum(s.generator == NOVEL for s in half) < 12


def test_the_scenario_knobs_parse_and_are_checked() -> None:
    cfg = loop_config(["novel_from_h=2", "novel_share=0.25", "history_ensemble=5"])
    assert (cfg.novel_from_h, cfg.novel_share, cfg.history_ensemble) == (2, 0.25, 5)
    assert LoopConfig().novel_from_h == -1  # off by default: the documented worlds are unchanged
    with pytest.raises(ValueError, match="novel_share"):
        LoopConfig(novel_share=1.5)
    with pytest.raises(ValueError, match="history_ensemble"):
        LoopConfig(history_ensemble=0)


def test_the_issue17_policies_run_on_the_real_stack(settings: Settings, tmp_path: Path) -> None:
    """An ensemble head with its OOD model, a new generator from hour 1: every policy serves and plays its
    songs; the uncertainty-aware default serves their spread and strength; calibration refits, never promotes."""
    from prometheus_client import REGISTRY

    from consumers.simulate_loop import run_loop_simulation

    def scored(seen: str) -> float:
        return (
            REGISTRY.get_sample_value("apexrank_generator_songs_scored_total", {"generator": NOVEL, "seen": seen})
            or 0.0
        )

    before = scored("no")

    cfg = LoopConfig(novel_from_h=1, history_ensemble=2, history_songs=40, duration_s=1.0)
    policies = ["fixed-w", "prior+evidence", "calibrated"]
    result = run_loop_simulation(
        settings, songs=24, users=6, hours=2, seed=4, out_dir=tmp_path, policies=policies, config=cfg
    )
    for p in policies:
        o = result.outcomes[p]
        assert sum(o.plays) == 6 * 2 * 3 and o.novel_plays > 0 and o.novel_posterior_spearman is not None, p
    calibrated = result.outcomes["calibrated"]
    assert calibrated.retrains == 1 and calibrated.promotions == 0
    # The worker wrote the ensemble's spread with every song, and the pages explain it.
    assert all(result.outcomes[p].songs_with_spread == 24 for p in policies), result.to_dict()["outcomes"]
    # ...and counted the new generator's songs as one its model never saw in training (/metrics).
    novel = sum(
        s.generator == NOVEL for s in _build_world(songs=24, users=8, hours=2, seed=4, out_dir=tmp_path, cfg=cfg).songs
    )
    assert scored("no") - before == novel * len(policies) and scored("yes") == 0
