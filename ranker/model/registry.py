"""Which model serves: locating the current one, loading it (or a seeded head) and promoting another.

``models_root`` holds one directory per model version (``models_root/<version>``, see
:mod:`ranker.model.artifact`); ``models_root/current`` (a symlink, or a file holding a directory
name) says which version serves, and :func:`promote` swaps it atomically. Kept apart from the
model directory itself because this is deployment state that workers and the retrain job share.
Every move of ``current`` holds :func:`promotion_lock`, so that the retrain job's "is the model I
judged against still serving?" and its swap are one step that no hand promotion can land inside.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from indexes.durable import fsync_dir, replace_text, stale
from ranker.errors import ConfigError
from ranker.model.artifact import DEFAULT_LAYERS, Device, ScoringModel
from ranker.model.artifact_files import CONFIG_FILE, WEIGHTS_FILE, ModelArtifactError

log = logging.getLogger(__name__)

CURRENT_LINK = "current"


def resolve_model_dir(head_dir: str | os.PathLike[str]) -> Path | None:
    """The model directory that ``head_dir`` designates, or None when it designates none yet.

    ``head_dir`` may be a model directory (or a symlink to one), a directory holding a
    ``current`` symlink or ``current`` file, or a ``current`` file whose text names a model
    directory relative to the folder it lives in. A ``current`` pointer to nothing is an error:
    silently serving an untrained head instead would hide a broken deployment.
    """
    path = Path(head_dir)
    if path.is_file():
        return _follow_pointer_file(path)
    if path.is_symlink() and not path.exists():
        raise ModelArtifactError(f"{path} is a symlink to {os.readlink(path)}, which does not exist")
    if not path.is_dir():
        return None
    if (path / CONFIG_FILE).exists() or (path / WEIGHTS_FILE).exists():
        # Resolve a symlink once, so that a promote() racing with the load cannot mix the
        # config of one version with the weights of another.
        return path.resolve() if path.is_symlink() else path
    current = path / CURRENT_LINK
    if current.is_symlink() or current.exists():
        return resolve_model_dir(current)
    return None


def _follow_pointer_file(path: Path) -> Path:
    name = path.read_text(encoding="utf-8").strip()
    if not name:
        raise ModelArtifactError(f"{path} is empty; it should name a model directory")
    target = path.parent / name
    if not target.is_dir():
        raise ModelArtifactError(f"{path} names {name!r}, but {target} is not a directory")
    return target


def load_or_init(
    head_dir: str | os.PathLike[str] | None,
    *,
    input_dim: int,
    encoder_id: str,
    seed: int,
    n_layers: int = 4,
    layers: Sequence[int] | None = None,
    device: Device = "cpu",
) -> ScoringModel:
    """Load the model ``head_dir`` designates, or, when there is none, the head seeded by ``seed``.

    A loaded model must have been trained on the configured encoder: its encoder_id, input
    size, layer count (and ``layers``, when given) must match, else :class:`ConfigError`.
    """
    model_dir = resolve_model_dir(head_dir) if head_dir is not None else None
    if model_dir is None:
        model = ScoringModel.from_seed(
            input_dim,
            seed,
            encoder_id,
            n_layers=n_layers,
            layers=tuple(layers) if layers is not None else DEFAULT_LAYERS,
            device=device,
        )
        log.warning("no trained APEX head at %s: using %s (scores are not meaningful)", head_dir, model.version)
        return model
    model = ScoringModel.load(model_dir, device=device)
    problems = []
    if model.encoder_id != encoder_id:
        problems.append(f"it was trained on encoder {model.encoder_id!r}, the configured encoder is {encoder_id!r}")
    if model.input_dim != input_dim or model.n_layers != n_layers:
        problems.append(
            f"it expects features of shape ({model.n_layers}, {model.input_dim}), "
            f"the encoder gives ({n_layers}, {input_dim})"
        )
    if layers is not None and model.layers is not None and tuple(layers) != model.layers:
        problems.append(f"it was trained on layers {list(model.layers)}, the configured layers are {list(layers)}")
    if problems:
        raise ConfigError(
            f"the APEX head at {model_dir} ({model.version}) does not fit this encoder: "
            + "; ".join(problems)
            + ". Configure the encoder it was trained on, point model.head_dir at a head trained "
            "for this encoder, or remove the head to start from the untrained seeded one."
        )
    log.info("loaded APEX head %s from %s", model.version, model_dir)
    return model


#: The lock file every move of ``current`` holds (``flock``): the kernel releases it when its holder
#: dies, so a crashed promotion never leaves it held.
PROMOTION_LOCK = ".promotion.lock"


@contextmanager
def promotion_lock(models_root: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the models folder's promotion lock for the block, waiting for another holder (any process).

    Not reentrant: :func:`promote` and :func:`promote_if_serving` take it themselves.
    """
    root = Path(models_root)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / PROMOTION_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def promote(models_root: str | os.PathLike[str], model_dir: str | os.PathLike[str]) -> str:
    """Point ``models_root/current`` at ``model_dir`` atomically; returns the promoted version.

    The model is loaded first (so a broken directory is never promoted); the new symlink is
    made beside the old one and renamed over it, so readers see either the old or the new
    model, never neither. The link is relative when ``model_dir`` is inside ``models_root``.
    """
    with promotion_lock(models_root):  # loaded inside: a prune cannot delete it before the swap
        model = ScoringModel.load(model_dir)
        _point_current(Path(models_root), Path(model_dir))
    log.info("promoted %s (%s)", model.version, model_dir)
    return model.version


class CurrentMoved(Exception):
    """``current`` no longer names the model a candidate was judged against: it was not promoted."""

    def __init__(self, serving: Path | None, moved: Path | None) -> None:
        super().__init__(f"current moved from {serving} to {moved}")
        self.serving, self.moved = serving, moved


def promote_if_serving(
    models_root: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    serving: Path | None,
    owed: dict[str, object],
) -> None:
    """Promote ``model_dir`` only while ``current`` still names ``serving`` (the model it was judged
    against), recording ``owed`` (:func:`mark_pending`) just before; else :class:`CurrentMoved`, and
    nothing changes. Check and swap hold :func:`promotion_lock`: a hand promotion (a rollback) waits
    for the swap, or is seen by the check."""
    with promotion_lock(models_root):
        moved = resolve_model_dir(models_root)
        if moved != serving:
            raise CurrentMoved(serving, moved)
        ScoringModel.load(model_dir)
        mark_pending(models_root, owed)
        _point_current(Path(models_root), Path(model_dir))
    log.info("promoted %s", model_dir)


def _point_current(root: Path, target: Path) -> None:
    """The swap itself; the caller holds :func:`promotion_lock`."""
    root.mkdir(parents=True, exist_ok=True)
    current = root / CURRENT_LINK
    if current.is_dir() and not current.is_symlink():
        raise ModelArtifactError(f"{current} is a real directory; move it aside so it can become a symlink")
    try:
        link_target = os.path.relpath(target.resolve(), root.resolve())
        if link_target.startswith(os.pardir):
            link_target = str(target.resolve())
    except ValueError:  # different drives
        link_target = str(target.resolve())
    tmp = root / f".{CURRENT_LINK}.tmp-{uuid.uuid4().hex[:8]}"
    os.symlink(link_target, tmp, target_is_directory=True)
    try:
        os.replace(tmp, current)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fsync_dir(root)
    except OSError as exc:  # the link is switched; only its durability is in doubt
        log.warning("fsync of %s failed after a promotion: %s", root, exc)


def models_root_of(head_dir: str | os.PathLike[str]) -> Path:
    """Where ``current`` lives for ``model.head_dir``: its folder when it names ``current``, else
    ``head_dir`` itself. A ``head_dir`` that is a model directory has no ``current`` to move: a
    promotion there would change nothing the workers load, so it is refused (:class:`ConfigError`)."""
    head = Path(head_dir)
    if head.name == CURRENT_LINK:
        return head.parent
    if (head / CONFIG_FILE).exists() or (head / WEIGHTS_FILE).exists():
        raise ConfigError(
            f"model.head_dir ({head}) is a model directory: workers load it as it is, so nothing can be promoted "
            f"over it; point model.head_dir at the folder that holds 'current' (or at 'current' itself)"
        )
    return head


#: A promotion whose follow-up (rescoring the cold-start window, announcing it) is still owed: written
#: before ``current`` moves, removed once both are done, so a run cut short finishes them next time.
PENDING_FILE = ".promotion-pending.json"


def mark_pending(models_root: str | os.PathLike[str], promotion: dict[str, object]) -> None:
    """Record ``promotion`` (its ``model_version`` and what its announcement carries) as owed."""
    root = Path(models_root)
    root.mkdir(parents=True, exist_ok=True)
    replace_text(root / PENDING_FILE, json.dumps(promotion))


def pending(models_root: str | os.PathLike[str]) -> dict[str, object] | None:
    """The promotion still owed its follow-up, or None."""
    path = Path(models_root) / PENDING_FILE
    if not path.exists():
        return None
    found: dict[str, object] = json.loads(path.read_text())
    return found


def clear_pending(models_root: str | os.PathLike[str]) -> None:
    (Path(models_root) / PENDING_FILE).unlink(missing_ok=True)


#: What marks a model directory the retrain job made (and so may prune): its report, written beside it.
RETRAIN_REPORT = "retrain-report.json"


def prune_versions(models_root: str | os.PathLike[str], keep: int, stale_after_s: float = 3600.0) -> list[str]:
    """Delete the model directories the retrain job made beyond its newest ``keep`` (never the one
    ``current`` names), and what a save or a promotion cut short left (``.<name>.tmp-*``, once older
    than ``stale_after_s``: one in progress elsewhere is younger). Directories made otherwise (``train
    --promote``, ``import-released``) are the operator's. Returns the names removed."""
    root = Path(models_root)
    if not root.is_dir():
        return []
    removed: list[str] = []
    with promotion_lock(root):  # else a hand promotion of an old version could land on a deleted one
        serving = resolve_model_dir(root)
        keep_dirs = {serving.resolve()} if serving is not None else set()
        made = [d for d in root.iterdir() if d.is_dir() and not d.is_symlink() and (d / RETRAIN_REPORT).exists()]
        made.sort(key=lambda d: d.stat().st_mtime, reverse=True)
        for old in made[keep:]:
            if old.resolve() not in keep_dirs:
                shutil.rmtree(old)
                removed.append(old.name)
    for left in stale(root.glob(".*.tmp-*"), stale_after_s):
        if left.is_dir() and not left.is_symlink():
            shutil.rmtree(left, ignore_errors=True)
        else:
            left.unlink(missing_ok=True)
        removed.append(left.name)
    if removed:
        fsync_dir(root)
    return removed
