"""The MERT-v1 encoder (95M or 330M) run through transformers' ``HubertModel``.

The checkpoint (Hub id, Hub cache or local directory) is resolved and loaded, without
running remote code, by :mod:`ranker.encoders.mert_checkpoint`, which also gives the
encoder's spec from ``config.json`` alone; this module runs the model.

Batching and exactness (a segment's features never depend on its batch mates):

* Each segment is normalised to zero mean and unit variance over its real samples, as
  MERT's feature extractor does (``eps = 1e-7``), and padded with zeros afterwards.
* A batch without padding (e.g. only full 30 s segments) runs the stock model with no
  attention mask, exactly as the checkpoints were trained.
* Group-norm front ends (``feat_extract_norm == "group"``, MERT-v1-95M) normalise each
  channel of the first conv layer over the whole clip, so zero padding would shift every
  frame of a shorter clip (measured on a tiny model: errors as large as the features),
  and they were trained without an attention mask, so a mask alone cannot fix it. Here
  that norm is replaced by :class:`MaskedInstanceNorm` (same parameters) which takes its
  statistics over the real frames only; together with the attention mask, a padded
  clip then gets what it would get alone. Should the model's layout ever differ from
  what that swap expects, the encoder falls back to never mixing lengths in a batch.
* Layer-norm front ends (``feat_extract_norm == "layer"``, MERT-v1-330M) normalise per
  frame; padding plus an ``attention_mask`` is exact on its own.
* On CUDA, padded batch widths are rounded up to whole seconds: tail lengths are random,
  and every new input shape makes cuDNN build new convolution and attention plans
  (measured on an H100: about 60 ms per new shape, more than the forward pass itself).
* Pooling is the time-mean over each segment's real frames only (frame counts from
  ``_get_feat_extract_output_lengths``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ranker.encoders.base import Encoder, EncoderSpec
from ranker.encoders.mert_checkpoint import _offline, load_hubert, mert_spec
from ranker.errors import ConfigError

if TYPE_CHECKING:  # settings need pydantic; a GPU benchmark host may only have torch + transformers
    from ranker.settings import ModelSettings

#: MERT's feature extractor uses this inside the square root of the variance.
NORM_EPS = 1e-7
#: The conv front end's receptive field: shorter inputs give no frame at all.
MIN_SAMPLES = 400


# --------------------------------------------------------------------------------------
# Device and precision
# --------------------------------------------------------------------------------------


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA request without CUDA is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"APEXRANK_MODEL__DEVICE={spec!r} is not a device (auto, cpu, cuda, cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"APEXRANK_MODEL__DEVICE={spec!r} but CUDA is not available; use auto or cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"APEXRANK_MODEL__DEVICE={spec!r}: only cpu and cuda devices are supported")
    return device


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """Mixed-precision dtype for CUDA (bf16 by default, fp16 on request); CPU runs fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "auto" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


# --------------------------------------------------------------------------------------
# Exact padding for group-norm front ends
# --------------------------------------------------------------------------------------


class MaskedInstanceNorm(torch.nn.Module):
    """Drop-in for HuBERT's first-layer ``GroupNorm(C, C)`` that ignores padded frames.

    That norm takes each channel's mean and variance over the whole time axis, so zero
    padding would shift every frame of a shorter clip in a batch. Given ``valid`` (real
    frames per row, set just before a forward pass) the statistics come from the real
    frames only, which is what the clip alone would get. With ``valid`` unset it is the
    stock group norm. Parameter names are unchanged, so the state dict is too.
    """

    def __init__(self, norm: torch.nn.GroupNorm) -> None:
        super().__init__()
        self.num_channels = norm.num_channels
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias
        self.valid: list[int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.valid is None:
            return torch.nn.functional.group_norm(x, self.num_channels, self.weight, self.bias, self.eps)
        y = x.to(torch.float32, copy=True)  # fp32 statistics, as autocast runs group_norm
        stats = [torch.var_mean(y[b, :, :n], dim=-1, correction=0) for b, n in enumerate(self.valid)]
        var = torch.stack([v for v, _ in stats])
        mean = torch.stack([m for _, m in stats])
        scale = torch.rsqrt(var + self.eps) * self.weight.float()
        shift = self.bias.float() - mean * scale
        return y.mul_(scale[..., None]).add_(shift[..., None])


def install_masked_norm(model: Any) -> MaskedInstanceNorm | None:
    """Swap in :class:`MaskedInstanceNorm` for a group-norm front end; None if it has none.

    Returns None as well when the layout is not the expected one (a future transformers
    release), in which case the encoder falls back to never padding such models.
    """
    if model.config.feat_extract_norm != "group":
        return None
    try:
        first = model.feature_extractor.conv_layers[0]
        norm = first.layer_norm
    except (AttributeError, IndexError, TypeError):
        return None
    if not isinstance(norm, torch.nn.GroupNorm) or norm.num_groups != norm.num_channels or not norm.affine:
        return None
    masked = MaskedInstanceNorm(norm)
    first.layer_norm = masked
    return masked


# --------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------


class MertEncoder(Encoder):
    """MERT hidden layers ``settings.layers``, each time-mean pooled over real frames."""

    name = "mert"

    def __init__(self, settings: ModelSettings, *, offline: bool, batch_size: int = 8) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        model, raw = load_hubert(settings.mert_model, offline=_offline(offline))
        config = model.config
        self._spec = spec = mert_spec(settings, config, raw)
        self.device = resolve_device(settings.device)
        self.amp_dtype = autocast_dtype(self.device, settings.precision)
        self._masked_norm = install_masked_norm(model)
        self.model = model.to(self.device)
        self.config = config
        self.layers = list(settings.layers)
        self.batch_size = batch_size
        #: Whether segments of different lengths may share a padded batch exactly.
        self.mixes_lengths = config.feat_extract_norm == "layer" or self._masked_norm is not None
        self.sample_rate = spec.sample_rate
        #: Batch widths are rounded up to whole seconds on CUDA so that shapes repeat and
        #: kernel plans (cuDNN convolution and attention) are reused, not rebuilt per tail.
        self.pad_multiple = self.sample_rate if self.device.type == "cuda" else 1
        self._lock = threading.Lock()  # the masked norm's per-batch state
        self.n_layers = spec.n_layers
        self.dim = spec.dim
        self.encoder_id = spec.encoder_id

    @property
    def spec(self) -> EncoderSpec:
        return self._spec

    def frames_for(self, n_samples: int) -> int:
        """MERT frames for a segment of ``n_samples`` (segments under 400 samples give one)."""
        return int(self.model._get_feat_extract_output_lengths(max(n_samples, MIN_SAMPLES)))

    def _batches(self, lengths: Sequence[int]) -> Iterator[list[int]]:
        """Indices grouped longest first, so padding stays small.

        Only if a model cannot mask padding exactly are lengths kept apart.
        """
        order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
        batch: list[int] = []
        for i in order:
            if batch and (
                len(batch) >= self.batch_size or (not self.mixes_lengths and lengths[i] != lengths[batch[0]])
            ):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    @torch.inference_mode()
    def encode(self, segments: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        n = len(segments)
        features = np.zeros((n, self.n_layers, self.dim), dtype=np.float32)
        frames = np.zeros(n, dtype=np.int64)
        lengths = [int(np.asarray(s).shape[0]) for s in segments]
        if any(length == 0 for length in lengths):
            raise ValueError("cannot encode an empty segment")
        for idx in self._batches(lengths):
            with self._lock:
                pooled, n_frames = self._encode_batch([np.asarray(segments[i], dtype=np.float32) for i in idx])
            features[idx] = pooled
            frames[idx] = n_frames
        return features, frames

    def _encode_batch(self, segs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        lengths = torch.tensor([s.shape[0] for s in segs], dtype=torch.int64)
        # Clips under one receptive field are zero-padded to it, alone or batched alike.
        effective = lengths.clamp(min=MIN_SAMPLES)
        width = int(effective.max())
        if self.mixes_lengths:
            width = -(-width // self.pad_multiple) * self.pad_multiple
        padded = bool((effective < width).any())
        raw = torch.zeros(len(segs), width, dtype=torch.float32)
        for row, s in enumerate(segs):
            raw[row, : s.shape[0]] = torch.from_numpy(s)
        dev = self.device
        x = raw.to(dev, non_blocking=True)
        real = torch.arange(width, device=dev)[None, :] < lengths.to(dev)[:, None]
        count = lengths.to(dev, torch.float32)[:, None]
        mean = (x * real).sum(-1, keepdim=True) / count
        var = (((x - mean) * real) ** 2).sum(-1, keepdim=True) / count
        x = (x - mean) / torch.sqrt(var + NORM_EPS) * real  # padding stays exactly zero

        # Unpadded batches run the stock model, exactly as the checkpoint was trained
        # (group-norm MERT never saw an attention mask). Padded ones mask the padding out of
        # the first norm and of attention, which reproduces each clip's unpadded result.
        mask = None
        if padded:
            valid_samples = torch.arange(width, device=dev)[None, :] < effective.to(dev)[:, None]
            mask = valid_samples.to(torch.long)
        if self._masked_norm is not None:
            k0, s0 = self.config.conv_kernel[0], self.config.conv_stride[0]
            self._masked_norm.valid = ((effective - k0) // s0 + 1).tolist() if padded else None
        amp = (
            torch.autocast(device_type=dev.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
        )
        try:
            with amp:
                out = self.model(x, attention_mask=mask, output_hidden_states=True, return_dict=True)
        finally:
            if self._masked_norm is not None:
                self._masked_norm.valid = None
        hidden = out.hidden_states

        n_frames = self.model._get_feat_extract_output_lengths(effective).to(torch.int64)
        t = hidden[0].shape[1]
        fmask = (torch.arange(t)[None, :] < n_frames[:, None]).to(dev, torch.float32)[..., None]  # (B, T, 1)
        denom = n_frames.to(dev, torch.float32)[:, None]
        pooled = torch.stack([(hidden[i].float() * fmask).sum(1) / denom for i in self.layers], dim=1)
        return pooled.cpu().numpy(), n_frames.numpy()
