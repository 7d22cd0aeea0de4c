"""The upstream client against a fake registry: challenges, tokens, redirects, failures."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from dockermirror.errors import RegistryError, Unauthorized
from dockermirror.upstream import auth as auth_module
from dockermirror.upstream.auth import AuthError, Authenticator, Challenge
from dockermirror.upstream.client import UpstreamClient, UpstreamUnreachable
from tests.unit.fakes import ALL_MANIFESTS, UPSTREAM, FakeClock, FakeRegistry, response


@pytest.mark.parametrize("header, scheme, params", [
    ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull"',
     "bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                "scope": "repository:library/busybox:pull"}),
    ('Basic realm="Registry Realm"', "basic", {"realm": "Registry Realm"}),
    ('BEARER Realm="https://r/t", Service=svc', "bearer", {"realm": "https://r/t", "service": "svc"}),
    # a comma and an escaped quote inside a quoted value
    (r'Bearer realm="https://r/t",scope="repository:a:pull,push",error="say \"no\""', "bearer",
     {"realm": "https://r/t", "scope": "repository:a:pull,push", "error": 'say "no"'}),
    ("Bearer", "bearer", {}),
])
def test_challenge_parse(header, scheme, params):
    challenge = Challenge.parse(header)
    assert challenge is not None
    assert challenge.scheme == scheme and challenge.params == params


def test_challenge_parse_empty():
    assert Challenge.parse("") is None
    assert Challenge.parse("   ") is None


pytestmark = pytest.mark.anyio


def client_for(registry: FakeRegistry, **kwargs) -> UpstreamClient:
    return UpstreamClient(UPSTREAM, transport=registry.transport, **kwargs)


async def test_token_is_fetched_once_for_many_requests_and_reused():
    registry = FakeRegistry(token="s3cret")
    registry.push("library/busybox", "latest")
    client = client_for(registry)
    try:
        replies = await asyncio.gather(*(client.manifest("library/busybox", "latest", ALL_MANIFESTS, head=True)
                                         for _ in range(5)))
        assert {r.status for r in replies} == {200}
        await client.manifest("library/busybox", "latest", ALL_MANIFESTS, head=True)
    finally:
        await client.aclose()
    tokens = registry.requests(path_contains="/token")
    assert len(tokens) == 1
    assert tokens[0].url.params["scope"] == "repository:library/busybox:pull"
    assert tokens[0].url.params["service"] == "registry.test"
    assert "authorization" not in tokens[0].headers        # anonymous: no credentials to send
    # after the first challenge, the token goes along up front
    last = registry.requests("HEAD")[-1]
    assert last.headers["authorization"] == "Bearer s3cret"


async def test_credentials_go_to_the_token_service_as_basic():
    registry = FakeRegistry(token="t")
    registry.push("org/private", "1")
    client = client_for(registry, username="robot", password="pw", token_realms=("auth.test",))
    try:
        assert (await client.manifest("org/private", "1", ALL_MANIFESTS, head=True)).status == 200
    finally:
        await client.aclose()
    token_request = registry.requests(path_contains="/token")[0]
    assert token_request.headers["authorization"] == "Basic cm9ib3Q6cHc="


async def test_tokens_expire_by_the_clock():
    clock = FakeClock(1000.0)
    registry = FakeRegistry(token="t")
    async with httpx.AsyncClient(transport=registry.transport) as http:
        auth = Authenticator(http, None, None, clock=clock, upstream=UPSTREAM)
        challenge = 'Bearer realm="https://auth.test/token",service="registry.test"'
        assert await auth.answer(challenge, "repository:a:pull") == "Bearer t"
        assert await auth.header_for("repository:a:pull") == "Bearer t"
        clock.advance(280)                                   # 300 s token, 10 s margin: still good
        await auth.header_for("repository:a:pull")
        assert len(registry.requests(path_contains="/token")) == 1
        clock.advance(15)
        await auth.header_for("repository:a:pull")
        assert len(registry.requests(path_contains="/token")) == 2


async def test_a_refusing_token_service_is_an_auth_error():
    def handle(request: httpx.Request) -> httpx.Response:
        return response(403, json_body={"details": "no"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as http:
        auth = Authenticator(http, None, None, upstream=UPSTREAM)
        with pytest.raises(AuthError) as caught:
            await auth.answer('Bearer realm="https://auth.test/token"', "repository:a:pull")
    assert caught.value.status == 403


@pytest.mark.parametrize("token_status, expected", [(401, Unauthorized), (403, Unauthorized),
                                                     (500, UpstreamUnreachable)])
async def test_a_token_service_that_refuses(token_status, expected):
    registry = FakeRegistry(token="t")

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            registry.seen.append(request)
            return response(token_status, json_body={"details": "refused"})
        return registry.handle(request)

    client = UpstreamClient(UPSTREAM, transport=httpx.MockTransport(handle))
    try:
        with pytest.raises(expected):
            await client.manifest("a/b", "1", ALL_MANIFESTS, head=True)
    finally:
        await client.aclose()


async def test_a_token_realm_that_fails_later_is_not_asked_up_front_again():
    """The realm learned from a challenge breaks (or the registry moves its token service): the
    next request goes without a token, learns the upstream's challenge of today and succeeds; a
    repository the upstream serves without a token is served; nothing waits on the old realm."""
    registry = FakeRegistry(token="t")
    registry.push("a/one", "1")
    registry.push("a/two", "1")
    old_realm = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test" and registry.realm is not None:
            old_realm.append(request)
            return response(503, json_body={"details": "down"})
        return registry.handle(request)

    client = UpstreamClient(UPSTREAM, transport=httpx.MockTransport(handle), token_realms=("auth2.test",))
    try:
        assert (await client.manifest("a/one", "1", ALL_MANIFESTS, head=True)).status == 200
        registry.realm = "https://auth2.test/token"      # the old realm fails from now on
        assert (await client.manifest("a/two", "1", ALL_MANIFESTS, head=True)).status == 200
        assert (await client.manifest("a/one", "1", ALL_MANIFESTS, head=True)).status == 200
        registry.token = None                            # no token needed any more
        assert (await client.manifest("a/one", "1", ALL_MANIFESTS, head=False)).status == 200
    finally:
        await client.aclose()
    assert len(old_realm) == 1      # asked once up front, then never again
    tokens = [(r.url.host, r.url.params["scope"]) for r in registry.requests(path_contains="/token")]
    assert tokens == [("auth.test", "repository:a/one:pull"), ("auth2.test", "repository:a/two:pull"),
                      ("auth2.test", "repository:a/one:pull")]


@pytest.mark.parametrize("token, why", [("good\r\nX-Injected: 1", "cannot be sent in a header"),
                                        ("a b", "cannot be sent in a header"),
                                        ("x" * (64 * 1024 + 1), "longer than 64 KiB")])
async def test_a_token_that_cannot_go_in_a_header_is_refused_and_never_shown(token, why):
    """A token with a line break (header injection), a space, or of absurd length: refused by
    its service's fault (502), and the error a client gets does not quote it."""
    registry = FakeRegistry(token=token)
    registry.push("a/b", "1")
    client = client_for(registry)
    try:
        with pytest.raises(UpstreamUnreachable) as caught:
            await client.manifest("a/b", "1", ALL_MANIFESTS, head=True)
    finally:
        await client.aclose()
    assert why in str(caught.value) and token not in str(caught.value)
    assert all("authorization" not in r.headers for r in registry.requests("HEAD"))


async def test_the_token_cache_is_bounded_however_many_repositories_clients_name(monkeypatch):
    """Tokens are per repository, and clients choose repositories: expired tokens go first, then
    the oldest, at MAX_TOKENS tokens or MAX_TOKEN_BYTES bytes."""
    monkeypatch.setattr(auth_module, "MAX_TOKENS", 50)
    monkeypatch.setattr(auth_module, "MAX_TOKEN_BYTES", 40 * 1000)
    clock = FakeClock(1000.0)
    registry = FakeRegistry(token="t" * 1000)
    challenge = 'Bearer realm="https://auth.test/token",service="registry.test"'
    async with httpx.AsyncClient(transport=registry.transport) as http:
        auth = Authenticator(http, None, None, clock=clock, upstream=UPSTREAM)
        for n in range(120):
            assert await auth.answer(challenge, f"repository:r{n}:pull") == "Bearer " + "t" * 1000
        assert len(auth._tokens) == 40 and auth._token_bytes == 40 * 1000      # the byte bound
        registry.token = "u"
        clock.advance(400)          # every token kept has expired: all go at the next one
        assert await auth.answer(challenge, "repository:new:pull") == "Bearer u"
        assert list(auth._tokens) == [("https://auth.test/token", "registry.test", "repository:new:pull")]
        for n in range(120):
            await auth.answer(challenge, f"repository:s{n}:pull")
        assert len(auth._tokens) == 50 and auth._token_bytes == 50     # the count bound, newest kept
        assert ("https://auth.test/token", "registry.test", "repository:s119:pull") in auth._tokens
        # the newest are served from the cache
        assert await auth.header_for("repository:s119:pull") == "Bearer u"
    assert len(registry.requests(path_contains="/token")) == 241


async def test_a_repository_the_token_service_refuses_costs_the_others_nothing():
    """A client naming a repository the token service refuses (403) gets its 401, and the
    tokens of other repositories stay cached: no token request more than each needs."""
    registry = FakeRegistry(token="t")
    registry.push("a/one", "1")
    registry.push("secret/x", "1")

    scopes = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            scopes.append(request.url.params["scope"])
            if "secret" in scopes[-1]:
                return response(403, json_body={"details": "denied"})
        return registry.handle(request)

    client = UpstreamClient(UPSTREAM, transport=httpx.MockTransport(handle))
    try:
        for _ in range(3):
            assert (await client.manifest("a/one", "1", ALL_MANIFESTS, head=True)).status == 200
            with pytest.raises(Unauthorized):
                await client.manifest("secret/x", "1", ALL_MANIFESTS, head=True)
    finally:
        await client.aclose()
    assert scopes == ["repository:a/one:pull"] + ["repository:secret/x:pull"] * 3


async def test_redirects_to_blob_storage_never_carry_our_authorization():
    registry = FakeRegistry(token="t", redirect_blobs=True)
    image = registry.push("library/busybox", "latest")
    client = client_for(registry)
    try:
        stream = await client.open_blob("library/busybox", image.layer)
        data = b"".join([chunk async for chunk in stream.chunks()])
        await stream.aclose()
    finally:
        await client.aclose()
    assert data == image.blobs[image.layer]
    cdn = registry.requests(path_contains="/signed/")
    assert len(cdn) == 1 and cdn[0].url.host == "cdn.test"
    assert "authorization" not in cdn[0].headers
    assert registry.requests("GET", "/blobs/")[-1].headers["authorization"] == "Bearer t"


async def test_endless_redirects_are_an_error():
    def handle(request: httpx.Request) -> httpx.Response:
        return response(302, {"Location": str(request.url.copy_with(path=request.url.path + "x"))})

    client = UpstreamClient(UPSTREAM, transport=httpx.MockTransport(handle))
    try:
        with pytest.raises(RegistryError) as caught:
            await client.open_blob("a/b", "sha256:" + "0" * 64)
    finally:
        await client.aclose()
    assert caught.value.status == 502 and "redirected too many times" in caught.value.message


async def test_no_answer_is_unreachable_and_remembered():
    registry = FakeRegistry(down=True)
    client = client_for(registry)
    try:
        with pytest.raises(UpstreamUnreachable):
            await client.manifest("a/b", "1", ALL_MANIFESTS, head=True)
    finally:
        await client.aclose()
    assert client.reachable is False and client.recently_down
    assert "ConnectError" in client.last_error


async def test_oversized_manifest_answer_is_refused():
    def handle(request: httpx.Request) -> httpx.Response:
        return response(200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, b"{" * (5 << 20))

    client = UpstreamClient(UPSTREAM, transport=httpx.MockTransport(handle))
    try:
        with pytest.raises(RegistryError) as caught:
            await client.manifest("a/b", "1", ALL_MANIFESTS, head=False)
    finally:
        await client.aclose()
    assert caught.value.code == "MANIFEST_INVALID" and caught.value.status == 502


async def test_docker_hub_pull_allowance_is_recorded():
    def handle(request: httpx.Request) -> httpx.Response:
        return response(200, {"ratelimit-remaining": "97;w=21600", "ratelimit-limit": "100;w=21600",
                              "Docker-Content-Digest": "sha256:" + "a" * 64})

    client = UpstreamClient(UPSTREAM, transport=httpx.MockTransport(handle))
    try:
        await client.manifest("a/b", "1", ALL_MANIFESTS, head=True)
    finally:
        await client.aclose()
    assert client.ratelimit_remaining == "97;w=21600" and client.ratelimit_limit == "100;w=21600"
