"""Import the paper's released checkpoint (AMAAI-Lab/apex on GitHub, amaai-lab/apex on the Hub).

The layout, read from the public code (``train.py`` saves it, ``inference.py`` and ``eval.py``
load it; commit 42acd65):

- The file is a ``torch.save`` of a dict: ``epoch``, ``model_state``, ``optimizer_state``,
  ``scheduler_state``, ``val_loss``, ``val_task_losses``, ``train_loss``, ``mode``
  (``song``/``segment``), ``task`` (``popularity``/``full``), ``loss``, ``shared`` (2 or 3)
  and, for uncertainty weighting, ``uncertainty_loss_state`` (``log_sigmas.<task>``, each of
  shape (1,)), ``final_sigmas`` and ``final_weights``. A bare ``model_state`` dict (or a
  ``.safetensors`` file of it) is accepted too.
- ``model_state`` keys (module ``apexMLP``)::

      shared.<i>.block.0.{weight,bias}                        Linear   (i = 0..shared-1)
      shared.<i>.block.1.{weight,bias,running_mean,running_var,num_batches_tracked}  BatchNorm1d
      branch_<task>.branch.<j>.block.0.{weight,bias}          Linear   (j = 0, 1: 256->128->64)
      branch_<task>.branch.<j>.block.1.{...}                  BatchNorm1d
      branch_<task>.branch.2.{weight,bias}                    Linear(64, 1)

  with ``<task>`` in ``score_streams``, ``score_likes`` and, for ``task == "full"``,
  ``coherence``, ``musicality``, ``memorability``, ``clarity``, ``naturalness``
  (``module.`` prefixes from DistributedDataParallel are stripped if present).
- Output scaling: each ``TaskBranch`` returns ``sigmoid(x) * scale + shift`` with (100, 0) for
  the two popularity scores and (4, 1) for the aesthetics: the same as :class:`ApexHead`.
- The layer mix is *not* in the checkpoint. ``embedding_extraction.py`` and ``inference.py``
  both call ``torch.manual_seed(42)`` and then build ``nn.Conv1d(4, 1, kernel_size=1)`` on the
  CPU (layers [2, 5, 8, -1] of MERT-v1-95M as channels, the 768 features as length) and never
  train it. The same two calls give the same weights here, so the mix is rebuilt exactly
  (:func:`paper_layer_mix`); a checkpoint that does carry ``aggregator.weight`` and
  ``aggregator.bias`` (top level or in ``model_state``) has those used instead.

Mapped onto :class:`ApexHead` with ``layer_mix="conv1x1"``: ``shared.<i>.block.<k>`` ->
``trunk.<i>.<k>``, ``branch_score_<t>.branch.<j>.block.<k>`` -> ``branches.<t>.<j>.<k>``,
``branch_<t>.branch.2`` -> ``branches.<t>.2``, ``log_sigmas.<t>`` -> ``log_sigma[t]``.

Loading never unpickles arbitrary objects: ``torch.load(weights_only=True)`` or safetensors.

Caveat for scoring: the paper's segment features include the zero padding of a song's last
30 s segment in their time mean; this project's encoder masks it. Songs whose length is a
multiple of 30 s get identical features; others differ slightly in their last segment.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ranker.events import AESTHETIC_TASKS, POPULARITY_TASKS, TASKS
from ranker.model.artifact import Device, ModelArtifactError, ScoringModel
from ranker.model.artifact_files import missing_and_unexpected, wrong_shapes
from ranker.model.head import ApexHead, HeadConfig

#: The seed the public code sets right before building its (never trained) layer mix.
PAPER_SEED = 42
#: MERT-v1-95M hidden states the paper pools: [2, 5, 8, -1] of 13.
PAPER_LAYERS: tuple[int, ...] = (2, 5, 8, 12)
PAPER_MERT = "m-a-p/MERT-v1-95M"
#: Checkpoint branch names of our tasks.
RELEASED_TASK_KEYS: dict[str, str] = {
    "streams": "score_streams",
    "likes": "score_likes",
    **{t: t for t in AESTHETIC_TASKS},
}
_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


class ReleasedCheckpointError(ModelArtifactError):
    """The file is not a checkpoint in the released APEX layout (the message says what differs)."""


def mert_encoder_id(model_ref: str = PAPER_MERT, layers: tuple[int, ...] = PAPER_LAYERS) -> str:
    """The ``encoder_id`` :class:`~ranker.encoders.mert.MertEncoder` reports for these settings.

    Mirrors its rule (``mert:<hub id or directory name>:layers=<i,j,...>``) so that a head can be
    imported without loading MERT's weights.
    """
    ref = Path(model_ref).expanduser()
    label = ref.name if ref.is_dir() else model_ref
    return f"mert:{label}:layers={','.join(str(i) for i in layers)}"


def paper_layer_mix(seed: int = PAPER_SEED, n_layers: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights (1, L, 1) and bias (1,) of the public code's fixed random ``Conv1d(L, 1, 1)``.

    Built exactly as the public code builds it (seed, then the module, on the CPU); the global
    RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        conv = nn.Conv1d(n_layers, 1, kernel_size=1)
    return conv.weight.detach().clone(), conv.bias.detach().clone()  # type: ignore[union-attr]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's top-level dict, read safely (``weights_only=True`` or safetensors)."""
    p = Path(path)
    if not p.is_file():
        raise ReleasedCheckpointError(f"checkpoint {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return {"model_state": load_file(str(p))}
        except Exception as exc:  # safetensors has its own error types
            raise ReleasedCheckpointError(f"{p} is not a readable safetensors file: {exc}") from exc
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for foreign objects, RuntimeError for junk
        raise ReleasedCheckpointError(
            f"{p} cannot be loaded safely (torch.load with weights_only=True): {exc}. Only plain "
            "tensors and containers are accepted; arbitrary pickled objects are never executed."
        ) from exc
    if not isinstance(data, Mapping):
        raise ReleasedCheckpointError(f"{p} holds a {type(data).__name__}, not a checkpoint dict")
    if "model_state" not in data:
        if any(str(k).startswith(("shared.", "module.shared.")) for k in data):
            return {"model_state": dict(data)}
        raise ReleasedCheckpointError(
            f"{p} has no 'model_state' (keys: {sorted(map(str, data))[:10]}); expected the layout "
            "train.py of AMAAI-Lab/apex saves"
        )
    return dict(data)


_SHARED = re.compile(r"^shared\.(\d+)\.block\.([01])\.(.+)$")
_BRANCH = re.compile(r"^branch_(\w+?)\.branch\.(?:(\d+)\.block\.([01])|(2))\.(.+)$")


def convert_state(state: Mapping[str, torch.Tensor]) -> tuple[HeadConfig, dict[str, torch.Tensor]]:
    """Map a released ``model_state`` onto :class:`ApexHead` (conv1x1 mix); returns config and tensors.

    The head's configuration (input size, trunk sizes, tasks) is read from the tensors themselves.
    """
    clean = {k.removeprefix("module."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    released_tasks: set[str] = set()
    by_name = {v: k for k, v in RELEASED_TASK_KEYS.items()}
    for key, tensor in clean.items():
        if not isinstance(tensor, torch.Tensor):
            unexpected.append(key)
            continue
        m = _SHARED.match(key)
        if m:
            out[f"trunk.{m.group(1)}.{m.group(2)}.{m.group(3)}"] = tensor
            continue
        m = _BRANCH.match(key)
        if m and m.group(1) in by_name:
            task = by_name[m.group(1)]
            released_tasks.add(task)
            if m.group(4) is not None:
                out[f"branches.{task}.2.{m.group(5)}"] = tensor
            else:
                out[f"branches.{task}.{m.group(2)}.{m.group(3)}.{m.group(5)}"] = tensor
            continue
        unexpected.append(key)
    if unexpected:
        raise ReleasedCheckpointError(f"model_state has keys the released layout does not have: {unexpected[:8]}")
    if not all(t in released_tasks for t in POPULARITY_TASKS):
        raise ReleasedCheckpointError(
            f"model_state lacks the popularity branches (found branches for {sorted(released_tasks)})"
        )
    depth = 0
    while f"trunk.{depth}.0.weight" in out:
        depth += 1
    if depth == 0:
        raise ReleasedCheckpointError("model_state has no shared.0.block.0.weight")
    shared_dims = tuple(int(out[f"trunk.{i}.0.weight"].shape[0]) for i in range(depth))
    input_dim = int(out["trunk.0.0.weight"].shape[1])
    any_task = next(t for t in TASKS if t in released_tasks)
    branch_dims = tuple(
        int(out[f"branches.{any_task}.{j}.0.weight"].shape[0])
        for j in range(2)
        if f"branches.{any_task}.{j}.0.weight" in out
    )
    tasks = tuple(t for t in TASKS if t in released_tasks)
    config = HeadConfig(
        input_dim=input_dim,
        n_layers=4,
        tasks=tasks,
        shared_dims=shared_dims,
        branch_dims=branch_dims,
        layer_mix="conv1x1",
    )
    return config, out


def load_released(
    path: str | Path,
    *,
    encoder_id: str | None = None,
    layers: tuple[int, ...] = PAPER_LAYERS,
    conv_seed: int = PAPER_SEED,
    device: Device = "cpu",
) -> ScoringModel:
    """A :class:`ScoringModel` from a checkpoint in the released layout (see the module doc).

    ``encoder_id`` defaults to what this project's MERT-v1-95M encoder with the paper's layers
    reports, so the worker accepts the head with default settings.
    """
    p = Path(path)
    data = read_checkpoint(p)
    state = data["model_state"]
    if not isinstance(state, Mapping):
        raise ReleasedCheckpointError(f"{p}: model_state is a {type(state).__name__}, not a state dict")
    config, tensors = convert_state(state)
    loss = str(data.get("loss", "uncertainty"))
    if loss in ("equal", "weighted", "uncertainty"):
        config = config.model_copy(update={"loss": loss})
    with torch.random.fork_rng(devices=[]):
        head = ApexHead(config)

    agg_w = data.get("aggregator.weight", state.get("aggregator.weight"))
    agg_b = data.get("aggregator.bias", state.get("aggregator.bias"))
    if isinstance(agg_w, torch.Tensor) and isinstance(agg_b, torch.Tensor):
        tensors = {k: v for k, v in tensors.items() if not k.startswith("aggregator.")}
        conv_w, conv_b, mix_source = agg_w, agg_b, "checkpoint aggregator"
    else:
        conv_w, conv_b = paper_layer_mix(conv_seed)
        mix_source = f"public-code Conv1d(4, 1, 1) after torch.manual_seed({conv_seed}), never trained"
    tensors["mix.conv.weight"] = conv_w.reshape(1, config.n_layers, 1)
    tensors["mix.conv.bias"] = conv_b.reshape(1)

    log_sigma = torch.zeros(len(config.tasks))
    unc = data.get("uncertainty_loss_state")
    if isinstance(unc, Mapping):
        for i, task in enumerate(config.tasks):
            v = unc.get(f"log_sigmas.{RELEASED_TASK_KEYS[task]}")
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                log_sigma[i] = v.reshape(())
    tensors["log_sigma"] = log_sigma

    expected = head.state_dict()
    missing, extra = missing_and_unexpected(expected, tensors)
    if missing or extra:
        raise ReleasedCheckpointError(f"{p}: after mapping, missing tensors {missing[:8]}, unexpected {extra[:8]}")
    wrong = wrong_shapes(expected, tensors)
    if wrong:
        raise ReleasedCheckpointError(f"{p}: tensors of the wrong shape: {'; '.join(wrong[:8])}")
    head.load_state_dict(
        {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in tensors.items()}, strict=True
    )

    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    training: dict[str, Any] = {
        "source": "AMAAI-Lab/apex released checkpoint",
        "checkpoint_file": p.name,
        "checkpoint_sha256": digest,
        "layer_mix": mix_source,
        "input_mode": str(data.get("mode", "song")),
        **{k: _plain(data[k]) for k in ("epoch", "val_loss", "task", "loss", "shared") if k in data},
    }
    return ScoringModel.from_head(
        head,
        encoder_id=encoder_id or mert_encoder_id(PAPER_MERT, layers),
        training=training,
        layers=layers,
        target_transform=None,
        device=device,
    )


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)
