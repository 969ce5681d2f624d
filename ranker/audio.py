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
no more than a ten-minute one.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
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
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import httpcore
import httpx
import numpy as np
import soundfile as sf

from ranker.errors import ErrorCode, InputError
from ranker.settings import AudioSettings

__all__ = [
    "AudioHTTPClient",
    "DecodedAudio",
    "decode_audio",
    "display_uri",
    "fetch_audio",
    "load_song",
    "segment_waveform",
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
        return _fetch_file(shown, parts.netloc, parts.path, settings)
    return _fetch_http(uri, settings, client)


# -- file:// ---------------------------------------------------------------------------

_warned_unconfined = False


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
        raise InputError(ErrorCode.FORBIDDEN_URI, f"{shown!r} is not a usable path: {exc}") from exc
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
    if st.st_size > settings.max_bytes:
        raise InputError(
            ErrorCode.TOO_LARGE, f"{shown!r} is {st.st_size} bytes, over the limit of {settings.max_bytes}"
        )
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
        return _read_capped(shown, fd, settings.max_bytes)
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


def _read_capped(shown: str, fd: int, max_bytes: int) -> bytes:
    """Read to EOF, at most ``max_bytes`` (the file may have grown since ``stat``)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
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
        ("::/96", "IPv4-compatible IPv6"),
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
        raise InputError(ErrorCode.HTTP_ERROR, f"{shown!r}{hop} is not a valid URL: {exc}") from exc
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
            ErrorCode.FETCH_TIMEOUT, f"{shown!r} timed out after {timeout_s:g} s ({type(exc).__name__}: {exc})"
        ) from exc
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
        raise InputError(ErrorCode.HTTP_ERROR, f"{shown!r} could not be fetched: {type(exc).__name__}: {exc}") from exc
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
# Decoding
# --------------------------------------------------------------------------------------

#: Samples (frames x channels) read from libsndfile at a time: memory follows the audio
#: actually decoded, never a frame count that a header merely claims.
_BLOCK_SAMPLES = 1 << 20
#: Largest sinc kernel (elements) that torchaudio may build when resampling.
_MAX_RESAMPLE_KERNEL = 1 << 21
#: Containers handed to libsndfile (``SoundFile.format`` names). libsndfile parses two
#: dozen more (CAF, AU, PAF, MAT, SD2, ...); untrusted bytes reach only these parsers.
ACCEPTED_FORMATS = frozenset({"WAV", "WAVEX", "RF64", "FLAC", "OGG", "MP3", "AIFF"})


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
            ErrorCode.UNDECODABLE_AUDIO,
            f"audio is not WAV, FLAC, OGG, MP3 or AIFF (starts with {bytes(data[:12])!r})",
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
            mono = _read_mono(snd, want, channels)
            n = mono.shape[0]
            if n < want:  # the data ended before the header said: its real length is known now
                total, known, more = n, True, False
            elif known:
                more = total > cap
            else:
                more = len(snd.read(frames=1, dtype="float32", always_2d=True)) > 0
    except (sf.LibsndfileError, sf.SoundFileError, RuntimeError, ValueError, TypeError, OverflowError) as exc:
        raise InputError(ErrorCode.UNDECODABLE_AUDIO, f"audio could not be decoded: {exc}") from exc
    if n == 0:
        raise InputError(ErrorCode.EMPTY_AUDIO, "audio has no samples")
    duration_s = (total if known else n) / sr
    if duration_s < settings.min_duration_s:
        raise InputError(
            ErrorCode.TOO_SHORT,
            f"audio lasts {duration_s:.3f} s, shorter than the minimum {settings.min_duration_s:g} s",
        )
    if not np.isfinite(mono).all():
        raise InputError(ErrorCode.UNDECODABLE_AUDIO, "audio contains non-finite samples (NaN or infinity)")
    with np.errstate(over="ignore"):
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


class _SeekableBytes(io.BytesIO):
    """``BytesIO`` that answers a seek before the start as ``lseek`` does: position unchanged.

    libsndfile seeks wherever a corrupt header points; ``BytesIO`` raises on a negative
    position, and soundfile's C callback can only swallow that and report position 0.
    """

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.tell(), io.SEEK_END: len(self.getbuffer())}.get(whence, 0)
        if base + offset < 0:
            return self.tell()
        return super().seek(offset, whence)


def _read_mono(snd: sf.SoundFile, want: int, channels: int) -> np.ndarray:
    """Up to ``want`` frames, averaged over channels one block at a time."""
    block = max(1, _BLOCK_SAMPLES // channels)
    parts: list[np.ndarray] = []
    got = 0
    while got < want:
        frames = snd.read(frames=min(block, want - got), dtype="float32", always_2d=True)
        if frames.shape[0] == 0:
            break
        if channels > 1:  # float64 sums: absurd float samples become inf/NaN only if they are; checked later
            with np.errstate(over="ignore", invalid="ignore"):
                parts.append(frames.mean(axis=1, dtype=np.float64).astype(np.float32))
        else:
            parts.append(frames[:, 0])
        got += frames.shape[0]
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _resample_kernel_size(orig: int, new: int) -> int:
    """Elements of torchaudio's sinc kernel for ``orig -> new`` (default filter width 6, rolloff 0.99)."""
    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    width = math.ceil(6 * o / (min(o, n) * 0.99))
    return n * (o + 2 * width)


def resample_rates(orig: int, new: int) -> tuple[int, int]:
    """The rates handed to torchaudio: exact when its kernel is small, else the nearest small ratio.

    torchaudio builds a ``(new/g) x (orig/g)`` kernel (g = gcd): 44,101 Hz -> 24 kHz would
    take about 18 GB and a minute. Standard rates are exact; odd ones are approximated by a
    ratio with a bounded denominator (a pitch error far below a cent).
    """
    if _resample_kernel_size(orig, new) <= _MAX_RESAMPLE_KERNEL:
        return orig, new
    for max_den in (1000, 300, 100, 30, 10, 1):
        ratio = Fraction(new, orig).limit_denominator(max_den)
        if ratio > 0 and _resample_kernel_size(ratio.denominator, ratio.numerator) <= _MAX_RESAMPLE_KERNEL:
            return ratio.denominator, ratio.numerator
    raise InputError(ErrorCode.UNDECODABLE_AUDIO, f"cannot resample {orig} Hz to {new} Hz at a bounded cost")


def _resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    import torch
    import torchaudio.functional as taf

    src, dst = resample_rates(orig, new)
    with torch.inference_mode():
        out = taf.resample(torch.from_numpy(np.ascontiguousarray(x)), src, dst)
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


def load_song(uri: str, settings: AudioSettings, *, client: AudioHTTPClient | None = None) -> DecodedAudio:
    """Fetch and decode one song; decode errors name the URI too."""
    data = fetch_audio(uri, settings, client=client)
    try:
        return decode_audio(data, settings)
    except InputError as exc:
        raise InputError(exc.code, f"{display_uri(uri)!r}: {exc.message}") from exc
