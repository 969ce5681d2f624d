"""Fetching and decoding newly generated audio: this service's main attack surface.

``audio_uri`` comes from whoever can publish to ``songs.generated``, so where it points
and every byte behind it are untrusted (see ``docs/security.md``). Hence three parts:

* :mod:`ranker.audio.fetch`: a ``file://`` or ``http(s)://`` URI to bytes, every hop checked;
* :mod:`ranker.audio.transport`: the HTTP client whose sockets reach only vetted public
  addresses, within one deadline;
* :mod:`ranker.audio.decode`: bytes to a mono waveform at a bounded cost, and its segments.

Everything that can go wrong with a song's audio raises :class:`~ranker.errors.InputError`
with a code that names the dead-letter reason and a message that names the URI (never
the content), so a bad song is parked and explained instead of retried forever.
"""

from ranker.audio.decode import (
    ACCEPTED_FORMATS,
    MIN_TAIL_S,
    DecodedAudio,
    decode_audio,
    resample,
    resample_rates,
    safe_error_text,
    segment_waveform,
    sniff_format,
)
from ranker.audio.fetch import (
    HTTP_SCHEMES,
    KNOWN_SCHEMES,
    REDIRECT_STATUSES,
    check_file_policy,
    display_uri,
    fetch_audio,
    load_song,
)
from ranker.audio.transport import AudioHTTPClient, IPAddress, non_public_reason

__all__ = [
    "ACCEPTED_FORMATS",
    "HTTP_SCHEMES",
    "KNOWN_SCHEMES",
    "MIN_TAIL_S",
    "REDIRECT_STATUSES",
    "AudioHTTPClient",
    "DecodedAudio",
    "IPAddress",
    "check_file_policy",
    "decode_audio",
    "display_uri",
    "fetch_audio",
    "load_song",
    "non_public_reason",
    "resample",
    "resample_rates",
    "safe_error_text",
    "segment_waveform",
    "sniff_format",
]
