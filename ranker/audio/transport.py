"""The HTTP client that fetches audio: sockets go only to vetted public addresses, within one deadline.

A plain ``httpx.Client`` connects wherever DNS says, and a second lookup may rebind a
name that was checked to an internal address. Here httpcore's network layer resolves
each host once, refuses every non-public address it resolves to (unless
``allow_private_networks``) and connects to the vetted address literal; every DNS
lookup, connect, TLS handshake, read and write is clamped to what is left of the
fetch's deadline (``fetch_timeout_s``). :mod:`ranker.audio.fetch` sets the fetch in
progress; outside it the client refuses to connect. See ``docs/security.md``.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from ranker.errors import ErrorCode, InputError
from ranker.settings import AudioSettings

__all__ = ["AudioHTTPClient", "IPAddress", "non_public_reason"]

# -- which addresses may be reached ------------------------------------------------------

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


# -- the fetch in progress ---------------------------------------------------------------


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
