"""Model subcommands of the ``apexrank`` CLI: embed, train, eval, ablation, import-released, evaluate-policy.

``consumers.cli`` calls :func:`register` on its subparsers. Each handler takes the parsed
``args`` and returns an exit code: 0 done, 1 the work failed, 2 the input cannot be used
(a bad catalog, battles file or features directory: the message names what to fix).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ranker.errors import ConfigError

if TYPE_CHECKING:  # imported where settings are built: `apexrank --help` loads no pydantic
    from ranker.settings import Settings

log = logging.getLogger("apexrank.model")

Handler = Callable[[argparse.Namespace], int]


def _fail(message: str, code: int = 2) -> int:
    print(f"apexrank: {message}", file=sys.stderr)
    return code


def _guard(fn: Handler) -> Handler:
    """Turn the errors users can fix into a message and exit code 2 (not a traceback)."""

    def run(args: argparse.Namespace) -> int:
        from pydantic import ValidationError

        from ranker.catalog import CatalogError
        from ranker.model.artifact import ModelArtifactError
        from ranker.model.train_config import TrainingError

        try:
            return fn(args)
        except (CatalogError, ConfigError, ModelArtifactError) as exc:
            return _fail(str(exc))
        except ValidationError as exc:
            return _fail(f"invalid options: {exc}")
        except FileExistsError as exc:
            return _fail(f"{exc}; choose another --out")
        except TrainingError as exc:
            return _fail(str(exc), code=1)

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _settings(args: argparse.Namespace) -> Settings:
    from ranker.settings import Settings

    settings = Settings()
    encoder = getattr(args, "encoder", None)
    if encoder:
        settings = settings.model_copy(update={"encoder": encoder})
    return settings


def _models_root(settings: Settings, explicit: str | None) -> Path:
    """Where ``current`` lives: --models-root, else what ``settings.head_dir`` says (the retrain
    job's rule: :func:`~ranker.model.registry.models_root_of`)."""
    if explicit:
        return Path(explicit)
    from ranker.model.registry import models_root_of

    return models_root_of(settings.head_dir)


def _promote(settings: Settings, model_dir: Path, root: str | None) -> None:
    from ranker.model.registry import promote

    models_root = _models_root(settings, root)
    version = promote(models_root, model_dir)
    print(f"promoted {version}: {models_root / 'current'} -> {model_dir}")


# -- embed ------------------------------------------------------------------------------
@_guard
def cmd_embed(args: argparse.Namespace) -> int:
    """Embed a catalog's audio once into a features directory (resumable)."""
    from ranker.embed import embed_catalog

    settings = _settings(args)
    report = embed_catalog(
        args.catalog,
        args.out,
        settings,
        batch_songs=args.batch_songs,
        progress=not args.no_progress,
    )
    print(report.summary())
    for f in report.failures[: args.show_failures]:
        print(f"  failed {f.song_id} (row {f.row}): {f.code}: {f.message}")
    if report.failed > args.show_failures:
        print(f"  ... and {report.failed - args.show_failures} more")
    if args.json:
        from ranker.model.report import write_json

        write_json(args.json, report.to_dict())
    nothing_worked = report.total > 0 and report.embedded + report.skipped_existing == 0
    return 1 if nothing_worked else 0


# -- train ------------------------------------------------------------------------------
def _train_config(args: argparse.Namespace) -> Any:
    from ranker.model.train_config import TrainConfig

    fields: dict[str, Any] = {
        "input_mode": args.input_mode,
        "tasks": args.tasks,
        "loss": args.loss,
        "shared_depth": args.shared_depth,
        "layer_mix": args.layer_mix,
        "train_layer_mix": not args.freeze_layer_mix,
        "standardize": not args.no_standardize,
        "epochs": args.epochs,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "batch_size": args.batch_size,
        "patience": args.patience,
        "val_fraction": args.val_fraction,
        "holdout_generators": tuple(args.holdout_generator or ()),
        "seed": args.seed,
        "ensemble": args.ensemble,
        "ood": False if args.no_ood else None,
        "gamma": args.gamma,
        "cohort": args.cohort,
        "shuffle_targets": args.shuffle_targets,
        "device": args.device,
        "threads": args.threads,
        "stop_on": args.stop_on,
    }
    if args.grad_clip is not None:
        fields["grad_clip"] = args.grad_clip if args.grad_clip > 0 else None
    return TrainConfig(**{k: v for k, v in fields.items() if v is not None})


@_guard
def cmd_train(args: argparse.Namespace) -> int:
    """Train a head on cached features; save it as a model directory (and optionally promote it)."""
    from ranker.features import load_features
    from ranker.model.report import print_metrics, write_json
    from ranker.model.train import train_head
    from ranker.settings import Settings

    settings = Settings()
    config = _train_config(args)
    features = load_features(args.features)
    result = train_head(features, args.catalog, config, progress=not args.no_progress)
    out = result.model.save(args.out)
    print_metrics(result.metrics, title=f"{result.model.version}: validation ({len(result.val_song_ids)} songs)")
    s = result.summary()
    print(
        f"saved {result.model.version} to {out}: best epoch {s['best_epoch']} of {s['epochs_run']}, "
        f"{s['n_train']} train / {s['n_val']} val songs, {s['rows_per_s']:.0f} rows/s"
    )
    if args.json:
        write_json(args.json, {"version": result.model.version, "metrics": result.metrics, "summary": s})
    if args.promote:
        _promote(settings, out, args.models_root)
    return 0


# -- eval -------------------------------------------------------------------------------
@_guard
def cmd_eval(args: argparse.Namespace) -> int:
    """Score a model against a catalog's truth (and optionally pairwise battles), or run the generator holdout."""
    if args.holdout_generator:
        return _eval_holdout(args)
    if not args.model:
        return _fail("eval needs --model (or --holdout-generator G to train without G and evaluate on it)")
    from rich.console import Console

    from ranker.features import load_features
    from ranker.model.artifact import ModelArtifactError, ScoringModel
    from ranker.model.battles import evaluate_battles
    from ranker.model.evaluate import evaluate_report
    from ranker.model.registry import resolve_model_dir
    from ranker.model.report import metrics_table, write_json

    model_dir = resolve_model_dir(args.model)
    if model_dir is None:
        raise ModelArtifactError(f"{args.model} is not a model directory and holds no 'current' model")
    model = ScoringModel.load(model_dir)
    features = load_features(args.features)
    report = evaluate_report(model, features, args.catalog)
    if args.battles:
        report.battles = evaluate_battles(
            model, features, args.battles, folds=args.folds, seed=42 if args.seed is None else args.seed
        )
    console = Console()
    console.print(metrics_table(report.metrics, title=f"{model.version} on {report.n_songs} songs"))
    for note in report.notes:
        console.print(f"note: {note}")
    if report.battles is not None:
        console.print(report.battles.table())
        for note in report.battles.notes:
            console.print(f"note: {note}")
    if args.json:
        write_json(args.json, {"model_version": model.version, **report.to_dict()})
    return 0


def _eval_holdout(args: argparse.Namespace) -> int:
    """Train without one generator (the train options apply), evaluate on it (ranker.model.holdout)."""
    from rich.console import Console
    from rich.table import Table

    from ranker.features import load_features
    from ranker.model.holdout import evaluate_holdout
    from ranker.model.report import write_json

    if len(args.holdout_generator) != 1:
        return _fail("eval --holdout-generator takes one generator")
    if args.model or args.battles:
        return _fail("eval --holdout-generator trains its own model: leave out --model and --battles")
    args.holdout_generator, generator = None, args.holdout_generator[0]
    config = _train_config(args)
    features = load_features(args.features)
    result, report = evaluate_holdout(features, args.catalog, generator, config, progress=not args.no_progress)
    if args.out:
        result.model.save(args.out)
    table = Table(title=f"{report['model_version']} (ensemble of {report['ensemble']}) on held-out {generator!r}")
    for col in ("task", "songs", "spearman", "calibration error", "spread~|error| spearman", "in-dist. spearman"):
        table.add_column(col, justify="left" if col == "task" else "right")

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    for task, m in report["holdout"].items():
        ind = report["in_distribution"].get(task, {})
        table.add_row(
            task,
            str(report["n_holdout"]),
            fmt(m["spearman"]),
            fmt(m["calibration_error"]),
            fmt(m["spread_error_spearman"]),
            fmt(ind.get("spearman")),
        )
    console = Console()
    console.print(table)
    console.print(
        f"OOD ROC AUC, {generator} vs {report['n_in_distribution']} in-distribution held-out songs: "
        f"{fmt(report['ood_auc'])}; mean OOD percentile of {generator}: {fmt(report['holdout_mean_ood_percentile'])}"
    )
    if args.json:
        write_json(args.json, report)
    return 0


# -- ablation ---------------------------------------------------------------------------
@_guard
def cmd_ablation(args: argparse.Namespace) -> int:
    """Run the paper's 24 conditions plus our improvements; write the comparison table."""
    from ranker.features import load_features
    from ranker.model.ablation import all_conditions, improvement_conditions, paper_conditions, run_ablation
    from ranker.model.train_config import TrainConfig

    base = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        val_fraction=args.val_fraction,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        stop_on=args.stop_on,
    )
    conditions = {"all": all_conditions, "paper": paper_conditions, "ours": improvement_conditions}[args.only]()
    features = load_features(args.features)
    result = run_ablation(
        features,
        args.catalog,
        args.out,
        base=base,
        conditions=conditions,
        seeds=tuple(args.seeds),
        test_fraction=args.test_fraction,
        test_generators=tuple(args.test_generator or ()),
        progress=not args.no_progress,
    )
    print(result.paths["md"].read_text(encoding="utf-8"))
    print(f"wrote {', '.join(str(p) for p in result.paths.values())} in {result.elapsed_s:.0f} s")
    return 0


# -- import-released --------------------------------------------------------------------
@_guard
def cmd_import_released(args: argparse.Namespace) -> int:
    """Convert the paper's released checkpoint into a model directory."""
    from ranker.model.released import PAPER_LAYERS, load_released, mert_encoder_id
    from ranker.settings import Settings

    settings = Settings()
    layers = tuple(settings.model.layers)
    if layers != PAPER_LAYERS:
        log.warning("the released head was trained on layers %s; settings use %s", PAPER_LAYERS, layers)
    encoder_id = args.encoder_id or mert_encoder_id(settings.model.mert_model, PAPER_LAYERS)
    model = load_released(args.checkpoint, encoder_id=encoder_id, conv_seed=args.conv_seed)
    out = model.save(args.out)
    print(json.dumps({"model_version": model.version, "dir": str(out), "encoder_id": encoder_id}))
    if args.promote:
        _promote(settings, out, args.models_root)
    return 0


# -- evaluate-policy --------------------------------------------------------------------
@_guard
def cmd_evaluate_policy(args: argparse.Namespace) -> int:
    """A feed policy's off-policy like rate on the explored slots of the served log (docs/off-policy.md)."""
    from consumers.evaluate_policy import run

    return run(args)


# -- parser -----------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    """Add ``embed``, ``train``, ``eval``, ``ablation``, ``import-released`` and ``evaluate-policy`` to ``sub``."""

    def add(name: str, fn: Handler, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    embed = add("embed", cmd_embed, "run the encoder once over a catalog and cache its features")
    embed.add_argument("--catalog", required=True, help="catalog (Parquet or CSV)")
    embed.add_argument("--out", required=True, help="features directory (created; resumed if it exists)")
    embed.add_argument("--encoder", choices=["mert", "logmel"], help="override APEXRANK_ENCODER")
    embed.add_argument("--batch-songs", type=int, default=16, help="songs decoded and encoded together")
    embed.add_argument("--show-failures", type=int, default=20, help="failed songs to list")
    embed.add_argument("--json", help="write the run report here")
    embed.add_argument("--no-progress", action="store_true")

    train = add("train", cmd_train, "train an APEX head on cached features")
    train.add_argument("--features", required=True, help="features directory from `apexrank embed`")
    train.add_argument("--catalog", required=True, help="catalog with the targets")
    train.add_argument("--out", required=True, help="model directory to write")
    _add_train_options(train)
    train.add_argument("--json", help="write validation metrics and the run summary here")
    train.add_argument("--promote", action="store_true", help="make the new model the one that serves")
    train.add_argument("--models-root", help="folder holding 'current' (default: from settings)")
    train.add_argument("--no-progress", action="store_true")

    ev = add(
        "eval",
        cmd_eval,
        "evaluate a model: per-task metrics and optional battles; or, with --holdout-generator G, train "
        "without G and report per task on G: Spearman, calibration error, spread~|error| Spearman, OOD ROC AUC",
    )
    ev.add_argument("--model", help="model directory (or a folder with 'current'); not with --holdout-generator")
    ev.add_argument("--features", required=True)
    ev.add_argument("--catalog", required=True)
    ev.add_argument("--battles", help="pairwise preferences: song_a, song_b, preference (CSV/Parquet)")
    ev.add_argument("--folds", type=int, default=10, help="cross-validation folds for battles")
    ev.add_argument("--json", help="write the metrics here")
    ev.add_argument("--out", help="with --holdout-generator: also save the trained model here")
    ev.add_argument("--no-progress", action="store_true")
    _add_train_options(ev)  # --seed (default 42 for battles), --ensemble, --holdout-generator, ...

    ab = add("ablation", cmd_ablation, "the paper's 24 conditions plus our improvements")
    ab.add_argument("--features", required=True)
    ab.add_argument("--catalog", required=True)
    ab.add_argument("--out", required=True, help="folder for ablation.md/.json/.csv")
    ab.add_argument("--only", choices=["all", "paper", "ours"], default="all")
    ab.add_argument("--seeds", type=int, nargs="+", default=[42])
    ab.add_argument("--test-fraction", type=float, default=0.15)
    ab.add_argument("--test-generator", action="append", help="test on this generator's songs (repeat)")
    ab.add_argument("--epochs", type=int, default=50)
    ab.add_argument("--batch-size", type=int, default=512)
    ab.add_argument("--lr", type=float, default=1e-4)
    ab.add_argument("--patience", type=int, default=20)
    ab.add_argument("--val-fraction", type=float, default=0.15)
    ab.add_argument("--seed", type=int, default=42, help="seed of the test split")
    ab.add_argument("--device", default="auto")
    ab.add_argument("--stop-on", choices=["val_loss", "val_scaled_mse"], default="val_loss")
    ab.add_argument("--threads", type=int, help="CPU threads (default: 1 for small batches, else torch's)")
    ab.add_argument("--no-progress", action="store_true")

    imp = add("import-released", cmd_import_released, "import the paper's released checkpoint")
    imp.add_argument("--checkpoint", required=True, help="best_model.pt (or .safetensors) of AMAAI-Lab/apex")
    imp.add_argument("--out", required=True, help="model directory to write")
    imp.add_argument("--encoder-id", help="default: this project's MERT-v1-95M encoder id")
    imp.add_argument("--conv-seed", type=int, default=42, help="seed of the paper's fixed layer mix")
    imp.add_argument("--promote", action="store_true")
    imp.add_argument("--models-root")

    ope = add(
        "evaluate-policy",
        cmd_evaluate_policy,
        "estimate a feed policy's like rate from the served log (self-normalised IPS on the explored slots)",
    )
    ope.add_argument("--policy", required=True, help="feed policy to evaluate (a name in feed.feeds)")
    ope.add_argument("--against", help="a second feed policy: both estimates and their paired difference")
    ope.add_argument("--since", required=True, help="RFC 3339 time, or a duration back from now: 24h, 7d")
    ope.add_argument("--impressions", help="an impressions table (Parquet) instead of the served and engagement logs")
    ope.add_argument("--resamples", type=int, help="bootstrap resamples over pages (default 1000)")
    ope.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    ope.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    ope.add_argument(
        "--min-matched", type=int, help="matched impressions below which the estimate is flagged (default 200)"
    )
    ope.add_argument("--json", action="store_true", help="print the estimate as JSON")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """The ablation factors and the optimiser settings (defaults: TrainConfig's)."""
    p.add_argument("--input-mode", choices=["song", "segment"])
    p.add_argument("--tasks", choices=["popularity", "full"])
    p.add_argument("--loss", choices=["equal", "weighted", "uncertainty"])
    p.add_argument("--shared-depth", type=int, choices=[2, 3])
    p.add_argument("--layer-mix", choices=["softmax", "conv1x1", "mean"])
    p.add_argument("--freeze-layer-mix", action="store_true", help="keep the mix at its start (paper)")
    p.add_argument(
        "--no-standardize", action="store_true", help="feed the head raw features (paper); default: standardised"
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-clip", type=float, help="0 turns clipping off")
    p.add_argument("--patience", type=int)
    p.add_argument("--val-fraction", type=float)
    p.add_argument(
        "--holdout-generator",
        action="append",
        help="train: validate on this generator (repeat); eval: train without it and evaluate on it",
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--ensemble", type=int, help="heads in the deep ensemble, seeded seed, seed+1, ... (default 1)")
    p.add_argument("--no-ood", action="store_true", help="fit no out-of-distribution model")
    p.add_argument("--gamma", type=float, help="power of the percentile -> score transform")
    p.add_argument("--cohort", choices=["all", "generator_week"])
    p.add_argument("--shuffle-targets", action="store_true", help="null baseline")
    p.add_argument("--stop-on", choices=["val_loss", "val_scaled_mse"], help="early-stopping criterion")
    p.add_argument("--device")
    p.add_argument("--threads", type=int, help="CPU threads (default: 1 for small batches, else torch's)")
