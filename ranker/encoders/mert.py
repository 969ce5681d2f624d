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

Speed options (``ModelSettings``; each off by default, so the CPU path is unchanged; see
:class:`SpeedOptions`): the attention kernel, bf16/fp16 end to end instead of autocast,
padded widths rounded to a few length buckets, ``torch.compile``, and pinned host buffers.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
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
#: ``torch.compile``'s backend. Inductor takes 15-65 s to compile even a tiny model on 2 CPU
#: cores, so the CPU tests trace with ``aot_eager`` (same graph capture, no code generation).
COMPILE_BACKEND = "inductor"


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


@dataclass(frozen=True)
class SpeedOptions:
    """How the forward pass runs; none of these changes what is computed beyond float tolerance.

    * ``attn_implementation``: transformers' attention kernel (``sdpa``, today's default;
      ``eager``; ``flash_attention_2``, which needs the flash-attn package and CUDA, so on
      the CPU it is a no-op and sdpa runs).
    * ``half_weights``: with a bf16/fp16 ``precision``, cast the weights and activations to
      it end to end instead of autocast (no fp32 master copies, no per-op casts). On CUDA
      with ``precision=auto`` too; on the CPU only when bf16/fp16 is named explicitly
      (slow there: it exists for the agreement test).
    * ``bucket_s``: padded batch widths are rounded up to the next of these lengths (in
      seconds) and a batch never spans two buckets, so a few shapes repeat (compile, kernel
      plans). Empty: whole seconds on CUDA, exact widths on the CPU.
    * ``compile``: ``torch.compile`` of the model, ``dynamic`` shapes or ``static`` (one
      graph per shape: use with ``bucket_s``; past torch's recompile limit, 8 shapes by
      default, the model runs uncompiled). ``cudagraphs``: static, and each shape's
      kernels replayed as one CUDA graph (``mode="reduce-overhead"``; on the CPU it is
      ``static``). The first call per shape compiles (minutes on a GPU).
    * ``pin_memory``: stage each batch in a reused pinned host buffer and copy it to the
      GPU without blocking. CUDA only; a no-op on the CPU.
    """

    attn_implementation: str = "sdpa"
    half_weights: bool = False
    bucket_s: tuple[float, ...] = ()
    compile: str = "off"
    pin_memory: bool = False

    @classmethod
    def from_settings(cls, settings: Any) -> SpeedOptions:
        if any(b <= 0 for b in settings.bucket_s):
            raise ConfigError(f"APEXRANK_MODEL__BUCKET_S={list(settings.bucket_s)}: bucket lengths must be positive")
        return cls(
            attn_implementation=settings.attn_implementation,
            half_weights=settings.half_weights,
            bucket_s=tuple(sorted(float(b) for b in settings.bucket_s)),
            compile=settings.compile,
            pin_memory=settings.pin_memory,
        )


def half_dtype(device: torch.device, precision: str, amp_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype ``half_weights`` casts the model to, or None (fp32, or autocast)."""
    if amp_dtype is not None:
        return amp_dtype
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return None


def set_attention(model: Any, implementation: str, device: torch.device) -> str:
    """Switch the model's attention kernel; returns the one in use (flash-attn: CUDA only)."""
    if implementation == "flash_attention_2" and device.type != "cuda":
        implementation = "sdpa"
    if model.config._attn_implementation == implementation:
        return implementation
    try:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(implementation)
        else:  # older transformers: HuBERT's attention reads the config at every call
            model.config._attn_implementation = implementation
    except (ImportError, ValueError) as exc:
        raise ConfigError(
            f"APEXRANK_MODEL__ATTN_IMPLEMENTATION={implementation!r} cannot run here: {exc}; use sdpa or eager"
        ) from exc
    return str(model.config._attn_implementation)


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

    Eager, it takes each row's statistics from a slice (no batch-sized temporaries: the
    first conv layer's output is the largest tensor of the model). Under ``torch.compile``
    it masks instead, with ``valid`` a tensor on the model's device, so that new lengths
    neither break the graph nor recompile it (the compiler fuses the masked sums).
    """

    def __init__(self, norm: torch.nn.GroupNorm) -> None:
        super().__init__()
        self.num_channels = norm.num_channels
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias
        self.valid: torch.Tensor | None = None  # int64 (B,): real frames per row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.valid is None:
            return torch.nn.functional.group_norm(x, self.num_channels, self.weight, self.bias, self.eps)
        y = x.to(torch.float32, copy=True)  # fp32 statistics, as autocast runs group_norm
        if torch.compiler.is_compiling():
            keep = (torch.arange(y.shape[-1], device=y.device)[None, :] < self.valid[:, None])[:, None, :]
            n = self.valid.to(torch.float32)[:, None]
            mean = torch.where(keep, y, 0.0).sum(-1) / n
            var = torch.where(keep, (y - mean[..., None]) ** 2, 0.0).sum(-1) / n
        else:
            stats = [torch.var_mean(y[b, :, :n], dim=-1, correction=0) for b, n in enumerate(self.valid.tolist())]
            var = torch.stack([v for v, _ in stats])
            mean = torch.stack([m for _, m in stats])
        scale = torch.rsqrt(var + self.eps) * self.weight.float()
        shift = self.bias.float() - mean * scale
        y = (
            y * scale[..., None] + shift[..., None]
            if torch.compiler.is_compiling()
            else y.mul_(scale[..., None]).add_(shift[..., None])
        )
        # Under autocast group_norm gives fp32; a model cast to bf16 end to end wants bf16 back.
        return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)


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
        self.options = options = SpeedOptions.from_settings(settings)
        self.amp_dtype = autocast_dtype(self.device, settings.precision)
        #: The dtype weights and activations are cast to end to end; None: fp32 (or autocast).
        self.half_dtype = half_dtype(self.device, settings.precision, self.amp_dtype) if options.half_weights else None
        if self.half_dtype is not None:
            self.amp_dtype = None
        self.attn_implementation = set_attention(model, options.attn_implementation, self.device)
        self._masked_norm = install_masked_norm(model)
        self.model = model.to(self.device, dtype=self.half_dtype)
        self.config = config
        self.layers = list(settings.layers)
        self.batch_size = batch_size
        #: Whether segments of different lengths may share a padded batch exactly.
        self.mixes_lengths = config.feat_extract_norm == "layer" or self._masked_norm is not None
        self.sample_rate = spec.sample_rate
        #: Batch widths are rounded up to whole seconds on CUDA so that shapes repeat and
        #: kernel plans (cuDNN convolution and attention) are reused, not rebuilt per tail.
        self.pad_multiple = self.sample_rate if self.device.type == "cuda" else 1
        #: Bucket edges in samples (``bucket_s``); a width past the last is rounded as above.
        self.bucket_edges = [round(b * self.sample_rate) for b in options.bucket_s]
        self._forward: Callable[..., Any] = self.model
        if options.compile != "off":
            graphs = options.compile == "cudagraphs" and self.device.type == "cuda"
            self._forward = torch.compile(
                self.model,
                dynamic=options.compile == "dynamic",
                backend=COMPILE_BACKEND,
                mode="reduce-overhead" if graphs else None,
            )
        self._pin = options.pin_memory and self.device.type == "cuda"
        self._staging: torch.Tensor | None = None  # the reused pinned buffer
        self._lock = threading.Lock()  # the masked norm's per-batch state, the pinned buffer
        self.n_layers = spec.n_layers
        self.dim = spec.dim
        self.encoder_id = spec.encoder_id

    @property
    def spec(self) -> EncoderSpec:
        return self._spec

    def frames_for(self, n_samples: int) -> int:
        """MERT frames for a segment of ``n_samples`` (segments under 400 samples give one)."""
        return int(self.model._get_feat_extract_output_lengths(max(n_samples, MIN_SAMPLES)))

    def bucket(self, n_samples: int) -> int:
        """The bucket edge (samples) a clip of ``n_samples`` pads to; 0 without buckets or past the last."""
        i = bisect.bisect_left(self.bucket_edges, n_samples)
        return self.bucket_edges[i] if i < len(self.bucket_edges) else 0

    def padded_width(self, longest: int) -> int:
        """The width a batch whose longest (receptive-field clamped) clip is ``longest`` pads to."""
        if not self.mixes_lengths:
            return longest
        edge = self.bucket(longest)
        if edge:
            return edge
        return -(-longest // self.pad_multiple) * self.pad_multiple

    def _batches(self, lengths: Sequence[int]) -> Iterator[list[int]]:
        """Indices grouped longest first, so padding stays small; with ``bucket_s`` a batch
        never spans two buckets, so its padded width is its bucket's edge.

        Only if a model cannot mask padding exactly are lengths kept apart.
        """
        order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
        key = (
            (lambda i: self.bucket(max(lengths[i], MIN_SAMPLES)))
            if self.mixes_lengths and self.bucket_edges
            else (lambda i: 0 if self.mixes_lengths else lengths[i])
        )
        batch: list[int] = []
        for i in order:
            if batch and (len(batch) >= self.batch_size or key(i) != key(batch[0])):
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
        width = self.padded_width(int(effective.max()))
        padded = bool((effective < width).any())
        raw = self._host_buffer(len(segs), width)
        for row, s in enumerate(segs):
            raw[row, : s.shape[0]] = torch.from_numpy(s)
            if self._pin:
                raw[row, s.shape[0] :] = 0.0  # the reused buffer holds the last batch's audio
        dev = self.device
        x = raw.to(dev, non_blocking=True)  # asynchronous only from pinned memory
        dev_lengths = lengths.to(dev)
        real = torch.arange(width, device=dev)[None, :] < dev_lengths[:, None]
        count = dev_lengths.to(torch.float32)[:, None]
        mean = (x * real).sum(-1, keepdim=True) / count
        var = (((x - mean) * real) ** 2).sum(-1, keepdim=True) / count
        x = (x - mean) / torch.sqrt(var + NORM_EPS) * real  # padding stays exactly zero
        if self.half_dtype is not None:
            x = x.to(self.half_dtype)  # normalised in fp32 first: the raw scale may be anything

        # Unpadded batches run the stock model, exactly as the checkpoint was trained
        # (group-norm MERT never saw an attention mask). Padded ones mask the padding out of
        # the first norm and of attention, which reproduces each clip's unpadded result.
        mask = None
        if padded:
            valid_samples = torch.arange(width, device=dev)[None, :] < effective.to(dev)[:, None]
            mask = valid_samples.to(torch.long)
        if self._masked_norm is not None:
            k0, s0 = self.config.conv_kernel[0], self.config.conv_stride[0]
            valid = (effective - k0) // s0 + 1
            # Compiled, the masked norm reads it on the device; eager, it slices rows from a host copy.
            self._masked_norm.valid = (valid.to(dev) if self._forward is not self.model else valid) if padded else None
        amp = (
            torch.autocast(device_type=dev.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
        )
        try:
            with amp:
                out = self._forward(x, attention_mask=mask, output_hidden_states=True, return_dict=True)
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

    def _host_buffer(self, rows: int, width: int) -> torch.Tensor:
        """A (rows, width) float32 host tensor: with ``pin_memory`` on CUDA a view of one reused
        pinned buffer, not zeroed (the caller zeroes each row's padding only); else a fresh
        zeroed one. Reuse is safe: each batch's results are copied back, which waits for its
        input copy, before the next batch is staged."""
        if not self._pin:
            return torch.zeros(rows, width, dtype=torch.float32)
        need = rows * width
        if self._staging is None or self._staging.numel() < need:
            self._staging = torch.empty(need, dtype=torch.float32, pin_memory=True)
        return self._staging[:need].view(rows, width)
