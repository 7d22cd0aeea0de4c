"""Several upstreams in one mirror (issue 11), in-process: three fake registries told apart by
the host the mirror dials (docker.io, ghcr.io, registry.example.org:5000), routed by ``?ns=``,
by path prefix or by default; per-upstream tag_ttl, down window, token cache and counters;
reloads that add, remove and change upstreams."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from dockermirror import config as configuration
from dockermirror.app import DockerMirror
from tests.unit.fakes import ALL_MANIFESTS, FakeClock, FakeRegistry, Image, digest_of
from tests.unit.fakes import response as fake_response

pytestmark = pytest.mark.anyio

ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]
HUB, GHCR, PRIVATE = "docker.io", "ghcr.io", "registry.example.org:5000"
HOSTS = {HUB: "hub.test", GHCR: "ghcr.test", PRIVATE: "private.test"}


def upstreams_text(cache_dir: Path, keys: tuple[str, ...] = (HUB, GHCR, PRIVATE), **per_key: str) -> str:
    """A configuration with these upstreams (the first is the default); ``per_key``: more lines
    of an upstream's item (key with dots and colons as underscores, e.g. ``ghcr_io``)."""
    lines = ["listen: 127.0.0.1:5000", "tls:", "  enabled: false", "upstreams:"]
    for key in keys:
        lines += [f"  - registry: {key}", f"    url: https://{HOSTS[key]}"]
        extra = per_key.get(key.replace(".", "_").replace(":", "_"), "")
        lines += [f"    {line}" for line in extra.splitlines() if line]
    lines += ["cache:", f"  dir: {cache_dir}", "  tag_ttl: 5m"]
    return "\n".join(lines) + "\n"


class Answered(Exception):
    """Raised by a registry's ``on_request`` hook: answer this instead."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response


class Fleet:
    """The fake registries, each behind its own host (and its token service's host)."""

    def __init__(self) -> None:
        self.registries = {key: FakeRegistry(auth_host=f"auth.{HOSTS[key]}") for key in HOSTS}
        self.by_host = {}
        for key, registry in self.registries.items():
            self.by_host[HOSTS[key]] = self.by_host[registry.auth_host] = registry
        self.strangers: list[httpx.Request] = []       # requests to any other host

    def __getitem__(self, key: str) -> FakeRegistry:
        return self.registries[key]

    def handle(self, request: httpx.Request) -> httpx.Response:
        registry = self.by_host.get(request.url.host)
        if registry is None:
            self.strangers.append(request)
            raise httpx.ConnectError("no such host", request=request)
        try:
            return registry.handle(request)
        except Answered as answered:
            return answered.response

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def seen(self) -> int:
        return sum(len(registry.seen) for registry in self.registries.values()) + len(self.strangers)


@dataclass
class Harness:
    app: DockerMirror
    client: httpx.AsyncClient
    fleet: Fleet
    clock: FakeClock
    cache_dir: Path

    def blob_file(self, digest: str) -> Path:
        algorithm, hexdigest = digest.split(":")
        return self.cache_dir / "blobs" / algorithm / hexdigest[:2] / hexdigest

    def client_of(self, key: str):
        return self.app.mirror.upstreams.get(key).client

    def reload(self, text: str) -> list[str]:
        return self.app.reconfigure(configuration.loads(text))

    async def settled(self) -> None:
        """Every transfer committed (fsync, rename: just after the response's last byte)."""
        await self.app.cache.transfers.wait_all(5)

    async def counters(self) -> dict[str, int]:
        await self.app.cache.flush()
        return self.app.cache.index.counters()


@pytest.fixture
async def fleet_mirror(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    fleet, clock, cache_dir = Fleet(), FakeClock(), tmp_path / "cache"
    text = upstreams_text(cache_dir, **getattr(request, "param", {}))     # param: per_key lines
    app = DockerMirror(configuration.loads(text), clock=clock, upstream_transport=fleet.transport)
    async with app.running():
        transport = httpx.ASGITransport(app=app.asgi, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://mirror.test") as client:
            yield Harness(app, client, fleet, clock, cache_dir)


def access_lines(caplog: pytest.LogCaptureFixture, pattern: str = "") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dockermirror.access" and pattern in r.getMessage()]


async def get_manifest(client: httpx.AsyncClient, path_name: str, tag: str, ns: str | None = None) -> httpx.Response:
    params = {"ns": ns} if ns else None
    return await client.get(f"/v2/{path_name}/manifests/{tag}", headers=ACCEPT, params=params)


def push_each(h: Harness) -> dict[str, Image]:
    """One image on each upstream, all different, under the same repository name."""
    return {key: h.fleet[key].push("org/app", "1.0", layer=f"layer of {key}\n".encode() * 100) for key in HOSTS}


# --- routing


@pytest.mark.parametrize("key, path_name, ns", [
    (HUB, "org/app", None),                         # no registry named: the default
    (HUB, "org/app", "docker.io"),
    (HUB, "docker.io/org/app", None),
    (HUB, "org/app", "index.docker.io"),            # Docker Hub's other names
    (GHCR, "org/app", "ghcr.io"),
    (GHCR, "ghcr.io/org/app", None),
    (GHCR, "ghcr.io/org/app", "ghcr.io"),           # containerd with override_path sends both
    (PRIVATE, "org/app", PRIVATE),
    (PRIVATE, f"{PRIVATE}/org/app", None),          # a prefix with a port
])
async def test_each_request_goes_to_its_upstream_only(fleet_mirror: Harness, key, path_name, ns):
    h = fleet_mirror
    images = push_each(h)
    response = await get_manifest(h.client, path_name, "1.0", ns)
    assert response.status_code == 200, response.text
    assert response.content == images[key].manifest
    assert response.headers.get("oci-namespace") == ns
    layer = await h.client.get(f"/v2/{path_name}/blobs/{images[key].layer}", params={"ns": ns} if ns else None)
    assert layer.status_code == 200 and layer.content == images[key].blobs[images[key].layer]
    # only that upstream was asked, for the repository without any prefix
    for other, registry in h.fleet.registries.items():
        paths = {seen.path for seen in registry.seen}
        if other == key:
            assert {"/v2/org/app/manifests/1.0", f"/v2/org/app/blobs/{images[key].layer}"} <= paths
            assert all(path.startswith("/v2/org/app/") for path in paths), paths
        else:
            assert paths == set()
    assert h.fleet.strangers == []


async def test_default_names_get_library_on_docker_hub_only(fleet_mirror: Harness):
    h = fleet_mirror
    hub = h.fleet[HUB].push("library/hello", "latest")
    ghcr = h.fleet[GHCR].push("hello", "latest", layer=b"ghcr's hello\n")
    assert (await get_manifest(h.client, "hello", "latest")).content == hub.manifest
    assert (await get_manifest(h.client, "ghcr.io/hello", "latest")).content == ghcr.manifest
    assert {s.path.rsplit("/manifests/")[0] for s in h.fleet[HUB].seen} == {"/v2/library/hello"}
    assert {s.path.rsplit("/manifests/")[0] for s in h.fleet[GHCR].seen} == {"/v2/hello"}


async def test_ns_and_prefix_are_one_cache_entry(fleet_mirror: Harness, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="dockermirror.access")
    h = fleet_mirror
    image = h.fleet[GHCR].push("org/app", "1.0")
    first = await get_manifest(h.client, "org/app", "1.0", ns=GHCR)
    second = await get_manifest(h.client, "ghcr.io/org/app", "1.0")
    assert first.content == second.content == image.manifest
    assert len(h.fleet[GHCR].requests("GET", "/manifests/")) == 1
    lines = access_lines(caplog, "/manifests/1.0")
    assert "cache=MISS" in lines[0] and "cache=HIT" in lines[1], lines
    assert all("upstream=ghcr.io" in line for line in lines)


@pytest.mark.parametrize("path_name, ns", [
    ("org/app", "evil.example.com"),
    ("org/app", "127.0.0.1:22"),
    ("org/app", "ghcr.test"),                       # the upstream's address is not its name
    ("evil.example.com/org/app", None),
    ("127.0.0.1:22/org/app", None),
    ("localhost/org/app", None),
    ("ghcr.test/org/app", None),
])
async def test_unknown_registry_is_404_with_nothing_contacted(fleet_mirror: Harness, path_name, ns):
    h = fleet_mirror
    push_each(h)
    params = {"ns": ns} if ns else None
    for url in (f"/v2/{path_name}/manifests/1.0", f"/v2/{path_name}/blobs/sha256:{'a' * 64}",
                f"/v2/{path_name}/tags/list"):
        response = await h.client.get(url, headers=ACCEPT, params=params)
        assert response.status_code == 404, (url, response.text)
        assert response.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    assert h.fleet.seen() == 0


# --- per upstream: tag_ttl, down window, tokens, counters


@pytest.mark.parametrize("fleet_mirror", [{"ghcr_io": "tag_ttl: 1m"}], indirect=True)
async def test_tag_ttl_per_upstream(fleet_mirror: Harness):
    h = fleet_mirror
    push_each(h)
    for key in HOSTS:
        assert (await get_manifest(h.client, "org/app", "1.0", ns=key)).status_code == 200
    h.clock.advance(120)          # past ghcr.io's 1m, within the 5m of the others
    for key in HOSTS:
        assert (await get_manifest(h.client, "org/app", "1.0", ns=key)).status_code == 200
    asked = {key: [s.method for s in h.fleet[key].requests(path_contains="/manifests/1.0")] for key in HOSTS}
    assert asked == {HUB: ["HEAD"], GHCR: ["HEAD", "HEAD"], PRIVATE: ["HEAD"]}


async def test_one_upstream_down_makes_only_its_tags_stale(fleet_mirror: Harness,
                                                           caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="dockermirror.access")
    h = fleet_mirror
    images = push_each(h)
    for key in HOSTS:
        assert (await get_manifest(h.client, "org/app", "1.0", ns=key)).status_code == 200
    h.clock.advance(600)                          # every tag is due for revalidation
    h.fleet[GHCR].down = True
    stale = await get_manifest(h.client, "org/app", "1.0", ns=GHCR)
    assert stale.status_code == 200 and stale.content == images[GHCR].manifest
    assert h.client_of(GHCR).recently_down
    # within ghcr.io's down window: ghcr.io is not asked again, the others are revalidated
    before = len(h.fleet[GHCR].seen)
    for key in (GHCR, HUB, PRIVATE):
        response = await get_manifest(h.client, "org/app", "1.0", ns=key)
        assert response.status_code == 200 and response.content == images[key].manifest
    assert len(h.fleet[GHCR].seen) == before
    for key in (HUB, PRIVATE):
        assert [s.method for s in h.fleet[key].requests(path_contains="/manifests/1.0")] == ["HEAD", "HEAD"]
        assert not h.client_of(key).recently_down
    lines = access_lines(caplog, "/manifests/1.0")[3:]
    assert [("cache=STALE" in line, line.split("upstream=")[1].split()[0]) for line in lines] == [
        (True, GHCR), (True, GHCR), (False, HUB), (False, PRIVATE)], lines
    assert all("upstream_status=200" in line for line in lines[2:])
    counters = await h.counters()
    assert counters[f"upstream/{GHCR}/requests_stale"] == 2
    assert f"upstream/{HUB}/requests_stale" not in counters


async def test_token_caches_are_separate(fleet_mirror: Harness):
    h = fleet_mirror
    h.fleet[GHCR].token, h.fleet[PRIVATE].token = "ghcr-token", "private-token"
    images = push_each(h)
    for key in (GHCR, PRIVATE, GHCR, PRIVATE):
        image = images[key]
        assert (await get_manifest(h.client, "org/app", "1.0", ns=key)).status_code == 200
        assert (await h.client.get(f"/v2/org/app/blobs/{image.layer}", params={"ns": key})).status_code == 200
        h.clock.advance(600)
    for key, token in ((GHCR, "ghcr-token"), (PRIVATE, "private-token")):
        registry = h.fleet[key]
        assert len([s for s in registry.seen if s.url.host == registry.auth_host]) == 1     # one token each
        sent = {s.headers.get("authorization") for s in registry.seen if s.url.host == HOSTS[key]}
        assert sent == {None, f"Bearer {token}"}      # the first challenge, then its own token only
    assert all("authorization" not in s.headers for s in h.fleet[HUB].seen)


async def test_counters_per_upstream(fleet_mirror: Harness):
    h = fleet_mirror
    images = push_each(h)
    for key, times in ((HUB, 1), (GHCR, 3), (PRIVATE, 2)):
        for _ in range(times):
            blob = await h.client.get(f"/v2/org/app/blobs/{images[key].layer}", params={"ns": key})
            assert blob.status_code == 200
            await h.settled()
    counters = await h.counters()
    size = {key: len(images[key].blobs[images[key].layer]) for key in HOSTS}
    assert {key: counters.get(f"upstream/{key}/requests_miss") for key in HOSTS} == {HUB: 1, GHCR: 1, PRIVATE: 1}
    assert {key: counters.get(f"upstream/{key}/requests_hit") for key in HOSTS} == {HUB: None, GHCR: 2, PRIVATE: 1}
    assert counters[f"upstream/{GHCR}/bytes_served_hit"] == 2 * size[GHCR]
    assert counters["requests_hit"] == 3 and counters["requests_miss"] == 3


# --- reloads


async def test_reload_adds_and_removes_upstreams(fleet_mirror: Harness):
    h = fleet_mirror
    images = push_each(h)
    h.reload(upstreams_text(h.cache_dir, (HUB, GHCR)))
    blob = await h.client.get(f"/v2/org/app/blobs/{images[GHCR].layer}", params={"ns": GHCR})
    assert blob.status_code == 200
    await h.settled()
    for path_name, ns in (("org/app", PRIVATE), (f"{PRIVATE}/org/app", None)):
        response = await get_manifest(h.client, path_name, "1.0", ns)
        assert response.status_code == 404 and response.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    assert h.fleet[PRIVATE].seen == []
    # removed: ghcr.io's names are unknown, what it brought stays on disk
    h.reload(upstreams_text(h.cache_dir, (HUB, PRIVATE)))
    gone = await get_manifest(h.client, "ghcr.io/org/app", "1.0")
    assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    assert h.blob_file(images[GHCR].layer).read_bytes() == images[GHCR].blobs[images[GHCR].layer]
    # added: the new upstream serves at once
    response = await get_manifest(h.client, f"{PRIVATE}/org/app", "1.0")
    assert response.status_code == 200 and response.content == images[PRIVATE].manifest


async def test_reload_keeps_a_client_unless_its_connection_changes(fleet_mirror: Harness):
    h = fleet_mirror
    first = {key: h.client_of(key) for key in HOSTS}
    # timeouts, aliases, tag_ttl: the same clients (token caches, reachability kept)
    h.reload(upstreams_text(h.cache_dir, ghcr_io="tag_ttl: 1m\nread_timeout: 5s\naliases: [ghcr.example.org]\n"
                                                 "connect_timeout: 3s"))
    assert {key: h.client_of(key) for key in HOSTS} == first
    assert all(h.client_of(key) is first[key] for key in HOSTS)
    assert h.app.mirror.upstreams.get(GHCR).tag_ttl == 60
    assert h.app.mirror.resolve("org/app", "ghcr.example.org").upstream.key == GHCR
    # new credentials: a new client for that upstream only
    h.reload(upstreams_text(h.cache_dir, ghcr_io="username: bot\npassword: pa55"))
    second = h.client_of(GHCR)
    assert second is not first[GHCR]
    assert h.client_of(HUB) is first[HUB] and h.client_of(PRIVATE) is first[PRIVATE]
    h.reload(upstreams_text(h.cache_dir, ghcr_io="username: bot\npassword: other-pa55"))
    third = h.client_of(GHCR)
    assert third is not second
    # a new URL likewise
    h.reload(upstreams_text(h.cache_dir, ghcr_io="username: bot\npassword: other-pa55")
             .replace("https://private.test", "https://private.test:8443"))
    assert h.client_of(PRIVATE) is not first[PRIVATE]
    assert h.client_of(GHCR) is third and h.client_of(HUB) is first[HUB]


def test_status_line_counts_only_upstreams_that_answered():
    from types import SimpleNamespace

    from dockermirror.service.server import upstream_status

    def up(key: str, reachable: bool | None):
        return SimpleNamespace(key=key, client=SimpleNamespace(reachable=reachable, ratelimit_remaining=None))

    assert upstream_status([up(HUB, None), up(GHCR, None)]) == [
        "upstreams 0 of 2 reachable (docker.io, ghcr.io not contacted yet)"]
    assert upstream_status([up(HUB, True), up(GHCR, False), up(PRIVATE, None)]) == [
        "upstreams 1 of 3 reachable (ghcr.io UNREACHABLE; registry.example.org:5000 not contacted yet)"]
    assert upstream_status([up(HUB, True), up(GHCR, True)]) == ["upstreams 2 of 2 reachable"]
    assert upstream_status([up(HUB, None)]) == ["upstream docker.io not contacted yet"]


@pytest.mark.parametrize("content, message", [
    (None, "cannot read {path}: No such file or directory"),
    (b"", "{path} holds no PEM certificate"),
    (b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", "{path} holds no PEM certificate"),
])
def test_a_bad_ca_bundle_is_a_config_error_with_its_line(tmp_path: Path, content, message):
    """Not a traceback when the upstream client is built (at start, or half way through a reload)."""
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    text = upstreams_text(tmp_path / "cache", ghcr_io=f"ca_bundle: {path}")
    with pytest.raises(configuration.ConfigError) as caught:
        configuration.loads(text)
    line = next(n for n, text_line in enumerate(text.splitlines(), 1) if "ca_bundle" in text_line)
    assert str(caught.value) == f"<string>:{line}: upstreams[1].ca_bundle: " + message.format(path=path)


async def test_reload_with_a_new_ca_bundle_content_makes_a_new_client(tmp_path: Path):
    """A CA bundle rotated in place (same path, other certificates), then a reload: the upstream
    gets a client built with the new bundle, as for a new password_file; the others keep theirs."""
    from tests.support.certs import make_pki

    bundle = tmp_path / "private-ca.pem"
    bundle.write_bytes(make_pki(tmp_path / "ca1").ca.read_bytes())
    text = upstreams_text(tmp_path / "cache", registry_example_org_5000=f"ca_bundle: {bundle}")
    app = DockerMirror(configuration.loads(text), clock=FakeClock(), upstream_transport=Fleet().transport)
    async with app.running():
        first = {u.key: u.client for u in app.mirror.upstreams}
        app.reconfigure(configuration.loads(text))                  # unchanged: the same clients
        assert {u.key: u.client for u in app.mirror.upstreams} == first
        bundle.write_bytes(make_pki(tmp_path / "ca2").ca.read_bytes())
        app.reconfigure(configuration.loads(text))
        now = {u.key: u.client for u in app.mirror.upstreams}
        assert now[PRIVATE] is not first[PRIVATE]
        assert now[HUB] is first[HUB] and now[GHCR] is first[GHCR]
        app.reconfigure(configuration.loads(text))                  # and kept from then on
        assert app.mirror.upstreams.get(PRIVATE).client is now[PRIVATE]


# --- the tag list's next page


@pytest.mark.parametrize("path_name, ns, expected", [
    ("ghcr.io/org/app", None, '</v2/ghcr.io/org/app/tags/list?last=a&n=1>; rel="next"'),
    ("org/app", GHCR, '</v2/org/app/tags/list?last=a&n=1&ns=ghcr.io>; rel="next"'),
    (f"{PRIVATE}/org/app", None, f'</v2/{PRIVATE}/org/app/tags/list?last=a&n=1>; rel="next"'),
])
async def test_the_next_page_link_names_the_repository_as_the_client_did(fleet_mirror: Harness, path_name, ns,
                                                                         expected):
    """Followed as the upstream wrote it (``/v2/org/app/...``), the next page would come from
    the default upstream."""
    h = fleet_mirror
    key = ns or path_name.split("/")[0]
    for tag in ("a", "b"):
        h.fleet[key].push("org/app", tag)
        h.fleet[HUB].push("org/app", f"hub-{tag}")          # the same name on the default upstream

    def paginate(request: httpx.Request) -> None:
        registry = h.fleet[key]
        if request.url.path.endswith("/tags/list") and request.url.params.get("n") == "1":
            last = request.url.params.get("last")
            tags = sorted(ref for repo, ref in registry.manifests if repo == "org/app" and ":" not in ref)
            page = [t for t in tags if last is None or t > last][:1]
            headers = {"Link": f'</v2/org/app/tags/list?last={page[0]}&n=1>; rel="next"'} if page[0] != tags[-1] \
                else {}
            raise Answered(fake_response(200, headers, json_body={"name": "org/app", "tags": page}))

    h.fleet[key].on_request = paginate
    params = {"n": "1", **({"ns": ns} if ns else {})}
    first = await h.client.get(f"/v2/{path_name}/tags/list", params=params)
    assert first.status_code == 200 and first.json()["tags"] == ["a"]
    assert first.headers["link"] == expected
    following = await h.client.get(expected[1:expected.index(">")])
    assert following.status_code == 200 and following.json()["tags"] == ["b"]
    assert "link" not in following.headers
    assert h.fleet[HUB].requests(path_contains="/tags/") == []


@pytest.mark.parametrize("link, expected", [
    ('</v2/org/app/tags/list?last=b&n=2>; rel="next"', '</v2/x.io/org/app/tags/list?last=b&n=2&ns=x.io>; rel="next"'),
    ('<https://ghcr.io/v2/org/app/tags/list?n=2&last=b>;rel=next', '</v2/x.io/org/app/tags/list?n=2&last=b&ns=x.io>; '
                                                                   'rel="next"'),
    ('</v2/org/app/tags/list?last=b&n=2&evil=%0d%0a>; rel="next"', '</v2/x.io/org/app/tags/list?last=b&n=2&ns=x.io>; '
                                                                   'rel="next"'),
    ('</v2/org/app/tags/list?n=2>; rel="next"', None),                        # no next tag named
    ('</v2/org/app/tags/list?last=%0a&n=2>; rel="next"', None),               # not a tag
    ('</v2/org/app/tags/list?last=b>; rel="prev"', None),
    ("garbage", None),
])
def test_next_page_link(link, expected):
    from dockermirror.api.links import next_page_link

    assert next_page_link(link, "x.io/org/app", "x.io") == expected


class GatedFleet(Fleet):
    """The fleet, with one upstream's answers held until ``release()``: a request to it stays in
    flight while a request for the same digest through another upstream arrives."""

    def __init__(self, held: str, *, fail: bool = False) -> None:
        super().__init__()
        self.held, self.fail = HOSTS[held], fail
        self.gate = asyncio.Event()
        self.waiting = 0        # requests to the held upstream, waiting at the gate

    @property
    def transport(self) -> httpx.MockTransport:
        async def handle(request: httpx.Request) -> httpx.Response:
            if request.url.host == self.held:
                self.waiting += 1
                await asyncio.wait_for(self.gate.wait(), 10)
                if self.fail:
                    raise httpx.ConnectTimeout("timed out", request=request)
            return self.handle(request)

        return httpx.MockTransport(handle)


async def _overlapping(tmp_path: Path, fleet: GatedFleet, first: str, second: str) -> tuple[httpx.Response, ...]:
    """GET ``first`` (held at its upstream), then ``second`` while it waits; then release."""
    app = DockerMirror(configuration.loads(upstreams_text(tmp_path / "cache")), clock=FakeClock(),
                       upstream_transport=fleet.transport)
    async with app.running(), httpx.AsyncClient(transport=httpx.ASGITransport(app.asgi),
                                                base_url="http://mirror.test") as client:
        held = asyncio.create_task(client.get(first, headers=ACCEPT))
        for _ in range(1000):
            if fleet.waiting or held.done():
                break
            await asyncio.sleep(0)
        assert fleet.waiting, "the first request never reached its upstream"
        second_task = asyncio.create_task(client.get(second, headers=ACCEPT))
        for _ in range(50):     # let it reach the download or fetch it would follow
            await asyncio.sleep(0)
        fleet.gate.set()
        return await held, await second_task


@pytest.mark.parametrize("kind", ["manifests", "blobs"])
async def test_another_upstreams_404_for_a_digest_is_not_this_upstreams_answer(tmp_path: Path, kind: str):
    """Docker Hub (held, then 404) and ghcr.io (has it) asked for the same digest at once:
    the ghcr.io request gets ghcr.io's answer, not Docker Hub's 404."""
    fleet = GatedFleet(HUB)
    image = fleet[GHCR].push("org/app", "1.0")
    digest = image.digest if kind == "manifests" else image.layer
    hub, ghcr = await _overlapping(tmp_path, fleet, f"/v2/org/app/{kind}/{digest}",
                                   f"/v2/ghcr.io/org/app/{kind}/{digest}")
    assert hub.status_code == 404
    assert ghcr.status_code == 200, ghcr.text
    assert digest_of(ghcr.content) == digest
    assert fleet[GHCR].requests("GET", f"/{kind}/{digest}")


@pytest.mark.parametrize("kind", ["manifests", "blobs"])
async def test_a_down_upstream_does_not_fail_another_upstreams_pull_of_the_same_digest(tmp_path: Path, kind: str):
    fleet = GatedFleet(GHCR, fail=True)
    image = fleet[HUB].push("library/busybox", "1.0")
    digest = image.digest if kind == "manifests" else image.layer
    ghcr, hub = await _overlapping(tmp_path, fleet, f"/v2/ghcr.io/x/y/{kind}/{digest}",
                                   f"/v2/busybox/{kind}/{digest}")
    assert ghcr.status_code == 503
    assert hub.status_code == 200, hub.text
    assert digest_of(hub.content) == digest


async def test_a_reload_whose_new_client_cannot_be_built_changes_nothing(tmp_path: Path):
    """The CA bundle is replaced by garbage between reading the configuration and building the
    clients: reconfigure fails before anything is swapped or retired (the service then refuses
    the reload and keeps running with what it had)."""
    from tests.support.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    fleet = Fleet()
    app = DockerMirror(configuration.loads(upstreams_text(tmp_path / "cache")), clock=FakeClock(),
                       upstream_transport=fleet.transport)
    async with app.running():
        before = list(app.mirror.upstreams)
        new = configuration.loads(upstreams_text(tmp_path / "cache", docker_io=f"ca_bundle: {pki.ca}",
                                                 ghcr_io=f"ca_bundle: {pki.ca}"))
        pki.ca.write_text("not a certificate\n")
        with pytest.raises(OSError):      # ssl.SSLError: no certificate in the bundle
            app.reconfigure(new)
        assert list(app.mirror.upstreams) == before
        assert app._retired == {}
