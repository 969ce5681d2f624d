"""Decoding untrusted audio bytes to a mono float32 waveform at a bounded cost, and segmenting it.

The bytes come from :mod:`ranker.audio.fetch`; see ``docs/security.md``. Only the first
``max_duration_s`` seconds of a long song are decoded and scored (``DecodedAudio.truncated``
says so), so an hour-long upload costs no more than a ten-minute one.

Memory for one song is bounded and known in advance: the decoded mono signal at the
source rate (at most ``max_duration_s x max_sample_rate x 4`` bytes, allocated once and
filled block by block), the output at ``sample_rate`` (24 kHz), and scratch of a fixed
size (a few MB). No step makes a whole-signal copy: channels are mixed per block, the
finiteness and loudness checks run per block, and the resampler runs per block.

Error messages name the failure, never the content: a file that fails to decode may be
any file the worker can read (``file://``), and messages go to logs and dead letters.
"""

from __future__ import annotations

import functools
import io
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from ranker.errors import ErrorCode, InputError
from ranker.settings import AudioSettings

if TYPE_CHECKING:
    import torch

__all__ = [
    "ACCEPTED_FORMATS",
    "MIN_TAIL_S",
    "DecodedAudio",
    "decode_audio",
    "resample",
    "resample_rates",
    "safe_error_text",
    "segment_waveform",
    "sniff_format",
]

#: Samples (frames x channels) read from libsndfile at a time: memory follows the audio
#: actually decoded, never a frame count that a header merely claims.
_BLOCK_SAMPLES = 1 << 20
#: Samples per block of the finiteness and loudness check (a 2 MB float64 scratch).
_CHECK_BLOCK = 1 << 18
#: Bound on one resampling block: output frames x taps, and output samples (elements).
_RESAMPLE_BLOCK = 1 << 20
#: Largest sinc kernel (elements) built when resampling.
_MAX_RESAMPLE_KERNEL = 1 << 21
#: The resampler's filter: torchaudio's defaults (Hann-windowed sinc), so results match
#: ``torchaudio.functional.resample``.
_LOWPASS_FILTER_WIDTH = 6
_ROLLOFF = 0.99
#: Containers handed to libsndfile (``SoundFile.format`` names). libsndfile parses two
#: dozen more (CAF, AU, PAF, MAT, SD2, ...); untrusted bytes reach only these parsers.
ACCEPTED_FORMATS = frozenset({"WAV", "WAVEX", "RF64", "FLAC", "OGG", "MP3", "AIFF"})

#: MERT's receptive field (400 samples at 24 kHz): a shorter tail yields no full frame.
MIN_TAIL_S = 400 / 24_000

# --------------------------------------------------------------------------------------
# Error text
# --------------------------------------------------------------------------------------

_OBJECT_REPR = re.compile(r"<[^<>]*? at 0x[0-9A-Fa-f]+>")
_BYTES_LITERAL = re.compile(r"""(?<![\w])(?:bytearray\()?b(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\)?""")
_ADDRESS = re.compile(r"0x[0-9A-Fa-f]{6,}")
_MAX_ERROR_TEXT = 200


def safe_error_text(exc: BaseException | str) -> str:
    """A library's error text fit for logs and dead letters: no content bytes, no heap addresses.

    libsndfile, soundfile and h11 quote what they choke on (``bytearray(b'...')``, a file
    object's ``repr`` with its address); the reason around it is kept.
    """
    text = exc if isinstance(exc, str) else str(exc) or type(exc).__name__
    text = _OBJECT_REPR.sub("<object>", text)
    text = _BYTES_LITERAL.sub("<bytes>", text)
    text = _ADDRESS.sub("<address>", text)
    return text if len(text) <= _MAX_ERROR_TEXT else text[: _MAX_ERROR_TEXT - 3] + "..."


def _decode_failure(exc: Exception) -> str:
    if isinstance(exc, sf.LibsndfileError):
        # libsndfile's own reason from its fixed table; str(exc) prefixes the file object's repr.
        return safe_error_text(exc.error_string)
    return safe_error_text(exc)


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def sniff_format(data: bytes) -> str | None:
    """The container named by the first bytes, if it is one of :data:`ACCEPTED_FORMATS`."""
    head = data[:12]
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "WAV"
    if head[:4] == b"fLaC":
        return "FLAC"
    if head[:4] == b"OggS":
        return "OGG"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "AIFF"
    if head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "MP3"  # an ID3v2 tag (also found before FLAC) or an MPEG frame sync
    return None


@dataclass
class DecodedAudio:
    """A song ready for the encoder.

    ``duration_s`` is the original length; ``scored_duration_s`` the length of
    ``waveform`` (shorter when ``truncated``).
    """

    waveform: np.ndarray  # float32, mono, at sample_rate
    sample_rate: int
    duration_s: float
    truncated: bool
    scored_duration_s: float


def decode_audio(data: bytes, settings: AudioSettings) -> DecodedAudio:
    """Decode any format libsndfile reads (WAV, FLAC, OGG Vorbis/Opus, MP3) to mono float32.

    Only :data:`ACCEPTED_FORMATS` reach libsndfile. Only the first ``max_duration_s``
    seconds are decoded, block by block and mixed to mono as they come, so a header that
    claims billions of frames or a thousand channels costs only what is really there.
    Sample rates above ``max_sample_rate`` are refused.
    """
    if sniff_format(data) is None:
        raise InputError(
            ErrorCode.UNDECODABLE_AUDIO, "audio is not WAV, FLAC, OGG, MP3 or AIFF (no known container signature)"
        )
    try:
        with sf.SoundFile(_SeekableBytes(data)) as snd:
            if snd.format not in ACCEPTED_FORMATS:
                raise InputError(ErrorCode.UNDECODABLE_AUDIO, f"audio in {snd.format} format is not accepted")
            sr = int(snd.samplerate)
            channels = int(snd.channels)
            if sr <= 0 or sr > settings.max_sample_rate:
                raise InputError(
                    ErrorCode.UNDECODABLE_AUDIO,
                    f"audio declares a sample rate of {sr} Hz; 1 to {settings.max_sample_rate} Hz are accepted",
                )
            if channels <= 0:
                raise InputError(ErrorCode.UNDECODABLE_AUDIO, f"audio declares {channels} channels")
            total = int(snd.frames)
            # Some streams report no (or a bogus) frame count; then read up to the cap.
            known = 0 < total < 2**62
            cap = max(1, math.floor(settings.max_duration_s * sr))
            want = min(total, cap) if known else cap
            mono = _read_mono(snd, want, channels, known=known)
            n = mono.shape[0]
            if n < want:  # the data ended before the header said: its real length is known now
                total, known, more = n, True, False
            elif known:
                more = total > cap
            else:
                more = len(snd.read(frames=1, dtype="float32", always_2d=True)) > 0
    except (sf.LibsndfileError, sf.SoundFileError, RuntimeError, ValueError, TypeError, OverflowError) as exc:
        raise InputError(ErrorCode.UNDECODABLE_AUDIO, f"audio could not be decoded: {_decode_failure(exc)}") from exc
    if n == 0:
        raise InputError(ErrorCode.EMPTY_AUDIO, "audio has no samples")
    duration_s = (total if known else n) / sr
    if duration_s < settings.min_duration_s:
        raise InputError(
            ErrorCode.TOO_SHORT,
            f"audio lasts {duration_s:.3f} s, shorter than the minimum {settings.min_duration_s:g} s",
        )
    rms = _rms(mono)
    if not math.isfinite(rms):
        raise InputError(ErrorCode.UNDECODABLE_AUDIO, "audio contains non-finite samples (NaN or infinity)")
    if rms < settings.silence_rms:
        raise InputError(
            ErrorCode.SILENT_AUDIO,
            f"audio is silent (RMS {rms:.2e} below the threshold {settings.silence_rms:.1e})",
        )
    target = settings.sample_rate
    waveform = mono if sr == target else resample(mono, sr, target)  # peak: both, plus a block
    return DecodedAudio(
        waveform=waveform,
        sample_rate=target,
        duration_s=float(duration_s),
        truncated=bool(more),
        scored_duration_s=waveform.shape[0] / target,
    )


class _SeekableBytes(io.BytesIO):
    """``BytesIO`` that answers a seek before the start as ``lseek`` does: position unchanged.

    libsndfile seeks wherever a corrupt header points; ``BytesIO`` raises on a negative
    position, and soundfile's C callback can only swallow that and report position 0.
    The size is kept rather than read through ``getbuffer()``, which would copy the bytes.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(data)  # shares ``data`` until written to or ``getbuffer()``: no copy
        self._size = len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.tell(), io.SEEK_END: self._size}.get(whence, 0)
        if base + offset < 0:
            return self.tell()
        return super().seek(offset, whence)

    def __repr__(self) -> str:  # soundfile names the file object in its messages
        return "<audio bytes>"


def _read_mono(snd: sf.SoundFile, want: int, channels: int, *, known: bool) -> np.ndarray:
    """Up to ``want`` frames, averaged over channels one block at a time, into one array.

    The result is allocated once (``want`` frames) when the frame count is known, and
    grown geometrically in place (``realloc``) when it is not; it is shrunk in place if
    the data ends early. Mono is read straight into it; wider audio goes through one
    block of scratch.
    """
    block = max(1, min(_BLOCK_SAMPLES // channels, want))
    out = np.empty(want if known else block, dtype=np.float32)
    wide = np.empty((block, channels), dtype=np.float32) if channels > 1 else None
    mix = np.empty(block, dtype=np.float64) if channels > 1 else None
    got = 0
    while got < want:
        k = min(block, want - got)
        if got + k > out.shape[0]:  # frame count unknown: grow (in place, no copy held)
            out.resize(min(want, max(2 * out.shape[0], got + k)), refcheck=False)
        if wide is None or mix is None:
            read = snd.read(out=out[got : got + k]).shape[0]
        else:
            frames = snd.read(out=wide[:k])
            read = frames.shape[0]
            # float64 sums: absurd float samples become inf/NaN only if they are; checked later
            with np.errstate(over="ignore", invalid="ignore"):
                np.mean(frames, axis=1, dtype=np.float64, out=mix[:read])
                out[got : got + read] = mix[:read]
        if read == 0:
            break
        got += read
    if got < out.shape[0]:
        out.resize(got, refcheck=False)  # nothing else refers to it
    return out


def _rms(x: np.ndarray) -> float:
    """Root mean square over blocks, in float64; NaN or infinity if any sample is not finite.

    Squares of finite float32 values cannot overflow a float64 sum, so a non-finite
    result means a non-finite sample.
    """
    if x.shape[0] == 0:
        return 0.0
    scratch = np.empty(min(_CHECK_BLOCK, x.shape[0]), dtype=np.float64)
    total = 0.0
    for start in range(0, x.shape[0], _CHECK_BLOCK):
        chunk = scratch[: min(_CHECK_BLOCK, x.shape[0] - start)]
        chunk[...] = x[start : start + chunk.shape[0]]
        total += float(np.dot(chunk, chunk))
    return math.sqrt(total / x.shape[0])


# --------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------


def _resample_kernel_size(orig: int, new: int) -> int:
    """Elements of the sinc kernel for ``orig -> new`` (filter width 6, rolloff 0.99)."""
    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    width = math.ceil(_LOWPASS_FILTER_WIDTH * o / (min(o, n) * _ROLLOFF))
    return n * (o + 2 * width)


def resample_rates(orig: int, new: int) -> tuple[int, int]:
    """The rates actually resampled between: exact when the kernel is small, else the nearest small ratio.

    The kernel is ``(new/g) x (orig/g)`` (g = gcd): 44,101 Hz -> 24 kHz would take about
    18 GB and a minute. Standard rates are exact; odd ones are approximated by a ratio
    with a bounded denominator (a pitch error far below a cent).
    """
    if _resample_kernel_size(orig, new) <= _MAX_RESAMPLE_KERNEL:
        return orig, new
    for max_den in (1000, 300, 100, 30, 10, 1):
        ratio = Fraction(new, orig).limit_denominator(max_den)
        if ratio > 0 and _resample_kernel_size(ratio.denominator, ratio.numerator) <= _MAX_RESAMPLE_KERNEL:
            return ratio.denominator, ratio.numerator
    raise InputError(ErrorCode.UNDECODABLE_AUDIO, f"cannot resample {orig} Hz to {new} Hz at a bounded cost")


@functools.lru_cache(maxsize=4)
def _sinc_kernel(o: int, n: int) -> tuple[torch.Tensor, int]:
    """The polyphase kernel ``(n, 1, o + 2 * width)`` for ``o -> n`` (coprime), and ``width``.

    The same Hann-windowed sinc, computed the same way (float32 torch operations), as
    ``torchaudio.functional.resample`` with its defaults, so that songs resample exactly
    as they did when the whole signal went through torchaudio (and as training saw them).
    At most 4 are kept, each at most 8 MB.
    """
    import torch

    base = min(o, n) * _ROLLOFF
    width = math.ceil(_LOWPASS_FILTER_WIDTH * o / base)
    idx = torch.arange(-width, width + o, dtype=torch.float32)[None, None] / o
    t = torch.arange(0, -n, -1, dtype=torch.float32)[:, None, None] / n + idx
    t *= base
    t = t.clamp_(-_LOWPASS_FILTER_WIDTH, _LOWPASS_FILTER_WIDTH)
    window = torch.cos(t * math.pi / _LOWPASS_FILTER_WIDTH / 2) ** 2
    t *= math.pi
    kernel = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)
    kernel *= window * (base / o)
    return kernel, width


def resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    """``torchaudio.functional.resample(x, orig, new)`` block by block, into one output array.

    The whole-signal version pads a copy of the input and holds its convolution output
    twice (before and after the polyphase interleave). Here each block of output frames
    is convolved from its slice of the input plus ``width`` samples of context on either
    side (zeros beyond the ends, as torchaudio pads), so the result is the same
    convolution, to float rounding, with scratch bounded by :data:`_RESAMPLE_BLOCK`.
    Rates whose kernel would be too large are approximated first (:func:`resample_rates`).
    """
    import torch

    src, dst = resample_rates(orig, new)
    g = math.gcd(src, dst)
    o, n = src // g, dst // g
    if o == n:
        return np.ascontiguousarray(x, dtype=np.float32)
    kernel, width = _sinc_kernel(o, n)
    taps = o + 2 * width
    length = x.shape[0]
    out_len = -(-n * length // o)  # ceil(n * length / o), as torchaudio trims
    frames_total = -(-out_len // n)  # conv frames: each gives n output samples
    out = np.empty(out_len, dtype=np.float32)
    step = max(1, min(_RESAMPLE_BLOCK // taps, _RESAMPLE_BLOCK // n))
    with torch.inference_mode():
        for k0 in range(0, frames_total, step):
            k1 = min(k0 + step, frames_total)
            # Frame k reads padded input [k*o, k*o + taps), i.e. x[k*o - width : k*o + o + width].
            seg = _slice_with_zeros(x, k0 * o - width, k1 * o + width)
            conv = torch.nn.functional.conv1d(torch.from_numpy(seg)[None, None], kernel, stride=o)
            a, b = k0 * n, min(k1 * n, out_len)
            out[a:b] = conv[0].T.reshape(-1)[: b - a].numpy()  # interleave the n phases
    return out


def _slice_with_zeros(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``x[start:stop]`` as a contiguous float32 array, zeros where it runs past either end."""
    if start >= 0 and stop <= x.shape[0] and x.dtype == np.float32 and x.flags.c_contiguous:
        return x[start:stop]  # a view: no copy in the middle of the signal
    seg = np.zeros(stop - start, dtype=np.float32)
    lo, hi = max(start, 0), min(stop, x.shape[0])
    if hi > lo:
        seg[lo - start : hi - start] = x[lo:hi]
    return seg


# --------------------------------------------------------------------------------------
# Segmenting
# --------------------------------------------------------------------------------------


def segment_waveform(waveform: np.ndarray, sample_rate: int, segment_s: float) -> list[np.ndarray]:
    """Split into consecutive non-overlapping segments (views, not copies).

    The last segment is shorter rather than zero-padded: the encoder pads and masks, so
    padding never reaches the features. A tail too short to give one MERT frame
    (400 samples at 24 kHz) is dropped when there are other segments.
    """
    seg_len = round(segment_s * sample_rate)
    if seg_len < 1:
        raise ValueError(f"segment_s={segment_s} at {sample_rate} Hz is shorter than one sample")
    x = np.asarray(waveform)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D waveform, got shape {x.shape}")
    segments = [x[i : i + seg_len] for i in range(0, x.shape[0], seg_len)]
    min_tail = math.ceil(MIN_TAIL_S * sample_rate)
    if len(segments) > 1 and segments[-1].shape[0] < min_tail:
        segments.pop()
    return segments
