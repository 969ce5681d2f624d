"""What a bad song can cost and reveal: clean error messages, the file:// start-up policy,
block-wise decoding and resampling.

Real files, a real local HTTP server and real decoding; no mocks. Run as a script
(``python -m tests.test_audio_limits``) to measure peak RSS of decoding a worst-case song
in a fresh process (the figures in ``docs/security.md``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import ranker.audio as audio
import ranker.audio.fetch as fetch
from ranker.audio import decode_audio, load_song
from ranker.errors import ConfigError, ErrorCode, InputError
from ranker.settings import AudioSettings
from tests.helpers import loopback

SR = 24_000
HEAP_ADDRESS = re.compile(r"0x[0-9a-f]{6,}", re.IGNORECASE)
SECRET = b"root:$6$secrethash.Xq9pLw2Zk$AbCdEfGh:19000:0:99999:7:::\nAWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI\n"
SECRET_PARTS = [b"root:$6$", b"secrethash", b"Xq9pLw2Zk", b"AWS_SECRET", b"wJalrXUtnFEMI"]
#: Secret text behind each accepted container's signature, so that it gets past the sniff
#: and into libsndfile, whose errors name the file object (and its address).
DISGUISES = [
    b"",
    b"RIFF\x24\x00\x00\x00WAVE",
    b"RIFF\xff\xff\xff\x7fWAVEfmt ",
    b"RF64\xff\xff\xff\xffWAVE",
    b"fLaC",
    b"OggS\x00\x02",
    b"FORM\x00\x00\x10\x00AIFF",
    b"ID3\x04\x00\x00\x00\x00\x00\x10",
    b"\xff\xfb\x90\x64",
]


def tone(seconds: float, sr: int = SR, freq: float = 440.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode_bytes(data: np.ndarray, sr: int = SR, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def assert_clean(err: InputError, *, also: list[bytes] | None = None) -> None:
    """No secret bytes (in any spelling a repr might use) and no heap address in the message."""
    for text in (err.message, str(err)):
        for part in [*SECRET_PARTS, *(also or [])]:
            assert part.decode("latin-1") not in text, text
            assert repr(part)[2:-1] not in text, text
        assert not HEAP_ADDRESS.search(text), text


# --------------------------------------------------------------------------------------
# Error messages name the failure, never the content
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", DISGUISES, ids=lambda p: repr(p[:4]))
def test_undecodable_file_messages_quote_no_content(tmp_path: Path, prefix: bytes) -> None:
    """A readable non-audio file (think /etc/shadow) that fails to decode is not quoted back."""
    path = tmp_path / "shadow"
    path.write_bytes(prefix + SECRET * 4)
    with pytest.raises(InputError) as info:
        load_song(path.as_uri(), AudioSettings())
    assert info.value.code in (ErrorCode.UNDECODABLE_AUDIO, ErrorCode.EMPTY_AUDIO, ErrorCode.TOO_SHORT)
    assert path.as_uri() in info.value.message  # it still names the URI
    assert_clean(info.value, also=[prefix[4:12]] if len(prefix) > 8 else None)


def test_too_large_file_message_gives_no_exact_size(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(SECRET * 100)
    size = path.stat().st_size
    with pytest.raises(InputError) as info:
        load_song(path.as_uri(), AudioSettings(max_bytes=1000))
    assert info.value.code == ErrorCode.TOO_LARGE
    assert str(size) not in info.value.message and "1000" in info.value.message  # the limit, not the size
    assert_clean(info.value)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = (b"RIFF\x24\x00\x00\x00WAVE" if self.path == "/disguised" else b"") + SECRET * 4
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with loopback(_Handler) as url:
        yield url


@pytest.mark.parametrize("path", ["/plain", "/disguised"])
def test_undecodable_http_body_is_not_quoted(server: str, path: str) -> None:
    with pytest.raises(InputError) as info:
        load_song(f"{server}{path}", AudioSettings(allow_private_networks=True, fetch_timeout_s=2.0))
    assert info.value.code == ErrorCode.UNDECODABLE_AUDIO
    assert_clean(info.value)


def test_safe_error_text_keeps_the_reason() -> None:
    assert audio.safe_error_text("illegal header line: bytearray(b'root:x:0:0')") == "illegal header line: <bytes>"
    text = audio.safe_error_text("Error opening <ranker.decode._SeekableBytes object at 0x7f3a2b1c9d40>: bad")
    assert text == "Error opening <object>: bad"
    assert audio.safe_error_text('b"\\x00secret" at 0x7ffdeadbeef0') == "<bytes> at <address>"
    assert audio.safe_error_text("couldn't read verb'ish") == "couldn't read verb'ish"
    assert len(audio.safe_error_text("x" * 10_000)) == 200


# --------------------------------------------------------------------------------------
# file:// without a root: refused at start-up outside development
# --------------------------------------------------------------------------------------


def test_file_policy_refuses_an_unconfined_file_scheme(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        audio.check_file_policy(AudioSettings(), dev_mode=False)
    message = str(info.value)
    for way_out in ["APEXRANK_AUDIO__FILE_ROOT", "APEXRANK_AUDIO__ALLOWED_SCHEMES", "APEXRANK_DEV_MODE=1"]:
        assert way_out in message
    with pytest.raises(ConfigError):  # the scheme matches whatever its case
        audio.check_file_policy(AudioSettings(allowed_schemes=["https", "FILE"]), dev_mode=False)
    # Either way out is enough.
    audio.check_file_policy(AudioSettings(file_root=tmp_path), dev_mode=False)
    audio.check_file_policy(AudioSettings(allowed_schemes=["http", "https"]), dev_mode=False)


def test_file_policy_warns_once_in_dev_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fetch, "_warned_unconfined", False)  # a fresh process, as far as the warning goes
    path = tmp_path / "a.wav"
    path.write_bytes(encode_bytes(tone(1.0)))
    with caplog.at_level(logging.WARNING, logger="ranker.audio"):
        audio.check_file_policy(AudioSettings(), dev_mode=True)
        audio.check_file_policy(AudioSettings(), dev_mode=True)
        audio.fetch_audio(path.as_uri(), AudioSettings())  # the first unconfined read: already said
    warnings = [r for r in caplog.records if r.name == "ranker.audio" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "file_root" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ranker.audio"):
        audio.check_file_policy(AudioSettings(file_root=tmp_path), dev_mode=True)
        audio.check_file_policy(AudioSettings(allowed_schemes=["https"]), dev_mode=False)
    assert caplog.records == []


# --------------------------------------------------------------------------------------
# Resampling block by block equals resampling the whole signal
# --------------------------------------------------------------------------------------

RATE_PAIRS = [(44_100, SR), (48_000, SR), (22_050, SR), (32_000, SR), (8_000, SR), (96_000, SR), (44_101, SR)]


def _whole(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    """The reference: torchaudio on the whole signal, at the rates decode_audio uses."""
    import torch
    import torchaudio.functional as taf

    src, dst = audio.resample_rates(orig, new)
    return taf.resample(torch.from_numpy(x), src, dst).numpy()


@pytest.mark.parametrize(("orig", "new"), RATE_PAIRS)
@pytest.mark.parametrize("length", [1, 2, 5, 1_001, 44_101, 250_003])
@pytest.mark.parametrize("block", [None, 997])
def test_blockwise_resample_matches_the_whole_signal(
    orig: int, new: int, length: int, block: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random audio and a sine, odd lengths; ``block`` makes blocks tiny so most outputs sit at a seam."""
    import ranker.audio.decode as decode

    if block is not None:
        monkeypatch.setattr(decode, "_RESAMPLE_BLOCK", block)
    rng = np.random.default_rng(length)
    noise = rng.uniform(-1.0, 1.0, length).astype(np.float32)
    sine = tone(length / orig, orig, freq=997.0, amp=0.9)
    for x in (noise, sine):
        got = audio.resample(x, orig, new)
        want = _whole(x, orig, new)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_resampling_a_long_signal_uses_many_blocks() -> None:
    """The default block really splits a song (a 48 kHz minute is dozens of convolutions)."""
    import ranker.audio.decode as decode

    x = tone(60.0, 48_000, freq=1234.5)
    taps = 2 + 2 * 13  # 48 kHz -> 24 kHz: o = 2, width = ceil(6 * 2 / 0.99)
    assert x.shape[0] / 2 > 20 * (decode._RESAMPLE_BLOCK // taps)
    np.testing.assert_allclose(audio.resample(x, 48_000, SR), _whole(x, 48_000, SR), rtol=0, atol=1e-5)
    assert audio.resample(x[:SR], SR, SR).shape == (SR,)  # same rate: unchanged


# --------------------------------------------------------------------------------------
# Decoding memory: one array at the source rate, one at 24 kHz, a fixed scratch
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 2])
def test_decode_holds_no_whole_signal_copies(channels: int) -> None:
    """Peak numpy allocation while decoding 100 s at 48 kHz: the two waveforms plus fixed scratch.

    The old code held the decoded blocks and their concatenation at once, then a float64
    square of the whole signal (about twice the source-rate signal on top of it).
    tracemalloc sees numpy's allocations, not torch's; torch only gets one block at a time.
    """
    sr, seconds = 48_000, 100.0
    x = tone(seconds, sr, freq=1000.0)
    data = encode_bytes(np.stack([x] * channels, axis=1) if channels > 1 else x, sr, subtype="FLOAT")
    source, output = x.nbytes, round(seconds * SR) * 4
    decode_audio(encode_bytes(tone(2.0, sr), sr), AudioSettings())  # imports torch, builds the kernel
    tracemalloc.start()
    try:
        song = decode_audio(data, AudioSettings())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert song.waveform.nbytes == output
    scratch = 20 << 20  # a read block, its float64 mix, the loudness block, a resampling block
    assert peak < source + output + scratch, f"peak {peak / 1e6:.1f} MB"


def test_unknown_frame_count_grows_to_the_real_length() -> None:
    """Streams without a frame count are read into a buffer grown in place, then trimmed."""
    from ranker.audio.decode import _read_mono

    x = np.stack([tone(3.3), tone(3.3, freq=660.0)], axis=1)
    data = encode_bytes(x, subtype="FLOAT")
    for want in (1, 1_000, 3 * SR, round(3.3 * SR), 10 * SR):
        with sf.SoundFile(io.BytesIO(data)) as snd:
            grown = _read_mono(snd, want, 2, known=False)
        assert grown.shape == (min(want, x.shape[0]),)
        np.testing.assert_allclose(grown, x[:want].mean(axis=1), atol=1e-7)
        assert grown.flags.owndata and grown.flags.c_contiguous


def test_header_lying_about_length_is_trimmed(tmp_path: Path) -> None:
    data = bytearray(encode_bytes(tone(1.5)))
    data_at = data.index(b"data")
    data[data_at + 4 : data_at + 8] = (0x7FFFFFF0).to_bytes(4, "little")
    data[4:8] = (0x7FFFFFF8).to_bytes(4, "little")
    song = decode_audio(bytes(data), AudioSettings())
    assert song.waveform.shape == (round(1.5 * SR),) and song.waveform.flags.owndata


# --------------------------------------------------------------------------------------
# Peak RSS of a worst-case song (a measurement, not a test): python -m tests.test_audio_limits
# --------------------------------------------------------------------------------------

_CHILD = r"""
import io, json, resource, sys, time
import numpy as np, soundfile as sf, torch
from ranker.audio import decode_audio
from ranker.settings import AudioSettings
torch.set_num_threads(int(sys.argv[3]))
cfg = AudioSettings(**json.loads(sys.argv[2]))
warm = io.BytesIO()
sf.write(warm, (0.3 * np.sin(np.arange(96_000) / 7)).astype(np.float32), 48_000, format="FLAC")
decode_audio(warm.getvalue(), cfg)  # libraries and allocator warmed up
data = open(sys.argv[1], "rb").read()
with open("/proc/self/statm") as f:
    before = int(f.read().split()[1]) * resource.getpagesize()
start = time.perf_counter()
song = decode_audio(data, cfg)
took = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"file_mb": len(data) / 1e6, "rss_before_mb": before / 1e6, "peak_rss_mb": peak / 1e6,
                  "delta_mb": (peak - before) / 1e6, "output_mb": song.waveform.nbytes / 1e6, "s": round(took, 2)}))
"""


def _write_song(path: Path, sr: int, channels: int, seconds: float) -> None:
    with sf.SoundFile(str(path), "w", sr, channels, format="FLAC", subtype="PCM_16") as f:
        block = sr * 10
        for i in range(round(seconds * sr) // block):
            t = (np.arange(block) + i * block) / sr
            y = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1234.5 * t)
            f.write((np.stack([y] * channels, axis=1) if channels > 1 else y).astype(np.float32))


def measure(directory: Path, threads: int = 2) -> dict[str, dict[str, float]]:
    """Peak RSS over the RSS just before ``decode_audio``, each case in a fresh process."""
    cases = {
        "600 s, 48 kHz stereo FLAC (defaults)": (48_000, 2, 600.0, {}),
        "1 h, 192 kHz mono FLAC (max_sample_rate 192000)": (192_000, 1, 3600.0, {"max_sample_rate": 192_000}),
    }
    results = {}
    for i, (name, (sr, channels, seconds, extra)) in enumerate(cases.items()):
        path = directory / f"song{i}.flac"
        if not path.exists():
            _write_song(path, sr, channels, seconds)
        run = subprocess.run(
            [sys.executable, "-c", _CHILD, str(path), json.dumps(extra), str(threads)],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        results[name] = json.loads(run.stdout)
    return results


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/apexrank-decode-memory")
    out.mkdir(parents=True, exist_ok=True)
    for case, figures in measure(out).items():
        print(f"{case}: {figures}")
