"""Training the APEX head on cached features: the paper's recipe, made reproducible and fast.

The recipe (paper and public code): AdamW (lr 1e-4, weight decay 1e-4), cosine annealing over
the epochs, batch 512, gradient clipping at 1.0, early stopping with patience 20 on the
validation loss (restoring the best weights), mixed precision, seed 42. Differences, each on
purpose:

- The target transform (raw counts -> percentile -> power) is fitted on the *training split
  only* and saved in the model card, so validation truth never leaks into the targets' scale
  and evaluation later maps counts exactly as training did.
- The head's inputs are standardised per (layer, feature) by the training songs' mean and
  standard deviation, saved with the weights (``standardize``; off reproduces the paper). MERT
  features are near unit scale, but the logmel baseline's are not: on 240 synthetic songs this
  lifted the held-out Spearman of the likes score against the true like probability from
  0.25 to 0.38 (on 2,000 songs with a tuned recipe it is neutral; docs/model.md).
- Weight decay is not applied to the uncertainty weights' log-sigmas (decay would pull every
  task's learned weight towards one for no reason).
- The validation split is by song (seeded) or by whole generators (``holdout_generators``:
  the paper's cross-system question, answered on held-out systems instead of assumed).
- The layer mix is learned (``softmax`` by default); ``conv1x1`` keeps the paper's form and
  starts from the paper's exact random mix (seed 42), which ``train_layer_mix=False`` keeps
  frozen, as in the paper.
- Segment mode validates at song level (frame-weighted mean of segment predictions), the
  level the metrics are reported at.
- Mixed precision (bf16 autocast) only on CUDA; on the CPU float32 is faster and exact.
- Deterministic on the CPU for a seed: the global RNG is forked and seeded, batches come
  from a seeded generator, and the same inputs give the same weights and model version.

Speed: all features live in one tensor (no DataLoader, no worker processes), batches are
gathered by index, validation runs in one pass. The trainer never touches audio.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import torch

from ranker.catalog import Catalog, CatalogError
from ranker.features import FeatureSet, FeatureStoreError
from ranker.model.artifact import ScoringModel, resolve_device
from ranker.model.drift import score_quantiles
from ranker.model.evaluate import (
    align,
    as_catalog,
    fit_transform,
    predict_songs,
    regression_metrics,
    require_columns,
    target_matrix,
)
from ranker.model.head import ApexHead, HeadConfig
from ranker.model.ood import MIN_SONGS as OOD_MIN_SONGS
from ranker.model.ood import OodModel, fit_ood
from ranker.model.report import json_safe
from ranker.model.train_config import TrainConfig, TrainingError, TrainResult

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------


def split_rows(
    n: int, generators: npt.NDArray[Any] | None, config: TrainConfig
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(train, val) positions: whole held-out generators, or a seeded random share of songs."""
    if config.holdout_generators:
        if generators is None:
            raise CatalogError("holdout_generators needs the catalog's generator column")
        gens = np.asarray([str(g) for g in generators], dtype=object)
        known = sorted(set(gens.tolist()))
        absent = [g for g in config.holdout_generators if g not in known]
        if absent:
            raise CatalogError(f"holdout generator(s) {absent} have no songs; the catalog's generators: {known}")
        val_mask = np.isin(gens, list(config.holdout_generators))
        if val_mask.all():
            raise CatalogError("holding out those generators leaves no songs to train on")
        return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
    if config.val_fraction == 0 or n < 2:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    perm = np.random.default_rng(config.seed).permutation(n)
    n_val = min(n - 1, max(1, round(config.val_fraction * n)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def _param_groups(head: ApexHead, config: TrainConfig) -> list[dict[str, Any]]:
    decay: list[torch.nn.Parameter] = []
    for name, p in head.named_parameters():
        if name == "log_sigma":
            continue
        if name.startswith("mix.") and not config.train_layer_mix:
            p.requires_grad_(False)
            continue
        decay.append(p)
    groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": config.weight_decay}]
    if config.loss == "uncertainty":
        groups.append({"params": [head.log_sigma], "weight_decay": 0.0})
    else:
        head.log_sigma.requires_grad_(False)
    return groups


def _init_head(config: HeadConfig) -> ApexHead:
    head = ApexHead(config)
    if head.mix.conv is not None:
        # Start where the paper's (fixed) mix is: its exact seeded Conv1d.
        from ranker.model.released import paper_layer_mix

        w, b = paper_layer_mix(n_layers=config.n_layers)
        with torch.no_grad():
            head.mix.conv.weight.copy_(w)
            head.mix.conv.bias.copy_(b)  # type: ignore[union-attr]
    return head


def _autocast(device: torch.device, amp: bool) -> AbstractContextManager[Any]:
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def _num_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (None: unchanged), restoring the previous count."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """A seeded shuffle cut into near-equal batches, none of size 1 (BatchNorm needs two rows)."""
    perm = torch.randperm(n, generator=gen)
    k = max(1, math.ceil(n / batch_size))
    if n // k < 2:
        k = max(1, n // 2)
    return list(torch.tensor_split(perm, k))


def _predict(
    head: ApexHead,
    x: torch.Tensor,
    device: torch.device,
    amp: bool,
    chunk: int = 8192,
) -> torch.Tensor:
    outs = []
    with torch.inference_mode(), _autocast(device, amp):
        for i in range(0, x.shape[0], chunk):
            outs.append(head(x[i : i + chunk]).float())
    return torch.cat(outs) if outs else torch.zeros(0, len(head.tasks), device=device)


def _song_mean(pred: torch.Tensor, song_index: torch.Tensor, weights: torch.Tensor, n_songs: int) -> torch.Tensor:
    """Frame-weighted mean of segment predictions per song."""
    num = torch.zeros(n_songs, pred.shape[1], device=pred.device, dtype=pred.dtype)
    num.index_add_(0, song_index, pred * weights[:, None])
    den = torch.zeros(n_songs, device=pred.device, dtype=pred.dtype).index_add_(0, song_index, weights)
    return num / den[:, None]


class _Member(NamedTuple):
    """One trained member of the ensemble and how its run went."""

    head: ApexHead
    history: list[dict[str, Any]]
    best_epoch: int
    best_loss: float
    stopped_early: bool
    train_s: float


def _fit_ood(cfg: TrainConfig, x_train: npt.NDArray[np.float32]) -> tuple[OodModel | None, dict[str, Any] | None]:
    """The OOD model of the training songs' head inputs (none when off or too few songs)."""
    if not cfg.ood:
        return None, None
    if len(x_train) < OOD_MIN_SONGS:
        log.warning("train: %d training songs are too few for an OOD model; none saved", len(x_train))
        return None, None
    ood = fit_ood(x_train, seed=cfg.seed)
    info = {
        "method": "ppca-mahalanobis-ledoit-wolf",
        "components": int(ood.components.shape[1]),
        "n_fit": len(x_train) - len(ood.calibration),
        "n_calibration": len(ood.calibration),
    }
    return ood, info


def train_head(
    features: FeatureSet,
    catalog: Catalog | str | Path,
    config: TrainConfig | None = None,
    *,
    song_ids: Sequence[str] | None = None,
    progress: bool = False,
    init: ScoringModel | None = None,
) -> TrainResult:
    """Train an APEX head on cached features and a catalog's targets; see the module docstring.

    ``song_ids`` restricts training and validation to those songs (e.g. to keep a test split
    out). ``init`` warm-starts from another model's weights (retraining), which needs the same
    head shape. Catalog problems raise :class:`~ranker.catalog.CatalogError` naming the rows.
    """
    cfg = config or TrainConfig()
    began = time.perf_counter()
    cat = as_catalog(catalog)
    tasks = cfg.task_names
    require_columns(cat, tasks)
    al = align(features, cat, song_ids)
    if al.skipped_failed:
        log.warning("train: %d catalog songs skipped: their embedding failed", len(al.skipped_failed))
    if len(al) < 4:
        raise CatalogError(f"catalog {cat.path}: only {len(al)} songs with features; too few to train")
    generators = cat.column("generator")[al.catalog_rows] if cat.has("generator") else None
    train_pos, val_pos = split_rows(len(al), generators, cfg)
    if len(train_pos) < 2:
        raise CatalogError("fewer than two training songs after the validation split")

    transform = fit_transform(
        cat, al.catalog_rows[train_pos], gamma=cfg.gamma, cohort=cfg.cohort, min_cohort_size=cfg.min_cohort_size
    )
    y_all = target_matrix(cat, al.catalog_rows, list(tasks), transform)
    for j, t in enumerate(tasks):
        if not np.isfinite(y_all[train_pos, j]).any():
            raise CatalogError(f"catalog {cat.path}: no training song has a {t} label")
    y_train_np = y_all[train_pos]
    if cfg.shuffle_targets:
        y_train_np = y_train_np[np.random.default_rng(cfg.seed + 1).permutation(len(train_pos))]

    device = resolve_device(cfg.device)
    feat_rows = al.feature_rows
    finite = np.isfinite(features.layers[feat_rows]).all(axis=(1, 2))
    if not finite.all():
        bad = [al.song_ids[i] for i in np.flatnonzero(~finite)[:10]]
        raise FeatureStoreError(f"features of {int((~finite).sum())} songs are NaN or infinite (e.g. {bad})")
    head_cfg = cfg.head_config(features.dim, features.n_layers)
    if init is not None:  # a warm start keeps the starting head's input standardisation (and its statistics)
        head_cfg = head_cfg.model_copy(update={"input_norm": init.head.config.input_norm})

    # Training rows: songs, or every segment of the training songs with its song's targets.
    val_index: torch.Tensor | None = None  # segment mode: each validation segment's song
    val_weights: torch.Tensor | None = None  # and its real frames
    if cfg.input_mode == "segment":
        features.segments()  # load once; the subsets below slice it in memory
        sub = features.subset(feat_rows)
        seg = sub.segments()
        seg_train = np.isin(seg.song_index, train_pos)
        pos_of = np.full(len(al), -1, dtype=np.int64)
        pos_of[train_pos] = np.arange(len(train_pos))
        x_train = torch.from_numpy(seg.features[seg_train])
        y_train = torch.from_numpy(y_train_np[pos_of[seg.song_index[seg_train]]])
        seg_val = np.isin(seg.song_index, val_pos)
        vpos_of = np.full(len(al), -1, dtype=np.int64)
        vpos_of[val_pos] = np.arange(len(val_pos))
        x_val = torch.from_numpy(seg.features[seg_val])
        val_index = torch.from_numpy(vpos_of[seg.song_index[seg_val]]).to(device)
        val_weights = torch.from_numpy(np.maximum(seg.frames[seg_val], 1).astype(np.float32)).to(device)
    else:
        x_train = torch.from_numpy(features.layers[feat_rows[train_pos]])
        y_train = torch.from_numpy(y_train_np)
        x_val = torch.from_numpy(features.layers[feat_rows[val_pos]])
    y_val = torch.from_numpy(y_all[val_pos]).to(device)
    # Per-task variance of the training targets: the scale of "val_scaled_mse".
    target_var = torch.from_numpy(np.maximum(np.nanvar(y_train_np, axis=0), 1e-6).astype(np.float32)).to(device)
    x_train, y_train, x_val = x_train.to(device), y_train.to(device), x_val.to(device)
    n_rows = int(x_train.shape[0])
    if n_rows < 2:
        raise CatalogError("fewer than two training rows")

    fork_devices = [device.index or 0] if device.type == "cuda" else []
    threads = cfg.cpu_threads(features.n_layers * features.dim) if device.type == "cpu" else None

    def fit_member(seed: int, start: ApexHead | None) -> _Member:
        """One head trained from ``seed`` (its init and batch order); ``start``: warm start."""
        history: list[dict[str, Any]] = []
        with torch.random.fork_rng(devices=fork_devices), _num_threads(threads):
            torch.manual_seed(seed)
            head = _init_head(head_cfg)
            if start is not None:
                head.load_state_dict(start.state_dict())
            elif head_cfg.input_norm:
                head.set_input_stats(x_train)
            head = head.to(device)
            opt = torch.optim.AdamW(_param_groups(head, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
            params = [p for g in opt.param_groups for p in g["params"]]
            gen = torch.Generator().manual_seed(seed)
            best_loss = math.inf  # of the early-stopping criterion
            best_state: dict[str, torch.Tensor] | None = None
            best_epoch = 0
            wait = 0
            stopped_early = False
            train_began = time.perf_counter()
            epochs = range(1, cfg.epochs + 1)
            bar: Any = None
            if progress:
                tqdm: Any = importlib.import_module("tqdm").tqdm  # typed as Any: no stubs needed

                bar = tqdm(epochs, unit="epoch", desc="train", dynamic_ncols=True)
                epochs = bar
            epoch = 0
            for epoch in epochs:
                t0 = time.perf_counter()
                head.train()
                # The loss is summed on the device and checked once an epoch: no GPU sync per step.
                total = torch.zeros((), device=device)
                steps = 0
                for idx in _batches(n_rows, cfg.batch_size, gen):
                    idx = idx.to(device)
                    xb, yb = x_train.index_select(0, idx), y_train.index_select(0, idx)
                    opt.zero_grad(set_to_none=True)
                    with _autocast(device, cfg.amp):
                        pred = head(xb)
                    loss = head.loss(pred.float(), yb)
                    loss.backward()
                    if cfg.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
                    opt.step()
                    total += loss.detach()
                    steps += 1
                train_loss = float(total) / max(steps, 1)
                if not math.isfinite(train_loss):
                    raise TrainingError(
                        f"the training loss became {train_loss} in epoch {epoch}; "
                        f"try a lower learning rate (lr={cfg.lr}) or check the features for outliers"
                    )
                sched.step()
                record: dict[str, Any] = {
                    "epoch": epoch,
                    "lr": float(opt.param_groups[0]["lr"]),
                    "train_loss": train_loss,
                }
                if len(val_pos):
                    head.eval()
                    pred_val = _predict(head, x_val, device, cfg.amp)
                    if val_index is not None and val_weights is not None:
                        pred_val = _song_mean(pred_val, val_index, val_weights, len(val_pos))
                    with torch.no_grad():
                        val_loss = float(head.loss(pred_val, y_val))
                        mse, _ = head.task_mse(pred_val, y_val)
                    scaled = float((mse / target_var).sum())
                    record["val_loss"] = val_loss
                    record["val_scaled_mse"] = scaled
                    record["val_mse"] = {t: float(v) for t, v in zip(tasks, mse.tolist(), strict=True)}
                    criterion = val_loss if cfg.stop_on == "val_loss" else scaled
                    if criterion < best_loss:
                        best_loss, best_epoch, wait = criterion, epoch, 0
                        best_state = copy.deepcopy(head.state_dict())
                    else:
                        wait += 1
                record["seconds"] = time.perf_counter() - t0
                history.append(record)
                if bar is not None:
                    bar.set_postfix(train=f"{record['train_loss']:.3f}", val=f"{record.get('val_loss', math.nan):.3f}")
                if len(val_pos) and wait >= cfg.patience:
                    stopped_early = True
                    break
            train_s = time.perf_counter() - train_began
            if bar is not None:
                bar.close()
            if best_state is not None:
                head.load_state_dict(best_state)
            else:
                best_epoch = epoch
        head = head.to("cpu").eval()
        return _Member(head, history, best_epoch, best_loss, stopped_early, train_s)

    if init is not None and init.head.config != head_cfg:
        raise TrainingError(
            f"cannot warm-start from {init.version}: its head differs ({init.head.config} vs {head_cfg})"
        )
    # Member i is seeded cfg.seed + i (member 0 is the single head of the same seed); a warm start
    # starts each member from the same member of an ensemble of the same size, else from its head.
    seeds = [cfg.seed + i for i in range(cfg.ensemble)]
    starts: list[ApexHead | None] = [None] * cfg.ensemble
    if init is not None:
        starts = [init.heads[i] if init.ensemble_size == cfg.ensemble else init.head for i in range(cfg.ensemble)]
    members = [fit_member(seed, start) for seed, start in zip(seeds, starts, strict=True)]
    _, history, best_epoch, best_loss, stopped_early, train_s = members[0]
    train_s = sum(m.train_s for m in members)
    ood, ood_info = _fit_ood(cfg, features.layers[feat_rows[train_pos]])

    ids = al.song_ids
    train_ids = [ids[i] for i in train_pos]
    val_ids = [ids[i] for i in val_pos]
    training: dict[str, Any] = {
        "config": cfg.card_dict(),
        "input_mode": cfg.input_mode,
        "n_train": len(train_ids),
        "n_val": len(val_ids),
        "train_ids_sha256": hashlib.sha256("\n".join(train_ids).encode()).hexdigest(),
        "split": "generators" if cfg.holdout_generators else ("random" if len(val_ids) else "none"),
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "best_val_criterion": best_loss if math.isfinite(best_loss) else None,
        "catalog": cat.path.name,
    }
    if cfg.ensemble > 1:
        training["ensemble_seeds"] = seeds
        training["ensemble_best_epochs"] = [m.best_epoch for m in members]
    if generators is not None:  # what the drift report calls a generator the model has seen (ranker.model.drift)
        training["generators"] = sorted({str(g) for g in np.asarray(generators)[train_pos].tolist()})
    result_model = ScoringModel.from_head(
        [m.head for m in members],
        ood=ood,
        ood_info=ood_info,
        encoder_id=features.encoder_id,
        training=training,
        layers=features.layer_indices,
        target_transform=transform.to_dict(),
    )
    # The training songs' scores as the model gives them: what the drift report compares new songs with.
    train_scores = predict_songs(result_model, features, feat_rows[train_pos], input_mode=cfg.input_mode)
    result_model = result_model.with_training({"score_quantiles": score_quantiles(train_scores, tasks)})
    metrics: dict[str, dict[str, float]] = {}
    if len(val_pos):
        pred = predict_songs(result_model, features, feat_rows[val_pos], input_mode=cfg.input_mode)
        truth = y_all[val_pos]
        metrics = {t: regression_metrics(truth[:, j], pred[:, j]) for j, t in enumerate(tasks)}
    result = TrainResult(
        model=result_model,
        metrics=metrics,
        history=history,
        best_epoch=best_epoch,
        epochs_run=len(history),
        stopped_early=stopped_early,
        train_song_ids=train_ids,
        val_song_ids=val_ids,
        skipped_failed=al.skipped_failed,
        elapsed_s=time.perf_counter() - began,
        train_s=train_s,
        rows_per_epoch=n_rows * cfg.ensemble,
    )
    # metrics.json is plain JSON: undefined correlations (constant predictions) become null.
    result.model.metrics = json_safe({"validation": metrics, "training": result.summary(), "history": history})
    log.info(
        "trained %s: %d train / %d val songs, best epoch %d of %d, %.0f rows/s",
        result_model.version,
        len(train_ids),
        len(val_ids),
        best_epoch,
        len(history),
        result.rows_per_s,
    )
    return result
