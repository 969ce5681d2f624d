"""The equivalence test (issue 13): the scoring, feed and retrain paths still give the frozen outputs.

``tests/golden/scores.json`` was written by ``python -m tests.golden.make_golden`` from a
clean checkout of the commit before the module moves; this test reruns the same paths
(:func:`tests.golden.paths.run_paths`: the worker, ``FeedReader``, ``rescore_window``) on the
current tree and compares:

* exactly: song ids and their orders (feed order, page order, which slots explore), model
  versions, how many songs were rescored;
* within 1e-9 absolute: what is computed in float64 from the clock and the counters alone
  (``age_hours``, ``freshness``, ``plays``, ``likes``);
* within 1e-6 relative (1e-9 absolute near zero): everything downstream of the head, whose
  outputs are float32 (the ``score.*`` fields, ``rank_score``, ``prior.like_rate``, page
  scores, quality, its contributions, prior, posterior and sampled like rates). A float32
  result may move by a few ulps (about 1.2e-7 relative each) when the batch it is computed
  in changes shape; any change of a formula moves it by far more.

A deliberate change of scores or ranking regenerates the file (see make_golden's docstring).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ranker.settings import Settings
from tests.golden.paths import FORMAT, run_paths

GOLDEN = Path(__file__).parent / "golden" / "scores.json"
#: Computed in float64 from the clock and the engagement counters only.
FLOAT64_KEYS = frozenset({"age_hours", "freshness", "plays", "likes"})
F64_ABS = 1e-9
F32_REL = 1e-6
#: Provenance of the file, not an output.
IGNORED = frozenset({"generated_from"})


def differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Where ``actual`` departs from ``expected`` (empty when it does not), one line per difference."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected a mapping, got {actual!r}"]
        keys = (set(expected) | set(actual)) - IGNORED
        out: list[str] = []
        for key in sorted(keys):
            if key not in actual or key not in expected:
                out.append(f"{path}/{key}: {'missing' if key not in actual else 'unexpected'}")
            else:
                out.extend(differences(expected[key], actual[key], f"{path}/{key}"))
        return out
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{path}: expected {expected!r}, got {actual!r}"]
        return [
            d for i, (e, a) in enumerate(zip(expected, actual, strict=True)) for d in differences(e, a, f"{path}[{i}]")
        ]
    if isinstance(expected, float) and not isinstance(actual, bool) and isinstance(actual, int | float):
        key = path.rsplit("/", 1)[-1]
        if key in FLOAT64_KEYS:
            ok, tol = abs(actual - expected) <= F64_ABS, f"abs {F64_ABS}"
        else:
            ok = math.isclose(actual, expected, rel_tol=F32_REL, abs_tol=F64_ABS)
            tol = f"rel {F32_REL}"
        return [] if ok else [f"{path}: expected {expected!r}, got {actual!r} ({tol})"]
    if type(expected) is not type(actual) or expected != actual:
        return [f"{path}: expected {expected!r}, got {actual!r}"]
    return []


def test_the_comparison_sees_what_it_should() -> None:
    """Guards the test below: orders, float32 and float64 values are compared at their tolerances."""
    base = {"songs": {"a": {"rank_score": 0.5, "freshness": 0.25}}, "order": ["a", "b"], "explore": False}
    assert differences(base, base) == []
    assert differences(base, {**base, "order": ["b", "a"]}) != []
    assert differences(base, {**base, "explore": True}) != []
    nudged = {"songs": {"a": {"rank_score": 0.5 * (1 + 5e-7), "freshness": 0.25 + 5e-10}}}
    assert differences(base, base | nudged) == []
    moved = {"songs": {"a": {"rank_score": 0.5 * (1 + 2e-6), "freshness": 0.25}}}
    assert differences(base, base | moved) == ["/songs/a/rank_score: expected 0.5, got 0.500001 (rel 1e-06)"]
    fresh = {"songs": {"a": {"rank_score": 0.5, "freshness": 0.25 + 2e-9}}}
    assert len(differences(base, base | fresh)) == 1
    assert differences(base, {k: v for k, v in base.items() if k != "order"}) == ["/order: missing"]


def test_ingest_feed_and_retrain_paths_match_the_golden_file(settings: Settings, tmp_path: Path) -> None:
    golden = json.loads(GOLDEN.read_text())
    assert golden["format"] == FORMAT, "the golden file was written by another version of tests/golden/paths.py"
    actual = json.loads(json.dumps(run_paths(settings, tmp_path)))  # the same types as the file's
    found = differences(golden, actual)
    assert not found, f"{len(found)} outputs differ from {GOLDEN.name}:\n" + "\n".join(found[:40])
