"""Property-based fuzzing of what untrusted producers control: event bytes, audio bytes, URIs.

The contract under test: whatever the input, the only exception is an ``InputError``
with a code that names a dead-letter reason; no other exception, no hang, no crash.

Fixed profile (``apexrank-fuzz``): derandomized (the same examples on every run, so CI
is reproducible), no example database, a per-example deadline. The default budget
keeps the whole file under about 30 s on two cores; ``APEXRANK_FUZZ_EXAMPLES=N`` runs N
examples per test instead (e.g. 20000 for a long campaign; see docs/security.md).
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
import re
import struct
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, currently_in_test_context, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st

from ranker.audio import DecodedAudio, decode_audio, fetch_audio, non_public_reason
from ranker.errors import ErrorCode, InputError
from ranker.events import Engagement, SongGenerated
from ranker.settings import AudioSettings

settings.register_profile(
    "apexrank-fuzz",
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=2),
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
FUZZ = settings.get_profile("apexrank-fuzz")
_OVERRIDE = int(os.environ.get("APEXRANK_FUZZ_EXAMPLES", "0") or 0)


def event(what: str) -> None:
    """Tally an outcome in ``--hypothesis-show-statistics`` (a no-op outside a property test)."""
    if currently_in_test_context():
        hypothesis_event(what)


def budget(default: int) -> settings:
    """The profile with ``default`` examples, or the ``APEXRANK_FUZZ_EXAMPLES`` override."""
    return settings(FUZZ, max_examples=_OVERRIDE or default)


#: A generous hard stop per test for a long campaign; a hang fails instead of blocking CI.
HANG_GUARD = pytest.mark.timeout(max(120, _OVERRIDE // 5))

EVENT_CODES = {ErrorCode.INVALID_JSON, ErrorCode.INVALID_SCHEMA, ErrorCode.INVALID_CREATED_AT}
AUDIO_CODES = {ErrorCode.UNDECODABLE_AUDIO, ErrorCode.EMPTY_AUDIO, ErrorCode.TOO_SHORT, ErrorCode.SILENT_AUDIO}

# --------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------

VALID_SONG: dict[str, Any] = {
    "schema_version": 1,
    "song_id": "song-1",
    "audio_uri": "https://cdn.example.com/a.wav",
    "generator": "suno-v5",
    "created_at": "2026-05-01T12:00:00Z",
    "title": "t",
    "tags": ["pop"],
    "prompt": "p",
    "duration_s": 3.5,
    "metadata": {"k": [1, 2]},
}
VALID_ENGAGEMENT: dict[str, Any] = {
    "schema_version": 1,
    "event_id": "e-1",
    "song_id": "song-1",
    "user_id": "u",
    "type": "like",
    "ts": "2026-05-01T12:00:00+02:00",
    "feed": "cold-start",
    "position": 3,
}

#: Any character, lone surrogates included (JSON can spell them as \\udXXX escapes).
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    any_text,
    st.sampled_from(["", "1", "2026-05-01T12:00:00Z", "2026-05-01", "file:///x", "http://", "like", "a" * 200]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(any_text, inner, max_size=4)),
    max_leaves=20,
)


def dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def mutated_event(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    """A valid event with fields dropped, replaced by any JSON value, or added."""
    event = dict(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["drop", "replace", "add"]))
        key = draw(st.sampled_from(sorted(base)))
        if op == "drop":
            event.pop(key, None)
        elif op == "replace":
            event[key] = draw(json_values)
        else:
            event[draw(any_text)] = draw(json_values)
    return dumps(event)


def check_parse(cls: type[SongGenerated] | type[Engagement], raw: bytes) -> None:
    try:
        parsed = cls.parse(raw)
    except InputError as exc:
        assert exc.code in EVENT_CODES, exc
        assert exc.message
        event(f"refused: {exc.code}")
        return
    assert isinstance(parsed, cls)
    event("accepted")


event_bytes = st.one_of(
    st.binary(max_size=512),
    json_values.map(dumps),
    st.lists(st.sampled_from([b"{", b"}", b"[", b"]", b'"', b":", b",", b"1", b"e9", b"\\u", b"null"])).map(b"".join),
)


@HANG_GUARD
@budget(600)
@given(raw=st.one_of(event_bytes, mutated_event(VALID_SONG)))
def test_song_generated_parse_never_crashes(raw: bytes) -> None:
    check_parse(SongGenerated, raw)


@HANG_GUARD
@budget(600)
@given(raw=st.one_of(event_bytes, mutated_event(VALID_ENGAGEMENT)))
def test_engagement_parse_never_crashes(raw: bytes) -> None:
    check_parse(Engagement, raw)


def test_valid_events_still_parse() -> None:
    """The generators' starting points are valid, so mutations explore near the schema."""
    assert SongGenerated.parse(dumps(VALID_SONG)).song_id == "song-1"
    assert Engagement.parse(dumps(VALID_ENGAGEMENT)).position == 3


# Pathological inputs found while writing these strategies. parse_event crashed on the
# first two (RecursionError, ValueError) until it moved to pydantic's own JSON parser.


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deep-nesting"),
        pytest.param(b'{"song_id": ' + b"1" * 5000 + b"}", id="int-over-4300-digits"),
        pytest.param(b'{"title": "\\ud800"}', id="lone-surrogate"),
    ],
)
def test_pathological_json_is_an_input_error(raw: bytes) -> None:
    with pytest.raises(InputError) as info:
        SongGenerated.parse(raw)
    assert info.value.code in EVENT_CODES


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"metadata": {"k": "é ✓ 𝄞", "n": 1, "x": 0.1, "big": 2**62, "nested": [None, True, {"a": -1.5e-300}]}},
        {"duration_s": 1e300, "title": 'tab\tnewline\nquote"', "tags": ["a", "b"]},
    ],
    ids=["plain", "unicode-and-numbers-in-metadata", "extreme-but-finite"],
)
def test_accepted_events_round_trip(extra: dict[str, Any]) -> None:
    """An accepted event must re-serialize to the same event (it is republished and logged)."""
    event = SongGenerated.parse(dumps(VALID_SONG | extra))
    assert SongGenerated.parse(event.to_bytes()) == event
    for key, value in extra.items():
        assert getattr(event, key) == value


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"duration_s": float("inf")}, "duration_s"),
        ({"duration_s": float("-inf")}, "duration_s"),
        ({"duration_s": float("nan")}, "duration_s"),
        ({"metadata": {"k": float("nan")}}, "metadata"),
        ({"metadata": {"k": float("inf")}}, "metadata"),
        ({"metadata": {"deep": [1, {"k": float("-inf")}]}}, "metadata"),
    ],
    ids=["inf-duration", "minus-inf-duration", "nan-duration", "nan-in-metadata", "inf-in-metadata", "nested-inf"],
)
def test_non_finite_numbers_are_refused(extra: dict[str, Any], field: str) -> None:
    """``Infinity``/``NaN`` (found by fuzzing) are refused: JSON cannot carry them back out."""
    with pytest.raises(InputError) as info:
        SongGenerated.parse(dumps(VALID_SONG | extra))
    assert info.value.code == ErrorCode.INVALID_SCHEMA and field in info.value.message


def test_a_lone_surrogate_is_refused() -> None:
    """A lone surrogate cannot be written back out as UTF-8: the event is refused as invalid JSON."""
    with pytest.raises(InputError) as info:
        SongGenerated.parse(dumps(VALID_SONG | {"metadata": {"k": "\ud800"}}))
    assert info.value.code == ErrorCode.INVALID_JSON


# --------------------------------------------------------------------------------------
# Audio decoding
# --------------------------------------------------------------------------------------

#: Short cap so that every example is cheap; 0 s minimum so that more inputs decode fully.
DECODE = AudioSettings(max_duration_s=2.0, min_duration_s=0.0)


def _encode(fmt: str, subtype: str | None, sr: int, channels: int, seconds: float) -> bytes:
    t = np.arange(round(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 440 * t)
    data = np.stack([x] * channels, axis=1) if channels > 1 else x
    buf = io.BytesIO()
    sf.write(buf, data.astype(np.float32), sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@cache
def seeds() -> tuple[bytes, ...]:
    """Small valid files, one per container and codec the worker accepts."""
    return (
        _encode("WAV", "PCM_16", 24_000, 1, 0.3),
        _encode("WAV", "FLOAT", 24_000, 2, 0.2),
        _encode("WAV", "PCM_U8", 8_000, 1, 0.3),
        _encode("WAVEX", "PCM_24", 48_000, 2, 0.1),
        _encode("RF64", "PCM_16", 24_000, 1, 0.2),
        _encode("FLAC", "PCM_16", 24_000, 1, 0.3),
        _encode("FLAC", "PCM_24", 44_100, 2, 0.2),
        _encode("OGG", "VORBIS", 24_000, 1, 0.3),
        _encode("OGG", "OPUS", 48_000, 1, 0.3),
        _encode("MP3", "MPEG_LAYER_III", 24_000, 1, 0.3),
        _encode("AIFF", "PCM_16", 22_050, 1, 0.2),
    )


INTERESTING_U32 = [0, 1, 2, 0x7F, 0x80, 0xFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 44_100, 10**9]


@st.composite
def mutated_audio(draw: st.DrawFn) -> bytes:
    """A valid file with header-biased byte flips, 32-bit field overwrites, splices and truncation."""
    data = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "u32", "u16", "insert", "delete", "truncate", "duplicate"]))
        # Three in four edits land in the first 128 bytes, where the headers are.
        hi = len(data) if draw(st.integers(0, 3)) == 0 else min(len(data), 128)
        if hi == 0:
            break
        pos = draw(st.integers(0, hi - 1))
        if op == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif op in ("u32", "u16"):
            value = draw(st.sampled_from(INTERESTING_U32) | st.integers(0, 0xFFFFFFFF))
            fmt = draw(st.sampled_from(["<", ">"])) + ("I" if op == "u32" else "H")
            packed = struct.pack(fmt, value & (0xFFFFFFFF if op == "u32" else 0xFFFF))
            data[pos : pos + len(packed)] = packed
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[pos:]
        else:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 256))] * draw(st.integers(1, 8))
    return bytes(data)


def check_decode(data: bytes) -> None:
    try:
        song = decode_audio(data, DECODE)
    except InputError as exc:
        assert exc.code in AUDIO_CODES, exc
        assert not re.search(r"0x[0-9a-fA-F]{6,}", exc.message), exc.message  # no heap addresses
        event(f"refused: {exc.code}")
        return
    event("decoded")
    assert isinstance(song, DecodedAudio)
    assert song.waveform.dtype == np.float32 and song.waveform.ndim == 1
    assert song.sample_rate == DECODE.sample_rate
    assert np.isfinite(song.waveform).all()
    assert song.waveform.shape[0] <= DECODE.max_duration_s * DECODE.sample_rate * 1.01 + 16


def test_seeds_decode() -> None:
    for data in seeds():
        check_decode(data)
        assert decode_audio(data, DECODE).waveform.shape[0] > 0


@HANG_GUARD
@budget(300)
@given(
    data=st.one_of(
        st.binary(max_size=4096),
        st.sampled_from([b"RIFF", b"fLaC", b"OggS", b"ID3", b"\xff\xfb"]).flatmap(
            lambda magic: st.binary(max_size=2048).map(lambda rest: magic + rest)
        ),
    )
)
def test_decode_arbitrary_bytes(data: bytes) -> None:
    check_decode(data)


@HANG_GUARD
@budget(800)
@given(data=mutated_audio())
def test_decode_mutated_files(data: bytes) -> None:
    check_decode(data)


# --------------------------------------------------------------------------------------
# URIs: file:// confinement and address vetting
# --------------------------------------------------------------------------------------

INSIDE = b"RIFF-inside-the-root"
SECRET = b"secret-outside-the-root"


@pytest.fixture(scope="module")
def file_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("fuzz-tree")
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (root / "in.wav").write_bytes(INSIDE)
    (root / "sub" / "in.wav").write_bytes(INSIDE)
    (base / "secret.wav").write_bytes(SECRET)
    (root / "out-link.wav").symlink_to(base / "secret.wav")
    (root / "out-dir").symlink_to(base, target_is_directory=True)
    return root


SEGMENTS = ["..", ".", "", "%2e%2e", "%2E.", ".%2e", "%2f", "..%2f", "%00", "%252e%252e", "sub", "in.wav"]
SEGMENTS += ["secret.wav", "out-link.wav", "out-dir", "root", "%c0%ae%c0%ae", "\\..", "..;", "~", "%"]
segments = st.sampled_from(SEGMENTS)


@HANG_GUARD
@budget(300)
@given(parts=st.lists(segments, min_size=1, max_size=8), host=st.sampled_from(["", "localhost", "LOCALHOST"]))
def test_file_uris_never_escape_the_root(file_tree: Path, parts: list[str], host: str) -> None:
    uri = f"file://{host}{file_tree}/" + "/".join(parts)
    try:
        data = fetch_audio(uri, AudioSettings(file_root=file_tree))
    except InputError as exc:
        assert exc.code in {ErrorCode.FORBIDDEN_URI, ErrorCode.FILE_NOT_FOUND}, exc
        return
    assert data == INSIDE, uri


PRIVATE_NETWORKS = ["10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"]
PRIVATE_NETWORKS += ["0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4", "fc00::/7", "fe80::/10", "ff00::/8", "::ffff:0:0/96"]


@budget(300)
@given(ip=st.one_of(*(st.ip_addresses(network=net) for net in PRIVATE_NETWORKS)))
def test_non_public_networks_are_always_refused(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    assert non_public_reason(ip) is not None
    mapped = ipaddress.IPv6Address(f"::ffff:{ip}") if ip.version == 4 else ip
    assert non_public_reason(mapped) is not None
    if ip.version == 4:  # 6to4 and NAT64 forms of it are judged by the address inside
        assert non_public_reason(ipaddress.IPv6Address((0x2002 << 112) | (int(ip) << 80))) is not None
        assert non_public_reason(ipaddress.IPv6Address(f"64:ff9b::{ip}")) is not None


@budget(300)
@given(uri=st.one_of(any_text, st.from_regex(r"\Ahttps?://[^/?#]{0,30}(/[^?#]{0,20})?\Z")))
def test_http_uri_checks_never_crash(uri: str) -> None:
    """URL parsing and vetting before any connection: only InputErrors, and never a connection."""
    from ranker.audio.fetch import _checked_http_url  # the pre-connection half of fetch_audio

    try:
        url = _checked_http_url(uri, AudioSettings(allowed_hosts=["*.example.com"]), uri)
    except InputError as exc:
        assert exc.code in {ErrorCode.FORBIDDEN_URI, ErrorCode.HTTP_ERROR}, exc
        return
    assert url.scheme in ("http", "https") and not url.userinfo
    assert url.host.rstrip(".").lower().endswith(".example.com")
