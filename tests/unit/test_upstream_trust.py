"""Upstream trust (issue 16): which token realms get the upstream's credentials, which redirects
are followed, that a client cannot add query parameters to an upstream request, and that
credentials and tokens stay out of logs and errors."""

from __future__ import annotations

import base64
import logging

import httpx
import pytest

from dockermirror import config as configuration
from dockermirror.errors import RegistryError
from dockermirror.upstream.client import MAX_REDIRECTS, UpstreamClient
from dockermirror.upstream.realms import RealmRefused, check_realm, same_site
from tests.unit.fakes import ALL_MANIFESTS, UPSTREAM, FakeRegistry, response

SECRET = "pw-Zq81-never-shown"
BASIC = "Basic " + base64.b64encode(f"robot:{SECRET}".encode()).decode()


# --- the realm rule, on its own

@pytest.mark.parametrize("upstream, realm, same", [
    ("registry-1.docker.io", "auth.docker.io", True),       # Docker Hub
    ("registry-1.docker.io", "docker.io", True),
    ("REGISTRY-1.Docker.IO.", "auth.docker.io", True),      # case and a trailing dot
    ("ghcr.io", "ghcr.io", True),
    ("ghcr.io", "auth.ghcr.io", False),                     # parent "io": one label, maybe a public suffix
    ("ghcr.io", "evil.io", False),
    ("registry.example.org", "auth.example.org", True),
    ("registry.example.org", "a.b.example.org", True),
    ("registry.example.org", "evilexample.org", False),     # not a subdomain, only a suffix of the text
    ("registry.example.org", "example.org.evil.test", False),
    ("registry.example.org", "example.com", False),
    ("registry.test", "auth.test", False),                  # parent "test": one label
    ("127.0.0.1", "127.0.0.1", True),                       # an IP: only that address
    ("127.0.0.1", "127.0.0.2", False),
    ("10.0.0.1", "0.0.1", False),
    ("::1", "[::1]", True),
    ("::1", "::2", False),
    ("registry.example.org", "127.0.0.1", False),
    ("localhost", "localhost", True),
    ("localhost", "evil.localhost", False),
    ("myorg.azurecr.io", "myorg.azurecr.io", True),         # hosting shared by tenants: its own host only
    ("myorg.azurecr.io", "attacker.azurecr.io", False),
    ("myorg.azurecr.io", "azurecr.io", False),
    ("123456789012.dkr.ecr.eu-west-1.amazonaws.com", "999999999999.dkr.ecr.eu-west-1.amazonaws.com", False),
    ("europe-docker.pkg.dev", "us-docker.pkg.dev", False),
    ("acme.jfrog.io", "evil.jfrog.io", False),
])
def test_same_site(upstream, realm, same):
    assert same_site(upstream, realm) is same


@pytest.mark.parametrize("upstream, realm, credentials, listed, why", [
    ("https://ghcr.io", "http://ghcr.io/token", False, (), "plain HTTP"),       # no downgrade, even anonymous
    ("https://ghcr.io", "file:///etc/passwd", False, (), "not an http(s) URL"),
    ("https://ghcr.io", "ftp://ghcr.io/token", True, (), "not an http(s) URL"),
    ("https://ghcr.io", "https://u:p@ghcr.io/token", True, (), "credentials of its own"),
    ("https://ghcr.io", "https://evil.test/token", True, (), "not on the upstream's own domain"),
    ("https://ghcr.io", "https://evil.test/token", True, ("auth.example.org",), "not on the upstream's own"),
    ("https://ghcr.io", "https://auth.example.org:8443/t", True, ("auth.example.org:443",), "not on the"),
    ("http://127.0.0.1:5000", "http://127.0.0.2:5001/token", True, (), "not on the upstream's own domain"),
])
def test_refused_realms(upstream, realm, credentials, listed, why):
    with pytest.raises(RealmRefused) as caught:
        check_realm(upstream, realm, credentials=credentials, listed=listed)
    assert why in str(caught.value)


@pytest.mark.parametrize("upstream, realm, credentials, listed", [
    ("https://registry-1.docker.io", "https://auth.docker.io/token", True, ()),
    ("https://ghcr.io", "https://ghcr.io/token", True, ()),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5001/token", True, ()),    # same host, another port
    ("http://registry.test", "https://auth.elsewhere.test/token", True, ("auth.elsewhere.test",)),
    ("https://nvcr.io", "https://authn.nvidia.test/token", True, ("AUTHN.nvidia.test",)),
    ("https://x.test", "https://auth.example.org:8443/t", True, ("auth.example.org:8443",)),
    ("https://x.test", "https://[::1]:8443/t", True, ("[::1]:8443",)),
    ("https://ghcr.io", "https://anywhere.test/token", False, ()),   # anonymous: nothing to leak
])
def test_trusted_realms(upstream, realm, credentials, listed):
    check_realm(upstream, realm, credentials=credentials, listed=listed)


# --- through the upstream client

pytestmark = pytest.mark.anyio


def client_for(registry: FakeRegistry, **kwargs) -> UpstreamClient:
    return UpstreamClient(kwargs.pop("url", UPSTREAM), transport=registry.transport, **kwargs)


async def test_credentials_never_go_to_a_realm_on_another_domain(caplog):
    registry = FakeRegistry(token="t", auth_host="auth.evil.test")
    registry.push("org/private", "1")
    client = client_for(registry, username="robot", password=SECRET)
    caplog.set_level(logging.INFO)
    try:
        with pytest.raises(RegistryError) as caught:
            await client.manifest("org/private", "1", ALL_MANIFESTS, head=True)
        with pytest.raises(RegistryError):     # and again: still refused, logged once
            await client.manifest("org/private", "1", ALL_MANIFESTS, head=True)
    finally:
        await client.aclose()
    assert [s for s in registry.seen if s.url.host == "auth.evil.test"] == []
    assert caught.value.status == 403 and caught.value.code == "DENIED"
    assert "https://auth.evil.test/token" in caught.value.message
    assert client.reachable is not False                 # a refusal says nothing about reachability
    refused = [r.getMessage() for r in caplog.records if "refused token realm" in r.getMessage()]
    assert len(refused) == 1 and "https://auth.evil.test/token" in refused[0]
    assert SECRET not in caplog.text and BASIC not in caplog.text and SECRET not in caught.value.message


async def test_a_realm_in_token_realms_gets_the_credentials():
    registry = FakeRegistry(token="t", auth_host="auth.elsewhere.test")
    registry.push("org/private", "1")
    client = client_for(registry, username="robot", password=SECRET, token_realms=("auth.elsewhere.test",))
    try:
        assert (await client.manifest("org/private", "1", ALL_MANIFESTS, head=True)).status == 200
    finally:
        await client.aclose()
    token_request = registry.requests(path_contains="/token")[0]
    assert token_request.url.host == "auth.elsewhere.test" and token_request.headers["authorization"] == BASIC


async def test_a_realm_on_the_same_host_and_another_port_gets_the_credentials():
    registry = FakeRegistry(token="t", realm="https://registry.test:5001/token")
    registry.push("org/private", "1")
    client = client_for(registry, username="robot", password=SECRET)
    try:
        assert (await client.manifest("org/private", "1", ALL_MANIFESTS, head=True)).status == 200
    finally:
        await client.aclose()
    token_request = registry.requests(path_contains="/token")[0]
    assert token_request.url.port == 5001 and token_request.headers["authorization"] == BASIC


async def test_without_credentials_a_realm_anywhere_is_asked_anonymously():
    """The choice made: nothing to leak, so an anonymous upstream's realm may be elsewhere (as
    Distribution does); the token request carries no Authorization."""
    registry = FakeRegistry(token="t", auth_host="auth.elsewhere.test")
    registry.push("library/busybox", "1")
    client = client_for(registry)
    try:
        assert (await client.manifest("library/busybox", "1", ALL_MANIFESTS, head=True)).status == 200
    finally:
        await client.aclose()
    token_request = registry.requests(path_contains="/token")[0]
    assert token_request.url.host == "auth.elsewhere.test" and "authorization" not in token_request.headers


@pytest.mark.parametrize("credentials", [True, False])
async def test_an_https_upstream_never_asks_a_plain_http_realm(credentials):
    registry = FakeRegistry(token="t", realm="http://registry.test/token")
    registry.push("org/private", "1")
    kwargs = {"username": "robot", "password": SECRET} if credentials else {}
    client = client_for(registry, **kwargs)
    try:
        with pytest.raises(RegistryError) as caught:
            await client.manifest("org/private", "1", ALL_MANIFESTS, head=True)
    finally:
        await client.aclose()
    assert caught.value.status == 403 and "plain HTTP" in caught.value.message
    assert registry.requests(path_contains="/token") == []


async def test_a_refused_realm_through_the_mirror_is_a_clear_oci_error(tmp_path, caplog):
    registry = FakeRegistry(token="t", auth_host="auth.evil.test")
    image = registry.push("org/private", "1")
    from dockermirror.app import DockerMirror
    text = (f"listen: 127.0.0.1:5000\ntls:\n  enabled: false\nupstream:\n  url: {UPSTREAM}\n  registry: registry.test\n"
            f"  username: robot\n  password: {SECRET}\ncache:\n  dir: {tmp_path / 'cache'}\n")
    app = DockerMirror(configuration.loads(text), upstream_transport=registry.transport)
    caplog.set_level(logging.INFO)
    async with app.running():
        transport = httpx.ASGITransport(app=app.asgi, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://mirror.test") as http:
            got = await http.get(f"/v2/org/private/manifests/{image.digest}",
                                 headers={"Accept": image.media_type})
            status = await http.get("/v2/org/private/manifests/1", headers={"Accept": image.media_type})
    assert got.status_code == 403 and status.status_code == 403
    error = got.json()["errors"][0]
    assert error["code"] == "DENIED" and "https://auth.evil.test/token" in error["message"]
    assert "token_realms" in error["message"]
    assert [s for s in registry.seen if s.url.host == "auth.evil.test"] == []
    assert SECRET not in caplog.text and SECRET not in got.text


# --- redirects

def redirecting(target: str) -> tuple[list[httpx.Request], httpx.MockTransport]:
    """An upstream whose blob GETs answer 307 to ``target``; and every request it got."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "registry.test" and "/blobs/" in request.url.path:
            return response(307, {"Location": target})
        return response(200, body=b"data")

    return seen, httpx.MockTransport(handle)


@pytest.mark.parametrize("target, why", [
    ("http://cdn.test/signed/x?sig=abc", "plain HTTP"),
    ("http://registry.test/v2/a/b/blobs/x", "plain HTTP"),        # even to the same host
    ("file:///etc/passwd", "'file'"),
    ("ftp://cdn.test/x", "'ftp'"),
    ("gopher://cdn.test/x", "'gopher'"),
])
async def test_redirects_that_are_not_followed(target, why, caplog):
    seen, transport = redirecting(target)
    client = UpstreamClient(UPSTREAM, transport=transport)
    caplog.set_level(logging.INFO)
    try:
        with pytest.raises(RegistryError) as caught:
            await client.open_blob("a/b", "sha256:" + "0" * 64)
    finally:
        await client.aclose()
    assert caught.value.status == 502 and why in caught.value.message
    assert [str(r.url) for r in seen if r.url.host != "registry.test" or r.url.scheme != "https"] == []
    assert client.reachable is not False                  # the upstream answered; it is not "down"
    assert "sig=abc" not in caplog.text                   # a signed URL's query is not logged


async def blob_through(handle, **options) -> bytes:
    """A blob's bytes as the upstream client (made with ``options``) reads them from an upstream
    answering with ``handle`` (a function, or an httpx transport)."""
    transport = handle if isinstance(handle, httpx.AsyncBaseTransport) else httpx.MockTransport(handle)
    client = UpstreamClient(UPSTREAM, transport=transport, **options)
    try:
        stream = await client.open_blob("a/b", "sha256:" + "0" * 64)
        try:
            return b"".join([c async for c in stream.chunks()])
        finally:
            await stream.aclose()
    finally:
        await client.aclose()


async def test_authorization_never_follows_a_second_hop_on_the_storage_host():
    """registry -> cdn.test -> cdn.test/elsewhere: the upstream's token goes to neither hop."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "registry.test":
            if request.url.path == "/token":
                return response(200, json_body={"token": "t"})
            if request.headers.get("authorization") != "Bearer t":
                return response(401, {"WWW-Authenticate": 'Bearer realm="https://registry.test/token"'})
            return response(307, {"Location": "https://cdn.test/first"})
        if request.url.path == "/first":
            return response(302, {"Location": "/second"})
        return response(200, body=b"data")

    assert await blob_through(handle) == b"data"
    cdn = [r for r in seen if r.url.host == "cdn.test"]
    assert [r.url.path for r in cdn] == ["/first", "/second"]
    assert all("authorization" not in r.headers for r in cdn)


async def test_as_many_redirects_as_allowed_are_followed():
    def handle(request: httpx.Request) -> httpx.Response:
        hop = int(request.url.params.get("hop", "0"))
        if hop < MAX_REDIRECTS:
            return response(302, {"Location": f"https://cdn.test/x?hop={hop + 1}"})
        return response(200, body=b"data")

    assert await blob_through(handle) == b"data"


# --- query strings

async def test_a_tag_list_parameter_cannot_add_parameters_upstream():
    registry = FakeRegistry()
    registry.push("a/b", "1")
    client = client_for(registry)
    try:
        await client.tags("a/b", [("n", "10"), ("last", "t0&n=1000&foo=bar")])
    finally:
        await client.aclose()
    (seen,) = registry.requests("GET", "/tags/list")
    assert seen.url.params.multi_items() == [("n", "10"), ("last", "t0&n=1000&foo=bar")]


async def test_a_hostile_last_through_the_mirror_is_refused_and_nothing_is_asked(mirror):
    mirror.registry.push("a/b", "1")
    got = await mirror.client.get("/v2/a/b/tags/list?last=t0%26n%3D1000%26foo%3Dbar")
    assert got.status_code == 400 and got.json()["errors"][0]["code"] == "TAG_INVALID"
    got = await mirror.client.get("/v2/a/b/tags/list?n=5%26foo%3Dbar")
    assert got.status_code == 400
    assert mirror.registry.requests(path_contains="/tags/list") == []
    got = await mirror.client.get("/v2/a/b/tags/list?n=5&last=0")
    assert got.status_code == 200
    (seen,) = mirror.registry.requests(path_contains="/tags/list")
    assert seen.url.params.multi_items() == [("n", "5"), ("last", "0")]


async def test_artifact_type_reaches_the_upstream_as_one_parameter(mirror):
    registry = mirror.registry
    registry.referrers = True
    image = registry.push("a/b", "1")
    got = await mirror.client.get(f"/v2/a/b/referrers/{image.digest}?artifactType=application/x%26foo%3Dbar")
    assert got.status_code == 400                         # '=' is no media type character
    assert registry.requests(path_contains="/referrers/") == []
    got = await mirror.client.get(f"/v2/a/b/referrers/{image.digest}?artifactType=application/x%26y%2Bz")
    assert got.status_code == 200
    (seen,) = registry.requests(path_contains="/referrers/")
    assert seen.url.params.multi_items() == [("artifactType", "application/x&y+z")]


# --- configuration

def test_token_realms_in_the_configuration():
    config = configuration.loads("upstreams:\n  - registry: nvcr.io\n    url: https://nvcr.io\n"
                                 "    token_realms: [authn.nvidia.com, 'AUTH.example.org:8443', '[::1]:5001']\n")
    assert config.registries[0].token_realms == ("authn.nvidia.com", "auth.example.org:8443", "[::1]:5001")
    assert configuration.loads("upstream:\n  url: https://ghcr.io\n").registries[0].token_realms == ()


@pytest.mark.parametrize("value", ["https://auth.example.org", "auth.example.org/token", "auth.example.org:0",
                                   "auth.example.org:99999", "'a b'", "auth.example.org", "'[nope]:1'"])
def test_bad_token_realms_are_refused_with_their_line(value):
    text = f"upstreams:\n  - registry: nvcr.io\n    url: https://nvcr.io\n    token_realms: [{value}]\n"
    if value == "auth.example.org":       # a bare string, not a list
        text = f"upstreams:\n  - registry: nvcr.io\n    url: https://nvcr.io\n    token_realms: {value}\n"
    with pytest.raises(configuration.ConfigError) as caught:
        configuration.loads(text)
    assert "token_realms" in str(caught.value) and ":4" in str(caught.value)


@pytest.mark.parametrize("text", [
    f"upstream:\n  url: https://robot:{SECRET}@registry-1.docker.io\n",
    f"upstreams:\n  - registry: ghcr.io\n    url: https://robot:{SECRET}@ghcr.io/\n",
    f"upstreams:\n  - registry: ghcr.io\n    url: https://{SECRET}@ghcr.io\n",
])
def test_a_url_with_credentials_is_refused_without_echoing_them(text):
    with pytest.raises(configuration.ConfigError) as caught:
        configuration.loads(text)
    assert "must not hold credentials" in str(caught.value) and SECRET not in str(caught.value)
