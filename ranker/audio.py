"""Fetching and decoding newly generated audio.

Everything that can go wrong with a song's audio raises :class:`~ranker.errors.InputError`
with a code that names the dead-letter reason and a message that names the URI, so a
bad song is parked and explained instead of retried forever.

``audio_uri`` comes from whoever can publish to ``songs.generated``, so fetching it is
this service's main attack surface (see ``docs/security.md``):

* ``http(s)://``: every hop (redirects are followed by hand, up to ``max_redirects``) is
  checked for scheme, credentials and ``allowed_hosts``; the host is resolved once, every
  address it resolves to must be public (unless ``allow_private_networks``), and the
  socket is opened to that vetted address, never to a second lookup (no DNS rebinding).
  ``fetch_timeout_s`` is one deadline for the whole fetch: DNS, connect, TLS, headers,
  every redirect and the body; each socket operation is clamped to what is left of it.
* ``file://``: local paths only, confined to ``file_root`` when set, regular files only
  (FIFOs and devices are refused without being opened), read with a byte cap.

Policy for long songs: only the first ``max_duration_s`` seconds are decoded and scored
(``DecodedAudio.truncated`` says so). Decoding stops there, so an hour-long upload costs
no more than a ten-minute one. Decoding lives in :mod:`ranker.decode` (re-exported here).

Messages name the URI and the failure, never the content: no bytes of a file or body,
no exact size of a local file, no heap address (library error text goes through
:func:`~ranker.decode.safe_error_text`). They end up in logs and on the dead-letter
topic, where whoever published the URI can read them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import math
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import httpcore
import httpx
import numpy as np

from ranker.decode import (
    ACCEPTED_FORMATS,
    DecodedAudio,
    decode_audio,
    resample,
    resample_rates,
    safe_error_text,
    sniff_format,
)
from ranker.errors import ConfigError, ErrorCode, InputError
from ranker.settings import AudioSettings

__all__ = [
    "ACCEPTED_FORMATS",
    "AudioHTTPClient",
    "DecodedAudio",
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

log = logging.getLogger(__name__)

#: Schemes this module knows how to fetch; ``AudioSettings.allowed_schemes`` narrows them.
KNOWN_SCHEMES = frozenset({"file", "http", "https"})
HTTP_SCHEMES = frozenset({"http", "https"})

#: MERT's receptive field (400 samples at 24 kHz): a shorter tail yields no full frame.
MIN_TAIL_S = 400 / 24_000

#: Redirect statuses that are followed (as GET); any other 3xx is an error.
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

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


# -- http(s):// : what may be reached -----------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Special-purpose ranges refused even where an older Python's ``is_global`` misses them.
_NON_PUBLIC_NETWORKS: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(net), why)
    for net, why in (
        ("0.0.0.0/8", "unspecified ('this network')"),
        ("100.64.0.0/10", "carrier-grade NAT (shared)"),
        ("192.0.0.0/24", "IETF protocol assignment"),
        ("192.88.99.0/24", "6to4 relay"),
        ("198.18.0.0/15", "benchmarking"),
        ("::/96", "IPv4-compatible IPv6"),  # after the checks for :: and ::1, which it contains
        ("::ffff:0:0/96", "IPv4-mapped IPv6"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard-only"),
        ("2001::/23", "IETF protocol assignment"),
        ("2001:db8::/32", "documentation"),
        ("fc00::/7", "unique-local"),
        ("fec0::/10", "site-local"),
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def non_public_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be fetched from by default (``None``: it is a public unicast address)."""
    if ip.is_loopback:
        return "loopback"
    if ip.is_unspecified:
        return "unspecified"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return "IPv4-mapped IPv6"
        # Addresses that embed an IPv4 one are judged by it (6to4, well-known NAT64 prefix).
        embedded = ip.sixtofour or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None:
            inner = non_public_reason(embedded)
            return f"{inner} (embedded in {ip})" if inner else None
    for net, why in _NON_PUBLIC_NETWORKS:
        if ip.version == net.version and ip in net:
            return why
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("non-global", not ip.is_global),
    )
    return next((why for why, hit in checks if hit), None)


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
    if not url.host:
        raise InputError(ErrorCode.FORBIDDEN_URI, f"{shown!r}{hop} has no host")
    if not _host_allowed(url, settings.allowed_hosts):
        raise InputError(ErrorCode.FORBIDDEN_URI, f"{shown!r}{hop} names host {url.host!r}, not in allowed_hosts")
    with contextlib.suppress(ValueError):  # an address literal: refuse before connecting
        _vet_addresses(url.host, [ipaddress.ip_address(url.host)], settings, shown)
    return url


def _vet_addresses(host: str, addresses: list[IPAddress], settings: AudioSettings, shown: str) -> None:
    if settings.allow_private_networks:
        return
    for ip in addresses:
        why = non_public_reason(ip)
        if why is not None:
            shown_ip = "" if str(ip) == host else f" resolves to {ip}, which"
            raise InputError(
                ErrorCode.FORBIDDEN_URI,
                f"{shown!r}: host {host!r}{shown_ip} is not public ({why}); only public addresses are "
                "fetched (audio.allow_private_networks is for development and tests)",
            )


# -- http(s):// : the guarded connection ----------------------------------------------


@dataclass(frozen=True)
class _Fetch:
    """The fetch in progress on this thread: its policy and its deadline."""

    settings: AudioSettings
    deadline: float
    shown: str


_CURRENT: ContextVar[_Fetch | None] = ContextVar("apexrank_audio_fetch", default=None)


def _clamp(timeout: float | None, expired: type[Exception]) -> float | None:
    """A socket operation's timeout, cut to what is left of the fetch's deadline."""
    fetch = _CURRENT.get()
    if fetch is None:
        return timeout
    left = fetch.deadline - time.monotonic()
    if left <= 0:
        raise expired(f"the fetch's deadline of {fetch.settings.fetch_timeout_s:g} s has passed")
    return left if timeout is None else min(timeout, left)


def _resolve(host: str, port: int, timeout: float | None) -> list[IPAddress]:
    """Resolve once, in a daemon thread so that a stuck resolver cannot outlive the deadline."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    result: list[Any] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the waiting thread
            result.append(exc)
        finally:
            done.set()

    threading.Thread(target=lookup, name="apexrank-dns", daemon=True).start()
    if not done.wait(timeout):
        raise httpcore.ConnectTimeout(f"resolving {host!r} took longer than the fetch's deadline")
    if isinstance(result[0], BaseException):
        exc = result[0]
        raise httpcore.ConnectError(f"cannot resolve {host!r}: {getattr(exc, 'strerror', None) or exc}")
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in result[0]:
        try:
            ip = ipaddress.ip_address(sockaddr[0])
        except ValueError as exc:  # not an IP socket address: nothing that can be vetted
            raise httpcore.ConnectError(f"{host!r} resolved to {sockaddr[0]!r}, not an IP address") from exc
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise httpcore.ConnectError(f"{host!r} has no address")
    return addresses


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read, write and TLS handshake is clamped to the fetch's deadline."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _clamp(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        tls = self._inner.start_tls(ssl_context, server_hostname, _clamp(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(tls)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _VettingBackend(httpcore.NetworkBackend):
    """httpcore's network layer with the SSRF check where the socket is opened.

    httpcore hands over the URL's host name; it is resolved here once, every address is
    vetted, and the socket connects to a vetted address literal, so no second lookup can
    rebind it. TLS still uses the name (SNI and certificate check), as does ``Host``.
    """

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        fetch = _CURRENT.get()
        if fetch is None:
            raise httpcore.ConnectError("AudioHTTPClient connects only inside fetch_audio, which vets addresses")
        addresses = _resolve(host, port, _clamp(timeout, httpcore.ConnectTimeout))
        _vet_addresses(host, addresses, fetch.settings, fetch.shown)
        failure: Exception = httpcore.ConnectError(f"{host!r} has no address")
        for ip in addresses:
            try:
                stream = self._inner.connect_tcp(
                    str(ip),
                    port,
                    timeout=_clamp(timeout, httpcore.ConnectTimeout),
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError as exc:
                failure = exc
                continue
            return _DeadlineStream(stream)
        raise failure

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("audio is never fetched over a unix socket")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


#: httpcore's exceptions and the httpx ones callers expect (subclasses first).
_HTTPX_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.ProxyError, httpx.ProxyError),
)


@contextlib.contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for core, mapped in _HTTPX_ERRORS:
            if isinstance(exc, core):
                raise mapped(str(exc)) from exc
        raise


class _ResponseStream(httpx.SyncByteStream):
    def __init__(self, response: httpcore.Response) -> None:
        self._response = response

    def __iter__(self) -> Iterator[bytes]:
        with _as_httpx_errors():
            yield from self._response.iter_stream()

    def close(self) -> None:
        with _as_httpx_errors():
            self._response.close()


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    """certifi's CAs, loaded once: building a context costs tens of ms, and one is safe to share."""
    return httpx.create_ssl_context(verify=True, trust_env=False)


class _VettingTransport(httpx.BaseTransport):
    """An httpx transport over httpcore pools that use :class:`_VettingBackend`.

    One pool per ``allow_private_networks`` value: a connection vetted under the lenient
    policy is never reused by a fetch under the strict one.
    """

    def __init__(self, verify: ssl.SSLContext | str | bool, max_connections: int) -> None:
        self._ssl_context = (
            _default_ssl_context() if verify is True else httpx.create_ssl_context(verify, trust_env=False)
        )
        self._max_connections = max_connections
        self._pools: dict[bool, httpcore.ConnectionPool] = {}
        self._lock = threading.Lock()

    def _pool(self) -> httpcore.ConnectionPool:
        fetch = _CURRENT.get()
        lenient = fetch is not None and fetch.settings.allow_private_networks
        with self._lock:
            if lenient not in self._pools:
                self._pools[lenient] = httpcore.ConnectionPool(
                    ssl_context=self._ssl_context,
                    max_connections=self._max_connections,
                    max_keepalive_connections=self._max_connections,
                    keepalive_expiry=5.0,
                    http1=True,
                    http2=False,
                    network_backend=_VettingBackend(),
                )
            return self._pools[lenient]

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _as_httpx_errors():
            response = self._pool().handle_request(core_request)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response),
            extensions=response.extensions,
        )

    def close(self) -> None:
        with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
        for pool in pools:
            pool.close()


class AudioHTTPClient(httpx.Client):
    """An ``httpx.Client`` whose connections go only to addresses :func:`fetch_audio` vetted.

    Share one across songs (and threads) to reuse connections. It ignores proxy and
    certificate environment variables (``trust_env=False``); ``verify`` takes a CA bundle
    or ``ssl.SSLContext`` for a private CA. Outside ``fetch_audio`` it refuses to connect.
    """

    def __init__(self, *, verify: ssl.SSLContext | str | bool = True, max_connections: int = 32) -> None:
        super().__init__(
            transport=_VettingTransport(verify, max_connections),
            trust_env=False,
            follow_redirects=False,
        )


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
        ) from exc
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
        # A server's reply is quoted by h11 when it is not HTTP ("illegal header line: b'...'").
        raise InputError(
            ErrorCode.HTTP_ERROR, f"{shown!r} could not be fetched: {type(exc).__name__}: {safe_error_text(exc)}"
        ) from exc
    finally:
        _CURRENT.reset(token)
        if client is None:
            http.close()


def _read_body(shown: str, resp: httpx.Response, settings: AudioSettings, deadline: float) -> bytes:
    status = resp.status_code
    if status >= 300:
        raise InputError(ErrorCode.HTTP_ERROR, f"{shown!r} answered HTTP {status} {resp.reason_phrase}")
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
            )
    return bytes(buf)


# --------------------------------------------------------------------------------------
# Segmenting and loading (decoding is in ranker/decode.py)
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


def load_song(uri: str, settings: AudioSettings, *, client: AudioHTTPClient | None = None) -> DecodedAudio:
    """Fetch and decode one song; decode errors name the URI too."""
    data = fetch_audio(uri, settings, client=client)
    try:
        return decode_audio(data, settings)
    except InputError as exc:
        raise InputError(exc.code, f"{display_uri(uri)!r}: {exc.message}") from exc
