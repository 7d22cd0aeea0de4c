"""Content shared by digest across repositories and upstreams (issue 16): a private upstream's
cached (or in-flight) content is served for another repository, or through another upstream,
only after that upstream said (HEAD, its credentials) that the repository has it; the common
all-anonymous mirror serves shared content as before, without asking anything."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from dockermirror import config as configuration
from dockermirror.app import DockerMirror
from dockermirror.cache import maintenance
from dockermirror.oci import Digest
from tests.unit.fakes import FakeClock, FakeRegistry, Image, response
from tests.unit.test_upstreams_app import ACCEPT, GHCR, HOSTS, HUB, PRIVATE, Answered, Fleet, Harness, upstreams_text

pytestmark = pytest.mark.anyio

SECRET_LAYER = b"private layer bytes\n" * 300
CREDENTIALS = "username: me\npassword: upstream-pw"


@pytest.fixture
async def mirror_of(tmp_path: Path) -> AsyncIterator:
    """Builds a mirror of the three fake upstreams; ``private``: the keys with credentials."""
    running: list = []

    async def make(private: tuple[str, ...] = (), extra: str = "") -> Harness:
        fleet, clock, cache_dir = Fleet(), FakeClock(), tmp_path / "cache"
        for registry in fleet.registries.values():
            registry.scoped_blobs = True        # a repository has only the blobs pushed to it
        per_key = {key.replace(".", "_").replace(":", "_"): CREDENTIALS for key in private}
        app = DockerMirror(configuration.loads(upstreams_text(cache_dir, **per_key) + extra), clock=clock,
                           upstream_transport=fleet.transport)
        context = app.running()
        await context.__aenter__()
        transport = httpx.ASGITransport(app=app.asgi, client=("192.0.2.7", 40000))
        client = httpx.AsyncClient(transport=transport, base_url="http://mirror.test")
        running.append((context, client))
        return Harness(app, client, fleet, clock, cache_dir)

    yield make
    for context, client in reversed(running):
        await client.aclose()
        await context.__aexit__(None, None, None)


async def pull_secret(h: Harness) -> Image:
    """ghcr.io/org/secret pulled (manifest by tag, its layer): now cached."""
    image = h.fleet[GHCR].push("org/secret", "1", layer=SECRET_LAYER)
    got = await h.client.get("/v2/ghcr.io/org/secret/manifests/1", headers=ACCEPT)
    assert got.status_code == 200
    got = await h.client.get(f"/v2/ghcr.io/org/secret/blobs/{image.layer}")
    assert got.status_code == 200 and got.content == SECRET_LAYER
    await h.settled()
    return image


def new_requests(registry: FakeRegistry, before: int) -> list[tuple[str, str]]:
    return [(s.method, s.path) for s in registry.seen[before:]]


async def test_a_private_blob_is_not_served_through_another_repository_or_upstream(mirror_of):
    h = await mirror_of(private=(GHCR,))
    image = await pull_secret(h)
    ghcr, hub = h.fleet[GHCR], h.fleet[HUB]
    seen_ghcr, seen_hub = len(ghcr.seen), len(hub.seen)

    for method in ("GET", "HEAD"):
        got = await h.client.request(method, f"/v2/ghcr.io/org/other/blobs/{image.layer}")
        assert got.status_code == 404 and SECRET_LAYER[:20] not in got.content
    assert new_requests(ghcr, seen_ghcr) == [("HEAD", f"/v2/org/other/blobs/{image.layer}")] * 2
    got = await h.client.get(f"/v2/library/nosuch/blobs/{image.layer}")       # through the anonymous hub
    assert got.status_code == 404 and got.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    got = await h.client.get(f"/v2/registry.example.org:5000/x/y/blobs/{image.layer}")
    assert got.status_code == 404
    assert new_requests(hub, seen_hub) == [("HEAD", f"/v2/library/nosuch/blobs/{image.layer}")]
    assert h.fleet[PRIVATE].requests("HEAD") != []

    # the manifest by digest, likewise
    got = await h.client.get(f"/v2/ghcr.io/org/other/manifests/{image.digest}", headers=ACCEPT)
    assert got.status_code == 404 and got.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    got = await h.client.get(f"/v2/library/nosuch/manifests/{image.digest}", headers=ACCEPT)
    assert got.status_code == 404 and image.manifest not in got.content

    # the repository it was fetched for: from the cache, nothing asked
    seen_ghcr = len(ghcr.seen)
    got = await h.client.get(f"/v2/ghcr.io/org/secret/blobs/{image.layer}")
    assert got.status_code == 200 and got.content == SECRET_LAYER
    got = await h.client.get(f"/v2/ghcr.io/org/secret/manifests/{image.digest}", headers=ACCEPT)
    assert got.status_code == 200 and got.content == image.manifest
    assert new_requests(ghcr, seen_ghcr) == []


async def test_a_repository_that_has_it_is_asked_once_then_served_from_the_cache(mirror_of):
    h = await mirror_of(private=(GHCR,))
    image = await pull_secret(h)
    ghcr = h.fleet[GHCR]
    ghcr.push("org/copy", "1", layer=SECRET_LAYER)          # the same image in another repository
    seen = len(ghcr.seen)
    for _ in range(2):
        got = await h.client.get(f"/v2/ghcr.io/org/copy/blobs/{image.layer}")
        assert got.status_code == 200 and got.content == SECRET_LAYER
    await h.app.cache.flush()                               # recorded in the index, not only in memory
    got = await h.client.get(f"/v2/ghcr.io/org/copy/blobs/{image.layer}")
    assert got.status_code == 200
    got = await h.client.get(f"/v2/ghcr.io/org/copy/manifests/{image.digest}", headers=ACCEPT)
    assert got.status_code == 200 and got.content == image.manifest
    assert new_requests(ghcr, seen) == [("HEAD", f"/v2/org/copy/blobs/{image.layer}"),
                                        ("HEAD", f"/v2/org/copy/manifests/{image.digest}")]


async def test_the_upstreams_refusal_goes_to_the_client(mirror_of):
    h = await mirror_of(private=(GHCR,))
    image = await pull_secret(h)

    def refuse(request: httpx.Request) -> None:
        if "/org/locked/" in request.url.path:
            raise Answered(response(401, {"WWW-Authenticate": 'Basic realm="x"'},
                                    json_body={"errors": [{"code": "UNAUTHORIZED", "message": "no"}]}))

    h.fleet[GHCR].on_request = refuse
    got = await h.client.get(f"/v2/ghcr.io/org/locked/blobs/{image.layer}")
    assert got.status_code == 401 and got.json()["errors"][0]["code"] == "UNAUTHORIZED"
    assert SECRET_LAYER[:20] not in got.content


@pytest.mark.parametrize("down", [GHCR, HUB])
async def test_an_upstream_that_cannot_answer_the_check_fails_closed(mirror_of, down):
    h = await mirror_of(private=(GHCR,))
    image = await pull_secret(h)
    h.fleet[down].down = True
    path = "ghcr.io/org/other" if down == GHCR else "library/other"
    got = await h.client.get(f"/v2/{path}/blobs/{image.layer}")
    assert got.status_code == 503 and SECRET_LAYER[:20] not in got.content
    got = await h.client.get(f"/v2/{path}/manifests/{image.digest}", headers=ACCEPT)
    assert got.status_code == 503


async def test_an_in_flight_private_blob_is_not_joined_by_another_repository(mirror_of):
    h = await mirror_of(private=(GHCR,))
    ghcr = h.fleet[GHCR]
    image = ghcr.push("org/secret", "1", layer=SECRET_LAYER)
    release = asyncio.Event()
    plain = ghcr.handle

    class Held(httpx.AsyncByteStream):
        async def __aiter__(self):
            yield SECRET_LAYER[:1000]
            await release.wait()
            yield SECRET_LAYER[1000:]

    async def held(request: httpx.Request) -> httpx.Response:
        answer = plain(request)
        if request.method == "GET" and "/blobs/" in request.url.path and answer.status_code == 200:
            return httpx.Response(200, headers={"Content-Length": str(len(SECRET_LAYER))}, stream=Held())
        return answer

    ghcr.handle = held
    first = asyncio.create_task(h.client.get(f"/v2/ghcr.io/org/secret/blobs/{image.layer}"))
    for _ in range(500):
        if h.app.cache.transfer(_digest(image.layer)) is not None:
            break
        await asyncio.sleep(0.01)
    assert h.app.cache.transfer(_digest(image.layer)) is not None
    second = asyncio.create_task(h.client.get(f"/v2/library/nosuch/blobs/{image.layer}"))
    for _ in range(300):            # (without the check it would wait for the transfer: let it end)
        if second.done():
            break
        await asyncio.sleep(0.01)
    release.set()
    got_first, got_second = await first, await second
    assert got_first.status_code == 200 and got_first.content == SECRET_LAYER
    assert got_second.status_code == 404 and SECRET_LAYER[:20] not in got_second.content
    assert h.fleet[HUB].requests("HEAD", "/blobs/") != []


@pytest.mark.parametrize("other, asked", [("library/nosuch", HUB), ("ghcr.io/org/other", GHCR)])
async def test_an_in_flight_private_manifest_is_not_joined_by_another_repository(mirror_of, other, asked):
    h = await mirror_of(private=(GHCR,))
    ghcr = h.fleet[GHCR]
    image = ghcr.push("org/secret", "1", layer=SECRET_LAYER)
    release, held_now = asyncio.Event(), asyncio.Event()
    plain = ghcr.handle

    async def held(request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path.startswith("/v2/org/secret/manifests/"):
            held_now.set()
            await release.wait()
        return plain(request)

    ghcr.handle = held
    first = asyncio.create_task(h.client.get(f"/v2/ghcr.io/org/secret/manifests/{image.digest}", headers=ACCEPT))
    await asyncio.wait_for(held_now.wait(), 10)
    second = asyncio.create_task(h.client.get(f"/v2/{other}/manifests/{image.digest}", headers=ACCEPT))
    for _ in range(300):            # (joined to the first fetch, it would wait for it: let it end)
        if second.done():
            break
        await asyncio.sleep(0.01)
    release.set()
    got_first, got_second = await first, await second
    assert got_first.status_code == 200 and got_first.content == image.manifest
    assert got_second.status_code == 404 and image.manifest not in got_second.content
    assert h.fleet[asked].requests(path_contains=f"/manifests/{image.digest}") != []


async def test_the_all_anonymous_mirror_shares_content_without_asking(mirror_of):
    """The common Docker Hub mirror: content cached for one repository is served for any other
    (public anyway) exactly as before: not one more upstream request."""
    h = await mirror_of()
    image = h.fleet[HUB].push("library/alpine", "3", layer=b"public layer\n" * 300)
    assert (await h.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)).status_code == 200
    assert (await h.client.get(f"/v2/library/alpine/blobs/{image.layer}")).status_code == 200
    await h.settled()
    before = h.fleet.seen()
    for path in ("library/alpine", "someone/fork", "ghcr.io/org/x", "registry.example.org:5000/a/b"):
        got = await h.client.get(f"/v2/{path}/blobs/{image.layer}")
        assert got.status_code == 200 and got.content == b"public layer\n" * 300
        assert (await h.client.head(f"/v2/{path}/blobs/{image.layer}")).status_code == 200
        got = await h.client.get(f"/v2/{path}/manifests/{image.digest}", headers=ACCEPT)
        assert got.status_code == 200 and got.content == image.manifest
    assert h.fleet.seen() == before


DENY_SECRET = """access:
  - deny: [anonymous]
    repositories: [ghcr.io/org/secret]
  - allow: ["*"]
"""


async def test_rules_by_repository_are_not_got_around_by_digest_through_an_allowed_repository(mirror_of):
    """Anonymous upstreams, but a rule denies one repository: its cached layer and manifest are
    not served through an allowed repository of the same upstream (or another) unless that
    repository's upstream says it has them; content of an allowed repository still is, once asked."""
    h = await mirror_of(extra=DENY_SECRET)
    image = h.fleet[GHCR].push("org/secret", "1", layer=SECRET_LAYER)
    h.app.api.guard = h.app._guard(dataclasses.replace(h.app.config, access=()))    # cached while allowed
    await pull_secret_cached(h, image)
    h.app.api.guard = h.app._guard(h.app.config)
    got = await h.client.get(f"/v2/ghcr.io/org/secret/blobs/{image.layer}")
    assert got.status_code == 403 and "access[0]" in got.text
    ghcr, hub = h.fleet[GHCR], h.fleet[HUB]
    seen_ghcr, seen_hub = len(ghcr.seen), len(hub.seen)
    for path in ("ghcr.io/org/anything", "library/alpine"):
        got = await h.client.get(f"/v2/{path}/blobs/{image.layer}")
        assert got.status_code == 404 and SECRET_LAYER[:20] not in got.content, path
        got = await h.client.get(f"/v2/{path}/manifests/{image.digest}", headers=ACCEPT)
        assert got.status_code == 404 and image.manifest not in got.content, path
    assert ("HEAD", f"/v2/org/anything/blobs/{image.layer}") in new_requests(ghcr, seen_ghcr)
    assert ("HEAD", f"/v2/library/alpine/blobs/{image.layer}") in new_requests(hub, seen_hub)
    # a repository the upstream says has it gets it from the cache, asked once
    h.fleet[GHCR].push("org/fork", "1", layer=SECRET_LAYER)
    for _ in range(2):
        got = await h.client.get(f"/v2/ghcr.io/org/fork/blobs/{image.layer}")
        assert got.status_code == 200 and got.content == SECRET_LAYER
    asked = [r for r in new_requests(ghcr, seen_ghcr) if r[1] == f"/v2/org/fork/blobs/{image.layer}"]
    assert asked == [("HEAD", f"/v2/org/fork/blobs/{image.layer}")]


async def pull_secret_cached(h: Harness, image: Image) -> None:
    got = await h.client.get(f"/v2/ghcr.io/org/secret/manifests/{image.digest}", headers=ACCEPT)
    assert got.status_code == 200
    got = await h.client.get(f"/v2/ghcr.io/org/secret/blobs/{image.layer}")
    assert got.status_code == 200 and got.content == SECRET_LAYER
    await h.settled()


async def test_public_content_is_served_to_a_private_upstreams_repository_without_asking(mirror_of):
    """Every upstream holding it is anonymous: its content is public, whoever asks."""
    h = await mirror_of(private=(GHCR,))
    image = h.fleet[HUB].push("library/alpine", "3", layer=b"public layer\n" * 300)
    assert (await h.client.get(f"/v2/library/alpine/manifests/{image.digest}", headers=ACCEPT)).status_code == 200
    assert (await h.client.get(f"/v2/library/alpine/blobs/{image.layer}")).status_code == 200
    await h.settled()
    before = h.fleet.seen()
    got = await h.client.get(f"/v2/ghcr.io/org/any/blobs/{image.layer}")
    assert got.status_code == 200 and h.fleet.seen() == before


def _digest(text: str):
    from dockermirror.oci import Digest
    return Digest.parse(text)


class GatedBody(httpx.AsyncByteStream):
    """A blob's first KiB, then the rest once ``go`` is set."""

    def __init__(self, data: bytes, go: asyncio.Event) -> None:
        self.data, self.go = data, go

    async def __aiter__(self):
        yield self.data[:1024]
        await self.go.wait()
        yield self.data[1024:]


async def test_a_reader_that_joins_a_transfer_which_ends_and_is_evicted_meanwhile_gets_the_whole_blob(
        tmp_path: Path):
    """B finds A's download of a private blob under way and asks the upstream (HEAD) whether its own
    repository has it; meanwhile A's download completes and is stored, and its file is evicted.
    B then reads the blob as it is now (fetched again), not the ended transfer's removed file."""
    fleet = Fleet()
    for registry in fleet.registries.values():
        registry.scoped_blobs = True
    image = fleet[GHCR].push("org/secret", "1", layer=SECRET_LAYER)
    fleet[GHCR].push("org/other", "1", layer=SECRET_LAYER)
    body_go, head_go, head_asked = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "HEAD" and path.startswith("/v2/org/other/blobs/"):
            head_asked.set()
            await head_go.wait()
        answer = fleet.handle(request)
        if request.method == "GET" and path == f"/v2/org/secret/blobs/{image.layer}" and answer.status_code == 200:
            return httpx.Response(200, headers=answer.headers, stream=GatedBody(await answer.aread(), body_go))
        return answer

    per_key = {GHCR.replace(".", "_").replace(":", "_"): CREDENTIALS}
    app = DockerMirror(configuration.loads(upstreams_text(tmp_path / "cache", **per_key)), clock=FakeClock(),
                       upstream_transport=httpx.MockTransport(handle))
    async with app.running():
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app.asgi), base_url="http://mirror.test")
        async with client:
            a = asyncio.ensure_future(client.get(f"/v2/ghcr.io/org/secret/blobs/{image.layer}"))
            async with asyncio.timeout(10):
                while app.cache.transfer(Digest.parse(image.layer)) is None:
                    await asyncio.sleep(0.01)
            b = asyncio.ensure_future(client.get(f"/v2/ghcr.io/org/other/blobs/{image.layer}"))
            await asyncio.wait_for(head_asked.wait(), 10)
            body_go.set()
            assert (await asyncio.wait_for(a, 10)).content == SECRET_LAYER
            await app.cache.transfers.wait_all(5)
            assert maintenance.remove(app.cache.store, app.cache.index, [image.layer]) == len(SECRET_LAYER)
            head_go.set()
            got = await asyncio.wait_for(b, 10)
            assert got.status_code == 200 and got.content == SECRET_LAYER
            assert [(s.method, s.path) for s in fleet[GHCR].seen if s.path.endswith(f"/blobs/{image.layer}")] == [
                ("GET", f"/v2/org/secret/blobs/{image.layer}"), ("HEAD", f"/v2/org/other/blobs/{image.layer}"),
                ("GET", f"/v2/org/other/blobs/{image.layer}")]      # fetched again, for B's repository
