"""Write ``model/``, ``features.npy`` and ``outputs.json`` here with the code of commit 09b37ad.

A tiny single-head model saved before ensembles and OOD models existed, and what that code
scored with it; ``tests/test_uncertainty.py`` checks that today's code loads it with the same
version and scores it bit-identically. Made once, from a worktree (no checkout of /work/main)::

    git worktree add /tmp/m-old 09b37ad
    cd /tmp/m-old && PYTHONPATH=/tmp/m-old /path/to/.venv/bin/python make_old_model.py OUT_DIR
    git worktree remove /tmp/m-old

Do not regenerate with newer code: the point is that the files come from the old one.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from ranker.model.artifact import ScoringModel
from ranker.model.head import ApexHead, HeadConfig
from ranker.model.targets import TargetTransform
from ranker.scoring import SongMeta, score_predictions
from ranker.settings import Settings

out = Path(sys.argv[1])
torch.manual_seed(7)
cfg = HeadConfig(input_dim=8, n_layers=2, input_norm=True, shared_dims=(16, 8), branch_dims=(8, 4))
head = ApexHead(cfg)
rng = np.random.default_rng(3)
head.set_input_stats(torch.from_numpy(rng.normal(size=(32, 2, 8)).astype(np.float32)))
counts = {"streams": rng.integers(0, 500, 64), "likes": rng.integers(0, 40, 64)}
tt = TargetTransform.fit(counts)
model = ScoringModel.from_head(
    head,
    encoder_id="logmel-test",
    training={"note": "golden, made by 09b37ad"},
    layers=(1, 2),
    target_transform=tt.to_dict(),
)
model.save(out / "model")
x = rng.normal(size=(5, 2, 8)).astype(np.float32)
np.save(out / "features.npy", x)
pred = model.predict(x)
songs = [SongMeta(f"g{i}", "suno-v5", "2026-01-05T00:00:00+00:00") for i in range(5)]
scored = score_predictions(Settings(), model, pred, songs)
outputs = {
    "version": model.version,
    "predict": pred.tolist(),
    "scores": [{"scores": s.scores, "rank_score": s.rank_score, "like_rate": s.like_rate} for s in scored],
}
with open(out / "outputs.json", "w") as f:
    json.dump(outputs, f, indent=1)
print(model.version)
