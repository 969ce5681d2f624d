"""A weight-free baseline encoder: per-band statistics of a log-mel spectrogram.

It exists so that the whole pipeline (worker, index, head training, demo) runs with no
model download, and as a floor any learned encoder has to beat. Frames match MERT's
rate (hop 320 at 24 kHz = 75 frames/s).

The four "layers" are per-band statistics over a segment's real frames:

0. mean log energy (timbre / spectral envelope),
1. standard deviation over time (dynamics),
2. mean absolute frame-to-frame difference (spectral flux: onsets, rhythm),
3. correlation over time between the band and the frame's mean log energy
   (co-modulation: bands that follow the overall loudness, such as drums, score high;
   sustained pads and noise score low).

The fourth statistic replaces the "band minus frame mean" shape average: that average
equals statistic 0 minus its mean over bands, so it would add no information.

Frames are computed without centring (``center=False``), so a frame never reaches past
the segment's real samples: zero padding from batching can be masked out exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ranker.encoders.base import Encoder, EncoderSpec

if TYPE_CHECKING:
    from ranker.settings import ModelSettings

#: ``ModelSettings.logmel_n_mels``'s default, for use without settings.
DEFAULT_N_MELS = 96
SAMPLE_RATE = 24_000
HOP = 320
N_FFT = 1024
LOG_EPS = 1e-6
_CORR_EPS = 1e-6
N_STATS = 4


def logmel_spec(n_mels: int = DEFAULT_N_MELS) -> EncoderSpec:
    """The spec of a :class:`LogMelEncoder` with ``n_mels`` bands, without building its filterbank."""
    return EncoderSpec(
        name="logmel",
        encoder_id=f"logmel-v1-n{n_mels}-sr{SAMPLE_RATE}",
        sample_rate=SAMPLE_RATE,
        n_layers=N_STATS,
        dim=n_mels,
        vector_dim=2 * n_mels,
    )


class LogMelEncoder(Encoder):
    """Log-mel band statistics; ``dim = n_mels``, ``n_layers = 4``."""

    name = "logmel"

    def __init__(self, settings: ModelSettings | None = None, *, batch_size: int = 8) -> None:
        import torchaudio

        n_mels = settings.logmel_n_mels if settings is not None else DEFAULT_N_MELS
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        spec = logmel_spec(n_mels)
        self.n_mels = n_mels
        self.batch_size = batch_size
        self.sample_rate = spec.sample_rate
        self.n_layers = spec.n_layers
        self.dim = spec.dim
        self.encoder_id = spec.encoder_id
        self._mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, n_mels=n_mels, center=False, power=2.0
        ).eval()

    @staticmethod
    def frames_for(n_samples: int) -> int:
        """Number of whole frames in ``n_samples`` (segments under one window count as one)."""
        return 1 + (max(n_samples, N_FFT) - N_FFT) // HOP

    def encode(self, segments: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        n = len(segments)
        features = np.zeros((n, self.n_layers, self.dim), dtype=np.float32)
        frames = np.zeros(n, dtype=np.int64)
        lengths = [int(np.asarray(s).shape[0]) for s in segments]
        if any(length == 0 for length in lengths):
            raise ValueError("cannot encode an empty segment")
        # Similar lengths together keep padding (and wasted FFTs) small.
        order = sorted(range(n), key=lambda i: lengths[i], reverse=True)
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                width = max(max(lengths[i] for i in idx), N_FFT)
                batch = torch.zeros(len(idx), width, dtype=torch.float32)
                for row, i in enumerate(idx):
                    batch[row, : lengths[i]] = torch.from_numpy(np.asarray(segments[i], dtype=np.float32))
                n_frames = torch.tensor([self.frames_for(lengths[i]) for i in idx], dtype=torch.int64)
                stats = self._stats(torch.log(self._mel(batch) + LOG_EPS), n_frames)
                features[idx] = stats.numpy()
                frames[idx] = n_frames.numpy()
        return features, frames

    @staticmethod
    def _stats(logmel: torch.Tensor, n_frames: torch.Tensor) -> torch.Tensor:
        """(B, M, T) log-mel and (B,) real frame counts -> (B, 4, M) statistics.

        Computed in float64 with a mask, so padded frames never enter a statistic and
        batched results match one-at-a-time ones to float precision.
        """
        x = logmel.to(torch.float64)
        t = x.shape[-1]
        mask = (torch.arange(t)[None, :] < n_frames[:, None]).to(torch.float64)  # (B, T)
        count = n_frames.to(torch.float64)[:, None]  # (B, 1)
        m3 = mask[:, None, :]

        mean = (x * m3).sum(-1) / count
        dev = (x - mean[..., None]) * m3
        std = torch.sqrt((dev**2).sum(-1) / count)

        pair_mask = mask[:, None, 1:]  # frame t and t-1 both real <=> t < n_frames
        flux = ((x[..., 1:] - x[..., :-1]).abs() * pair_mask).sum(-1) / (count - 1).clamp(min=1)

        loud = x.mean(dim=1)  # (B, T): frame mean over bands
        loud_mean = (loud * mask).sum(-1, keepdim=True) / count
        loud_dev = (loud - loud_mean) * mask
        loud_std = torch.sqrt((loud_dev**2).sum(-1, keepdim=True) / count)
        cov = (dev * loud_dev[:, None, :]).sum(-1) / count
        comod = cov / (std * loud_std + _CORR_EPS)

        return torch.stack([mean, std, flux, comod], dim=1).to(torch.float32)

    @property
    def vector_dim(self) -> int:
        return 2 * self.n_mels

    def song_vector(self, layers: np.ndarray) -> np.ndarray:
        """Spectral envelope and dynamics profile, each with its average over bands removed.

        Raw log-mel means share a large negative offset (log of small energies), which
        makes every pair of songs nearly parallel; removing each profile's average (the
        overall level) leaves its shape, so cosine similarity compares timbre and dynamics
        rather than loudness. Shape: (2 * n_mels,).
        """
        arr = np.asarray(layers, dtype=np.float32)
        mean, std = arr[0], arr[1]
        return np.concatenate([mean - mean.mean(), std - std.mean()]).astype(np.float32)
