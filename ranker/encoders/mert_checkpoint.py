"""Loading a MERT-v1 checkpoint (95M or 330M) into transformers' ``HubertModel``, and its spec.

MERT checkpoints on the Hub ship remote code (``model_type: "mert_model"``). With CQT
features and deepnorm off, that code is HuBERT with a different config class, so this
module builds a :class:`~transformers.HubertConfig` from the checkpoint's ``config.json``
and loads the state dict itself. No remote code is ever executed, and the same loader
serves Hub ids, the Hub cache (offline) and local directories.

Weights are loaded by this module rather than ``from_pretrained``. The positional
convolution's weight norm has two spellings: ``weight_g``/``weight_v`` (old torch, as in
the MERT checkpoints) and ``parametrizations.weight.original0/1`` (what a current
``HubertModel`` has). transformers 5.24's ``from_pretrained`` maps them, and torch's
parametrized weight norm has a load hook for the old names, but this module renames
keys explicitly (both directions, plus wrapper prefixes) so that loading does not depend
on either version and the missing-key check sees the real state.

Split from :mod:`ranker.encoders.mert` (the encoder: batching, exact padding, pooling): the
spec needs only this module, and a checkpoint's files and state dict are a concern of their own.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ranker.encoders.base import EncoderSpec
from ranker.errors import ConfigError

if TYPE_CHECKING:  # settings need pydantic; a GPU benchmark host may only have torch + transformers
    from ranker.settings import ModelSettings

log = logging.getLogger(__name__)

MERT_SAMPLE_RATE = 24_000

FIX_HINT = (
    "Set APEXRANK_MODEL__MERT_MODEL=/path/to/local/MERT-v1-95M (a directory holding config.json "
    "and the weights), or APEXRANK_ENCODER=logmel to run the weight-free baseline encoder."
)

#: Weight files looked for, in order of preference.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

#: config.json keys that describe the file or the training run, not the architecture.
_NON_ARCH_KEYS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "auto_map",
        "model_type",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "id2label",
        "label2id",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "is_encoder_decoder",
        "problem_type",
        "chunk_size_feed_forward",
    }
)
_ACCEPTED_MODEL_TYPES = frozenset({"hubert", "mert_model", "mert"})
#: Prefixes a wrapper model may have put in front of HubertModel's own keys.
_KEY_PREFIXES = ("mert_model.", "hubert.", "model.")
_WEIGHT_NORM_NAMES = (
    (".weight_g", ".parametrizations.weight.original0"),
    (".weight_v", ".parametrizations.weight.original1"),
)


# --------------------------------------------------------------------------------------
# Config and weights
# --------------------------------------------------------------------------------------


def hubert_config_from_dict(raw: dict[str, Any], *, source: str = "config.json") -> Any:
    """A ``HubertConfig`` from a HuBERT or MERT ``config.json``.

    Keeps only the keys HubertConfig knows; refuses MERT options HuBERT cannot run (CQT
    features, deepnorm) instead of silently computing different features.
    """
    from transformers import HubertConfig

    model_type = raw.get("model_type", "hubert")
    if model_type not in _ACCEPTED_MODEL_TYPES:
        raise ConfigError(
            f"{source} describes a {model_type!r} model; the MERT encoder needs a MERT or HuBERT checkpoint. "
            + FIX_HINT
        )
    if raw.get("feature_extractor_cqt"):
        raise ConfigError(
            f"{source} enables feature_extractor_cqt (a MERT variant with CQT input features), which this "
            "encoder does not implement; use MERT-v1-95M or MERT-v1-330M. " + FIX_HINT
        )
    if raw.get("deepnorm"):
        raise ConfigError(
            f"{source} enables deepnorm (scaled residuals), which HubertModel does not implement; "
            "use MERT-v1-95M or MERT-v1-330M. " + FIX_HINT
        )
    known = set(HubertConfig().to_dict()) - _NON_ARCH_KEYS
    kwargs = {k: v for k, v in raw.items() if k in known}
    # attention_relax only rescales logits before a max-subtracted softmax: same result.
    dropped = sorted(set(raw) - known - _NON_ARCH_KEYS)
    if dropped:
        log.debug("ignoring config keys HubertConfig does not know: %s", ", ".join(dropped))
    return HubertConfig(**kwargs)


def _is_local_reference(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~", ".\\")) or "\\" in ref or ref.count("/") > 1


def resolve_model_files(ref: str, *, offline: bool) -> tuple[Path, list[Path]]:
    """``(config.json, weight files)`` for a local directory or a Hub id.

    Hub files come through huggingface_hub's cache; with ``offline`` only the cache is
    consulted. Every failure becomes a :class:`ConfigError` that says what to change.
    """
    directory = _local_directory(ref)
    return _resolve_local(directory) if directory is not None else _resolve_hub(ref, offline=offline)


def resolve_config_file(ref: str, *, offline: bool) -> Path:
    """``config.json`` alone of a local directory or a Hub id: no weight file is looked for or fetched."""
    directory = _local_directory(ref)
    return _local_config(directory) if directory is not None else _hub_config(ref, offline=offline)


def _local_directory(ref: str) -> Path | None:
    """The directory ``ref`` names, or None when it is a Hub id."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"MERT model {ref!r} is a file; it must be a directory or a Hub id. " + FIX_HINT)
    if _is_local_reference(ref):
        raise ConfigError(f"MERT model directory {ref!r} does not exist. " + FIX_HINT)
    return None


def _local_config(directory: Path) -> Path:
    config = directory / "config.json"
    if not config.is_file():
        raise ConfigError(f"MERT model directory {directory} has no config.json. " + FIX_HINT)
    return config


def _resolve_local(directory: Path) -> tuple[Path, list[Path]]:
    config = _local_config(directory)
    for name in WEIGHT_FILES:
        candidate = directory / name
        if candidate.is_file():
            if name.endswith(".index.json"):
                return config, [directory / shard for shard in _shard_names(candidate)]
            return config, [candidate]
    raise ConfigError(
        f"MERT model directory {directory} holds no weights (looked for {', '.join(WEIGHT_FILES)}). " + FIX_HINT
    )


def _hub_where(offline: bool) -> str:
    return "the local Hub cache (offline mode)" if offline else "the Hugging Face Hub"


def _hub_config(repo_id: str, *, offline: bool) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - transformers depends on it
        raise ConfigError(f"huggingface_hub is needed to fetch {repo_id!r}: {exc}. " + FIX_HINT) from exc
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename="config.json", local_files_only=offline))
    except Exception as exc:
        raise ConfigError(
            f"could not get config.json of MERT model {repo_id!r} from {_hub_where(offline)}: "
            f"{type(exc).__name__}: {exc}. " + FIX_HINT
        ) from exc


def _resolve_hub(repo_id: str, *, offline: bool) -> tuple[Path, list[Path]]:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError as exc:  # pragma: no cover - transformers depends on it
        raise ConfigError(f"huggingface_hub is needed to fetch {repo_id!r}: {exc}. " + FIX_HINT) from exc
    where = _hub_where(offline)

    def get(name: str) -> Path:
        return Path(hf_hub_download(repo_id=repo_id, filename=name, local_files_only=offline))

    config = _hub_config(repo_id, offline=offline)
    for name in WEIGHT_FILES:
        try:
            found = get(name)
        except EntryNotFoundError:
            continue
        except Exception as exc:
            raise ConfigError(
                f"could not get {name} of MERT model {repo_id!r} from {where}: {type(exc).__name__}: {exc}. " + FIX_HINT
            ) from exc
        if not name.endswith(".index.json"):
            return config, [found]
        try:
            return config, [get(shard) for shard in _shard_names(found)]
        except Exception as exc:
            raise ConfigError(
                f"could not get the weight shards of MERT model {repo_id!r} from {where}: {exc}. " + FIX_HINT
            ) from exc
    raise ConfigError(
        f"found no weights for MERT model {repo_id!r} in {where} (looked for {', '.join(WEIGHT_FILES)}). " + FIX_HINT
    )


def _shard_names(index_file: Path) -> list[str]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read the shard index {index_file}: {exc}. " + FIX_HINT) from exc


def read_state_dict(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    """Tensors from safetensors or torch ``.bin`` files (never unpickling arbitrary objects)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                state.update(load_file(str(f), device="cpu"))
            else:
                state.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as exc:
            raise ConfigError(f"cannot read MERT weights from {f}: {type(exc).__name__}: {exc}. " + FIX_HINT) from exc
    return state


def _key_candidates(key: str) -> Iterator[str]:
    bases = [key] + [key[len(p) :] for p in _KEY_PREFIXES if key.startswith(p)]
    for base in bases:
        yield base
        for old, new in _WEIGHT_NORM_NAMES:
            if base.endswith(old):
                yield base[: -len(old)] + new
            elif base.endswith(new):
                yield base[: -len(new)] + old


def adapt_state_dict(state: dict[str, torch.Tensor], expected: Iterable[str]) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys to the model's: weight-norm spelling and wrapper prefixes.

    A key that matches nothing is kept as is (it is reported as unexpected).
    """
    wanted = set(expected)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        target = next((c for c in _key_candidates(key) if c in wanted), key)
        out[target] = value
    return out


def read_config(config_file: Path) -> tuple[Any, dict[str, Any]]:
    """``(HubertConfig, raw dict)`` of a checkpoint's ``config.json``."""
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {config_file}: {exc}. " + FIX_HINT) from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_file} is not a JSON object. " + FIX_HINT)
    return hubert_config_from_dict(raw, source=str(config_file)), raw


def load_hubert(ref: str, *, offline: bool) -> tuple[Any, dict[str, Any]]:
    """Build a ``HubertModel`` for ``ref`` and load its weights; returns ``(model, raw config)``."""
    from transformers import HubertModel

    config_file, weight_files = resolve_model_files(ref, offline=offline)
    config, raw = read_config(config_file)
    model = HubertModel(config)
    state = adapt_state_dict(read_state_dict(weight_files), model.state_dict().keys())
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ConfigError(f"the weights of MERT model {ref!r} do not fit its config.json: {exc}. " + FIX_HINT) from exc
    # masked_spec_embed is only used for training-time masking.
    missing = [k for k in result.missing_keys if k != "masked_spec_embed"]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(f"the weights of MERT model {ref!r} lack {len(missing)} tensors ({shown}). " + FIX_HINT)
    if result.unexpected_keys:
        log.warning(
            "MERT model %r: ignoring %d checkpoint tensors HubertModel does not use (e.g. %s)",
            ref,
            len(result.unexpected_keys),
            result.unexpected_keys[0],
        )
    return model.eval(), raw


# --------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------


def mert_spec(settings: ModelSettings, config: Any, raw: dict[str, Any]) -> EncoderSpec:
    """The spec of the MERT ``settings`` name, from its config (``HubertConfig`` and raw dict) alone."""
    ref = settings.mert_model
    layers = list(settings.layers)
    n_hidden = int(config.num_hidden_layers) + 1
    bad = [i for i in layers if not 0 <= i < n_hidden]
    if not layers or bad:
        raise ConfigError(
            f"APEXRANK_MODEL__LAYERS={layers} must name hidden states 0..{n_hidden - 1} of {ref!r} "
            f"({config.num_hidden_layers} transformer layers)"
        )
    label = Path(ref).expanduser().name if Path(ref).expanduser().is_dir() else ref
    dim = int(config.hidden_size)
    return EncoderSpec(
        name="mert",
        encoder_id=f"mert:{label}:layers={','.join(str(i) for i in layers)}",
        sample_rate=int(raw.get("sample_rate", MERT_SAMPLE_RATE)),
        n_layers=len(layers),
        dim=dim,
        vector_dim=dim,
        layers=tuple(layers),
    )


def _offline(offline: bool) -> bool:
    return offline or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def mert_encoder_spec(settings: ModelSettings, *, offline: bool) -> EncoderSpec:
    """What :class:`MertEncoder` would report as its spec, reading only the checkpoint's ``config.json``."""
    config, raw = read_config(resolve_config_file(settings.mert_model, offline=_offline(offline)))
    return mert_spec(settings, config, raw)
