"""SSRF-protected outbound HTTP against real HTTP servers on 127.0.0.1 and 127.0.0.2."""

from __future__ import annotations

import datetime as dt
import gzip
import os
import socket
import ssl
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from moderation.config import Settings
from moderation.errors import BlockedDestination, FetchFailed, PayloadTooLarge
from moderation.net.safe_http import (
    OutboundPolicy,
    SafeHttpClient,
    blocked_reason,
    fetch_bytes,
    validate_url,
)

Route = Callable[["_Handler"], None]
DEFAULT = OutboundPolicy()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    routes: dict[str, Route]
    hits: list[tuple[str, str, dict[str, str], bytes, tuple[str, int]]]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        self.server.hits.append((self.command, path, dict(self.headers.items()), body, self.client_address))
        route = self.server.routes.get(path)
        if route is None:
            send(self, 404, b"no route")
            return
        try:
            route(self)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def send(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class LocalServer:
    def __init__(self, host: str, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.httpd = _Server((host, port), _Handler)
        self.httpd.routes = {}
        self.httpd.hits = []
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.daemon = True
        self.thread.start()

    def url(self, path: str = "/", host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    def route(self, path: str, handler: Route) -> None:
        self.httpd.routes[path] = handler

    def paths(self) -> list[str]:
        return [hit[1] for hit in self.httpd.hits]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[LocalServer]:
    srv = LocalServer("127.0.0.1")
    yield srv
    srv.close()


@pytest.fixture
def server2() -> Iterator[LocalServer]:
    srv = LocalServer("127.0.0.2")
    yield srv
    srv.close()


def resolver_for(mapping: dict[str, list[str]]) -> Callable[[str, int], list[str]]:
    def resolve(host: str, port: int) -> list[str]:
        try:
            return mapping[host]
        except KeyError:
            raise socket.gaierror(socket.EAI_NONAME, "unknown host") from None

    return resolve


ONLY_2 = OutboundPolicy(allowed_cidrs=["127.0.0.2/32"])


def fetch(url: str, policy: OutboundPolicy = DEFAULT, **kwargs: Any) -> Any:
    options: dict[str, Any] = {"max_bytes": 1_000_000, "timeout_seconds": 5.0, "max_redirects": 5}
    options.update(kwargs)
    return fetch_bytes(url, policy, **options)


# URL validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/a.png",
        "file:///etc/passwd",
        "gopher://example.com/",
        "javascript:alert(1)",
        "example.com/a.png",
        "http:///no-host",
        "http://user:pass@example.com/",
        "http://user@example.com/",
        "http://example.com\\@127.0.0.1/",
        "http://example.com /a.png",
        "http://example.com:0/",
        "http://example.com:99999/",
        "http://127.0.0.1/",
        "http://127.0.0.2:8080/",
        "http://10.1.2.3/",
        "http://172.16.0.1/",
        "http://192.168.1.1/",
        "http://100.64.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://169.254.1.1/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://255.255.255.255/",
        "http://[::1]/",
        "http://[::]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:169.254.169.254]/",
        "http://[fe80::1]/",
        "http://[fc00::1]/",
        "http://[fec0::1]/",
        "http://[fd00:ec2::254]/",
        "http://[2002:7f00:1::]/",
        "http://[64:ff9b::a00:1]/",
        "http://2130706433/",
        "http://0x7f000001/",
        "http://127.1/",
        "http://0177.0.0.1/",
        "http://localhost/",
        "http://LOCALHOST./",
        "http://api.localhost/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://metadata/",
        "http://bad_host!.example/",
    ],
)
def test_validate_url_rejects(url: str) -> None:
    with pytest.raises(BlockedDestination):
        validate_url(url, DEFAULT)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/a.png",
        "http://images.example.com:8080/a.png?sig=x",
        "http://93.184.215.14/",
        "http://[2606:4700::1111]/",
        "https://bücher.example/",
    ],
)
def test_validate_url_accepts_public_destinations(url: str) -> None:
    validate_url(url, DEFAULT)


def test_validate_url_message_is_clear() -> None:
    with pytest.raises(BlockedDestination, match="loopback") as info:
        validate_url("http://127.0.0.1/x", DEFAULT)
    assert info.value.code == "blocked_destination"
    with pytest.raises(BlockedDestination, match="scheme"):
        validate_url("ftp://example.com/", DEFAULT)


def test_allow_private_permits_private_but_not_metadata() -> None:
    policy = OutboundPolicy(allow_private=True)
    for url in ("http://127.0.0.1/", "http://localhost/", "http://10.0.0.5/", "http://[fe80::1]/"):
        validate_url(url, policy)
    for url in ("http://169.254.169.254/", "http://[fd00:ec2::254]/", "http://metadata.google.internal/"):
        with pytest.raises(BlockedDestination, match="metadata"):
            validate_url(url, policy)
    with pytest.raises(BlockedDestination):
        validate_url("http://0.0.0.0/", policy)


@pytest.mark.parametrize(
    ("address", "policy", "allowed"),
    [
        ("8.8.8.8", DEFAULT, True),
        ("::ffff:8.8.8.8", DEFAULT, True),
        ("64:ff9b::808:808", DEFAULT, True),
        ("2606:4700::1111", DEFAULT, True),
        ("64:ff9b::7f00:1", DEFAULT, False),
        ("2002:a9fe:a9fe::", DEFAULT, False),
        ("198.18.0.1", DEFAULT, False),
        ("192.0.2.1", DEFAULT, False),
        ("240.0.0.1", OutboundPolicy(allow_private=True), False),
        ("ff02::1", OutboundPolicy(allow_private=True), False),
        ("169.254.169.254", OutboundPolicy(allow_private=True), False),
        ("169.254.170.2", OutboundPolicy(allow_private=True), False),
        ("::ffff:169.254.169.254", OutboundPolicy(allow_private=True), False),
        ("169.254.169.254", OutboundPolicy(allowed_cidrs=["169.254.169.254/32"]), True),
        ("::ffff:127.0.0.2", ONLY_2, True),
        ("127.0.0.1", ONLY_2, False),
        ("10.9.8.7", OutboundPolicy(allow_private=True), True),
        ("fe80::1%eth0", OutboundPolicy(allow_private=True), True),
        ("fe80::1%eth0", DEFAULT, False),
    ],
)
def test_blocked_reason(address: str, policy: OutboundPolicy, allowed: bool) -> None:
    assert (blocked_reason(address, policy) is None) is allowed


def test_policy_from_settings() -> None:
    settings = Settings(allow_private_network=True, fetch_allowed_cidrs=["10.0.0.0/8", "2001:db8::/32"])
    policy = OutboundPolicy.from_settings(settings)
    assert policy.allow_private is True
    assert [str(n) for n in policy.networks] == ["10.0.0.0/8", "2001:db8::/32"]
    with pytest.raises(ValueError, match="CIDR"):
        OutboundPolicy(allowed_cidrs=["not-a-cidr"])


# Fetching -------------------------------------------------------------------------------------------------


def test_fetch_loopback_blocked_by_default(server: LocalServer) -> None:
    server.route("/a.png", lambda h: send(h, 200, b"png"))
    with pytest.raises(BlockedDestination):
        fetch(server.url("/a.png"))
    with pytest.raises(BlockedDestination, match="loopback"):
        fetch(server.url("/a.png", host="localhost"))
    assert server.paths() == []


def test_hostname_resolving_to_loopback_blocked_at_connect(server: LocalServer) -> None:
    server.route("/a.png", lambda h: send(h, 200, b"png"))
    resolver = resolver_for({"images.test": ["127.0.0.1"]})
    url = server.url("/a.png", host="images.test")
    validate_url(url, DEFAULT)
    with pytest.raises(BlockedDestination, match="loopback"):
        fetch(url, resolver=resolver)
    assert server.paths() == []


def test_allow_private_fetches_loopback_but_not_metadata(server: LocalServer) -> None:
    server.route("/a.png", lambda h: send(h, 200, b"png-bytes", {"Content-Type": "image/png"}))
    policy = OutboundPolicy(allow_private=True)
    result = fetch(server.url("/a.png"), policy)
    assert result.data == b"png-bytes"
    assert result.content_type == "image/png"
    assert result.final_url == server.url("/a.png")
    with pytest.raises(BlockedDestination, match="metadata"):
        fetch("http://169.254.169.254/latest/meta-data/", policy)
    # A host name pointing at the metadata address is caught when connecting, before any packet is sent.
    resolver = resolver_for({"innocent.test": ["169.254.169.254"]})
    with pytest.raises(BlockedDestination, match="metadata"):
        fetch("http://innocent.test/latest/meta-data/", policy, resolver=resolver)


def test_allowed_cidr_server_fetched_but_its_redirect_to_loopback_blocked(
    server: LocalServer, server2: LocalServer
) -> None:
    server.route("/secret", lambda h: send(h, 200, b"secret"))
    server2.route("/ok", lambda h: send(h, 200, b"fine"))
    server2.route("/bounce", lambda h: send(h, 302, headers={"Location": server.url("/secret")}))
    server2.route(
        "/bounce-by-name",
        lambda h: send(h, 302, headers={"Location": server.url("/secret", host="sneaky.test")}),
    )
    assert fetch(server2.url("/ok"), ONLY_2).data == b"fine"
    with pytest.raises(BlockedDestination, match="loopback"):
        fetch(server2.url("/bounce"), ONLY_2)
    resolver = resolver_for({"sneaky.test": ["127.0.0.1"]})
    with pytest.raises(BlockedDestination, match="loopback"):
        fetch(server2.url("/bounce-by-name"), ONLY_2, resolver=resolver)
    assert server.paths() == []


def test_redirect_to_other_scheme_blocked(server2: LocalServer) -> None:
    server2.route("/file", lambda h: send(h, 302, headers={"Location": "file:///etc/passwd"}))
    server2.route("/ftp", lambda h: send(h, 301, headers={"Location": "ftp://example.com/x"}))
    for path in ("/file", "/ftp"):
        with pytest.raises(BlockedDestination):
            fetch(server2.url(path), ONLY_2)


def _pair_on_same_port() -> tuple[LocalServer, LocalServer]:
    for _ in range(20):
        public = LocalServer("127.0.0.2")
        try:
            private = LocalServer("127.0.0.1", port=public.port)
        except OSError:
            public.close()
            continue
        return public, private
    raise RuntimeError("could not bind 127.0.0.1 and 127.0.0.2 on the same port")


class RebindingResolver:
    """Answers an allowed address the first time, then a private one, like a rebinding DNS server."""

    def __init__(self, first: list[str], then: list[str]) -> None:
        self.answers = [first, then]
        self.calls = 0

    def __call__(self, host: str, port: int) -> list[str]:
        answer = self.answers[min(self.calls, 1)]
        self.calls += 1
        return answer


def test_dns_rebinding_blocked_at_connect_time() -> None:
    public, private = _pair_on_same_port()
    try:
        public.route("/img", lambda h: send(h, 200, b"public"))
        private.route("/img", lambda h: send(h, 200, b"private"))
        resolver = RebindingResolver(first=["127.0.0.2"], then=["127.0.0.1"])
        url = public.url("/img", host="rebind.test")
        validate_url(url, ONLY_2)
        # The first resolution (what a validate-then-fetch design would check) is allowed...
        assert fetch(url, ONLY_2, resolver=resolver).data == b"public"
        # ...and the rebound answer is refused on the connection itself.
        with pytest.raises(BlockedDestination, match="loopback"):
            fetch(url, ONLY_2, resolver=resolver)
        assert resolver.calls == 2
        assert private.paths() == []
    finally:
        public.close()
        private.close()


def test_mixed_answers_connect_only_to_allowed_address() -> None:
    public, private = _pair_on_same_port()
    try:
        public.route("/img", lambda h: send(h, 200, b"public"))
        private.route("/img", lambda h: send(h, 200, b"private"))
        resolver = resolver_for({"mixed.test": ["127.0.0.1", "127.0.0.2"]})
        assert fetch(public.url("/img", host="mixed.test"), ONLY_2, resolver=resolver).data == b"public"
        assert private.paths() == []
    finally:
        public.close()
        private.close()


def _self_signed(tmp_path: Path, hostname: str) -> tuple[Path, Path, str]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file, cert_pem.decode()


def test_tls_uses_hostname_for_sni_and_verification_while_connecting_to_ip(tmp_path: Path) -> None:
    cert_file, key_file, cert_pem = _self_signed(tmp_path, "images.test")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_file, key_file)
    sni: list[str | None] = []

    def record_sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        sni.append(name)

    server_ctx.sni_callback = record_sni
    tls_server = LocalServer("127.0.0.2", tls=server_ctx)
    try:
        tls_server.route("/a.png", lambda h: send(h, 200, b"over-tls"))
        client_ctx = ssl.create_default_context(cadata=cert_pem)
        resolver = resolver_for({"images.test": ["127.0.0.2"], "other.test": ["127.0.0.2"]})
        url = f"https://images.test:{tls_server.port}/a.png"
        result = fetch(url, ONLY_2, resolver=resolver, verify=client_ctx)
        assert result.data == b"over-tls"
        assert sni == ["images.test"]
        assert tls_server.httpd.hits[0][2]["Host"] == f"images.test:{tls_server.port}"
        # The certificate is checked against the URL's host name, not the address connected to.
        with pytest.raises(FetchFailed):
            fetch(f"https://other.test:{tls_server.port}/a.png", ONLY_2, resolver=resolver, verify=client_ctx)
    finally:
        tls_server.close()


def test_content_length_over_limit_rejected_early(server2: LocalServer) -> None:
    def big(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(50_000_000))
        h.end_headers()
        h.wfile.write(b"x" * 1024)

    server2.route("/big", big)
    with pytest.raises(PayloadTooLarge, match="declares"):
        fetch(server2.url("/big"), ONLY_2, max_bytes=10_000)


def test_chunked_stream_over_limit_aborted(server2: LocalServer) -> None:
    def endless(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        chunk = b"y" * 4096
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            h.wfile.flush()

    server2.route("/endless", endless)
    server2.route("/small", lambda h: send(h, 200, b"z" * 10_000))
    started = time.monotonic()
    with pytest.raises(PayloadTooLarge, match="more than"):
        fetch(server2.url("/endless"), ONLY_2, max_bytes=100_000)
    assert time.monotonic() - started < 3
    assert len(fetch(server2.url("/small"), ONLY_2, max_bytes=10_000).data) == 10_000


def test_overall_deadline_on_trickling_body(server2: LocalServer) -> None:
    def trickle(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        for _ in range(1000):
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(0.05)

    server2.route("/slow", trickle)
    started = time.monotonic()
    with pytest.raises(FetchFailed, match="timed out"):
        fetch(server2.url("/slow"), ONLY_2, timeout_seconds=0.6)
    assert time.monotonic() - started < 2.5


def test_overall_deadline_on_trickling_headers(server2: LocalServer) -> None:
    def trickle_headers(h: _Handler) -> None:
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(1000):
            h.wfile.write(b"X-Pad-%d: 1\r\n" % i)
            h.wfile.flush()
            time.sleep(0.05)

    server2.route("/slow-headers", trickle_headers)
    started = time.monotonic()
    with pytest.raises(FetchFailed, match="timed out"):
        fetch(server2.url("/slow-headers"), ONLY_2, timeout_seconds=0.6)
    assert time.monotonic() - started < 2.5


def test_redirects_followed_up_to_limit(server2: LocalServer) -> None:
    def hop_to(target: str) -> Route:
        return lambda h: send(h, 302, headers={"Location": target})

    for i in range(6):
        server2.route(f"/r{i}", hop_to(f"/r{i + 1}"))
    server2.route("/r6", lambda h: send(h, 200, b"end", {"Content-Type": "image/gif"}))
    result = fetch(server2.url("/r3"), ONLY_2, max_redirects=3)
    assert result.data == b"end"
    assert result.final_url == server2.url("/r6")
    with pytest.raises(FetchFailed, match="too many redirects"):
        fetch(server2.url("/r0"), ONLY_2, max_redirects=3)
    with pytest.raises(FetchFailed, match="too many redirects"):
        fetch(server2.url("/r5"), ONLY_2, max_redirects=0)


def test_error_status_is_fetch_failed(server2: LocalServer) -> None:
    server2.route("/boom", lambda h: send(h, 500, b"oops"))
    with pytest.raises(FetchFailed, match="HTTP 500"):
        fetch(server2.url("/boom"), ONLY_2)
    with pytest.raises(FetchFailed, match="HTTP 404"):
        fetch(server2.url("/missing"), ONLY_2)


def test_connection_refused_is_fetch_failed() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.2", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchFailed):
        fetch(f"http://127.0.0.2:{port}/", ONLY_2)


def test_proxy_environment_is_ignored(server2: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    server2.route("/a", lambda h: send(h, 200, b"direct"))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert fetch(server2.url("/a"), ONLY_2).data == b"direct"


# 50 MB of zeros, gzipped to ~50 KB: what a hostile server answers to make a client inflate it in memory.
_BOMB = gzip.compress(bytes(50_000_000), compresslevel=9)


def test_a_compressed_response_is_inflated_only_up_to_the_limit(server2: LocalServer) -> None:
    server2.route("/bomb.png", lambda h: send(h, 200, _BOMB, {"Content-Encoding": "gzip"}))
    server2.route(
        "/nested.png", lambda h: send(h, 200, gzip.compress(_BOMB), {"Content-Encoding": "gzip, gzip"})
    )
    server2.route(
        "/small.png", lambda h: send(h, 200, gzip.compress(b"\x89PNG tiny"), {"Content-Encoding": "gzip"})
    )
    server2.route("/broken.png", lambda h: send(h, 200, b"not gzip at all", {"Content-Encoding": "gzip"}))
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge, match="more than"):
            fetch(server2.url("/bomb.png"), ONLY_2, max_bytes=1_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000  # never the 50 MB the body inflates to
    with pytest.raises(FetchFailed, match="unsupported Content-Encoding"):
        fetch(server2.url("/nested.png"), ONLY_2, max_bytes=1_000_000)
    with pytest.raises(FetchFailed, match="does not decode"):
        fetch(server2.url("/broken.png"), ONLY_2, max_bytes=1_000_000)
    assert fetch(server2.url("/small.png"), ONLY_2, max_bytes=1_000_000).data == b"\x89PNG tiny"
    assert all(hit[2]["Accept-Encoding"] == "identity" for hit in server2.httpd.hits)


# Webhook client -------------------------------------------------------------------------------------------


def test_post_returns_status_and_capped_excerpt_and_reuses_connections(server2: LocalServer) -> None:
    server2.route("/hook", lambda h: send(h, 202, b"a" * 10_000))
    with SafeHttpClient(ONLY_2, timeout_seconds=5) as client:
        status, excerpt = client.post(
            server2.url("/hook"), b'{"event":"x"}', {"Content-Type": "application/json"}
        )
        assert status == 202
        assert excerpt == "a" * 4096
        server2.route("/hook", lambda h: send(h, 200, b"ok"))
        assert client.post(server2.url("/hook"), b"second") == (200, "ok")
        server2.route("/hook", lambda h: send(h, 200, b"ok"))
        assert client.post(server2.url("/hook"), b"third") == (200, "ok")
    method, path, headers, body, _ = server2.httpd.hits[0]
    assert (method, path, body) == ("POST", "/hook", b'{"event":"x"}')
    assert headers["Content-Type"] == "application/json"
    # The first response was not drained, so its connection closes; the next two share one.
    assert server2.httpd.hits[1][4] == server2.httpd.hits[2][4]


def test_a_webhook_receiver_answering_with_a_gzip_bomb_gets_only_an_excerpt_read(
    server2: LocalServer,
) -> None:
    server2.route("/hook", lambda h: send(h, 200, _BOMB, {"Content-Encoding": "gzip"}))
    tracemalloc.start()
    try:
        with SafeHttpClient(ONLY_2) as client:
            status, excerpt = client.post(server2.url("/hook"), b"payload")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (status, excerpt) == (200, "\x00" * 4096)
    assert peak < 20_000_000
    assert server2.httpd.hits[0][2]["Accept-Encoding"] == "identity"


def test_webhook_redirect_not_followed(server2: LocalServer) -> None:
    server2.route("/hook", lambda h: send(h, 307, b"moved", {"Location": "/elsewhere"}))
    server2.route("/elsewhere", lambda h: send(h, 200, b"ok"))
    with SafeHttpClient(ONLY_2) as client:
        status, excerpt = client.post(server2.url("/hook"), b"payload")
    assert (status, excerpt) == (307, "moved")
    assert server2.paths() == ["/hook"]


def test_post_blocked_and_rebinding_protected(server: LocalServer) -> None:
    server.route("/hook", lambda h: send(h, 200, b"ok"))
    resolver = resolver_for({"hooks.test": ["127.0.0.1"]})
    with SafeHttpClient(DEFAULT, resolver=resolver) as client:
        with pytest.raises(BlockedDestination):
            client.post(server.url("/hook"), b"x")
        with pytest.raises(BlockedDestination):
            client.post(server.url("/hook", host="hooks.test"), b"x")
        with pytest.raises(BlockedDestination):
            client.post("http://169.254.169.254/", b"x")
    assert server.paths() == []


def test_post_timeout_is_fetch_failed(server2: LocalServer) -> None:
    def hang(h: _Handler) -> None:
        time.sleep(2)
        send(h, 200, b"late")

    server2.route("/hang", hang)
    started = time.monotonic()
    with SafeHttpClient(ONLY_2) as client, pytest.raises(FetchFailed, match="timed out"):
        client.post(server2.url("/hang"), b"x", timeout=0.3)
    assert time.monotonic() - started < 1.5


def test_fetch_works_in_forked_child(server2: LocalServer) -> None:
    server2.route("/a", lambda h: send(h, 200, b"ok"))
    resolver = resolver_for({"images.test": ["127.0.0.2"]})
    url = server2.url("/a", host="images.test")
    assert fetch(url, ONLY_2, resolver=resolver).data == b"ok"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child process
        try:
            code = 0 if fetch(url, ONLY_2, resolver=resolver, timeout_seconds=3).data == b"ok" else 1
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
