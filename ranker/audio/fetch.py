"""Turning an ``audio_uri`` into bytes, refusing whatever it must not reach.

``audio_uri`` comes from whoever can publish to ``songs.generated``, so this is the
service's main attack surface (see ``docs/security.md``):

* ``http(s)://``: every hop (redirects are followed by hand, up to ``max_redirects``) is
  checked for scheme, credentials and ``allowed_hosts``; the connection itself goes
  through :mod:`ranker.audio.transport`, which resolves the host once, lets it reach only
  public addresses (unless ``allow_private_networks``) and never looks it up again (no
  DNS rebinding). ``fetch_timeout_s`` is one deadline for the whole fetch: DNS, connect,
  TLS, headers, every redirect and the body.
* ``file://``: local paths only, confined to ``file_root`` when set, regular files only
  (FIFOs and devices are refused without being opened), read with a byte cap.

Messages name the URI and the failure, never the content: no bytes of a file or body,
no exact size of a local file, no heap address (library error text goes through
:func:`~ranker.audio.decode.safe_error_text`). They end up in logs and on the dead-letter
topic, where whoever published the URI can read them.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import stat
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

from ranker.audio.decode import DecodedAudio, decode_audio, safe_error_text
from ranker.audio.transport import _CURRENT, AudioHTTPClient, _Fetch, _vet_addresses
from ranker.errors import ConfigError, ErrorCode, InputError
from ranker.retry_after import retry_after_s
from ranker.settings import AudioSettings

__all__ = ["check_file_policy", "display_uri", "fetch_audio", "load_song", "transient_status"]

#: The package's name, as before the split: logging configuration and filters name it.
log = logging.getLogger("ranker.audio")

#: Schemes this module knows how to fetch; ``AudioSettings.allowed_schemes`` narrows them.
KNOWN_SCHEMES = frozenset({"file", "http", "https"})
HTTP_SCHEMES = frozenset({"http", "https"})

#: Redirect statuses that are followed (as GET); any other 3xx is an error.
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

# -- transient or permanent: the one place fetch failures are classified ------------------
# A transient failure may pass if the same URI is fetched again later: the worker retries it
# with backoff before its dead letter. Everything else (4xx, a forbidden or malformed URI, a
# bad redirect, a body over the limit) would fail the same way again and is dead-lettered at once.

#: Statuses besides 5xx that say "not now" rather than "not this URI": a request timeout, throttling.
TRANSIENT_STATUSES = frozenset({408, 429})

#: Transport failures that say nothing about the URI: timeouts, refused or reset connections,
#: a resolver that did not answer, a peer that hung up mid-response.
TRANSIENT_TRANSPORT_ERRORS: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)


def transient_status(status: int) -> bool:
    """Is an HTTP error status worth retrying later (5xx, 408, 429)?"""
    return status in TRANSIENT_STATUSES or 500 <= status <= 599


def display_uri(uri: str) -> str:
    """The URI as error messages show it: password and query values hidden.

    Presigned URLs carry credentials in the query string, and messages end up in logs
    and on the dead-letter topic, so only the query's presence is shown.
    """
    try:
        parts = urlsplit(uri)
        netloc = parts.netloc
        if parts.password is not None:
            netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    except ValueError:
        return uri
    query = "<redacted>" if parts.query else ""
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def fetch_audio(uri: str, settings: AudioSettings, *, client: AudioHTTPClient | None = None) -> bytes:
    """Return the raw bytes behind ``uri`` (``file://``, ``http://`` or ``https://``).

    ``client`` lets a worker reuse one connection pool across songs; it must be an
    :class:`AudioHTTPClient` (a plain ``httpx.Client`` would connect wherever DNS says).
    Without it a short-lived one is made per call.
    """
    shown = display_uri(uri)
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise InputError(
            ErrorCode.UNSUPPORTED_URI_SCHEME, f"{shown!r} is not a valid URI: {safe_error_text(exc)}"
        ) from exc
    scheme = parts.scheme.lower()
    allowed = {s.lower() for s in settings.allowed_schemes} & KNOWN_SCHEMES
    if scheme not in allowed:
        what = f"scheme {scheme!r}" if scheme else "no scheme"
        raise InputError(
            ErrorCode.UNSUPPORTED_URI_SCHEME,
            f"{shown!r} has {what}; allowed schemes are {sorted(allowed)}",
        )
    if scheme == "file":
        return _fetch_file(shown, parts.netloc, parts.path, settings)
    return _fetch_http(uri, settings, client)


# -- file:// ---------------------------------------------------------------------------

#: Set once the "file:// without a root" warning has been logged (start-up or first read).
_warned_unconfined = False


def check_file_policy(settings: AudioSettings, dev_mode: bool) -> None:
    """Refuse to start with ``file://`` allowed and no ``file_root``, outside development.

    Without a root a producer may name any file the worker can read (only regular files,
    and their bytes never come back, but existence and decodability do). The worker calls
    this at start-up; in ``dev_mode`` (the demo, tests) it warns once instead.
    """
    global _warned_unconfined
    if "file" not in {s.lower() for s in settings.allowed_schemes} or settings.file_root is not None:
        return
    if not dev_mode:
        raise ConfigError(
            "audio.allowed_schemes includes 'file' but audio.file_root is not set, so a producer could "
            "name any file the worker can read. Set audio.file_root (APEXRANK_AUDIO__FILE_ROOT) to the "
            "shared audio volume, or drop 'file' from audio.allowed_schemes (APEXRANK_AUDIO__ALLOWED_SCHEMES). "
            "For development only, APEXRANK_DEV_MODE=1 allows it with a warning."
        )
    if not _warned_unconfined:
        _warned_unconfined = True
        log.warning(
            "dev_mode: file:// audio URIs may name any file this process can read (no audio.file_root); "
            "outside dev_mode the worker refuses to start like this"
        )


def _fetch_file(shown: str, netloc: str, raw_path: str, settings: AudioSettings) -> bytes:
    """Read a local regular file, confined to ``file_root`` when it is set.

    Non-regular files are refused from ``stat`` alone, before any ``open``: opening a
    FIFO blocks until a writer comes and opening some devices has side effects. The file
    is then opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked again through its
    descriptor, so swapping it for a symlink or FIFO after the checks does not help.
    """
    global _warned_unconfined
    if netloc.lower() not in ("", "localhost"):
        raise InputError(ErrorCode.FORBIDDEN_URI, f"{shown!r} names host {netloc!r}; only local files are read")
    path = unquote(raw_path)
    if not path or not os.path.isabs(path):
        raise InputError(ErrorCode.FORBIDDEN_URI, f"{shown!r} must name an absolute path (file:///abs/path)")
    try:
        real = Path(os.path.realpath(path))
    except (ValueError, OSError) as exc:  # e.g. an embedded NUL byte
        raise InputError(ErrorCode.FORBIDDEN_URI, f"{shown!r} is not a usable path: {safe_error_text(exc)}") from exc
    root: Path | None = None
    if settings.file_root is not None:
        root = Path(os.path.realpath(settings.file_root))
        # Checked before existence so that probing outside the root reveals nothing.
        if not real.is_relative_to(root):
            raise InputError(ErrorCode.FORBIDDEN_URI, f"{shown!r} resolves outside the allowed root {root}")
    elif not _warned_unconfined:
        _warned_unconfined = True
        log.warning(
            "file:// audio URIs may name any file this process can read: set audio.file_root "
            "(APEXRANK_AUDIO__FILE_ROOT) or drop 'file' from audio.allowed_schemes in production"
        )
    try:
        st = os.stat(real)
    except FileNotFoundError as exc:
        raise InputError(ErrorCode.FILE_NOT_FOUND, f"{shown!r}: no such file") from exc
    except OSError as exc:
        raise InputError(ErrorCode.FILE_NOT_FOUND, f"{shown!r} cannot be read: {exc.strerror or exc}") from exc
    _check_regular(shown, st.st_mode)
    if st.st_size > settings.max_bytes:  # the size itself is not shown: it says something about the file
        raise InputError(ErrorCode.TOO_LARGE, f"{shown!r} is over the limit of {settings.max_bytes} bytes")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(real, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # became a symlink, or is a socket
            raise InputError(ErrorCode.FORBIDDEN_URI, f"{shown!r} changed while being opened") from exc
        raise InputError(ErrorCode.FILE_NOT_FOUND, f"{shown!r} cannot be read: {exc.strerror or exc}") from exc
    try:
        _check_regular(shown, os.fstat(fd).st_mode)
        if root is not None:
            _check_fd_inside(shown, fd, root)
        return _read_capped(shown, fd, settings.max_bytes, st.st_size)
    except OSError as exc:
        raise InputError(ErrorCode.FILE_NOT_FOUND, f"{shown!r} cannot be read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def _check_regular(shown: str, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise InputError(ErrorCode.FILE_NOT_FOUND, f"{shown!r} is a directory, not a file")
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    raise InputError(ErrorCode.FORBIDDEN_URI, f"{shown!r} is {kind}, not a regular file; it is not read")


def _check_fd_inside(shown: str, fd: int, root: Path) -> None:
    """Where the kernel says the open file lives (Linux): defeats a directory swapped for a symlink."""
    try:
        opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return  # no procfs: the realpath check above stands alone
    if not opened.is_relative_to(root):
        raise InputError(ErrorCode.FORBIDDEN_URI, f"{shown!r} resolves outside the allowed root {root}")


def _read_capped(shown: str, fd: int, max_bytes: int, expected: int) -> bytes:
    """Read to EOF, at most ``max_bytes`` (the file may have grown since ``stat``).

    The first read asks for the ``expected`` size, so a file that did not change is read
    into one ``bytes`` object and never copied again (joining one chunk returns it).
    """
    chunks: list[bytes] = []
    total = 0
    first = min(max(expected, 0), max_bytes) + 1
    while True:
        chunk = os.read(fd, min(first if not chunks else 1 << 20, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise InputError(ErrorCode.TOO_LARGE, f"{shown!r} is over the limit of {max_bytes} bytes")


# -- http(s):// ------------------------------------------------------------------------


def _host_allowed(url: httpx.URL, allowed_hosts: list[str]) -> bool:
    """``allowed_hosts`` entries are exact names or ``*.suffix`` (subdomains only); empty allows all."""
    if not allowed_hosts:
        return True
    names = {url.host.lower().rstrip("."), url.raw_host.decode("ascii", "replace").lower().rstrip(".")}
    for entry in allowed_hosts:
        pattern = entry.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")
        if pattern.startswith("*."):
            suffix = pattern[1:]
            if any(name.endswith(suffix) and len(name) > len(suffix) for name in names):
                return True
        elif pattern and pattern in names:
            return True
    return False


def _checked_http_url(target: str, settings: AudioSettings, shown: str, *, base: httpx.URL | None = None) -> httpx.URL:
    """Parse and check one hop (the URI itself, or a redirect's ``Location`` against ``base``)."""
    hop = "" if base is None else f" redirected to {display_uri(target)!r}, which"
    try:
        url = httpx.URL(target) if base is None else base.join(target)
        # httpx decodes an IDNA host only when asked: a malformed A-label ("xn--") raises here, not later.
        host = url.host
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise InputError(ErrorCode.HTTP_ERROR, f"{shown!r}{hop} is not a valid URL: {safe_error_text(exc)}") from exc
    allowed = {s.lower() for s in settings.allowed_schemes} & HTTP_SCHEMES
    if url.scheme not in allowed:
        raise InputError(
            ErrorCode.FORBIDDEN_URI, f"{shown!r}{hop} has scheme {url.scheme!r}; only {sorted(allowed)} are fetched"
        )
    if base is not None and base.scheme == "https" and url.scheme != "https":
        raise InputError(ErrorCode.FORBIDDEN_URI, f"{shown!r}{hop} downgrades https to {url.scheme}")
    if url.userinfo:
        raise InputError(
            ErrorCode.FORBIDDEN_URI,
            f"{shown!r}{hop} carries credentials (user:password@); they are refused, not stripped",
        )
    if not host:
        raise InputError(ErrorCode.FORBIDDEN_URI, f"{shown!r}{hop} has no host")
    if not _host_allowed(url, settings.allowed_hosts):
        raise InputError(ErrorCode.FORBIDDEN_URI, f"{shown!r}{hop} names host {host!r}, not in allowed_hosts")
    with contextlib.suppress(ValueError):  # an address literal: refuse before connecting
        _vet_addresses(host, [ipaddress.ip_address(host)], settings, shown)
    return url


_REQUEST_HEADERS = {
    # Audio is compressed already; refusing content codings rules out decompression bombs.
    "Accept-Encoding": "identity",
    "User-Agent": "apexrank-audio-fetch",
}


def _fetch_http(uri: str, settings: AudioSettings, client: AudioHTTPClient | None) -> bytes:
    """Fetch with redirects followed by hand, a byte cap and one deadline for everything."""
    if client is not None and not isinstance(client, AudioHTTPClient):
        raise TypeError(f"client must be an AudioHTTPClient (vets every address), not {type(client).__name__}")
    shown = display_uri(uri)
    timeout_s = settings.fetch_timeout_s
    fetch = _Fetch(settings=settings, deadline=time.monotonic() + timeout_s, shown=shown)
    url = _checked_http_url(uri, settings, shown)
    http = client or AudioHTTPClient(max_connections=2)
    token = _CURRENT.set(fetch)
    try:
        for hop in range(settings.max_redirects + 1):
            left = max(fetch.deadline - time.monotonic(), 1e-3)
            request_timeout = httpx.Timeout(min(timeout_s, left), pool=left)
            with http.stream("GET", url, headers=_REQUEST_HEADERS, timeout=request_timeout) as resp:
                status = resp.status_code
                if status in REDIRECT_STATUSES:
                    where = resp.headers.get("location")
                    if where is None:
                        raise InputError(ErrorCode.HTTP_ERROR, f"{shown!r} answered HTTP {status} with no Location")
                    if hop == settings.max_redirects:
                        raise InputError(
                            ErrorCode.HTTP_ERROR,
                            f"{shown!r} answered HTTP {status} redirecting to {display_uri(where)!r}; "
                            f"more than {settings.max_redirects} redirects are not followed: publish the final URL",
                        )
                    url = _checked_http_url(where, settings, shown, base=url)
                    continue
                return _read_body(shown, resp, settings, fetch.deadline)
        raise AssertionError("unreachable: the loop returns or raises")
    except httpx.TimeoutException as exc:
        raise InputError(
            ErrorCode.FETCH_TIMEOUT,
            f"{shown!r} timed out after {timeout_s:g} s ({type(exc).__name__}: {safe_error_text(exc)})",
            transient=True,
        ) from exc
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, UnicodeError) as exc:
        # A server's reply is quoted by h11 when it is not HTTP ("illegal header line: b'...'"). UnicodeError:
        # httpx decodes a redirect's host before we see it, and idna refuses a malformed one ("xn--").
        raise InputError(
            ErrorCode.HTTP_ERROR,
            f"{shown!r} could not be fetched: {type(exc).__name__}: {safe_error_text(exc)}",
            transient=isinstance(exc, TRANSIENT_TRANSPORT_ERRORS),
        ) from exc
    finally:
        _CURRENT.reset(token)
        if client is None:
            http.close()


def _read_body(shown: str, resp: httpx.Response, settings: AudioSettings, deadline: float) -> bytes:
    status = resp.status_code
    if status >= 300:
        transient = transient_status(status)
        raise InputError(
            ErrorCode.HTTP_ERROR,
            f"{shown!r} answered HTTP {status} {resp.reason_phrase}",
            transient=transient,
            retry_after_s=retry_after_s(resp.headers.get("retry-after")) if transient else None,
        )
    coding = resp.headers.get("content-encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        raise InputError(
            ErrorCode.HTTP_ERROR, f"{shown!r} answered with Content-Encoding {coding!r} although identity was asked"
        )
    length = resp.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > settings.max_bytes:
        raise InputError(
            ErrorCode.TOO_LARGE,
            f"{shown!r} announces {int(length)} bytes, over the limit of {settings.max_bytes}",
        )
    buf = bytearray()
    for chunk in resp.iter_raw():  # as received; every socket read is clamped to the deadline
        buf += chunk
        if len(buf) > settings.max_bytes:
            raise InputError(ErrorCode.TOO_LARGE, f"{shown!r} sent more than the limit of {settings.max_bytes} bytes")
        if time.monotonic() > deadline:
            raise InputError(
                ErrorCode.FETCH_TIMEOUT,
                f"{shown!r} took longer than {settings.fetch_timeout_s:g} s to download ({len(buf)} bytes so far)",
                transient=True,
            )
    return bytes(buf)


def load_song(uri: str, settings: AudioSettings, *, client: AudioHTTPClient | None = None) -> DecodedAudio:
    """Fetch and decode one song; decode errors name the URI too."""
    data = fetch_audio(uri, settings, client=client)
    try:
        return decode_audio(data, settings)
    except InputError as exc:
        raise InputError(exc.code, f"{display_uri(uri)!r}: {exc.message}") from exc
