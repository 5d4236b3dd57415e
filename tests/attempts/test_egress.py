"""The egress guard.

Every known way around an address check is tried against a CANARY: a TCP listener on
loopback that records each connection it accepts, and must never accept one. Then the
http task end to end against real servers on loopback: allowed destinations work,
redirects are re-checked, size and time are bounded, statuses map to attempts.

No traffic leaves loopback: names other than ``localhost`` resolve through the
guard's resolver seam, and a refused destination is refused before any connect.
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import ipaddress
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from aiohttp import web

from service.attempts import Attempt
from service.attempts.http import run_http
from service.egress import (
    AllowRule,
    EgressDenied,
    EgressGuard,
    IPAddress,
    Resolver,
    blocked_reason,
    fetch,
    system_resolver,
)
from service.spec import HttpTask

MiB = 1024 * 1024


def task(url: str, **fields: Any) -> HttpTask:
    return HttpTask.model_validate({"kind": "http", "url": url, **fields})


def fake_resolver(table: dict[str, list[str]], calls: list[str] | None = None) -> Resolver:
    """Answers from ``table``. ``localhost`` and numeric forms (``127.1``, ``0x7f.1``)
    go to getaddrinfo, which answers them from /etc/hosts or by parsing; any other name
    fails, so that no test ever sends a DNS query off this machine."""

    async def resolve(host: str, port: int) -> list[IPAddress]:
        if calls is not None:
            calls.append(host)
        if host in table:
            return [ipaddress.ip_address(a) for a in table[host]]
        if host.lower() == "localhost" or re.fullmatch(r"[0-9a-fx.]+", host.lower()):
            return await system_resolver(host, port)
        raise socket.gaierror(socket.EAI_NONAME, f"{host} is not in the test's table")

    return resolve


async def attempt(guard: EgressGuard, url: str, *, within: float = 5, **fields: Any) -> Attempt:
    async with guard.client() as http:
        return await run_http(http, task(url, **fields), timeout=within)


def bound_socket(host: str, port: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


# --- the canary --------------------------------------------------------------------


@dataclass
class Canary:
    """Listens on 127.0.0.1 and, when the machine has IPv6, ::1 (same port)."""

    port: int = 0
    hosts: list[str] = field(default_factory=list)
    peers: list[tuple[str, int]] = field(default_factory=list)
    servers: list[asyncio.Server] = field(default_factory=list)

    async def start(self) -> None:
        for _ in range(20):
            v4 = bound_socket("127.0.0.1")
            port = v4.getsockname()[1]
            try:
                v6: socket.socket | None = bound_socket("::1", port)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:  # taken on ::1 only: another port
                    v4.close()
                    continue
                v6 = None  # no IPv6 loopback here: the v4 listener alone
            break
        else:
            raise RuntimeError("no port free on both 127.0.0.1 and ::1")
        self.port = port
        for sock in (v4, v6):
            if sock is not None:
                self.servers.append(await asyncio.start_server(self._record, sock=sock))
                self.hosts.append(sock.getsockname()[0])

    async def _record(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(tuple(writer.get_extra_info("peername")[:2]))
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 6\r\n\r\ncanary"
        )
        await writer.drain()
        writer.close()

    async def hits(self) -> list[tuple[str, int]]:
        """Connections accepted so far, probes excluded.

        A connection the client made is queued at the listener before the client's
        call returns; a probe queued after it is accepted after it. So once each
        listener has answered a probe, every earlier connection has been recorded.
        """
        probes = []
        for host in self.hosts:
            reader, writer = await asyncio.open_connection(host, self.port)
            probes.append(tuple(writer.get_extra_info("sockname")[:2]))
            async with asyncio.timeout(5):
                await reader.read()  # the canary answers and closes: it has recorded us
            writer.close()
            await writer.wait_closed()
        return [peer for peer in self.peers if peer not in probes]

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
            await server.wait_closed()


@pytest.fixture
async def canary() -> AsyncIterator[Canary]:
    listener = Canary()
    await listener.start()
    yield listener
    await listener.stop()


# --- an upstream server ------------------------------------------------------------


@dataclass
class Upstream:
    host: str
    port: int
    seen: list[web.Request] = field(default_factory=list)
    scheme: str = "http"

    def url(self, path: str = "/") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{path}"


def upstream_app(record: list[web.Request]) -> web.Application:
    async def json_(request: web.Request) -> web.Response:
        return web.json_response({"answer": 391, "items": [1, 2]})

    async def echo(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        return web.json_response({"method": request.method, "host": request.host, "json": body})

    async def text(request: web.Request) -> web.Response:
        return web.Response(text="plain text, ok", headers={"ETag": '"v1"', "X-Secret": "internal"})

    async def status(request: web.Request) -> web.Response:
        headers = {}
        if "retry_after" in request.query:
            headers["Retry-After"] = request.query["retry_after"]
        return web.Response(status=int(request.match_info["code"]), text="nope", headers=headers)

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": request.query["to"]})

    async def chain(request: web.Request) -> web.Response:
        left = int(request.match_info["n"])
        if left == 0:
            return web.json_response({"arrived": True})
        return web.Response(status=307, headers={"Location": f"/chain/{left - 1}"})

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * (2 * MiB))

    async def big_chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(32):
            await response.write(b"x" * 65536)
        await response.write_eof()
        return response

    async def gzip_bomb(request: web.Request) -> web.Response:
        body = gzip.compress(b"\0" * (8 * MiB))
        return web.Response(body=body, headers={"Content-Encoding": "gzip"})

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(1000):  # a byte every 20 ms: never a read timeout, 20 s in all
            await response.write(b".")
            await asyncio.sleep(0.02)
        return response

    async def set_cookie(request: web.Request) -> web.Response:
        response = web.json_response({})
        response.set_cookie("session", "tenant-a-secret")
        return response

    async def cookies(request: web.Request) -> web.Response:
        return web.json_response(dict(request.cookies))

    @web.middleware
    async def recording(request: web.Request, handler: Any) -> web.StreamResponse:
        record.append(request)
        response: web.StreamResponse = await handler(request)
        return response

    app = web.Application(middlewares=[recording])
    app.router.add_get("/json", json_)
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/text", text)
    app.router.add_get("/status/{code}", status)
    app.router.add_route("*", "/redirect", redirect)
    app.router.add_get("/chain/{n}", chain)
    app.router.add_get("/big", big)
    app.router.add_get("/big-chunked", big_chunked)
    app.router.add_get("/gzip-bomb", gzip_bomb)
    app.router.add_get("/trickle", trickle)
    app.router.add_get("/set-cookie", set_cookie)
    app.router.add_get("/cookies", cookies)
    return app


Serve = Callable[..., Awaitable[Upstream]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start upstream servers: ``await serve(host="127.0.0.1", port=0, tls=None)``."""
    runners: list[web.AppRunner] = []

    async def start(
        host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None
    ) -> Upstream:
        try:
            sock = bound_socket(host, port)
        except OSError as exc:
            pytest.skip(f"cannot listen on {host}:{port} here: {exc}")
        upstream = Upstream(host, sock.getsockname()[1], scheme="https" if tls else "http")
        runner = web.AppRunner(
            upstream_app(upstream.seen), handler_cancellation=True, shutdown_timeout=1
        )
        await runner.setup()
        runners.append(runner)
        await web.SockSite(runner, sock, ssl_context=tls).start()
        return upstream

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def upstream(serve: Serve) -> Upstream:
    return await serve()


# --- which addresses are refused (pure) --------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "shared (RFC 6598)"),
        ("100.127.255.254", "shared (RFC 6598)"),
        ("169.254.169.254", "link-local (cloud metadata)"),
        ("169.254.0.1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("255.255.255.255", "broadcast"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fc00::1", "private"),
        ("fd00:ec2::254", "private"),
        ("fe80::1", "link-local"),
        ("ff02::1", "multicast"),
        ("fec0::1", "site-local"),
        ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
        ("::ffff:10.0.0.1", "IPv4-mapped private"),
        ("::ffff:169.254.169.254", "IPv4-mapped link-local (cloud metadata)"),
        ("64:ff9b::7f00:1", "NAT64 loopback"),
        ("64:ff9b::a00:1", "NAT64 private"),
        ("64:ff9b:1::1", "local-use NAT64"),
        ("2002:7f00:1::1", "6to4 loopback"),
        ("2002:c0a8:101::1", "6to4 private"),
        ("::127.0.0.1", "reserved"),
    ],
)
def test_non_public_addresses_are_named(address: str, reason: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "93.184.215.14",
        "2606:4700:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
    ],
)
def test_public_addresses_pass(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "address", ["198.18.0.1", "192.0.0.8", "240.0.0.1", "2001:db8::1", "2001::1"]
)
def test_other_special_purpose_addresses_are_refused(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is not None


# --- the allow list ----------------------------------------------------------------


def test_allow_list_forms_parse() -> None:
    guard = EgressGuard(
        " 10.0.0.0/8, api.internal ,127.0.0.1:9000,[::1]:8080, *.svc.local, fd00::/8,"
    )
    rules = [(str(r.network) if r.network else r.host, r.port) for r in guard.rules]
    assert rules == [
        ("10.0.0.0/8", None),
        ("api.internal", None),
        ("127.0.0.1/32", 9000),
        ("::1/128", 8080),
        ("*.svc.local", None),
        ("fd00::/8", None),
    ]


@pytest.mark.parametrize(
    "entry", ["10.0.0.0/33", "api:http", "host:0", "bad host!", "[::1]x", "a..b"]
)
def test_a_bad_allow_entry_is_a_config_error(entry: str) -> None:
    with pytest.raises(ValueError, match="egress allow entry"):
        AllowRule.parse(entry)


def test_a_cidr_allows_its_addresses_and_their_mapped_forms() -> None:
    guard = EgressGuard("10.0.0.0/8")
    guard.check_ip("10.1.2.3")
    guard.check_ip("::ffff:10.1.2.3")
    with pytest.raises(
        EgressDenied, match=r"192\.168\.1\.1: private address, not in FANOUT_EGRESS_ALLOW"
    ):
        guard.check_ip("192.168.1.1")


def test_a_port_rule_allows_that_port_only() -> None:
    guard = EgressGuard("127.0.0.1:9000")
    guard.check_ip("127.0.0.1", port=9000)
    with pytest.raises(EgressDenied):
        guard.check_ip("127.0.0.1", port=9001)


def test_a_hostname_rule_allows_that_name_only() -> None:
    guard = EgressGuard("api.internal, *.svc.local")
    guard.check_ip("10.0.0.5", host="API.internal.")
    guard.check_ip("10.0.0.5", host="db.svc.local")
    for host in ("evil.api.internal", "svc.local", "api.internal.evil", None):
        with pytest.raises(EgressDenied):
            guard.check_ip("10.0.0.5", host=host)


def test_unspecified_and_multicast_are_never_allowed() -> None:
    guard = EgressGuard("0.0.0.0/0, ::/0")
    guard.check_ip("127.0.0.1")
    guard.check_ip("::1")
    for address in ("0.0.0.0", "224.0.0.1", "255.255.255.255", "::", "ff02::1"):
        with pytest.raises(EgressDenied, match="never allowed"):
            guard.check_ip(address)


async def test_a_name_is_refused_when_any_of_its_addresses_is() -> None:
    calls: list[str] = []
    guard = EgressGuard(
        "", resolver=fake_resolver({"mixed.test": ["93.184.215.14", "127.0.0.1"]}, calls)
    )
    with pytest.raises(EgressDenied, match=r"mixed\.test \(127\.0\.0\.1\): loopback"):
        await guard.resolve("mixed.test", 80)
    assert calls == ["mixed.test"]


async def test_every_address_of_a_name_is_checked_before_connecting(
    canary: Canary, serve: Serve
) -> None:
    """An allowed first address does not let a refused second one through."""
    allowed = await serve("127.0.0.2", canary.port)
    guard = EgressGuard(
        "127.0.0.2/32", resolver=fake_resolver({"both.test": ["127.0.0.2", "127.0.0.1"]})
    )
    result = await attempt(guard, f"http://both.test:{canary.port}/json")
    assert result.error_type == "egress_denied", result
    assert allowed.seen == []
    assert await canary.hits() == []


async def test_the_metadata_address_is_refused_by_name_too() -> None:
    guard = EgressGuard("", resolver=fake_resolver({"metadata.test": ["169.254.169.254"]}))
    with pytest.raises(EgressDenied, match=r"link-local \(cloud metadata\) address"):
        await guard.resolve("metadata.test", 80)


# --- the bypass matrix, against the canary -----------------------------------------

BYPASSES = [
    "http://127.0.0.1:{port}/",
    "https://127.0.0.1:{port}/",
    "http://localhost:{port}/",
    "http://LocalHost:{port}/",
    "http://2130706433:{port}/",  # decimal
    "http://0177.0.0.1:{port}/",  # octal
    "http://017700000001:{port}/",  # octal, one number
    "http://0x7f.0.0.1:{port}/",  # hex
    "http://0x7f000001:{port}/",
    "http://127.1:{port}/",  # short form
    "http://[::1]:{port}/",
    "http://[0:0:0:0:0:0:0:1]:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/",  # IPv4-mapped
    "http://[::ffff:7f00:1]:{port}/",
    "http://[64:ff9b::7f00:1]:{port}/",  # NAT64
    "http://example.com@127.0.0.1:{port}/",  # userinfo
    "http://127.0.0.1:{port}#@example.com/",
    "http://0.0.0.0:{port}/",  # "this host"
    "http://0:{port}/",
    "http://[::]:{port}/",
    "http://canary.test:{port}/",  # a name that resolves to loopback
    "http://mapped.test:{port}/",  # ... to a mapped loopback
    "file:///etc/passwd",
    "ftp://127.0.0.1:{port}/",
    "gopher://127.0.0.1:{port}/_GET%20/",
    "dict://127.0.0.1:{port}/",
    "ws://127.0.0.1:{port}/",
    "//127.0.0.1:{port}/",
    "127.0.0.1:{port}",
]

RESOLVES = {
    "canary.test": ["127.0.0.1"],
    "mapped.test": ["::ffff:127.0.0.1"],
}


@pytest.mark.parametrize("url", BYPASSES)
async def test_a_bypass_never_reaches_the_canary(canary: Canary, url: str) -> None:
    guard = EgressGuard("", resolver=fake_resolver(RESOLVES))
    result = await attempt(guard, url.format(port=canary.port))
    assert (result.error_type, result.transient) == ("egress_denied", False), result
    assert await canary.hits() == []


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.1:{port}/",
        "http://localhost:{port}/",
        "http://[::ffff:127.0.0.1]:{port}/",
        "http://2130706433:{port}/",
        "file:///etc/passwd",
        "gopher://127.0.0.1:{port}/",
    ],
)
async def test_a_redirect_from_an_allowed_server_is_checked_again(
    canary: Canary, serve: Serve, location: str
) -> None:
    allowed = await serve("127.0.0.2")
    guard = EgressGuard("127.0.0.2/32")
    target = location.format(port=canary.port)
    result = await attempt(guard, allowed.url(f"/redirect?to={quote(target, safe='')}"))
    assert result.error_type == "egress_denied", result
    assert [r.path for r in allowed.seen] == ["/redirect"]
    assert await canary.hits() == []


async def test_a_port_rule_does_not_open_other_ports_of_the_host(
    canary: Canary, upstream: Upstream
) -> None:
    guard = EgressGuard(f"127.0.0.1:{upstream.port}")
    assert (await attempt(guard, upstream.url("/json"))).ok
    result = await attempt(guard, upstream.url(f"/redirect?to=http://127.0.0.1:{canary.port}/"))
    assert result.error_type == "egress_denied", result
    assert await canary.hits() == []


async def test_the_checked_address_is_the_one_connected_to(canary: Canary, serve: Serve) -> None:
    """DNS rebinding: a name that answers "allowed" once and "loopback" after is looked
    up once, and the connection goes to the address that was checked."""
    allowed = await serve("127.0.0.2", canary.port)
    answers = iter([["127.0.0.2"]])
    calls: list[str] = []

    async def rebinding(host: str, port: int) -> list[IPAddress]:
        calls.append(host)
        return [ipaddress.ip_address(a) for a in next(answers, ["127.0.0.1"])]

    guard = EgressGuard("127.0.0.2/32", resolver=rebinding)
    result = await attempt(guard, f"http://rebind.test:{canary.port}/json")
    assert result.ok, result
    assert calls == ["rebind.test"]
    assert [r.host for r in allowed.seen] == [f"rebind.test:{canary.port}"]
    assert await canary.hits() == []


async def test_proxy_settings_in_the_environment_are_ignored(
    canary: Canary, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{canary.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    result = await attempt(EgressGuard("127.0.0.1"), upstream.url("/json"))
    assert result.ok, result
    assert await canary.hits() == []


async def test_the_canary_sees_an_unguarded_client(canary: Canary) -> None:
    """Control: the matrix above would notice a connection."""
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(f"http://2130706433:{canary.port}/")
    assert response.text == "canary"
    assert len(await canary.hits()) == 1


async def test_the_canary_sees_the_guard_when_loopback_is_allowed(canary: Canary) -> None:
    """Control: refusals in the matrix come from the check, not from a broken client."""
    result = await attempt(EgressGuard("127.0.0.0/8"), f"http://127.1:{canary.port}/")
    assert result.output == {
        "status": 200,
        "headers": {"content-type": "text/plain", "content-length": "6"},
        "body": "canary",
    }
    assert len(await canary.hits()) == 1


# --- allowed destinations ----------------------------------------------------------


async def test_an_allowed_loopback_server_answers_with_json(upstream: Upstream) -> None:
    result = await attempt(EgressGuard("127.0.0.1"), upstream.url("/json"))
    assert result.ok, result
    assert result.output["status"] == 200
    assert result.output["headers"]["content-type"] == "application/json; charset=utf-8"
    assert result.output["body"] == {"answer": 391, "items": [1, 2]}


async def test_method_and_json_body_are_sent(upstream: Upstream) -> None:
    result = await attempt(
        EgressGuard("127.0.0.1"), upstream.url("/echo"), method="POST", json={"q": [1, "a"]}
    )
    assert result.output["body"] == {
        "method": "POST",
        "host": f"127.0.0.1:{upstream.port}",
        "json": {"q": [1, "a"]},
    }


async def test_a_text_body_is_text_and_only_selected_headers_are_kept(upstream: Upstream) -> None:
    result = await attempt(EgressGuard("127.0.0.1"), upstream.url("/text"))
    assert result.output["body"] == "plain text, ok"
    assert result.output["headers"]["etag"] == '"v1"'
    assert "x-secret" not in result.output["headers"]


async def test_an_allowed_hostname_keeps_its_host_header(upstream: Upstream) -> None:
    guard = EgressGuard(
        "api.internal.test", resolver=fake_resolver({"api.internal.test": ["127.0.0.1"]})
    )
    result = await attempt(
        guard, f"http://api.internal.test:{upstream.port}/echo", headers={"Host": "other.example"}
    )
    assert result.output["body"]["host"] == f"api.internal.test:{upstream.port}"


async def test_redirects_are_followed_up_to_five(upstream: Upstream) -> None:
    guard = EgressGuard("127.0.0.1")
    assert (await attempt(guard, upstream.url("/chain/5"))).output["body"] == {"arrived": True}
    result = await attempt(guard, upstream.url("/chain/6"))
    assert (result.error_type, result.transient) == ("upstream_error", False)
    assert result.error_message == "more than 5 redirects"


async def test_fetch_can_leave_redirects_alone(upstream: Upstream) -> None:
    async with EgressGuard("127.0.0.1").client() as http:
        fetched = await fetch(
            http,
            "POST",
            upstream.url("/redirect?to=/json"),
            content=b"{}",
            timeout=5,
            follow_redirects=False,
        )
    assert fetched.status == 302
    assert [r.path for r in upstream.seen] == ["/redirect"]


async def test_cookies_are_not_kept_between_requests(upstream: Upstream) -> None:
    async with EgressGuard("127.0.0.1").client() as http:
        await run_http(http, task(upstream.url("/set-cookie")), timeout=5)
        result = await run_http(http, task(upstream.url("/cookies")), timeout=5)
    assert result.output["body"] == {}


# --- TLS: the checked IP is dialled, the hostname is verified ----------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=api.internal.test",
            "-addext",
            "subjectAltName=DNS:api.internal.test",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    yield cert, key


async def test_tls_uses_the_hostname_for_sni_and_verification(
    serve: Serve, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    server_names: list[str | None] = []
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    server_tls.sni_callback = lambda _sock, name, _ctx: server_names.append(name)
    tls = await serve(tls=server_tls)
    trust = ssl.create_default_context(cafile=str(cert))
    guard = EgressGuard(
        "api.internal.test, 127.0.0.1", resolver=fake_resolver({"api.internal.test": ["127.0.0.1"]})
    )

    async with guard.client(verify=trust) as http:
        by_name = await run_http(
            http, task(f"https://api.internal.test:{tls.port}/json"), timeout=5
        )
        by_ip = await run_http(http, task(f"https://127.0.0.1:{tls.port}/json"), timeout=5)

    assert by_name.output["body"] == {"answer": 391, "items": [1, 2]}, by_name
    assert server_names[0] == "api.internal.test"
    assert (
        by_ip.error_type == "upstream_error"
    )  # the certificate names api.internal.test, not 127.0.0.1
    assert "CERTIFICATE_VERIFY_FAILED" in (by_ip.error_message or "")


# --- bounds ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/big", "/big-chunked", "/gzip-bomb"])
async def test_a_body_over_the_cap_is_an_invalid_response(upstream: Upstream, path: str) -> None:
    result = await attempt(EgressGuard("127.0.0.1"), upstream.url(path))
    assert (result.error_type, result.transient) == ("invalid_response", False), result
    assert result.error_message == f"the response is larger than the cap of {MiB} bytes"


async def test_the_cap_is_configurable(upstream: Upstream) -> None:
    guard = EgressGuard("127.0.0.1", max_response_bytes=4 * MiB)
    async with guard.client() as http:
        result = await run_http(http, task(upstream.url("/big")), timeout=5, max_bytes=4 * MiB)
    assert len(result.output["body"]) == 2 * MiB


async def test_a_slow_trickle_is_cut_at_the_total_time(upstream: Upstream) -> None:
    started = time.monotonic()
    result = await attempt(EgressGuard("127.0.0.1"), upstream.url("/trickle"), within=0.5)
    assert (result.error_type, result.transient) == ("timeout", True), result
    assert time.monotonic() - started < 3


# --- statuses and failures ---------------------------------------------------------


async def test_429_is_rate_limited_and_says_when_to_retry(upstream: Upstream) -> None:
    result = await attempt(EgressGuard("127.0.0.1"), upstream.url("/status/429?retry_after=7"))
    assert (result.error_type, result.transient, result.retry_after) == ("rate_limited", True, 7.0)
    assert result.error_message == "HTTP 429: nope"


@pytest.mark.parametrize("code", [408, 409, 500, 502, 503])
async def test_retryable_statuses_are_transient(upstream: Upstream, code: int) -> None:
    result = await attempt(EgressGuard("127.0.0.1"), upstream.url(f"/status/{code}?retry_after=2"))
    assert (result.error_type, result.transient, result.retry_after) == (
        "upstream_error",
        True,
        2.0,
    )


@pytest.mark.parametrize("code", [400, 401, 403, 404, 422])
async def test_other_4xx_fail_at_once(upstream: Upstream, code: int) -> None:
    result = await attempt(EgressGuard("127.0.0.1"), upstream.url(f"/status/{code}?retry_after=2"))
    assert (result.error_type, result.transient, result.retry_after) == (
        "upstream_error",
        False,
        None,
    )
    assert result.error_message == f"HTTP {code}: nope"


async def test_a_refused_connection_is_transient() -> None:
    with bound_socket("127.0.0.1") as closed:  # bound, never listening
        result = await attempt(
            EgressGuard("127.0.0.1"), f"http://127.0.0.1:{closed.getsockname()[1]}/"
        )
    assert (result.error_type, result.transient) == ("upstream_error", True), result
    assert (result.error_message or "").startswith("connection failed")


async def test_a_head_request_is_not_judged_by_the_length_it_declares(upstream: Upstream) -> None:
    result = await attempt(EgressGuard("127.0.0.1"), upstream.url("/big"), method="HEAD")
    assert result.output["status"] == 200, result
    assert result.output["headers"]["content-length"] == str(2 * MiB)


@pytest.mark.parametrize("headers", [{"X-A": "a\r\nHost: evil"}, {"X-A": "é"}, {"Bad Name": "x"}])
async def test_a_header_that_cannot_be_sent_fails_at_once(
    upstream: Upstream, headers: dict[str, str]
) -> None:
    result = await attempt(EgressGuard("127.0.0.1"), upstream.url("/json"), headers=headers)
    assert (result.error_type, result.transient) == ("upstream_error", False), result
    assert (result.error_message or "").startswith("the request could not be sent")
    assert upstream.seen == []
