"""Fetching and decoding newly generated audio.

Everything that can go wrong with a song's audio raises :class:`~ranker.errors.InputError`
with a code that names the dead-letter reason and a message that names the URI, so a
bad song is parked and explained instead of retried forever.

Policy for long songs: only the first ``max_duration_s`` seconds are decoded and scored
(``DecodedAudio.truncated`` says so). Decoding stops there, so an hour-long upload costs
no more than a ten-minute one.
"""

from __future__ import annotations

import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx
import numpy as np
import soundfile as sf

from ranker.errors import ErrorCode, InputError
from ranker.settings import AudioSettings

__all__ = [
    "DecodedAudio",
    "decode_audio",
    "display_uri",
    "fetch_audio",
    "load_song",
    "segment_waveform",
]

#: Schemes this module knows how to fetch; ``AudioSettings.allowed_schemes`` narrows them.
KNOWN_SCHEMES = frozenset({"file", "http", "https"})

#: MERT's receptive field (400 samples at 24 kHz): a shorter tail yields no full frame.
MIN_TAIL_S = 400 / 24_000

# --------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------


def display_uri(uri: str) -> str:
    """The URI as error messages show it: password and query values hidden.

    Presigned URLs carry credentials in the query string, and messages end up in logs
    and on the dead-letter topic, so only the query's presence is shown.
    """
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    query = "<redacted>" if parts.query else ""
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def fetch_audio(uri: str, settings: AudioSettings, *, client: httpx.Client | None = None) -> bytes:
    """Return the raw bytes behind ``uri`` (``file://``, ``http://`` or ``https://``).

    ``client`` lets a worker reuse one connection pool across songs (the client's own
    timeouts and redirect policy are then used; redirects are still refused); without it
    a short-lived client is made per call.
    """
    shown = display_uri(uri)
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise InputError(ErrorCode.UNSUPPORTED_URI_SCHEME, f"{shown!r} is not a valid URI: {exc}") from exc
    scheme = parts.scheme.lower()
    allowed = {s.lower() for s in settings.allowed_schemes} & KNOWN_SCHEMES
    if scheme not in allowed:
        what = f"scheme {scheme!r}" if scheme else "no scheme"
        raise InputError(
            ErrorCode.UNSUPPORTED_URI_SCHEME,
            f"{shown!r} has {what}; allowed schemes are {sorted(allowed)}",
        )
    if scheme == "file":
        return _fetch_file(uri, parts.netloc, parts.path, settings)
    return _fetch_http(uri, settings, client)


def _fetch_file(uri: str, netloc: str, raw_path: str, settings: AudioSettings) -> bytes:
    shown = display_uri(uri)
    if netloc not in ("", "localhost"):
        raise InputError(
            ErrorCode.FORBIDDEN_URI, f"{shown!r} names host {netloc!r}; only local files are read"
        )
    path = unquote(raw_path)
    if not path or not os.path.isabs(path):
        raise InputError(ErrorCode.FORBIDDEN_URI, f"{shown!r} must name an absolute path (file:///abs/path)")
    try:
        real = Path(os.path.realpath(path))
    except (ValueError, OSError) as exc:  # e.g. an embedded NUL byte
        raise InputError(ErrorCode.FORBIDDEN_URI, f"{shown!r} is not a usable path: {exc}") from exc
    if settings.file_root is not None:
        root = Path(os.path.realpath(settings.file_root))
        # Checked before existence so that probing outside the root reveals nothing.
        if not real.is_relative_to(root):
            raise InputError(ErrorCode.FORBIDDEN_URI, f"{shown!r} resolves outside the allowed root {root}")
    try:
        st = real.stat()
    except FileNotFoundError as exc:
        raise InputError(ErrorCode.FILE_NOT_FOUND, f"{shown!r}: no such file") from exc
    except OSError as exc:
        raise InputError(
            ErrorCode.FILE_NOT_FOUND, f"{shown!r} cannot be read: {exc.strerror or exc}"
        ) from exc
    if not real.is_file():
        raise InputError(ErrorCode.FILE_NOT_FOUND, f"{shown!r} is not a regular file")
    if st.st_size > settings.max_bytes:
        raise InputError(
            ErrorCode.TOO_LARGE, f"{shown!r} is {st.st_size} bytes, over the limit of {settings.max_bytes}"
        )
    try:
        with real.open("rb") as fh:
            data = fh.read(settings.max_bytes + 1)  # the file may have grown since stat()
    except OSError as exc:
        raise InputError(
            ErrorCode.FILE_NOT_FOUND, f"{shown!r} cannot be read: {exc.strerror or exc}"
        ) from exc
    if len(data) > settings.max_bytes:
        raise InputError(ErrorCode.TOO_LARGE, f"{shown!r} is over the limit of {settings.max_bytes} bytes")
    return data


def _fetch_http(uri: str, settings: AudioSettings, client: httpx.Client | None) -> bytes:
    """Stream the body with a byte cap and an overall deadline.

    httpx's timeouts bound each connect and each read; the deadline bounds the whole
    transfer, so a server that trickles bytes cannot hold a worker forever. It is checked
    between reads, so a transfer can overrun it by at most one read timeout.
    """
    shown = display_uri(uri)
    timeout_s = settings.fetch_timeout_s
    deadline = time.monotonic() + timeout_s
    own_client = client is None
    http = client or httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=False)
    try:
        with http.stream("GET", uri, follow_redirects=False) as resp:
            status = resp.status_code
            if 300 <= status < 400:
                where = resp.headers.get("location", "?")
                raise InputError(
                    ErrorCode.HTTP_ERROR,
                    f"{shown!r} answered HTTP {status} redirecting to {display_uri(where)!r}; "
                    "redirects are not followed: publish the final URL",
                )
            if status >= 400:
                raise InputError(
                    ErrorCode.HTTP_ERROR, f"{shown!r} answered HTTP {status} {resp.reason_phrase}"
                )
            length = resp.headers.get("content-length")
            if length is not None and length.strip().isdigit() and int(length) > settings.max_bytes:
                raise InputError(
                    ErrorCode.TOO_LARGE,
                    f"{shown!r} announces {int(length)} bytes, over the limit of {settings.max_bytes}",
                )
            buf = bytearray()
            # Counted after content decoding, so a compressed bomb is capped too.
            for chunk in resp.iter_bytes():  # as received: no buffering past the deadline
                buf += chunk
                if len(buf) > settings.max_bytes:
                    raise InputError(
                        ErrorCode.TOO_LARGE,
                        f"{shown!r} sent more than the limit of {settings.max_bytes} bytes",
                    )
                if time.monotonic() > deadline:
                    raise InputError(
                        ErrorCode.FETCH_TIMEOUT,
                        f"{shown!r} took longer than {timeout_s:g} s to download ({len(buf)} bytes so far)",
                    )
            return bytes(buf)
    except httpx.TimeoutException as exc:
        raise InputError(
            ErrorCode.FETCH_TIMEOUT, f"{shown!r} timed out after {timeout_s:g} s ({type(exc).__name__})"
        ) from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise InputError(
            ErrorCode.HTTP_ERROR, f"{shown!r} could not be fetched: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        if own_client:
            http.close()


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


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

    Only the first ``max_duration_s`` seconds are decoded. Channels are averaged, then the
    signal is resampled to ``settings.sample_rate``.
    """
    try:
        with sf.SoundFile(io.BytesIO(data)) as snd:
            sr = int(snd.samplerate)
            total = int(snd.frames)
            # Some streams report no (or a bogus) frame count; then read up to the cap.
            known = 0 < total < 2**62
            cap = max(1, math.floor(settings.max_duration_s * sr))
            want = min(total, cap) if known else cap
            frames = snd.read(frames=want, dtype="float32", always_2d=True)
            more = len(snd.read(frames=1, dtype="float32", always_2d=True)) > 0 if not known else total > cap
    except (sf.LibsndfileError, sf.SoundFileError, RuntimeError, ValueError, TypeError) as exc:
        raise InputError(ErrorCode.UNDECODABLE_AUDIO, f"audio could not be decoded: {exc}") from exc
    if sr <= 0:
        raise InputError(ErrorCode.UNDECODABLE_AUDIO, f"audio declares an invalid sample rate {sr}")
    n = frames.shape[0]
    if n == 0:
        raise InputError(ErrorCode.EMPTY_AUDIO, "audio has no samples")
    duration_s = (total if known else n) / sr
    if duration_s < settings.min_duration_s:
        raise InputError(
            ErrorCode.TOO_SHORT,
            f"audio lasts {duration_s:.3f} s, shorter than the minimum {settings.min_duration_s:g} s",
        )
    mono = frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else frames[:, 0]
    if not np.isfinite(mono).all():
        raise InputError(ErrorCode.UNDECODABLE_AUDIO, "audio contains non-finite samples (NaN or infinity)")
    rms = float(np.sqrt(np.mean(np.square(mono, dtype=np.float64))))
    if rms < settings.silence_rms:
        raise InputError(
            ErrorCode.SILENT_AUDIO,
            f"audio is silent (RMS {rms:.2e} below the threshold {settings.silence_rms:.1e})",
        )
    target = settings.sample_rate
    if sr != target:
        mono = _resample(mono, sr, target)
    waveform = np.ascontiguousarray(mono, dtype=np.float32)
    return DecodedAudio(
        waveform=waveform,
        sample_rate=target,
        duration_s=float(duration_s),
        truncated=bool(more),
        scored_duration_s=waveform.shape[0] / target,
    )


def _resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    import torch
    import torchaudio.functional as taf

    with torch.inference_mode():
        out = taf.resample(torch.from_numpy(np.ascontiguousarray(x)), orig, new)
    return out.numpy()


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


def load_song(uri: str, settings: AudioSettings, *, client: httpx.Client | None = None) -> DecodedAudio:
    """Fetch and decode one song; decode errors name the URI too."""
    data = fetch_audio(uri, settings, client=client)
    try:
        return decode_audio(data, settings)
    except InputError as exc:
        raise InputError(exc.code, f"{display_uri(uri)!r}: {exc.message}") from exc
