"""The egress guard: where ``http`` tasks and webhooks may connect.

A caller's URL is untrusted, so the check is on the IP address the socket actually
connects to, not on the text of the URL (``2130706433``, ``0x7f.1``, ``[::ffff:7f00:1]``
and a DNS name pointing at ``127.0.0.1`` are all the same address)::

    fetch()                      redirects by hand (each hop re-checked), body cap, total time
      client.send()              an httpx.AsyncClient from EgressGuard.client():
                                 no environment proxies, no cookie jar, no auto-redirects
        EgressTransport          only http and https; caps the bytes read off the wire
          httpcore pool
            _GuardedBackend      resolves the host ONCE, checks EVERY address, then
              .connect_tcp()     connects to a checked IP literal: no second lookup,
                                 so no DNS-rebinding window. TLS SNI and certificate
                                 checks still use the URL's hostname (httpcore passes
                                 it to start_tls), and so does the Host header.

Private, loopback, link-local (cloud metadata), shared, reserved and the IPv6
counterparts are refused unless ``FANOUT_EGRESS_ALLOW`` names them; unspecified,
multicast and broadcast addresses are refused always (``0.0.0.0`` means "this host").

Errors: :class:`EgressDenied` (a refused destination), :class:`ResponseTooLarge`,
:class:`TooManyRedirects`, all :class:`EgressError`. Network failures stay httpx's own.
"""

from __future__ import annotations

import asyncio
import codecs
import http.cookiejar
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]
"""``(host, port) -> addresses``: how the guard turns a hostname into addresses."""

DEFAULT_MAX_RESPONSE_BYTES = 1_048_576
MAX_REDIRECTS = 5
ALLOWED_SCHEMES = frozenset({"http", "https"})

# --- errors ------------------------------------------------------------------------


class EgressError(Exception):
    """Base of the guard's own errors."""


class EgressDenied(EgressError):
    """The destination is refused: a scheme, a URL or an address the guard won't reach."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ResponseTooLarge(EgressError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the response is larger than the cap of {limit} bytes")
        self.limit = limit


class TooManyRedirects(EgressError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} redirects")
        self.limit = limit


# --- which addresses are private ---------------------------------------------------

_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # RFC 6598 carrier-grade NAT
# IETF protocol assignments (RFC 6890); older Pythons call only a /29 of it private.
_PROTOCOL_ASSIGNMENTS = ipaddress.IPv4Network("192.0.0.0/24")
_METADATA = ipaddress.IPv4Address("169.254.169.254")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the v4 address is the last 32 bits
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215 local use


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a mapped or NAT64 address stands for (the same destination)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(ip.packed[-4:])
    return None


def _classify(ip: IPAddress) -> tuple[str, bool] | None:
    """``(why the address is not public, whether the allow list may still permit it)``,
    or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        v4 = _embedded_v4(ip)
        if v4 is not None:
            inner = _classify(v4)
            kind = "IPv4-mapped" if ip.ipv4_mapped is not None else "NAT64"
            return None if inner is None else (f"{kind} {inner[0]}", inner[1])
        if ip in _NAT64_LOCAL:
            return ("local-use NAT64", True)
        if ip.sixtofour is not None:
            # 6to4 goes through the relay at the embedded address: a private one is
            # a way into the local network.
            inner = _classify(ip.sixtofour)
            if inner is not None:
                return (f"6to4 {inner[0]}", inner[1])
    if ip.is_unspecified:
        return ("unspecified", False)
    if ip.is_multicast:
        return ("multicast", False)
    if ip == _BROADCAST:
        return ("broadcast", False)
    if ip.is_loopback:
        return ("loopback", True)
    if ip.is_link_local:
        return ("link-local (cloud metadata)" if ip == _METADATA else "link-local", True)
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return ("site-local", True)
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return ("shared (RFC 6598)", True)
    if ip.is_private:
        return ("private", True)
    if isinstance(ip, ipaddress.IPv4Address) and ip in _PROTOCOL_ASSIGNMENTS:
        return ("IETF protocol assignment", True)
    if ip.is_reserved:
        return ("reserved", True)
    if not ip.is_global:
        return ("non-global", True)
    return None


def blocked_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public destination (``"loopback"``, ...), or None if it is."""
    found = _classify(ip)
    return None if found is None else found[0]


# --- the allow list ----------------------------------------------------------------


@dataclass(frozen=True)
class AllowRule:
    """One entry of ``FANOUT_EGRESS_ALLOW``: a network or a hostname, maybe one port.

    Forms: ``10.0.0.0/8``, ``10.1.2.3``, ``fd00::/8``, ``api.internal``, ``*.internal``
    (any name below it), each optionally with ``:PORT`` (IPv6 in brackets:
    ``[::1]:8080``, ``[fd00::/8]:443``).
    """

    text: str
    network: IPNetwork | None = None
    host: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, entry: str) -> AllowRule:
        text = entry.strip()
        target, port = _split_port(text)
        try:
            return cls(text, network=ipaddress.ip_network(target, strict=False), port=port)
        except ValueError:
            pass
        host = _normal_host(target)
        name = host.removeprefix("*.")
        labels = name.split(".")
        if not name or not all(label and _HOST_CHARS.issuperset(label) for label in labels):
            raise ValueError(
                f"egress allow entry {entry!r} is neither a CIDR, an IP nor a hostname"
            )
        return cls(text, host=host, port=port)

    def allows(self, host: str | None, ip: IPAddress, port: int | None) -> bool:
        if self.port is not None and port != self.port:
            return False
        if self.network is not None:
            candidates = [ip]
            if isinstance(ip, ipaddress.IPv6Address) and (v4 := _embedded_v4(ip)) is not None:
                candidates.append(v4)
            # Compare versions first: ``in`` across versions is not an error, it is wrong.
            return any(c.version == self.network.version and c in self.network for c in candidates)
        if host is None or self.host is None:
            return False
        name = _normal_host(host)
        if self.host.startswith("*."):
            return name.endswith(self.host[1:])
        return name == self.host


_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def _normal_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def _split_port(text: str) -> tuple[str, int | None]:
    """``host:port`` -> (host, port); IPv6 needs brackets to carry a port."""
    if text.startswith("["):
        inner, _, rest = text[1:].partition("]")
        if not rest:
            return inner, None
        if not rest.startswith(":"):
            raise ValueError(f"egress allow entry {text!r}: expected ':PORT' after ']'")
        return inner, _port(text, rest[1:])
    if text.count(":") == 1:  # an IPv6 address has at least two colons
        target, _, port = text.partition(":")
        return target, _port(text, port)
    return text, None


def _port(entry: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"egress allow entry {entry!r}: {text!r} is not a port")
    return int(text)


def parse_allow(setting: str) -> tuple[AllowRule, ...]:
    """Rules from the comma-separated ``FANOUT_EGRESS_ALLOW``; a bad entry raises ValueError."""
    return tuple(AllowRule.parse(entry) for entry in setting.split(",") if entry.strip())


# --- resolving ---------------------------------------------------------------------


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """Every address ``getaddrinfo`` gives for ``host``, in its order, without repeats."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0])
        if ip not in addresses:
            addresses.append(ip)
    return addresses


def check_url(url: httpx.URL | str) -> httpx.URL:
    """The parsed URL if its form is acceptable (http or https, a host); no DNS here."""
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise EgressDenied(f"not a valid URL: {exc}") from None
    if parsed.scheme not in ALLOWED_SCHEMES:
        raise EgressDenied(
            f"scheme {parsed.scheme or '(none)'!r} is not allowed, only http and https"
        )
    if not parsed.host:
        raise EgressDenied("the URL has no host")
    return parsed


# --- the guard ---------------------------------------------------------------------


class EgressGuard:
    """The egress policy, and the factory of HTTP clients that enforce it.

    ``allow`` is the ``FANOUT_EGRESS_ALLOW`` string (see :class:`AllowRule`);
    ``resolver`` is the seam tests use in place of DNS.
    """

    def __init__(
        self,
        allow: str = "",
        *,
        resolver: Resolver | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self.rules = parse_allow(allow)
        self.resolver: Resolver = resolver or system_resolver
        self.max_response_bytes = max_response_bytes

    def check_ip(
        self, ip: IPAddress | str, *, host: str | None = None, port: int | None = None
    ) -> None:
        """Raise :class:`EgressDenied` unless ``ip`` (reached as ``host:port``) may be used."""
        address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
        found = _classify(address)
        if found is None:
            return
        reason, allowable = found
        if allowable and any(rule.allows(host, address, port) for rule in self.rules):
            return
        where = str(address)
        if host and _normal_host(host) != where:
            where = f"{host} ({address})"
        verdict = "never allowed" if not allowable else "not in FANOUT_EGRESS_ALLOW"
        raise EgressDenied(f"refused {where}: {reason} address, {verdict}")

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Addresses of ``host``, each checked; any refused one refuses the host."""
        try:
            addresses = [ipaddress.ip_address(_normal_host(host))]
        except ValueError:
            addresses = await self.resolver(host, port)
        if not addresses:
            raise OSError(f"{host} has no address")
        for address in addresses:
            self.check_ip(address, host=host, port=port)
        return addresses

    def client(
        self,
        *,
        timeout: httpx.Timeout | float = 10.0,
        max_connections: int = 100,
        verify: ssl.SSLContext | bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` whose every connection passes this guard.

        ``timeout`` bounds each phase (connect, read, ...); bound the whole exchange
        with :func:`fetch`. The environment is not trusted (no proxies, which would
        connect to an unchecked place; no ``.netrc`` credentials sent to a caller's
        host), cookies are never kept (the client is shared by tenants), and redirects
        are not followed unless asked (:func:`fetch` follows them).
        """
        transport = EgressTransport(
            self,
            verify=verify,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        return httpx.AsyncClient(
            transport=transport,
            trust_env=False,
            follow_redirects=False,
            max_redirects=MAX_REDIRECTS,
            timeout=timeout,
            cookies=_no_cookies(),
            # Ask for no compression so that the byte cap on the wire is the cap on
            # the body too (fetch() still caps the decoded body).
            headers={"accept-encoding": "identity", "user-agent": "fanout", **(headers or {})},
        )


def _no_cookies() -> http.cookiejar.CookieJar:
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


class EgressTransport(httpx.AsyncHTTPTransport):
    """``AsyncHTTPTransport`` on a connection pool whose network backend checks every
    address it connects to; refuses non-http(s) and caps the bytes read per response."""

    def __init__(
        self, guard: EgressGuard, *, verify: ssl.SSLContext | bool, limits: httpx.Limits
    ) -> None:
        ssl_context = httpx.create_ssl_context(verify=verify, trust_env=False)
        super().__init__(verify=ssl_context, trust_env=False, limits=limits)
        self.guard = guard
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_GuardedBackend(guard),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        check_url(request.url)
        response = await super().handle_async_request(request)
        limit = self.guard.max_response_bytes
        # A HEAD or 304 response declares the length of a body it does not send.
        declared = response.headers.get("content-length", "")
        bodyless = request.method == "HEAD" or response.status_code == 304
        if not bodyless and declared.isdigit() and int(declared) > limit:
            await response.aclose()
            raise ResponseTooLarge(limit)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _CappedStream(response.stream, limit)
        return response


class _CappedStream(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, limit: int) -> None:
        self._stream = stream
        self._limit = limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._stream:
            seen += len(chunk)
            if seen > self._limit:
                raise ResponseTooLarge(self._limit)
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolve once, check every address, connect to a checked IP literal."""

    def __init__(self, guard: EgressGuard) -> None:
        self._guard = guard
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                addresses = await self._guard.resolve(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} took over {timeout} s") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise EgressDenied("unix sockets are not an egress destination")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


# --- one exchange ------------------------------------------------------------------


@dataclass(frozen=True)
class Fetched:
    """A response read whole through the guard."""

    status: int
    headers: httpx.Headers
    content: bytes
    url: httpx.URL

    @property
    def is_json(self) -> bool:
        media = str(self.headers.get("content-type", "")).split(";")[0].strip().lower()
        return media == "application/json" or media.endswith("+json")

    @property
    def text(self) -> str:
        """The body decoded by its declared charset (UTF-8 when none or unknown)."""
        charset = "utf-8"
        for param in str(self.headers.get("content-type", "")).split(";")[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "charset":
                charset = value.strip().strip('"') or charset
        try:
            codecs.lookup(charset)
        except LookupError:
            charset = "utf-8"
        return self.content.decode(charset, errors="replace")


async def fetch(
    client: httpx.AsyncClient,
    method: str,
    url: httpx.URL | str,
    *,
    timeout: float,
    headers: Mapping[str, str] | None = None,
    json: Any = None,
    content: bytes | None = None,
    follow_redirects: bool = True,
    max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
) -> Fetched:
    """One request through ``client`` (from :meth:`EgressGuard.client`), whole within
    ``timeout`` seconds, following at most ``client.max_redirects`` redirects, each
    hop's scheme and address checked again, reading at most ``max_bytes`` of body.

    Raises :class:`EgressError`, ``TimeoutError`` and httpx's transport errors.
    """
    async with asyncio.timeout(timeout):
        request = client.build_request(
            method, check_url(url), headers=headers, json=json, content=content
        )
        for _ in range(client.max_redirects + 1):
            response = await client.send(request, stream=True, follow_redirects=False)
            try:
                next_request = response.next_request
                if next_request is None or not follow_redirects:
                    body = await _read_capped(response, max_bytes)
                    return Fetched(response.status_code, response.headers, body, request.url)
            finally:
                await response.aclose()
            check_url(next_request.url)
            request = next_request
        raise TooManyRedirects(client.max_redirects)


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    """The decoded body, refusing more than ``limit`` bytes (a gzip bomb is small on
    the wire and large here)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise ResponseTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)
