"""Fetching ``audio_uri`` safely: SSRF, DNS rebinding, redirects, deadlines and local file escapes.

Real servers on 127.0.0.1 (plain HTTP and, when ``openssl`` is there, HTTPS with a
certificate made for the test). Reaching them needs ``allow_private_networks=True``;
the refusal tests use the defaults, literal addresses and names such as ``localhost``,
so no network is needed. Where a test needs a name that resolves to a chosen address
(rebinding, SNI, a "public" first hop), ``socket.getaddrinfo`` is replaced for that name
only: everything else still goes through the real resolver and real sockets.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpcore
import numpy as np
import pytest
import soundfile as sf

import ranker.audio.fetch as audio
import ranker.audio.transport as transport
from ranker.audio import AudioHTTPClient, fetch_audio, non_public_reason
from ranker.errors import ErrorCode, InputError
from ranker.settings import AudioSettings
from tests.helpers import serving

SR = 24_000


def _wav() -> bytes:
    buf = io.BytesIO()
    t = np.arange(SR) / SR
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), SR, format="WAV")
    return buf.getvalue()


WAV = _wav()


def expect(code: ErrorCode, uri: str, settings: AudioSettings, **kw: Any) -> InputError:
    with pytest.raises(InputError) as info:
        fetch_audio(uri, settings, **kw)
    assert info.value.code == code, info.value
    return info.value


# --------------------------------------------------------------------------------------
# A real HTTP(S) server on loopback
# --------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so that connection reuse is exercised
    seen: list[dict[str, str]]  # request headers, per server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def _drip(self, head: bytes, pause_s: float = 0.2, limit_s: float = 10.0) -> None:
        """Write ``head``, then one byte every ``pause_s`` until the client hangs up."""
        stop = time.monotonic() + limit_s
        with contextlib.suppress(OSError):
            self.wfile.write(head)
            self.wfile.flush()
            while time.monotonic() < stop:
                time.sleep(pause_s)
                self.wfile.write(b"x")
                self.wfile.flush()

    def do_GET(self) -> None:
        self.seen.append({k.lower(): v for k, v in self.headers.items()} | {"path": self.path})
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        path = parts.path
        if path == "/ok.wav":
            self._send(200, WAV, {"Content-Type": "audio/wav"})
        elif path == "/host":
            self._send(200, self.headers.get("Host", "").encode())
        elif path == "/to":  # redirect to ?url=
            self._send(int(query.get("status", ["302"])[0]), b"", {"Location": query["url"][0]})
        elif path.startswith("/chain/"):  # /chain/N redirects N times, then serves the song
            n = int(path.rsplit("/", 1)[1])
            if n == 0:
                self._send(200, WAV, {"Content-Type": "audio/wav"})
            else:
                self._send(302, b"", {"Location": f"/chain/{n - 1}"})
        elif path == "/loop":
            self._send(302, b"", {"Location": "/loop"})
        elif path == "/drip-body":  # a byte every 0.2 s: no read ever times out
            self._drip(b"HTTP/1.1 200 OK\r\nContent-Type: audio/wav\r\nConnection: close\r\n\r\n")
        elif path == "/drip-headers":  # headers that never end
            self._drip(b"HTTP/1.1 200 OK\r\nX-Drip: ")
        elif path == "/stall":  # one byte of body, then silence longer than the deadline
            self._drip(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nx", pause_s=5.0, limit_s=5.0)
        elif path == "/gzip":
            self._send(200, b"\x1f\x8b" + b"\x00" * 20, {"Content-Encoding": "gzip"})
        else:
            self._send(404)


@contextlib.contextmanager
def _serve(tls: ssl.SSLContext | None = None) -> Iterator[tuple[str, list[dict[str, str]]]]:
    seen: list[dict[str, str]] = []
    handler = type("Handler", (_Handler,), {"seen": seen})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    with serving(httpd):
        yield f"{'https' if tls else 'http'}://127.0.0.1:{httpd.server_address[1]}", seen


@pytest.fixture(scope="module")
def http_server() -> Iterator[tuple[str, list[dict[str, str]]]]:
    with _serve() as served:
        yield served


@pytest.fixture
def server(http_server: tuple[str, list[dict[str, str]]]) -> str:
    return http_server[0]


@pytest.fixture
def port(server: str) -> int:
    return int(server.rsplit(":", 1)[1])


#: Development settings: loopback allowed, short deadline.
DEV = AudioSettings(allow_private_networks=True, fetch_timeout_s=1.0)
#: Production defaults with a short deadline.
PROD = AudioSettings(fetch_timeout_s=1.0)


# --------------------------------------------------------------------------------------
# Resolver and connection instrumentation
# --------------------------------------------------------------------------------------


class FakeDNS:
    """``socket.getaddrinfo`` for chosen names (successive answers; the last repeats); others are real."""

    def __init__(self, answers: dict[str, list[list[str]]], delay_s: float = 0.0) -> None:
        self.answers = answers
        self.delay_s = delay_s
        self.calls: dict[str, int] = {}
        self.real = socket.getaddrinfo

    def __call__(self, host: Any, port: Any, *args: Any, **kw: Any) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.answers:
            return self.real(host, port, *args, **kw)
        n = self.calls.get(name, 0)
        self.calls[name] = n + 1
        time.sleep(self.delay_s)
        ips = self.answers[name][min(n, len(self.answers[name]) - 1)]
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0))
            if ":" in ip
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in ips
        ]


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeDNS]:
    def install(answers: dict[str, list[list[str]]], delay_s: float = 0.0) -> FakeDNS:
        fake = FakeDNS(answers, delay_s)
        monkeypatch.setattr(socket, "getaddrinfo", fake)
        return fake

    return install


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Addresses that sockets are opened to; connections to anything but loopback fail at once."""
    seen: list[str] = []
    real = httpcore.SyncBackend.connect_tcp

    def connect_tcp(self: httpcore.SyncBackend, host: str, port: int, *args: Any, **kw: Any) -> Any:
        seen.append(host)
        if host not in ("127.0.0.1", "::1"):
            raise httpcore.ConnectError(f"test: no route to {host}")
        return real(self, host, port, *args, **kw)

    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", connect_tcp)
    return seen


# --------------------------------------------------------------------------------------
# Non-public addresses
# --------------------------------------------------------------------------------------

NON_PUBLIC = [
    "127.0.0.1",  # loopback
    "127.255.0.9",
    "10.1.2.3",  # private
    "172.16.5.4",
    "192.168.0.1",
    "169.254.169.254",  # link-local: cloud metadata
    "100.64.0.1",  # CGNAT
    "100.127.255.254",
    "0.0.0.0",  # unspecified
    "0.1.2.3",
    "224.0.0.1",  # multicast
    "239.255.255.250",
    "240.0.0.1",  # reserved
    "255.255.255.255",
    "192.0.0.8",
    "198.18.0.1",
    "[::1]",
    "[::]",
    "[fe80::1]",  # link-local
    "[fc00::1]",  # unique-local
    "[fd12:3456::1]",
    "[fec0::1]",  # site-local
    "[ff02::1]",  # multicast
    "[::ffff:127.0.0.1]",  # IPv4-mapped
    "[::ffff:8.8.8.8]",  # IPv4-mapped, even of a public address
    "[::127.0.0.1]",  # IPv4-compatible
    "[2002:7f00:1::1]",  # 6to4 of 127.0.0.1
    "[2002:a9fe:a9fe::1]",  # 6to4 of 169.254.169.254
    "[64:ff9b::a9fe:a9fe]",  # NAT64 of 169.254.169.254
    "[2001:db8::1]",  # documentation
]


@pytest.mark.parametrize("host", NON_PUBLIC)
def test_non_public_literal_addresses_are_refused_before_connecting(host: str, connects: list[str]) -> None:
    uri = f"http://{host}:8080/a.wav"
    err = expect(ErrorCode.FORBIDDEN_URI, uri, PROD)
    assert uri in err.message and "allow_private_networks" in err.message
    assert connects == []


@pytest.mark.parametrize(("host", "why"), [("[::1]", "loopback"), ("[::]", "unspecified"), ("127.0.0.1", "loopback")])
def test_ipv6_loopback_is_refused_as_loopback(port: int, host: str, why: str, connects: list[str]) -> None:
    """``::1`` and ``::`` lie inside ``::/96`` (IPv4-compatible) but are named for what they are."""
    err = expect(ErrorCode.FORBIDDEN_URI, f"http://{host}:{port}/ok.wav", PROD)
    assert f"is not public ({why})" in err.message and "IPv4-compatible" not in err.message
    assert connects == []


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "127.1", "0x7f.1", "0177.0.0.1"])
def test_odd_spellings_of_loopback_are_refused(host: str, connects: list[str]) -> None:
    """inet_aton's legacy forms reach the resolver, whose answer is what gets vetted (or fail to parse)."""
    with pytest.raises(InputError) as info:
        fetch_audio(f"http://{host}:8080/a.wav", PROD)
    err = info.value
    if err.code == ErrorCode.FORBIDDEN_URI:
        assert "127.0.0.1" in err.message and "loopback" in err.message
    else:  # httpx rejects a dotted quad with a leading zero outright
        assert err.code == ErrorCode.HTTP_ERROR and "not a valid URL" in err.message
    assert connects == []


@pytest.mark.parametrize("ip", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "64:ff9b::808:808"])
def test_public_addresses_pass(ip: str) -> None:
    assert non_public_reason(__import__("ipaddress").ip_address(ip)) is None


def test_public_address_is_connected_to(connects: list[str]) -> None:
    expect(ErrorCode.HTTP_ERROR, "http://93.184.216.34/a.wav", PROD)  # no route in the test
    assert connects == ["93.184.216.34"]


def test_name_resolving_to_loopback_is_refused(server: str, port: int, connects: list[str]) -> None:
    uri = f"http://localhost:{port}/ok.wav"
    err = expect(ErrorCode.FORBIDDEN_URI, uri, PROD)
    assert "'localhost' resolves to" in err.message and "loopback" in err.message
    assert connects == []
    assert fetch_audio(uri, DEV) == WAV  # the opt-in, and the same path reaches the server


def test_private_networks_opt_in(server: str) -> None:
    expect(ErrorCode.FORBIDDEN_URI, f"{server}/ok.wav", PROD)
    assert fetch_audio(f"{server}/ok.wav", DEV) == WAV


# --------------------------------------------------------------------------------------
# DNS rebinding: resolve once, connect to the vetted address
# --------------------------------------------------------------------------------------


def test_connects_to_the_vetted_address_with_the_original_host(
    http_server: tuple[str, list[dict[str, str]]], port: int, dns: Callable[..., FakeDNS], connects: list[str]
) -> None:
    fake = dns({"audio.test": [["127.0.0.1"]]})
    _, seen = http_server
    assert fetch_audio(f"http://audio.test:{port}/host", DEV) == f"audio.test:{port}".encode()
    assert fake.calls == {"audio.test": 1}
    assert connects == ["127.0.0.1"]
    assert seen[-1]["host"] == f"audio.test:{port}"
    assert seen[-1]["accept-encoding"] == "identity"


def test_rebinding_to_loopback_after_the_check_does_not_reach_it(
    dns: Callable[..., FakeDNS], connects: list[str]
) -> None:
    """First answer public, every later one loopback: the socket goes to the first."""
    fake = dns({"rebind.test": [["93.184.216.34"], ["127.0.0.1"]]})
    expect(ErrorCode.HTTP_ERROR, "http://rebind.test/a.wav", PROD)
    assert fake.calls == {"rebind.test": 1}
    assert connects == ["93.184.216.34"]


def test_any_non_public_answer_refuses_the_host(dns: Callable[..., FakeDNS], connects: list[str]) -> None:
    dns({"mixed.test": [["93.184.216.34", "10.0.0.7"]], "private.test": [["192.168.1.20"], ["93.184.216.34"]]})
    err = expect(ErrorCode.FORBIDDEN_URI, "http://mixed.test/a.wav", PROD)
    assert "10.0.0.7" in err.message and "private" in err.message
    expect(ErrorCode.FORBIDDEN_URI, "http://private.test/a.wav", PROD)
    assert connects == []


def test_dns_that_hangs_is_bounded_by_the_deadline(dns: Callable[..., FakeDNS]) -> None:
    dns({"slow.test": [["93.184.216.34"]]}, delay_s=3.0)
    start = time.monotonic()
    expect(ErrorCode.FETCH_TIMEOUT, "http://slow.test/a.wav", PROD.model_copy(update={"fetch_timeout_s": 0.5}))
    assert time.monotonic() - start < 1.0


def test_unknown_host_is_an_http_error(dns: Callable[..., FakeDNS]) -> None:
    dns({"nx.test": [[]]})
    expect(ErrorCode.HTTP_ERROR, "http://nx.test/a.wav", PROD)


# --------------------------------------------------------------------------------------
# Redirects: every hop re-checked
# --------------------------------------------------------------------------------------


@pytest.fixture
def loopback_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Treat 127.0.0.1 (only) as public, so that the test server can play an internet host."""
    real = transport.non_public_reason
    monkeypatch.setattr(transport, "non_public_reason", lambda ip: None if str(ip) == "127.0.0.1" else real(ip))


def _to(server: str, target: str, status: int = 302) -> str:
    return f"{server}/to?status={status}&url={quote(target, safe='')}"


@pytest.mark.usefixtures("loopback_is_public")
@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/a.wav",
        "http://[::1]/a.wav",
        "http://[::ffff:127.0.0.2]/a.wav",
        "http://localhost:{port}/ok.wav",  # resolves to loopback (127.0.0.1 may pass, ::1 / 127.x not)
        "http://2130706433:{port}/ok.wav",
    ],
)
def test_redirect_to_a_private_address_is_refused(
    server: str, port: int, target: str, dns: Callable[..., FakeDNS], connects: list[str]
) -> None:
    dns({"localhost": [["::1", "127.0.0.1"]], "2130706433": [["127.0.0.2"]]})
    assert fetch_audio(f"{server}/ok.wav", PROD) == WAV  # the first hop is "public" here
    err = expect(ErrorCode.FORBIDDEN_URI, _to(server, target.format(port=port)), PROD)
    assert "/to?" in err.message and "<redacted>" in err.message  # names the URI as published
    assert all(ip == "127.0.0.1" for ip in connects)


@pytest.mark.parametrize(
    ("target", "needle"),
    [
        ("file:///etc/passwd", "scheme 'file'"),
        ("ftp://example.com/a.wav", "scheme 'ftp'"),
        ("gopher://127.0.0.1:6379/_INFO", "scheme 'gopher'"),
        ("http://user:secret@127.0.0.1/ok.wav", "credentials"),
    ],
)
def test_redirect_to_another_scheme_or_with_credentials_is_refused(server: str, target: str, needle: str) -> None:
    err = expect(ErrorCode.FORBIDDEN_URI, _to(server, target), DEV)
    assert needle in err.message and "secret" not in err.message


def test_redirect_outside_the_allowlist_is_refused(server: str, port: int) -> None:
    cfg = DEV.model_copy(update={"allowed_hosts": ["127.0.0.1"]})
    assert fetch_audio(_to(server, "/ok.wav"), cfg) == WAV  # relative, same host
    err = expect(ErrorCode.FORBIDDEN_URI, _to(server, f"http://localhost:{port}/ok.wav"), cfg)
    assert "'localhost', not in allowed_hosts" in err.message


def test_a_malformed_idna_host_is_refused_as_input(server: str, connects: list[str]) -> None:
    """idna refuses the A-label "xn--" only when httpx is asked for the host: in the event's URI and in a
    redirect's Location alike it is the URI's fault (an http_error, not retried), never an unexpected error."""
    err = expect(ErrorCode.HTTP_ERROR, "http://xn--/a.wav", DEV)
    assert "not a valid URL" in err.message and not err.transient
    assert connects == []
    err = expect(ErrorCode.HTTP_ERROR, _to(server, "http://xn--/a.wav"), DEV)
    assert "IDNAError" in err.message and not err.transient


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_statuses_are_followed(server: str, status: int) -> None:
    assert fetch_audio(_to(server, "/ok.wav", status), DEV) == WAV


def test_redirect_chain_limit(server: str) -> None:
    assert fetch_audio(f"{server}/chain/3", DEV) == WAV  # 3 redirects: the default limit
    err = expect(ErrorCode.HTTP_ERROR, f"{server}/chain/4", DEV)
    assert "more than 3 redirects" in err.message
    expect(ErrorCode.HTTP_ERROR, f"{server}/loop", DEV)
    assert fetch_audio(f"{server}/chain/5", DEV.model_copy(update={"max_redirects": 5})) == WAV
    expect(ErrorCode.HTTP_ERROR, f"{server}/chain/1", DEV.model_copy(update={"max_redirects": 0}))


# --------------------------------------------------------------------------------------
# Allowlist and credentials
# --------------------------------------------------------------------------------------


def test_host_allowlist(server: str, port: int, dns: Callable[..., FakeDNS]) -> None:
    names = ["cdn.songs.example", "cdn.songs.example.", "songs.example", "evilsongs.example"]
    dns({name: [["127.0.0.1"]] for name in names})
    cfg = DEV.model_copy(update={"allowed_hosts": ["*.songs.example", "127.0.0.1"]})
    assert fetch_audio(f"http://cdn.songs.example:{port}/ok.wav", cfg) == WAV
    assert fetch_audio(f"http://CDN.Songs.Example.:{port}/ok.wav", cfg) == WAV  # case, trailing dot
    assert fetch_audio(f"{server}/ok.wav", cfg) == WAV  # exact entry
    for host in ["songs.example", "evilsongs.example", "localhost", "songs.example.evil.test"]:
        err = expect(ErrorCode.FORBIDDEN_URI, f"http://{host}:{port}/ok.wav", cfg)
        assert "not in allowed_hosts" in err.message
    # The allowlist narrows, it never widens: an allowed name resolving to loopback is still refused.
    prod = PROD.model_copy(update={"allowed_hosts": ["*.songs.example"]})
    expect(ErrorCode.FORBIDDEN_URI, f"http://cdn.songs.example:{port}/ok.wav", prod)


@pytest.mark.parametrize(
    "uri",
    [
        "http://user:hunter2@{host}/ok.wav",
        "http://user@{host}/ok.wav",
        "http://{host}@evil.test/ok.wav",  # 'user' looks like the allowed host
        "http://:hunter2@{host}/ok.wav",
    ],
)
def test_userinfo_is_refused(server: str, uri: str) -> None:
    uri = uri.format(host=server.removeprefix("http://"))
    err = expect(ErrorCode.FORBIDDEN_URI, uri, DEV)
    assert "credentials" in err.message and "hunter2" not in err.message


# --------------------------------------------------------------------------------------
# One deadline for the whole fetch, limits on what is accepted
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["drip-body", "drip-headers", "stall"])
def test_deadline_holds_against_slow_servers(server: str, path: str) -> None:
    """A byte every 0.2 s never trips a read timeout; the overall deadline still holds."""
    start = time.monotonic()
    err = expect(ErrorCode.FETCH_TIMEOUT, f"{server}/{path}", DEV)
    elapsed = time.monotonic() - start
    assert 0.9 < elapsed < 1.3, f"{path}: gave up after {elapsed:.2f} s"
    assert "1 s" in err.message


def test_deadline_covers_redirect_hops(server: str) -> None:
    """Redirect hops share the one deadline: the time spent on hop 1 is not given back on hop 2."""
    start = time.monotonic()
    expect(ErrorCode.FETCH_TIMEOUT, _to(server, _to(server, "/drip-body")), DEV)
    assert 0.9 < time.monotonic() - start < 1.3


def test_content_encoding_is_refused(http_server: tuple[str, list[dict[str, str]]]) -> None:
    server, seen = http_server
    err = expect(ErrorCode.HTTP_ERROR, f"{server}/gzip", DEV)
    assert "Content-Encoding 'gzip'" in err.message
    assert seen[-1]["accept-encoding"] == "identity"


@pytest.mark.parametrize(
    "reply",
    [
        b"-ERR SECRET-TOKEN-4f2a unknown command\r\n",  # Redis, say, reached under the opt-in
        b"HTTP/1.1 200 OK\r\nSECRET-TOKEN-4f2a\r\n\r\n",  # h11 quotes a bad header line
        b"HTTP/1.1 SECRET-TOKEN-4f2a\r\n\r\n",  # a bad status line
        b"SECRET-TOKEN-4f2a 200 OK\r\n\r\n",
    ],
)
def test_a_non_http_reply_is_not_quoted(reply: bytes) -> None:
    """What an internal service answers is not echoed into the message (logs, dead letters)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def answer() -> None:
            conn, _ = listener.accept()
            with conn, contextlib.suppress(OSError):
                conn.recv(65536)
                conn.sendall(reply)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        err = expect(ErrorCode.HTTP_ERROR, f"http://127.0.0.1:{listener.getsockname()[1]}/a.wav", DEV)
        thread.join(5)
    assert "SECRET" not in err.message and "4f2a" not in err.message
    assert not re.search(r"0x[0-9a-f]{6,}", err.message)


def test_pooled_connections_never_cross_policies(port: int, connects: list[str]) -> None:
    """A kept-alive connection to loopback, made under the opt-in, is not reused by a strict fetch."""
    uri = f"http://localhost:{port}/ok.wav"
    with AudioHTTPClient() as client:
        assert fetch_audio(uri, DEV, client=client) == WAV
        assert fetch_audio(uri, DEV, client=client) == WAV
        assert len(connects) == 1  # the second fetch reused the connection
        expect(ErrorCode.FORBIDDEN_URI, uri, PROD, client=client)
        assert len(connects) == 1


def test_plain_client_outside_fetch_audio_connects_nowhere(server: str) -> None:
    import httpx

    with AudioHTTPClient() as client, pytest.raises(httpx.ConnectError):
        client.get(f"{server}/ok.wav")


# --------------------------------------------------------------------------------------
# HTTPS: the socket goes to the vetted address, TLS still checks the name
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    req = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=audio.test"]
    subprocess.run(
        [*req, "-addext", "subjectAltName=DNS:audio.test", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_pins_the_address_and_verifies_the_name(
    tls_files: tuple[Path, Path], dns: Callable[..., FakeDNS], connects: list[str]
) -> None:
    cert, key = tls_files
    sni: list[str | None] = []
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    server_ctx.sni_callback = lambda _sock, name, _ctx: sni.append(name)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    with _serve(server_ctx) as (server, seen), AudioHTTPClient(verify=client_ctx) as client:
        port = int(server.rsplit(":", 1)[1])
        fake = dns({"audio.test": [["127.0.0.1"]]})
        assert fetch_audio(f"https://audio.test:{port}/ok.wav", DEV, client=client) == WAV
        assert sni == ["audio.test"] and seen[-1]["host"] == f"audio.test:{port}"
        assert connects == ["127.0.0.1"] and fake.calls == {"audio.test": 1}
        # The certificate names audio.test, not the address: connecting by address fails verification.
        err = expect(ErrorCode.HTTP_ERROR, f"{server}/ok.wav", DEV, client=client)
        assert "CERTIFICATE_VERIFY_FAILED" in err.message or "certificate" in err.message.lower()
        # https -> http is a downgrade, refused even when the target would be fine.
        err = expect(
            ErrorCode.FORBIDDEN_URI, _to(f"https://audio.test:{port}", "http://audio.test/ok.wav"), DEV, client=client
        )
        assert "downgrades" in err.message


# --------------------------------------------------------------------------------------
# file:// confinement
# --------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "in.wav").write_bytes(WAV)
    (outside / "secret.wav").write_bytes(WAV)
    (root / "dirlink").symlink_to(outside, target_is_directory=True)
    (root / "filelink.wav").symlink_to(outside / "secret.wav")
    (root / "inner-link.wav").symlink_to(root / "in.wav")
    return {"root": root, "outside": outside}


@pytest.mark.parametrize(
    "suffix",
    [
        "sub/../../outside/secret.wav",  # dot-dot
        "sub/%2e%2e/%2e%2e/outside/secret.wav",  # percent-encoded dots
        "sub/..%2f..%2foutside%2fsecret.wav",  # percent-encoded slashes
        "%2e%2e/outside/secret.wav",
        "dirlink/secret.wav",  # a symlinked directory leading out
        "filelink.wav",  # a symlinked file leading out
        "../outside/missing.wav",  # outside and missing: forbidden, not "not found"
    ],
)
def test_file_root_escapes_are_refused(tree: dict[str, Path], suffix: str) -> None:
    cfg = AudioSettings(file_root=tree["root"])
    uri = f"file://{tree['root']}/{suffix}"
    err = expect(ErrorCode.FORBIDDEN_URI, uri, cfg)
    assert "outside the allowed root" in err.message


def test_file_root_allows_what_stays_inside(tree: dict[str, Path]) -> None:
    cfg = AudioSettings(file_root=tree["root"])
    root = tree["root"]
    for suffix in ["in.wav", "sub/../in.wav", "sub/%2e%2e/in.wav", "inner-link.wav", "%69n.wav"]:
        assert fetch_audio(f"file://{root}/{suffix}", cfg) == WAV
    assert fetch_audio(f"file://localhost{root}/in.wav", cfg) == WAV
    # Double encoding is not decoded twice: it names a file called '%2e%2e', which does not exist.
    expect(ErrorCode.FILE_NOT_FOUND, f"file://{root}/sub/%252e%252e/in.wav", cfg)


@pytest.mark.parametrize(
    "uri",
    [
        "file://otherhost/etc/passwd",
        "file://127.0.0.1/etc/passwd",
        "file://user@localhost/etc/passwd",
        "file://localhost:80/etc/passwd",
        "file:///tmp/a%00.wav",  # NUL byte
        "file:relative.wav",
    ],
)
def test_bad_file_uris_are_refused(uri: str) -> None:
    expect(ErrorCode.FORBIDDEN_URI, uri, AudioSettings())


@pytest.mark.timeout(20)
@pytest.mark.parametrize("rooted", [False, True])
def test_special_files_are_refused_without_hanging(tmp_path: Path, rooted: bool) -> None:
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    sock_path = tmp_path / "s.wav"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock_path))
    (tmp_path / "zero.wav").symlink_to("/dev/zero")
    cfg = AudioSettings(file_root=tmp_path if rooted else None)
    uris = [fifo.as_uri(), sock_path.as_uri(), (tmp_path / "zero.wav").as_uri()]
    if not rooted:
        uris += ["file:///dev/zero", "file:///dev/urandom", "file:///dev/null", "file:///dev/stdin"]
    try:
        for uri in uris:
            start = time.monotonic()
            err = expect(ErrorCode.FORBIDDEN_URI, uri, cfg)
            assert "not a regular file" in err.message or (rooted and "outside the allowed root" in err.message)
            assert time.monotonic() - start < 1.0
    finally:
        listener.close()


@pytest.mark.timeout(20)
def test_fifo_swapped_in_after_the_check_is_refused_without_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race: stat() saw a regular file, open() finds a FIFO. O_NONBLOCK + fstat catch it."""
    regular = tmp_path / "regular.wav"
    regular.write_bytes(WAV)
    fifo = tmp_path / "swapped.wav"
    os.mkfifo(fifo)
    real_stat = os.stat
    monkeypatch.setattr(audio.os, "stat", lambda p, *a, **k: real_stat(regular if str(p) == str(fifo) else p))
    start = time.monotonic()
    err = expect(ErrorCode.FORBIDDEN_URI, fifo.as_uri(), AudioSettings())
    assert "FIFO" in err.message and time.monotonic() - start < 1.0


def test_file_size_cap_holds_for_growing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stat() may under-report (a file still being written): the read is capped regardless."""
    path = tmp_path / "grows.wav"
    path.write_bytes(b"x" * 5000)
    real_stat = os.stat

    class Small:
        def __init__(self, st: os.stat_result) -> None:
            self.st_mode, self.st_size = st.st_mode, 10

    monkeypatch.setattr(audio.os, "stat", lambda p, *a, **k: Small(real_stat(p)))
    expect(ErrorCode.TOO_LARGE, path.as_uri(), AudioSettings(max_bytes=1000))
