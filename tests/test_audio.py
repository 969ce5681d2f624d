"""Fetching and decoding: real files written with soundfile, a real local HTTP server."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ranker.audio import (
    AudioHTTPClient,
    DecodedAudio,
    decode_audio,
    display_uri,
    fetch_audio,
    load_song,
    segment_waveform,
)
from ranker.errors import ErrorCode, InputError
from ranker.settings import AudioSettings
from tests.helpers import CountingHTTPServer, loopback, serving

SR = 24_000


def tone(seconds: float, sr: int = SR, freq: float = 440.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write(path: Path, data: np.ndarray, sr: int = SR, **kw: str) -> Path:
    sf.write(str(path), data, sr, **kw)
    return path


def encode_bytes(data: np.ndarray, sr: int = SR, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def expect(code: ErrorCode, fn: object, *args: object, **kw: object) -> InputError:
    assert callable(fn)
    with pytest.raises(InputError) as info:
        fn(*args, **kw)
    assert info.value.code == code, info.value
    return info.value


@pytest.fixture
def settings() -> AudioSettings:
    return AudioSettings()


# --------------------------------------------------------------------------------------
# file:// fetching
# --------------------------------------------------------------------------------------


def test_load_wav_from_file(tmp_path: Path, settings: AudioSettings) -> None:
    path = write(tmp_path / "song.wav", tone(2.0))
    song = load_song(path.as_uri(), settings)
    assert isinstance(song, DecodedAudio)
    assert song.waveform.dtype == np.float32 and song.waveform.ndim == 1
    assert song.waveform.shape == (2 * SR,)
    assert song.sample_rate == SR
    assert song.duration_s == pytest.approx(2.0)
    assert song.scored_duration_s == pytest.approx(2.0)
    assert not song.truncated
    np.testing.assert_allclose(song.waveform, tone(2.0), atol=1e-4)  # 16-bit PCM round trip


@pytest.mark.parametrize(
    ("fmt", "subtype", "sr"),
    [("WAV", "FLOAT", SR), ("FLAC", "PCM_16", SR), ("OGG", "VORBIS", SR), ("MP3", "MPEG_LAYER_III", SR)],
)
def test_formats(tmp_path: Path, settings: AudioSettings, fmt: str, subtype: str, sr: int) -> None:
    path = tmp_path / f"song.{fmt.lower()}"
    path.write_bytes(encode_bytes(tone(1.5, sr), sr, fmt, subtype))
    song = load_song(path.as_uri(), settings)
    assert song.sample_rate == SR
    # Lossy codecs may add encoder delay/padding frames.
    assert abs(song.waveform.shape[0] - round(1.5 * SR)) < 0.1 * SR
    rms = float(np.sqrt(np.mean(song.waveform**2)))
    assert rms == pytest.approx(0.3 / np.sqrt(2), rel=0.15)


def test_stereo_is_averaged_to_mono(settings: AudioSettings) -> None:
    left = tone(1.0, freq=440.0)
    right = tone(1.0, freq=660.0, amp=0.1)
    song = decode_audio(encode_bytes(np.stack([left, right], axis=1), subtype="FLOAT"), settings)
    assert song.waveform.ndim == 1
    np.testing.assert_allclose(song.waveform, (left + right) / 2, atol=1e-6)


def test_resample_44100_to_24000(settings: AudioSettings) -> None:
    sr = 44_100
    song = decode_audio(encode_bytes(tone(1.5, sr, freq=1000.0), sr, subtype="FLOAT"), settings)
    assert song.sample_rate == SR
    assert song.waveform.shape == (36_000,)
    assert song.duration_s == pytest.approx(1.5)
    spectrum = np.abs(np.fft.rfft(song.waveform))
    peak_hz = np.argmax(spectrum) * SR / song.waveform.shape[0]
    assert peak_hz == pytest.approx(1000.0, abs=2.0)


def test_long_audio_keeps_first_part(settings: AudioSettings) -> None:
    cfg = settings.model_copy(update={"max_duration_s": 2.0})
    data = np.concatenate([tone(2.0), tone(3.0, freq=880.0)])
    song = decode_audio(encode_bytes(data, subtype="FLOAT"), cfg)
    assert song.truncated
    assert song.duration_s == pytest.approx(5.0)
    assert song.scored_duration_s == pytest.approx(2.0)
    assert song.waveform.shape == (2 * SR,)
    np.testing.assert_allclose(song.waveform, tone(2.0), atol=1e-6)  # the first seconds, not the last


def test_truncation_with_resampling(settings: AudioSettings) -> None:
    cfg = settings.model_copy(update={"max_duration_s": 1.0})
    song = decode_audio(encode_bytes(tone(3.0, 48_000), 48_000), cfg)
    assert song.truncated and song.duration_s == pytest.approx(3.0)
    assert song.waveform.shape == (SR,)


def test_unsupported_schemes(settings: AudioSettings) -> None:
    for uri in ["ftp://example.com/a.wav", "s3://bucket/a.wav", "relative/a.wav", "/abs/a.wav", "data:,x"]:
        err = expect(ErrorCode.UNSUPPORTED_URI_SCHEME, fetch_audio, uri, settings)
        assert uri in err.message
    only_files = settings.model_copy(update={"allowed_schemes": ["file"]})
    err = expect(ErrorCode.UNSUPPORTED_URI_SCHEME, fetch_audio, "https://example.com/a.wav", only_files)
    assert "https://example.com/a.wav" in err.message


def test_file_root_confinement(tmp_path: Path, settings: AudioSettings) -> None:
    root = tmp_path / "root"
    root.mkdir()
    inside = write(root / "in.wav", tone(1.0))
    outside = write(tmp_path / "out.wav", tone(1.0))
    (root / "link.wav").symlink_to(outside)
    (root / "sub").mkdir()
    cfg = settings.model_copy(update={"file_root": root})

    assert fetch_audio(inside.as_uri(), cfg) == inside.read_bytes()
    for uri in [
        outside.as_uri(),
        (root / "link.wav").as_uri(),  # a symlink leading out of the root
        f"file://{root}/sub/../../out.wav",  # dot-dot escape
        f"file://{tmp_path}/missing.wav",  # outside and missing: still forbidden, not "not found"
    ]:
        err = expect(ErrorCode.FORBIDDEN_URI, fetch_audio, uri, cfg)
        assert uri in err.message
    # Without a root, the symlink is followed.
    assert fetch_audio((root / "link.wav").as_uri(), settings) == outside.read_bytes()


def test_file_uri_must_be_local_and_absolute(settings: AudioSettings) -> None:
    expect(ErrorCode.FORBIDDEN_URI, fetch_audio, "file://otherhost/tmp/a.wav", settings)
    expect(ErrorCode.FORBIDDEN_URI, fetch_audio, "file:relative.wav", settings)


def test_file_not_found(tmp_path: Path, settings: AudioSettings) -> None:
    uri = (tmp_path / "nope.wav").as_uri()
    err = expect(ErrorCode.FILE_NOT_FOUND, fetch_audio, uri, settings)
    assert uri in err.message
    expect(ErrorCode.FILE_NOT_FOUND, fetch_audio, tmp_path.as_uri(), settings)  # a directory


def test_file_too_large(tmp_path: Path, settings: AudioSettings) -> None:
    path = write(tmp_path / "big.wav", tone(1.0))
    cfg = settings.model_copy(update={"max_bytes": 1000})
    err = expect(ErrorCode.TOO_LARGE, fetch_audio, path.as_uri(), cfg)
    assert path.as_uri() in err.message
    assert "1000 bytes" in err.message and str(path.stat().st_size) not in err.message  # the limit, not the size


def test_percent_encoded_file_uri(tmp_path: Path, settings: AudioSettings) -> None:
    path = write(tmp_path / "my song #1.wav", tone(1.0))
    assert load_song(path.as_uri(), settings).waveform.shape == (SR,)


# --------------------------------------------------------------------------------------
# Decoding errors
# --------------------------------------------------------------------------------------


def test_undecodable(tmp_path: Path, settings: AudioSettings) -> None:
    expect(ErrorCode.UNDECODABLE_AUDIO, decode_audio, b"this is not audio at all" * 100, settings)
    expect(ErrorCode.UNDECODABLE_AUDIO, decode_audio, b"", settings)
    path = tmp_path / "fake.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    err = expect(ErrorCode.UNDECODABLE_AUDIO, load_song, path.as_uri(), settings)
    assert path.as_uri() in err.message  # load_song names the uri for decode errors too
    assert "junk" not in err.message and " at 0x" not in err.message  # neither content nor heap addresses


def test_non_finite_samples(settings: AudioSettings) -> None:
    data = tone(2.0)
    data[1000] = np.nan
    expect(ErrorCode.UNDECODABLE_AUDIO, decode_audio, encode_bytes(data, subtype="FLOAT"), settings)
    data[1000] = np.inf
    expect(ErrorCode.UNDECODABLE_AUDIO, decode_audio, encode_bytes(data, subtype="FLOAT"), settings)


def test_empty_audio(settings: AudioSettings) -> None:
    expect(ErrorCode.EMPTY_AUDIO, decode_audio, encode_bytes(np.zeros(0, dtype=np.float32)), settings)


def test_too_short(settings: AudioSettings) -> None:
    err = expect(ErrorCode.TOO_SHORT, decode_audio, encode_bytes(tone(0.5)), settings)
    assert "0.500" in err.message


def test_silent(settings: AudioSettings) -> None:
    expect(ErrorCode.SILENT_AUDIO, decode_audio, encode_bytes(np.zeros(SR * 2, dtype=np.float32)), settings)
    hiss = (np.random.default_rng(0).standard_normal(SR * 2) * 1e-5).astype(np.float32)
    expect(ErrorCode.SILENT_AUDIO, decode_audio, encode_bytes(hiss, subtype="FLOAT"), settings)
    # Out-of-phase stereo cancels in the mono mix: the encoder would hear silence.
    x = tone(2.0)
    expect(ErrorCode.SILENT_AUDIO, decode_audio, encode_bytes(np.stack([x, -x], 1), subtype="FLOAT"), settings)


# --------------------------------------------------------------------------------------
# Decoding untrusted bytes at a bounded cost
# --------------------------------------------------------------------------------------


def test_odd_sample_rate_resamples_at_a_bounded_cost(settings: AudioSettings) -> None:
    """44,101 Hz made torchaudio build a 24000 x 44101 kernel (18 GB, a minute); now it is approximated."""
    import resource

    from ranker.audio import resample_rates

    assert resample_rates(44_100, SR) == (44_100, SR)  # standard rates stay exact
    src, dst = resample_rates(44_101, SR)
    assert abs(dst / src - SR / 44_101) < 1e-5 and src <= 1000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    song = decode_audio(encode_bytes(tone(1.2, 44_101), 44_101), settings)
    assert time.monotonic() - start < 5.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB
    assert abs(song.waveform.shape[0] - round(1.2 * SR)) <= 2
    hi_res = settings.model_copy(update={"max_sample_rate": 192_000})
    for sr in [1_000, 7_919, 96_001, 191_999]:
        assert decode_audio(encode_bytes(tone(1.1, sr, freq=300.0), sr), hi_res).sample_rate == SR


def test_sample_rate_limit(settings: AudioSettings) -> None:
    data = encode_bytes(tone(1.0, 192_000), 192_000)
    assert settings.max_sample_rate == 48_000  # the default: generated music is at most 48 kHz
    err = expect(ErrorCode.UNDECODABLE_AUDIO, decode_audio, data, settings)
    assert "192000 Hz" in err.message and "48000 Hz" in err.message
    assert decode_audio(encode_bytes(tone(1.0, 48_000), 48_000), settings).sample_rate == SR
    hi_res = settings.model_copy(update={"max_sample_rate": 192_000})
    assert decode_audio(data, hi_res).sample_rate == SR
    err = expect(
        ErrorCode.UNDECODABLE_AUDIO, decode_audio, data, settings.model_copy(update={"max_sample_rate": 96_000})
    )
    assert "192000 Hz" in err.message


def test_header_claiming_more_frames_than_present(settings: AudioSettings) -> None:
    """A data chunk size far beyond the file: the real length is reported, memory follows the data."""
    data = bytearray(encode_bytes(tone(1.5)))
    data_at = data.index(b"data")
    data[data_at + 4 : data_at + 8] = (0x7FFFFFF0).to_bytes(4, "little")
    data[4:8] = (0x7FFFFFF8).to_bytes(4, "little")  # RIFF size to match
    song = decode_audio(bytes(data), settings)
    assert song.duration_s == pytest.approx(1.5) and not song.truncated


def test_many_channels_are_mixed_block_by_block(settings: AudioSettings) -> None:
    x = tone(1.0)
    song = decode_audio(encode_bytes(np.stack([x] * 64, axis=1), subtype="FLOAT"), settings)
    np.testing.assert_allclose(song.waveform, x, atol=1e-6)


@pytest.mark.parametrize(
    ("fmt", "subtype"), [("AU", "PCM_16"), ("CAF", "PCM_16"), ("W64", "PCM_16"), ("NIST", "PCM_16")]
)
def test_only_common_containers_reach_libsndfile(settings: AudioSettings, fmt: str, subtype: str) -> None:
    err = expect(ErrorCode.UNDECODABLE_AUDIO, decode_audio, encode_bytes(tone(1.0), fmt=fmt, subtype=subtype), settings)
    assert "not WAV, FLAC, OGG, MP3 or AIFF" in err.message
    aiff = encode_bytes(tone(1.0), fmt="AIFF", subtype="PCM_16")
    assert decode_audio(aiff, settings).waveform.shape == (SR,)


def test_absurd_float_samples_are_refused(settings: AudioSettings) -> None:
    x = np.stack([np.full(SR * 2, 3e38, np.float32), np.full(SR * 2, 3e38, np.float32)], axis=1)
    song = decode_audio(encode_bytes(x, subtype="FLOAT"), settings)  # finite: the mix does not overflow
    assert np.isfinite(song.waveform).all()
    x[5, 0], x[5, 1] = np.inf, -np.inf
    expect(ErrorCode.UNDECODABLE_AUDIO, decode_audio, encode_bytes(x, subtype="FLOAT"), settings)


# --------------------------------------------------------------------------------------
# Segmenting
# --------------------------------------------------------------------------------------


def test_segments_are_not_padded() -> None:
    x = np.arange(70 * SR, dtype=np.float32)
    segs = segment_waveform(x, SR, 30.0)
    assert [s.shape[0] for s in segs] == [30 * SR, 30 * SR, 10 * SR]
    np.testing.assert_array_equal(np.concatenate(segs), x)


def test_segments_exact_multiple_and_short_song() -> None:
    assert [s.shape[0] for s in segment_waveform(np.zeros(60 * SR, np.float32), SR, 30.0)] == [30 * SR] * 2
    assert [s.shape[0] for s in segment_waveform(np.zeros(5 * SR, np.float32), SR, 30.0)] == [5 * SR]
    assert segment_waveform(np.zeros(0, np.float32), SR, 30.0) == []


def test_tiny_tail_is_dropped_only_with_other_segments() -> None:
    segs = segment_waveform(np.zeros(30 * SR + 399, np.float32), SR, 30.0)
    assert [s.shape[0] for s in segs] == [30 * SR]
    segs = segment_waveform(np.zeros(30 * SR + 400, np.float32), SR, 30.0)
    assert [s.shape[0] for s in segs] == [30 * SR, 400]
    assert [s.shape[0] for s in segment_waveform(np.zeros(300, np.float32), SR, 30.0)] == [300]


def test_segment_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        segment_waveform(np.zeros((2, 100), np.float32), SR, 30.0)
    with pytest.raises(ValueError):
        segment_waveform(np.zeros(100, np.float32), SR, 1e-9)


# --------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------

WAV_BYTES = encode_bytes(tone(1.0))


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client gave up first (timeout tests)
            self.wfile.write(body)

    def _stream(self, chunk: bytes, pause_s: float, limit_s: float) -> None:
        """Send a close-delimited body (no Content-Length) until the client hangs up."""
        self.send_response(200)
        self.send_header("Content-Type", "audio/wav")
        self.end_headers()
        stop = time.monotonic() + limit_s
        try:
            while time.monotonic() < stop:
                self.wfile.write(chunk)
                self.wfile.flush()
                if pause_s:
                    time.sleep(pause_s)
        except OSError:
            pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/ok.wav":
            self._send(200, WAV_BYTES, {"Content-Type": "audio/wav"})
        elif path == "/missing.wav":
            self._send(404, b"not here")
        elif path == "/error.wav":
            self._send(500, b"boom")
        elif path == "/unavailable.wav":
            self._send(503, b"try later")
        elif path == "/throttled.wav":
            self._send(429, b"slow down")
        elif path == "/forbidden.wav":
            self._send(403, b"no")
        elif path == "/hangup.wav":  # announces a body, then hangs up halfway
            self._send(200, WAV_BYTES[:100], {"Content-Length": str(len(WAV_BYTES))})
        elif path == "/redirect.wav":
            self._send(302, b"", {"Location": "/ok.wav"})
        elif path == "/slow.wav":  # headers only after the client gave up
            time.sleep(1.5)
            self._send(200, WAV_BYTES)
        elif path == "/trickle.wav":  # every read is fast, the whole body is not
            self._stream(b"x" * 100, pause_s=0.05, limit_s=3.0)
        elif path == "/huge-declared.wav":
            self._send(200, b"x" * 10, {"Content-Length": str(10**9)})
        elif path == "/huge-stream.wav":
            self._stream(b"x" * 65536, pause_s=0.0, limit_s=3.0)
        else:
            self._send(404)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with loopback(_Handler) as url:
        yield url


@pytest.fixture
def http_settings() -> AudioSettings:
    # The test server listens on loopback, which production settings refuse (see test_security.py).
    return AudioSettings(fetch_timeout_s=0.5, max_bytes=200_000, allow_private_networks=True)


def test_http_ok(server: str, http_settings: AudioSettings) -> None:
    assert fetch_audio(f"{server}/ok.wav", http_settings) == WAV_BYTES
    song = load_song(f"{server}/ok.wav?sig=abc", http_settings)
    assert song.waveform.shape == (SR,)


@pytest.mark.parametrize(("path", "needle"), [("missing", "404"), ("error", "500")])
def test_http_errors(server: str, http_settings: AudioSettings, path: str, needle: str) -> None:
    uri = f"{server}/{path}.wav"
    err = expect(ErrorCode.HTTP_ERROR, fetch_audio, uri, http_settings)
    assert uri in err.message and needle in err.message


def test_http_redirects(server: str, http_settings: AudioSettings) -> None:
    assert fetch_audio(f"{server}/redirect.wav", http_settings) == WAV_BYTES
    no_redirects = http_settings.model_copy(update={"max_redirects": 0})
    uri = f"{server}/redirect.wav"
    err = expect(ErrorCode.HTTP_ERROR, fetch_audio, uri, no_redirects)
    assert uri in err.message and "302" in err.message and "redirect" in err.message


def test_http_connection_refused(http_settings: AudioSettings) -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}/a.wav"
    err = expect(ErrorCode.HTTP_ERROR, fetch_audio, uri, http_settings)
    assert uri in err.message


def test_http_timeouts(server: str, http_settings: AudioSettings) -> None:
    for path in ["slow", "trickle"]:
        uri = f"{server}/{path}.wav"
        start = time.monotonic()
        err = expect(ErrorCode.FETCH_TIMEOUT, fetch_audio, uri, http_settings)
        elapsed = time.monotonic() - start
        assert uri in err.message
        assert elapsed < 1.3, f"{path}: gave up after {elapsed:.2f} s"


def test_fetch_failures_are_transient_or_permanent(server: str, http_settings: AudioSettings) -> None:
    """Transient failures are retried by the worker before their dead letter; permanent ones are not."""
    import socket

    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}/a.wav"
    transient = {
        f"{server}/error.wav": ErrorCode.HTTP_ERROR,  # 500
        f"{server}/unavailable.wav": ErrorCode.HTTP_ERROR,  # 503
        f"{server}/throttled.wav": ErrorCode.HTTP_ERROR,  # 429
        f"{server}/hangup.wav": ErrorCode.HTTP_ERROR,  # the peer closed mid-body
        refused: ErrorCode.HTTP_ERROR,  # connection refused
        f"{server}/slow.wav": ErrorCode.FETCH_TIMEOUT,
        f"{server}/trickle.wav": ErrorCode.FETCH_TIMEOUT,
    }
    for uri, code in transient.items():
        assert expect(code, fetch_audio, uri, http_settings).transient, uri
    no_redirects = http_settings.model_copy(update={"max_redirects": 0})
    permanent = [
        (ErrorCode.HTTP_ERROR, f"{server}/missing.wav", http_settings),  # 404
        (ErrorCode.HTTP_ERROR, f"{server}/forbidden.wav", http_settings),  # 403
        (ErrorCode.HTTP_ERROR, f"{server}/redirect.wav", no_redirects),
        (ErrorCode.TOO_LARGE, f"{server}/huge-declared.wav", http_settings),
        (ErrorCode.FORBIDDEN_URI, f"{server}/ok.wav", AudioSettings()),  # loopback is refused by default
        (ErrorCode.UNSUPPORTED_URI_SCHEME, "ftp://example.org/a.wav", http_settings),
    ]
    for code, uri, cfg in permanent:
        assert not expect(code, fetch_audio, uri, cfg).transient, uri


def test_http_too_large(server: str, http_settings: AudioSettings) -> None:
    for path in ["huge-declared", "huge-stream"]:
        uri = f"{server}/{path}.wav"
        start = time.monotonic()
        err = expect(ErrorCode.TOO_LARGE, fetch_audio, uri, http_settings)
        assert uri in err.message
        assert time.monotonic() - start < 1.0  # aborted early, not after the server's 3 s


class _KeepAliveHandler(_Handler):
    protocol_version = "HTTP/1.1"  # a connection serves request after request (the module's server closes each)


@pytest.fixture
def counting_server() -> Iterator[CountingHTTPServer]:
    with serving(CountingHTTPServer(_KeepAliveHandler)) as httpd:
        yield httpd


def test_http_shares_a_client(counting_server: CountingHTTPServer, http_settings: AudioSettings) -> None:
    import httpx

    server = f"http://127.0.0.1:{counting_server.server_address[1]}"
    with AudioHTTPClient() as client:
        for _ in range(3):  # the pooled connection is reused across songs...
            assert fetch_audio(f"{server}/ok.wav", http_settings, client=client) == WAV_BYTES
        assert counting_server.accepted == 1
        # A redirect costs at most one more connection: fetch_audio leaves the 302's (empty) body
        # unread, so httpcore drops that connection instead of pooling it, and the next hop opens one.
        assert fetch_audio(f"{server}/redirect.wav", http_settings, client=client) == WAV_BYTES
        pooled = counting_server.accepted
        assert pooled <= 2
        for _ in range(2):  # the connection that served the redirect's target serves the next songs
            assert fetch_audio(f"{server}/ok.wav", http_settings, client=client) == WAV_BYTES
        assert counting_server.accepted == pooled
        # The shared client still applies each call's policy: loopback is refused by default.
        expect(ErrorCode.FORBIDDEN_URI, fetch_audio, f"{server}/ok.wav", AudioSettings(), client=client)
        # Outside fetch_audio it connects nowhere, since nothing vets the address there.
        with pytest.raises(httpx.ConnectError):
            client.get(f"{server}/ok.wav")
        assert counting_server.accepted == pooled  # neither refusal opened a connection
    # Without a shared client each song opens (and closes) its own connection.
    for n in (1, 2):
        assert fetch_audio(f"{server}/ok.wav", http_settings) == WAV_BYTES
        assert counting_server.accepted == pooled + n
    # A plain httpx client would connect wherever DNS points: it is not accepted.
    with httpx.Client() as plain, pytest.raises(TypeError):
        fetch_audio(f"{server}/ok.wav", http_settings, client=plain)  # type: ignore[arg-type]
    assert counting_server.accepted == pooled + 2


def test_display_uri_hides_secrets() -> None:
    shown = display_uri("https://user:hunter2@example.com/a.wav?X-Amz-Signature=abc")
    assert "hunter2" not in shown and "abc" not in shown
    assert shown.startswith("https://user:***@example.com/a.wav?")
    assert display_uri("file:///tmp/a.wav") == "file:///tmp/a.wav"
