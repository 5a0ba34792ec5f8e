"""Outbound HTTP with SSRF protection, for image_url fetches and webhook deliveries.

Every TCP connection goes through a network backend that resolves the host itself and connects only to
addresses the policy allows, so the check applies to the address actually connected to (DNS rebinding
cannot slip a private address in after validation), on every redirect hop and every new pooled connection.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextvars import ContextVar
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import TYPE_CHECKING, Any

import httpcore
import httpx

from moderation.errors import BlockedDestination, FetchFailed, PayloadTooLarge

# httpx logs every request's full URL at INFO: webhook URLs carry their receivers' tokens in paths and
# queries, and image URLs their signatures. Warnings and errors still show.
logging.getLogger("httpx").setLevel(logging.WARNING)

if TYPE_CHECKING:
    from moderation.config import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]
"""Maps (host, port) to the IP addresses to try, as strings; the default uses socket.getaddrinfo."""

USER_AGENT = "moderation-service/0.1 (+safe-http)"
DEFAULT_EXCERPT_BYTES = 4096

_ALLOWED_SCHEMES = frozenset({"http", "https"})
_DEFAULT_PORTS = {"http": 80, "https": 443}

# Cloud instance-metadata endpoints hand out credentials; they stay blocked even with allow_private.
_METADATA_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.169.254/32",  # AWS, GCP, Azure, OCI, DigitalOcean, OpenStack
        "169.254.170.2/32",  # AWS ECS task credentials
        "169.254.170.23/32",  # AWS EKS pod identity agent
        "169.254.0.23/32",  # Tencent Cloud
        "100.100.100.200/32",  # Alibaba Cloud
        "fd00:ec2::254/128",  # AWS IMDS over IPv6
        "fd00:ec2::23/128",  # AWS EKS pod identity agent over IPv6
    )
)
_METADATA_HOSTNAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.tencentyun.com",
    }
)

# What allow_private opens up: RFC 1918, CGNAT, loopback, link-local and ULA.
_PRIVATE_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

_HOSTNAME_RE = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))*\.?$")
_NUMERIC_HOST_RE = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+))*\.?$")


@dataclass(frozen=True)
class OutboundPolicy:
    """Which destinations outbound requests may reach.

    ``allowed_cidrs`` accepts networks or CIDR strings and is normalised to a tuple of networks;
    addresses inside it are always allowed, even cloud-metadata ones.
    """

    allow_private: bool = False
    allowed_cidrs: Sequence[IPNetwork | str] = ()

    def __post_init__(self) -> None:
        networks = tuple(
            n if isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network) else _parse_network(n)
            for n in self.allowed_cidrs
        )
        object.__setattr__(self, "allowed_cidrs", networks)

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        """The always-allowed networks, parsed."""
        return tuple(n for n in self.allowed_cidrs if not isinstance(n, str))

    @classmethod
    def from_settings(cls, settings: Settings) -> OutboundPolicy:
        """Policy from the ``allow_private_network`` and ``fetch_allowed_cidrs`` settings."""
        return cls(
            allow_private=settings.allow_private_network,
            allowed_cidrs=list(settings.fetch_allowed_cidrs),
        )


@dataclass(frozen=True)
class FetchedResource:
    """A fetched body with its declared content type and the URL it finally came from."""

    data: bytes
    content_type: str | None
    final_url: str


def _parse_network(value: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError as exc:
        raise ValueError(f"invalid CIDR in allowed_cidrs: {value!r}") from exc


def _without_scope(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        return ipaddress.IPv6Address(str(address).split("%", 1)[0])
    return address


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    if address.sixtofour is not None:
        return address.sixtofour, "6to4"
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), "NAT64"
    return None


def blocked_reason(address: IPAddress | str, policy: OutboundPolicy) -> str | None:
    """Why connecting to ``address`` is forbidden under ``policy``, or None when it is allowed."""
    ip = _without_scope(ipaddress.ip_address(address) if isinstance(address, str) else address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return blocked_reason(ip.ipv4_mapped, policy)
    if any(ip.version == n.version and ip in n for n in policy.networks):
        return None
    if any(ip.version == n.version and ip in n for n in _METADATA_NETWORKS):
        return "cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            inner, kind = embedded
            reason = blocked_reason(inner, policy)
            return None if reason is None else f"{reason} embedded in a {kind} IPv6 address"
    if policy.allow_private and any(ip.version == n.version and ip in n for n in _PRIVATE_NETWORKS):
        return None
    if ip.is_unspecified:
        return "unspecified address"
    if ip.is_loopback:
        return "loopback address"
    if ip.is_link_local:
        return "link-local address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local address"  # fec0::/10: deprecated, yet routed inside some networks
    if ip.is_multicast:
        return "multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "carrier-grade NAT address"
    if ip.is_private:
        return "private network address"
    if ip.is_reserved or not ip.is_global:
        return "reserved or non-global address"
    return None


def check_ip(address: IPAddress | str, policy: OutboundPolicy) -> None:
    """Raise BlockedDestination when ``policy`` forbids connecting to ``address``."""
    reason = blocked_reason(address, policy)
    if reason is not None:
        raise BlockedDestination(f"destination {address} is blocked: {reason}")


def _check_host(host: str, policy: OutboundPolicy) -> None:
    if not host:
        raise BlockedDestination("URL has no host")
    if "%" in host:
        raise BlockedDestination("URL host contains a zone identifier or percent-encoding")
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        check_ip(literal, policy)
        return
    name = host.lower().rstrip(".")
    if _NUMERIC_HOST_RE.match(name):
        # Legacy forms such as 2130706433, 0x7f.1 or 127.1 resolve to IPs via inet_aton; refuse them outright.
        raise BlockedDestination(f"ambiguous numeric host {host!r}; use a dotted-quad IP address")
    if not _HOSTNAME_RE.match(name):
        raise BlockedDestination(f"invalid host name {host!r}")
    if name in _METADATA_HOSTNAMES:
        raise BlockedDestination(f"destination {host!r} is blocked: cloud metadata host name")
    if not policy.allow_private and (name == "localhost" or name.endswith(".localhost")):
        raise BlockedDestination(f"destination {host!r} is blocked: loopback host name")


def _parse_url(url: str, policy: OutboundPolicy) -> httpx.URL:
    if not isinstance(url, str) or not url:
        raise BlockedDestination("URL must be a non-empty string")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F or ch == "\\" for ch in url):
        raise BlockedDestination("URL contains whitespace, control characters or backslashes")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise BlockedDestination(f"invalid URL: {exc}") from exc
    if parsed.scheme not in _ALLOWED_SCHEMES:
        raise BlockedDestination(f"URL scheme {parsed.scheme!r} is not allowed; use http or https")
    if parsed.userinfo:
        raise BlockedDestination("URLs with credentials (user@host) are not allowed")
    port = parsed.port
    if port is not None and not 1 <= port <= 65535:
        raise BlockedDestination(f"URL port {port} is out of range")
    _check_host(parsed.raw_host.decode("ascii"), policy)
    return parsed


def validate_url(url: str, policy: OutboundPolicy) -> None:
    """Reject a URL that can never be fetched safely: scheme, credentials, port, literal IPs, host names.

    Host names are not resolved here; resolved addresses are checked on every connection instead.
    """
    _parse_url(url, policy)


def origin_of(url: str) -> str:
    """The scheme, host and port of a URL given as text, for logs and messages ("?" when it does not parse)."""
    try:
        return _origin(httpx.URL(url))
    except (httpx.InvalidURL, UnicodeError):
        return "?"


def _origin(url: httpx.URL) -> str:
    """The scheme, host and port of a URL, for messages: paths and queries may carry secrets."""
    port = url.port or _DEFAULT_PORTS.get(url.scheme, 0)
    host = url.raw_host.decode("ascii")
    if ":" in host:
        host = f"[{host}]"
    return f"{url.scheme}://{host}:{port}"


# Deadline of the whole operation in progress in this context (time.monotonic() value).
_deadline: ContextVar[float | None] = ContextVar("safe_http_deadline", default=None)


@contextlib.contextmanager
def _deadline_after(seconds: float) -> Iterator[None]:
    current = _deadline.get()
    candidate = time.monotonic() + seconds
    token = _deadline.set(candidate if current is None else min(current, candidate))
    try:
        yield
    finally:
        _deadline.reset(token)


def _bounded(timeout: float | None, exc_type: type[Exception]) -> float | None:
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise exc_type("overall deadline exceeded")
    return remaining if timeout is None else min(timeout, remaining)


def system_resolver(host: str, port: int) -> list[str]:
    """Resolve ``host`` with socket.getaddrinfo to its TCP addresses, in resolver order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


_resolver_pool: ThreadPoolExecutor | None = None
_resolver_pool_lock = threading.Lock()


def _forget_resolver_pool() -> None:
    # A forked child (Celery prefork) inherits the pool but not its threads; work submitted there never runs.
    global _resolver_pool, _resolver_pool_lock
    _resolver_pool = None
    _resolver_pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_resolver_pool)


def _resolve_within(resolver: Resolver, host: str, port: int, timeout: float | None) -> Sequence[str]:
    if timeout is None:
        return resolver(host, port)
    global _resolver_pool
    with _resolver_pool_lock:
        if _resolver_pool is None:
            # getaddrinfo cannot be interrupted; a worker thread lets the caller give up on time.
            _resolver_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="safe-http-dns")
        pool = _resolver_pool
    future = pool.submit(resolver, host, port)
    try:
        return future.result(timeout=timeout)
    except FutureTimeout as exc:
        future.cancel()
        raise httpcore.ConnectTimeout(f"resolving {host!r} timed out") from exc


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every operation is bounded by the overall deadline of the request."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Read up to ``max_bytes`` before the per-read timeout or the deadline, whichever is first."""
        return self._inner.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Write ``buffer`` before the per-write timeout or the deadline, whichever is first."""
        self._inner.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        """Close the underlying stream."""
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        """Upgrade to TLS; httpcore passes the URL's host name, so SNI and certificate checks use it."""
        tls = self._inner.start_tls(ssl_context, server_hostname, _bounded(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(tls)

    def get_extra_info(self, info: str) -> Any:
        """Delegate to the underlying stream."""
        return self._inner.get_extra_info(info)


class GuardedNetworkBackend(httpcore.NetworkBackend):
    """httpcore backend that resolves hosts itself and connects only to addresses the policy allows."""

    def __init__(self, policy: OutboundPolicy, resolver: Resolver | None = None) -> None:
        self._policy = policy
        self._resolver: Resolver = resolver or system_resolver
        self._inner = httpcore.SyncBackend()

    def _addresses(self, host: str, port: int, timeout: float | None) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        try:
            answers = _resolve_within(self._resolver, host, port, _bounded(timeout, httpcore.ConnectTimeout))
        except OSError as exc:
            raise httpcore.ConnectError(f"could not resolve {host!r}: {exc}") from exc
        addresses: list[IPAddress] = []
        for answer in answers:
            try:
                address = ipaddress.ip_address(answer)
            except ValueError as exc:
                raise BlockedDestination(f"resolver returned a non-IP answer for {host!r}") from exc
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise httpcore.ConnectError(f"{host!r} did not resolve to any address")
        return addresses

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        """Resolve ``host``, drop blocked addresses and connect to the first allowed one that answers."""
        addresses = self._addresses(host, port, timeout)
        allowed: list[IPAddress] = []
        reasons: list[str] = []
        for address in addresses:
            reason = blocked_reason(address, self._policy)
            if reason is None:
                allowed.append(address)
            else:
                reasons.append(reason)
        if not allowed:
            # Resolved addresses stay out of the message: it may reach tenants and would map internal DNS.
            raise BlockedDestination(f"destination {host!r} is blocked: it resolves to a {reasons[0]}")
        last_error: Exception | None = None
        for address in allowed:
            try:
                stream = self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=_bounded(timeout, httpcore.ConnectTimeout),
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
                continue
            return _DeadlineStream(stream)
        assert last_error is not None
        raise last_error

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        """Always refused: outbound requests go over TCP only."""
        raise BlockedDestination("unix socket destinations are not allowed")

    def sleep(self, seconds: float) -> None:
        """Sleep, as httpcore's retry logic asks."""
        self._inner.sleep(seconds)


class SafeTransport(httpx.HTTPTransport):
    """httpx transport whose connection pool connects through a GuardedNetworkBackend, without env proxies."""

    def __init__(
        self,
        policy: OutboundPolicy,
        *,
        resolver: Resolver | None = None,
        verify: ssl.SSLContext | bool = True,
        limits: httpx.Limits | None = None,
    ) -> None:
        limits = limits or httpx.Limits(max_connections=20, max_keepalive_connections=10, keepalive_expiry=30)
        ssl_context = httpx.create_ssl_context(verify=verify, trust_env=False)
        super().__init__(verify=ssl_context, trust_env=False, limits=limits)
        # HTTPTransport builds its pool with the default backend; swap in one with the same settings.
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=GuardedNetworkBackend(policy, resolver),
        )


def _no_cookies() -> CookieJar:
    # Cookies set by one destination must never travel to later requests of the same client.
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def _build_client(
    policy: OutboundPolicy,
    *,
    timeout: float,
    resolver: Resolver | None,
    verify: ssl.SSLContext | bool,
    limits: httpx.Limits | None = None,
) -> httpx.Client:
    return httpx.Client(
        transport=SafeTransport(policy, resolver=resolver, verify=verify, limits=limits),
        trust_env=False,
        follow_redirects=False,
        timeout=httpx.Timeout(timeout),
        cookies=_no_cookies(),
        headers={"User-Agent": USER_AGENT},
    )


# Content codings a response may arrive in (a server may ignore "Accept-Encoding: identity"), with zlib's
# window bits for each.
_DECODABLE = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def _bounded_body(response: httpx.Response, limit: int, origin: str) -> Iterator[bytes]:
    """The response body, decoded, stopping once more than ``limit`` bytes came out.

    httpx's own decoding inflates each network chunk whole, so a few kilobytes of nested gzip could grow
    into gigabytes before any size check: here inflation is capped as it goes. One gzip or deflate layer
    is decoded; stacked or unknown codings are refused.
    """
    codings = [c.strip().lower() for c in response.headers.get("content-encoding", "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        yield from response.iter_raw()
        return
    if len(codings) > 1 or codings[0] not in _DECODABLE:
        raise FetchFailed(f"{origin} sent an unsupported Content-Encoding: {', '.join(codings)}")
    decoder = zlib.decompressobj(_DECODABLE[codings[0]])
    produced = 0
    try:
        for chunk in response.iter_raw():
            pending = chunk
            while pending:
                out = decoder.decompress(pending, limit + 1 - produced)
                produced += len(out)
                if out:
                    yield out
                if produced > limit:
                    return
                pending = decoder.unconsumed_tail
    except zlib.error as exc:
        raise FetchFailed(f"{origin} sent a {codings[0]} body that does not decode: {exc}") from exc


def _read_capped(response: httpx.Response, max_bytes: int, origin: str) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError as exc:
            raise FetchFailed(f"{origin} sent an invalid Content-Length") from exc
        if length > max_bytes:
            raise PayloadTooLarge(f"{origin} declares {length} bytes, over the limit of {max_bytes} bytes")
    body = bytearray()
    for chunk in _bounded_body(response, max_bytes, origin):
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"{origin} sent more than the limit of {max_bytes} bytes")
    return bytes(body)


def fetch_bytes(
    url: str,
    policy: OutboundPolicy,
    *,
    max_bytes: int,
    timeout_seconds: float,
    max_redirects: int,
    resolver: Resolver | None = None,
    verify: ssl.SSLContext | bool = True,
) -> FetchedResource:
    """GET ``url`` under ``policy`` within one overall deadline, following up to ``max_redirects`` redirects.

    Raises BlockedDestination, PayloadTooLarge (declared or streamed size over ``max_bytes``) or FetchFailed.
    """
    current = _parse_url(url, policy)
    origin = _origin(current)
    with (
        _build_client(policy, timeout=timeout_seconds, resolver=resolver, verify=verify) as client,
        _deadline_after(timeout_seconds),
    ):
        try:
            request = client.build_request(
                "GET", current, headers={"Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity"}
            )
            for hop in range(max(max_redirects, 0) + 1):
                origin = _origin(request.url)
                response = client.send(request, stream=True)
                try:
                    if response.next_request is not None:
                        if hop >= max_redirects:
                            raise FetchFailed(f"too many redirects (more than {max_redirects})")
                        # httpx built the next hop with browser semantics (303, 301/302 on POST: GET).
                        request = response.next_request
                        _parse_url(str(request.url), policy)
                        continue
                    if not response.is_success:
                        raise FetchFailed(f"{origin} answered HTTP {response.status_code}")
                    data = _read_capped(response, max_bytes, origin)
                    return FetchedResource(
                        data=data,
                        content_type=response.headers.get("content-type"),
                        final_url=str(request.url),
                    )
                finally:
                    response.close()
        except httpx.TimeoutException as exc:
            raise FetchFailed(f"fetching from {origin} timed out after {timeout_seconds:g}s") from exc
        except httpx.UnsupportedProtocol as exc:
            raise BlockedDestination(f"redirect from {origin} to a URL scheme that is not allowed") from exc
        except httpx.HTTPError as exc:
            raise FetchFailed(f"fetching from {origin} failed: {exc}") from exc
        except httpx.InvalidURL as exc:
            raise FetchFailed(f"{origin} redirected to an invalid URL") from exc
    raise AssertionError("unreachable")  # pragma: no cover


class SafeHttpClient:
    """SSRF-protected HTTP client for webhook deliveries: one connection pool, redirects never followed."""

    def __init__(
        self,
        policy: OutboundPolicy,
        *,
        timeout_seconds: float = 10.0,
        excerpt_bytes: int = DEFAULT_EXCERPT_BYTES,
        resolver: Resolver | None = None,
        verify: ssl.SSLContext | bool = True,
        limits: httpx.Limits | None = None,
    ) -> None:
        self._policy = policy
        self._timeout = timeout_seconds
        self._excerpt_bytes = excerpt_bytes
        self._client = _build_client(
            policy, timeout=timeout_seconds, resolver=resolver, verify=verify, limits=limits
        )

    def post(
        self,
        url: str,
        content: bytes,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, str]:
        """POST ``content``; return (status code, start of the body). A 3xx is returned, never followed.

        Raises BlockedDestination for forbidden destinations and FetchFailed for network errors and timeouts.
        """
        parsed = _parse_url(url, self._policy)
        origin = _origin(parsed)
        limit = self._timeout if timeout is None else timeout
        try:
            with (
                _deadline_after(limit),
                self._client.stream(
                    "POST",
                    parsed,
                    content=content,
                    headers={**dict(headers or {}), "Accept-Encoding": "identity"},
                    timeout=limit,
                ) as response,
            ):
                excerpt = bytearray()
                try:
                    for chunk in _bounded_body(response, self._excerpt_bytes, origin):
                        excerpt += chunk
                        if len(excerpt) >= self._excerpt_bytes:
                            break
                except FetchFailed as exc:  # the status is the answer; a body that does not decode is not
                    excerpt = bytearray(str(exc).encode())
                text = bytes(excerpt[: self._excerpt_bytes]).decode("utf-8", errors="replace")
                return response.status_code, text
        except httpx.TimeoutException as exc:
            raise FetchFailed(f"delivery to {origin} timed out after {limit:g}s") from exc
        except httpx.HTTPError as exc:
            raise FetchFailed(f"delivery to {origin} failed: {exc}") from exc

    def close(self) -> None:
        """Close pooled connections."""
        self._client.close()

    def __enter__(self) -> SafeHttpClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
