"""Where a redirect may lead (dockermirror.upstream.peers): never further inside the network than
the upstream itself is. The transports below report the address each answer came from, as the
real ones do (that they do is checked against real sockets in test_blob_transport.py)."""

from __future__ import annotations

import logging

import httpx
import pytest

from dockermirror import config as configuration
from dockermirror.errors import RegistryError
from dockermirror.upstream.client import UpstreamClient
from dockermirror.upstream.peers import LOCAL, PRIVATE, PUBLIC, reach
from tests.unit.fakes import UPSTREAM, Body
from tests.unit.test_upstream_trust import blob_through

DIGEST = "sha256:" + "0" * 64
pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("address, kind", [
    ("104.16.99.52", PUBLIC),
    ("2606:4700::6810:6334", PUBLIC),
    ("10.1.2.3", PRIVATE),
    ("172.16.0.9", PRIVATE),
    ("192.168.1.1", PRIVATE),
    ("100.64.0.1", PRIVATE),            # carrier-grade NAT: not globally routable
    ("198.18.0.1", PRIVATE),            # benchmarking
    ("fd00::1", PRIVATE),               # unique local
    ("127.0.0.1", LOCAL),
    ("127.9.9.9", LOCAL),
    ("::1", LOCAL),
    ("169.254.169.254", LOCAL),         # the cloud's metadata service
    ("fe80::1%eth0", LOCAL),            # link-local, with a scope
    ("::ffff:127.0.0.1", LOCAL),        # IPv4-mapped
    ("::ffff:10.0.0.1", PRIVATE),
    ("0.0.0.0", LOCAL),                 # connecting to it reaches this machine
    ("::", LOCAL),
    ("224.0.0.1", LOCAL),
    ("64:ff9b::a9fe:a9fe", LOCAL),      # NAT64 (RFC 6052): the gateway connects to 169.254.169.254
    ("64:ff9b::a00:1", PRIVATE),        # ... to 10.0.0.1
    ("64:ff9b::6810:6334", PUBLIC),     # ... to 104.16.99.52
    ("not an address", LOCAL),
])
def test_reach(address, kind):
    assert reach(address) == kind


class Stream(Body):
    """A body that records whether anyone read it."""

    def __init__(self, data: bytes, log: list[str], name: str) -> None:
        super().__init__(data)
        self._log, self._name = log, name

    async def __aiter__(self):
        self._log.append(self._name)
        async for chunk in super().__aiter__():
            yield chunk


def network(addresses: dict[str, str | None], hops: dict[str, str]):
    """``addresses``: host -> the address its answers come from (None: the transport does not
    say); ``hops``: host -> where its blob answers redirect (absent: it answers the blob)."""
    seen: list[str] = []
    read: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        seen.append(host)
        address = addresses[host]
        extensions = {} if address is None else {"server_addr": (address, 443)}
        if host in hops:
            return httpx.Response(307, headers={"Location": hops[host], "Content-Length": "0"},
                                  stream=Body(b""), extensions=extensions)
        return httpx.Response(200, headers={"Content-Length": "4"}, stream=Stream(b"data", read, host),
                              extensions=extensions)

    return seen, read, httpx.MockTransport(handle)


@pytest.mark.parametrize("upstream, storage", [
    ("104.16.99.52", "151.101.1.1"),        # Docker Hub -> its CDN
    ("10.1.2.3", "10.9.9.9"),               # a private registry -> MinIO beside it
    ("10.1.2.3", "151.101.1.1"),            # ... or a public bucket
    ("10.1.2.3", "100.64.7.7"),
    ("127.0.0.1", "10.9.9.9"),              # an upstream on this machine (a local proxy): anywhere
    ("127.0.0.1", "169.254.169.254"),
    ("::1", "::1"),
    ("104.16.99.52", None),                 # the transport does not say: nothing to check
])
async def test_redirects_no_further_inside_than_the_upstream_are_followed(upstream, storage):
    seen, read, transport = network({"registry.test": upstream, "cdn.test": storage},
                                    {"registry.test": "https://cdn.test/signed"})
    assert await blob_through(transport) == b"data"
    assert seen == ["registry.test", "cdn.test"] and read == ["cdn.test"]


@pytest.mark.parametrize("upstream, storage, kind", [
    ("104.16.99.52", "169.254.169.254", "loopback or link-local"),     # the metadata service
    ("104.16.99.52", "127.0.0.1", "loopback or link-local"),
    ("104.16.99.52", "::ffff:127.0.0.1", "loopback or link-local"),
    ("104.16.99.52", "0.0.0.0", "loopback or link-local"),
    ("104.16.99.52", "fe80::1%eth0", "loopback or link-local"),
    ("104.16.99.52", "10.0.0.5", "private"),
    ("104.16.99.52", "fd00::5", "private"),
    ("10.1.2.3", "169.254.169.254", "loopback or link-local"),
    ("10.1.2.3", "127.0.0.1", "loopback or link-local"),
    (None, "10.0.0.5", "private"),      # the upstream's address unknown: it counts as public
])
async def test_a_redirect_further_inside_is_not_read(upstream, storage, kind, caplog):
    seen, read, transport = network({"registry.test": upstream, "cdn.test": storage},
                                    {"registry.test": "https://cdn.test/signed?sig=abc"})
    caplog.set_level(logging.INFO)
    with pytest.raises(RegistryError) as caught:
        await blob_through(transport)
    assert caught.value.status == 502
    assert caught.value.message == (f"the upstream redirected to cdn.test, a {kind} address, "
                                    "which is not followed from this upstream")
    assert seen == ["registry.test", "cdn.test"] and read == []     # asked, and its answer never read
    (line,) = [r for r in caplog.records if "further inside" in r.getMessage()]
    assert line.levelno == logging.WARNING and storage in line.getMessage()
    assert "private_redirects" in line.getMessage()
    assert not [r for r in caplog.records if r.name.startswith("dockermirror") and "sig=abc" in r.getMessage()]


async def test_the_limit_is_the_upstreams_not_the_last_hops():
    """registry (public) -> cdn (private, refused already) ... and registry (private) -> cdn
    (public) -> inner (private): the second hop is measured against the registry, and allowed."""
    seen, read, transport = network(
        {"registry.test": "10.1.2.3", "cdn.test": "151.101.1.1", "inner.test": "10.7.7.7"},
        {"registry.test": "https://cdn.test/a", "cdn.test": "https://inner.test/b"})
    assert await blob_through(transport) == b"data"
    assert seen == ["registry.test", "cdn.test", "inner.test"]
    seen, read, transport = network(
        {"registry.test": "151.101.2.2", "cdn.test": "151.101.1.1", "inner.test": "127.0.0.1"},
        {"registry.test": "https://cdn.test/a", "cdn.test": "https://inner.test/b"})
    with pytest.raises(RegistryError, match="inner.test, a loopback or link-local address"):
        await blob_through(transport)
    assert seen == ["registry.test", "cdn.test", "inner.test"] and read == []


async def test_private_redirects_true_follows_them():
    seen, read, transport = network({"registry.test": "104.16.99.52", "cdn.test": "169.254.169.254"},
                                    {"registry.test": "https://cdn.test/signed"})
    assert await blob_through(transport, private_redirects=True) == b"data"
    assert read == ["cdn.test"]


def test_private_redirects_is_a_per_upstream_key_off_by_default(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text("upstreams:\n  - registry: docker.io\n  - registry: ghcr.io\n    private_redirects: true\n")
    hub, ghcr = configuration.load(path).registries
    assert (hub.private_redirects, ghcr.private_redirects) == (False, True)
    path.write_text("upstream:\n  private_redirects: maybe\n")
    with pytest.raises(configuration.ConfigError, match="private_redirects"):
        configuration.load(path)


# --- token realms: the same rule (the realm's answer would go back to the upstream as the token)

def realm_network(registry: str | None, realm: str | None):
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "auth.test":
            return httpx.Response(200, headers={"Content-Type": "application/json"},
                                  stream=Body(b'{"token": "from-inside"}'), extensions={} if realm is None else {"server_addr": (realm, 443)})
        extensions = {} if registry is None else {"server_addr": (registry, 443)}
        if request.headers.get("authorization") != "Bearer from-inside":
            return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="https://auth.test/token?x=1"'},
                                  stream=Body(b""), extensions=extensions)
        return httpx.Response(200, headers={"Content-Length": "4"}, stream=Body(b"data"), extensions=extensions)

    return seen, httpx.MockTransport(handle)


@pytest.mark.parametrize("registry, realm", [
    ("104.16.99.52", "169.254.169.254"),
    ("104.16.99.52", "10.0.0.8"),
    ("10.1.2.3", "127.0.0.1"),
])
async def test_a_token_realm_further_inside_is_refused_and_its_token_never_sent(registry, realm, caplog):
    from dockermirror.errors import Denied
    seen, transport = realm_network(registry, realm)
    caplog.set_level(logging.INFO)
    client = UpstreamClient(UPSTREAM, transport=transport)
    try:
        for _ in range(2):
            with pytest.raises(Denied) as caught:
                await client.open_blob("a/b", DIGEST)
            assert caught.value.status == 403
            assert "https://auth.test/token is at a" in caught.value.message
            assert "further inside" in caught.value.message
    finally:
        await client.aclose()
    assert not [r for r in seen if r.headers.get("authorization")]     # its answer never went upstream
    lines = [r for r in caplog.records if "refused token realm" in r.getMessage()]
    assert len(lines) == 1 and realm in lines[0].getMessage() and "x=1" not in lines[0].getMessage()


@pytest.mark.parametrize("registry, realm, options", [
    ("104.16.99.52", "104.16.99.53", {}),
    ("10.1.2.3", "10.1.2.4", {}),
    ("127.0.0.1", "169.254.169.254", {}),
    ("104.16.99.52", "169.254.169.254", {"private_redirects": True}),
    ("104.16.99.52", None, {}),
])
async def test_a_token_realm_no_further_inside_is_asked(registry, realm, options):
    seen, transport = realm_network(registry, realm)
    assert await blob_through(transport, **options) == b"data"
    assert [r.headers.get("authorization") for r in seen if r.url.host == "registry.test"] == [None, "Bearer from-inside"]
