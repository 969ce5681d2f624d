"""Frozen outputs of the scoring, feed and retrain paths (issue 13: the equivalence test)."""
