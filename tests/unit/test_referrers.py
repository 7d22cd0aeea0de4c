"""The OCI 1.1 referrers API: ``GET /v2/<name>/referrers/<digest>`` forwarded and cached like a tag.

The upstream is faked (tests/unit/fakes.py): with ``referrers=True`` it answers from the
artifacts pushed with a ``subject``; without, it answers 404 as Distribution 2.8 does.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import httpx
import pytest

from dockermirror import config as configuration
from dockermirror.app import DockerMirror
from dockermirror.cache import maintenance
from dockermirror.cache.index import IMMUTABLE, Index, ReferrersEntry
from dockermirror.oci import MAX_MANIFEST_SIZE, Digest
from tests.unit.conftest import config_text
from tests.unit.fakes import OCI_INDEX, Answer, FakeRegistry, digest_of

pytestmark = pytest.mark.anyio

SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"


def seed(registry: FakeRegistry, repo: str = "acme/tool"):
    """An image with a signature and an SBOM that refer to it."""
    registry.referrers = True
    image = registry.push(repo, "1.0")
    registry.push_artifact(repo, image.digest, SIGNATURE, b"signed\n")
    registry.push_artifact(repo, image.digest, SBOM, b"sbom\n")
    return image


def asked(registry: FakeRegistry) -> list[str]:
    """The referrers requests the upstream got (path and query)."""
    return [f"{s.method} {s.url.raw_path.decode()}" for s in registry.requests(path_contains="/referrers/")]


def rows(cache_dir: Path) -> list[tuple]:
    db = sqlite3.connect(cache_dir / "index.sqlite")
    try:
        return db.execute("SELECT upstream, repository, subject, artifact_type, digest, filtered FROM referrers"
                          " ORDER BY artifact_type").fetchall()
    finally:
        db.close()


def cache_labels(caplog) -> list[str]:
    return [r.getMessage().split("cache=")[1].split()[0] for r in caplog.records
            if r.name == "dockermirror.access" and "/referrers/" in r.getMessage()]


async def test_a_miss_then_hits_from_the_cache(mirror, caplog):
    caplog.set_level(logging.INFO, "dockermirror.access")
    image = seed(mirror.registry)
    url = f"/v2/acme/tool/referrers/{image.digest}"
    expected = mirror.registry.referrers_body("acme/tool", image.digest)
    assert len(json.loads(expected)["manifests"]) == 2
    for method in ("GET", "GET", "HEAD"):
        response = await mirror.client.request(method, url)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == OCI_INDEX
        assert response.headers["content-length"] == str(len(expected))
        assert "oci-filters-applied" not in response.headers
        assert response.content == (expected if method == "GET" else b"")
    assert asked(mirror.registry) == [f"GET /v2/acme/tool/referrers/{image.digest}"]
    assert cache_labels(caplog) == ["MISS", "HIT", "HIT"]
    # stored as content (an image index), keyed like a tag but never listed as one
    assert rows(mirror.cache_dir) == [("docker.io", "acme/tool", image.digest, "", digest_of(expected), 0)]
    assert mirror.blob_file(digest_of(expected)).read_bytes() == expected
    assert mirror.app.cache.entry(Digest.parse(digest_of(expected))).media_type == OCI_INDEX
    index = mirror.app.cache.index
    assert index.tag_count() == 0 and index.tags_of("docker.io", "acme/tool") == []
    mirror.registry.down = True
    tag_list = await mirror.client.get("/v2/acme/tool/tags/list")
    assert tag_list.status_code == 503        # no tags known: the referrers row is not one


async def test_a_head_first_fetches_and_stores_the_answer(mirror):
    image = seed(mirror.registry)
    url = f"/v2/acme/tool/referrers/{image.digest}"
    expected = mirror.registry.referrers_body("acme/tool", image.digest)
    head = await mirror.client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(expected))
    assert (await mirror.client.get(url)).content == expected
    assert asked(mirror.registry) == [f"GET /v2/acme/tool/referrers/{image.digest}"]   # never a HEAD upstream


async def test_the_artifact_type_filter_is_passed_on_and_echoed(mirror, caplog):
    caplog.set_level(logging.INFO, "dockermirror.access")
    image = seed(mirror.registry)
    url = f"/v2/acme/tool/referrers/{image.digest}"
    expected = mirror.registry.referrers_body("acme/tool", image.digest, SIGNATURE)
    assert [m["artifactType"] for m in json.loads(expected)["manifests"]] == [SIGNATURE]
    for _ in range(2):
        response = await mirror.client.get(url, params={"artifactType": SIGNATURE})
        assert response.status_code == 200, response.text
        assert response.content == expected
        assert response.headers["oci-filters-applied"] == "artifactType"
    # '+' percent-encoded: the upstream read the same media type
    seen = mirror.registry.requests(path_contains="/referrers/")
    assert [s.url.params.get("artifactType") for s in seen] == [SIGNATURE]
    assert "artifactType=application%2Fvnd.dev.cosign.artifact.sig.v1%2Bjson" in seen[0].url.raw_path.decode()
    # the unfiltered answer is an entry of its own
    unfiltered = await mirror.client.get(url)
    assert unfiltered.content == mirror.registry.referrers_body("acme/tool", image.digest)
    assert "oci-filters-applied" not in unfiltered.headers
    assert len(asked(mirror.registry)) == 2
    assert cache_labels(caplog) == ["MISS", "HIT", "MISS"]
    assert [(r[3], r[5]) for r in rows(mirror.cache_dir)] == [("", 0), (SIGNATURE, 1)]


async def test_an_upstream_that_does_not_filter_is_passed_on_unfiltered_without_the_header(mirror):
    """The mirror does not filter itself: the client sees no OCI-Filters-Applied and filters
    (as the spec asks of clients), and gets the upstream's bytes."""
    image = seed(mirror.registry)
    mirror.registry.filters = False
    url = f"/v2/acme/tool/referrers/{image.digest}"
    for _ in range(2):
        response = await mirror.client.get(url, params={"artifactType": SBOM})
        assert response.status_code == 200
        assert response.content == mirror.registry.referrers_body("acme/tool", image.digest)
        assert "oci-filters-applied" not in response.headers
    assert [s.url.params.get("artifactType") for s in mirror.registry.requests(path_contains="/referrers/")] == [SBOM]


async def test_revalidated_with_a_get_after_the_tag_ttl(mirror, caplog):
    caplog.set_level(logging.INFO, "dockermirror.access")
    image = seed(mirror.registry)
    url = f"/v2/acme/tool/referrers/{image.digest}"
    first = (await mirror.client.get(url)).content
    mirror.registry.push_artifact("acme/tool", image.digest, "application/vnd.example.attestation+json", b"att\n")
    mirror.clock.advance(299)
    assert (await mirror.client.get(url)).content == first          # within tag_ttl (5m): the cached answer
    mirror.clock.advance(2)
    again = await mirror.client.get(url)
    assert again.status_code == 200
    assert again.content == mirror.registry.referrers_body("acme/tool", image.digest) != first
    assert len(json.loads(again.content)["manifests"]) == 3
    assert asked(mirror.registry) == [f"GET /v2/acme/tool/referrers/{image.digest}"] * 2
    assert (await mirror.client.get(url)).content == again.content
    assert cache_labels(caplog) == ["MISS", "HIT", "MISS", "HIT"]
    assert [r[4] for r in rows(mirror.cache_dir)] == [digest_of(again.content)]


@pytest.mark.parametrize("failure", ["down", 503, 429])
async def test_served_stale_when_the_upstream_fails(mirror, caplog, failure):
    caplog.set_level(logging.INFO)
    image = seed(mirror.registry)
    url = f"/v2/acme/tool/referrers/{image.digest}"
    cached = (await mirror.client.get(url, params={"artifactType": SIGNATURE})).content
    mirror.clock.advance(301)
    if failure == "down":
        mirror.registry.down = True
    else:
        mirror.registry.status = failure
    for method in ("GET", "HEAD"):
        response = await mirror.client.request(method, url, params={"artifactType": SIGNATURE})
        assert response.status_code == 200, response.text
        assert response.content == (cached if method == "GET" else b"")
        assert response.headers["oci-filters-applied"] == "artifactType"
    assert cache_labels(caplog) == ["MISS", "STALE", "STALE"]
    assert any(r.levelno == logging.INFO and "serving the cached answer" in r.getMessage()
               and "referrers of docker.io/acme/tool@" + image.digest in r.getMessage() for r in caplog.records)
    # an answer never cached has nothing to fall back on
    other = await mirror.client.get(url)
    assert other.status_code == (503 if failure != 429 else 429)


async def test_recently_down_serves_stale_without_asking(mirror):
    image = seed(mirror.registry)
    url = f"/v2/acme/tool/referrers/{image.digest}"
    cached = (await mirror.client.get(url)).content
    mirror.registry.down = True
    await mirror.client.get("/v2/acme/tool/manifests/1.0")        # finds the upstream unreachable
    mirror.clock.advance(301)
    before = len(mirror.registry.seen)
    response = await mirror.client.get(url)
    assert response.status_code == 200 and response.content == cached
    assert len(mirror.registry.seen) == before


async def test_a_404_is_passed_on_and_never_cached(mirror, caplog):
    """Distribution 2.8 has no referrers API: 404, so that the client falls back to the tag scheme."""
    caplog.set_level(logging.INFO, "dockermirror.access")
    image = mirror.registry.push("acme/tool", "1.0")
    url = f"/v2/acme/tool/referrers/{image.digest}"
    for _ in range(2):
        response = await mirror.client.get(url)
        assert response.status_code == 404
        error = response.json()["errors"][0]
        assert error["code"] == "MANIFEST_UNKNOWN" and error["detail"]["upstream_status"] == 404
        assert "sha256-<hex> tag" in error["message"]
    assert len(asked(mirror.registry)) == 2         # asked each time: a 404 is not an answer to keep
    assert rows(mirror.cache_dir) == [] and mirror.cached_files() == []
    assert all("upstream_status=404" in r.getMessage() for r in caplog.records
               if r.name == "dockermirror.access" and "/referrers/" in r.getMessage())
    head = await mirror.client.head(url)
    assert head.status_code == 404 and head.content == b""


async def test_a_404_forgets_the_cached_answer_and_is_never_served_stale(mirror):
    image = seed(mirror.registry)
    url = f"/v2/acme/tool/referrers/{image.digest}"
    assert (await mirror.client.get(url)).status_code == 200
    mirror.registry.referrers = False          # the upstream was replaced by one without the API
    mirror.clock.advance(301)
    assert (await mirror.client.get(url)).status_code == 404
    assert rows(mirror.cache_dir) == []
    mirror.registry.down = True
    assert (await mirror.client.get(url)).status_code == 503


def _body(body: bytes, content_type: bytes = OCI_INDEX.encode()):
    def alter(request: httpx.Request, answer: Answer) -> None:
        answer.status, answer.body = 200, body
        answer.headers = {"content-type": content_type}
    return alter


BAD_BODIES = {
    "not JSON": _body(b"<html>referrers</html>"),
    "not UTF-8": _body(b"\xff\xfe{}"),
    "a JSON array": _body(b'[{"manifests": []}]'),
    "no manifests": _body(b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json"}'),
    "manifests not a list": _body(b'{"schemaVersion": 2, "manifests": {"a": 1}}'),
    "manifests of strings": _body(b'{"schemaVersion": 2, "manifests": ["sha256:00"]}'),
    "nested too deep": _body(b'{"manifests": ' + b"[" * 100_000),
    "too large": _body(b'{"manifests": [], "pad": "' + b"x" * MAX_MANIFEST_SIZE + b'"}'),
    "status 204": lambda request, answer: setattr(answer, "status", 204),
}


@pytest.mark.parametrize("case", BAD_BODIES)
async def test_an_upstream_answer_that_is_not_an_image_index_is_a_502_and_not_kept(mirror, case):
    image = seed(mirror.registry)
    mirror.registry.alter_referrers = BAD_BODIES[case]
    response = await mirror.client.get(f"/v2/acme/tool/referrers/{image.digest}")
    assert response.status_code == 502, response.text
    assert response.json()["errors"][0]["code"] and "Traceback" not in response.text
    assert rows(mirror.cache_dir) == [] and mirror.cached_files() == []


@pytest.mark.parametrize("path, code", [
    ("/v2/acme/tool/referrers/sha256:1234", "DIGEST_INVALID"),
    ("/v2/acme/tool/referrers/latest", "DIGEST_INVALID"),
    (f"/v2/acme/tool/referrers/md5:{'0' * 32}", "DIGEST_INVALID"),
    (f"/v2/acme/tool/referrers/sha256:{'0' * 64}?artifactType=signature", "UNSUPPORTED"),
    (f"/v2/acme/tool/referrers/sha256:{'0' * 64}?artifactType=", "UNSUPPORTED"),
    (f"/v2/acme/tool/referrers/sha256:{'0' * 64}?artifactType=a/b%0D%0AX-Evil:%201", "UNSUPPORTED"),
    (f"/v2/acme/tool/referrers/sha256:{'0' * 64}?artifactType=a/b;%20x=y", "UNSUPPORTED"),
    (f"/v2/acme/tool/referrers/sha256:{'0' * 64}?artifactType=a/b&artifactType=c/d", "UNSUPPORTED"),
    (f"/v2/UPPER/referrers/sha256:{'0' * 64}", "NAME_INVALID"),
])
async def test_invalid_requests_are_400_without_asking_upstream(mirror, path, code):
    response = await mirror.client.get(path)
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["code"] == code
    assert mirror.registry.seen == []


async def test_ns_and_the_path_prefix_reach_the_right_upstream_and_share_an_entry(tmp_path, clock):
    hub, ghcr = FakeRegistry(), FakeRegistry()
    image = seed(ghcr, "org/app")
    seed(hub, "org/app")                                # a different image of the same name on the default

    def route(request: httpx.Request) -> httpx.Response:
        return (ghcr if request.url.host == "ghcr.test" else hub).handle(request)

    cache_dir = tmp_path / "cache"
    text = config_text(cache_dir).replace(
        "upstream:\n  url: https://registry.test\n",
        "upstreams:\n  - registry: docker.io\n    url: https://registry.test\n"
        "  - registry: ghcr.io\n    url: https://ghcr.test\n    tag_ttl: 1m\n")
    app = DockerMirror(configuration.loads(text), clock=clock, upstream_transport=httpx.MockTransport(route))
    expected = ghcr.referrers_body("org/app", image.digest)
    async with app.running():
        transport = httpx.ASGITransport(app=app.asgi, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://mirror.test") as client:
            by_ns = await client.get(f"/v2/org/app/referrers/{image.digest}", params={"ns": "ghcr.io"})
            assert by_ns.status_code == 200 and by_ns.content == expected
            assert by_ns.headers["oci-namespace"] == "ghcr.io"
            by_prefix = await client.get(f"/v2/ghcr.io/org/app/referrers/{image.digest}")
            assert by_prefix.status_code == 200 and by_prefix.content == expected
            assert asked(ghcr) == [f"GET /v2/org/app/referrers/{image.digest}"]
            assert asked(hub) == []
            unknown = await client.get(f"/v2/org/app/referrers/{image.digest}", params={"ns": "quay.io"})
            assert unknown.status_code == 404 and unknown.json()["errors"][0]["code"] == "NAME_UNKNOWN"
            # ghcr.io's own tag_ttl (1m) decides when it is asked again
            clock.advance(61)
            assert (await client.get(f"/v2/ghcr.io/org/app/referrers/{image.digest}")).content == expected
            assert len(asked(ghcr)) == 2 and asked(hub) == []
            # the default upstream has its own entry
            default = await client.get(f"/v2/org/app/referrers/{image.digest}")
            assert default.content == hub.referrers_body("org/app", image.digest)
            assert len(asked(hub)) == 1
    assert {(r[0], r[1]) for r in rows(cache_dir)} == {("ghcr.io", "org/app"), ("docker.io", "org/app")}


# --- the index

def _row(subject: str = "sha256:" + "1" * 64, artifact_type: str = "", when: float = 100.0) -> ReferrersEntry:
    return ReferrersEntry("docker.io", "acme/tool", subject, artifact_type, "sha256:" + "2" * 64, 50, False,
                          when, when)


def test_referrers_rows_expire_with_tags_and_are_no_tags(tmp_path):
    index = Index(tmp_path / "index.sqlite")
    try:
        index.put_referrers(_row(when=100.0))
        index.put_referrers(_row(artifact_type=SBOM, when=300.0))
        assert index.tag_count() == 0 and index.tags_of("docker.io", "acme/tool") == []
        assert index.delete_tags_before(200.0) == 1
        assert index.referrers("docker.io", "acme/tool", "sha256:" + "1" * 64, "") is None
        assert index.referrers("docker.io", "acme/tool", "sha256:" + "1" * 64, SBOM) == _row(artifact_type=SBOM,
                                                                                            when=300.0)
        index.delete_repository("docker.io", "acme/tool")
        assert index.referrers("docker.io", "acme/tool", "sha256:" + "1" * 64, SBOM) is None
    finally:
        index.close()


def _schema_2_index(path: Path) -> None:
    """An index as the previous version left it: schema 2, no referrers table."""
    index = Index(path)
    index.close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE referrers")
    db.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
    db.execute("INSERT INTO tags VALUES ('docker.io', 'acme/tool', '1.0', '', 'sha256:' || hex(zeroblob(32)),"
               " 'application/vnd.oci.image.manifest.v1+json', 500, 1000.0, 1001.0)")
    db.commit()
    db.close()


def test_a_schema_2_index_is_upgraded_in_place(tmp_path):
    path = tmp_path / "index.sqlite"
    _schema_2_index(path)
    for _ in range(2):
        index = Index(path)
        try:
            assert index.meta("schema") == "4"
            assert index.tag("docker.io", "acme/tool", "1.0") is not None
            index.put_referrers(_row())
            assert index.referrers("docker.io", "acme/tool", "sha256:" + "1" * 64, "") == _row()
        finally:
            index.close()


def test_a_schema_2_index_is_still_read_as_it_is(tmp_path):
    """A read-only or full filesystem: the index cannot be upgraded, its tags are still served."""
    path = tmp_path / "index.sqlite"
    _schema_2_index(path)
    index = Index(path, mode=IMMUTABLE)
    try:
        assert index.tag("docker.io", "acme/tool", "1.0") is not None
        assert index.referrers("docker.io", "acme/tool", "sha256:" + "1" * 64, "") is None
    finally:
        index.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("2",)
    finally:
        db.close()


async def test_an_answer_whose_content_was_evicted_is_asked_for_again(mirror):
    image = seed(mirror.registry)
    url = f"/v2/acme/tool/referrers/{image.digest}"
    body = (await mirror.client.get(url)).content
    cache = mirror.app.cache
    maintenance.remove(cache.store, cache.index, [digest_of(body)])     # as eviction does
    again = await mirror.client.get(url)
    assert again.status_code == 200 and again.content == body
    assert len(asked(mirror.registry)) == 2
    assert mirror.blob_file(digest_of(body)).read_bytes() == body
    maintenance.remove(cache.store, cache.index, [digest_of(body)])
    mirror.clock.advance(301)
    mirror.registry.down = True
    assert (await mirror.client.get(url)).status_code == 503         # nothing left to serve stale


async def test_answers_expire_with_tags(mirror):
    image = seed(mirror.registry)
    url = f"/v2/acme/tool/referrers/{image.digest}"
    assert (await mirror.client.get(url)).status_code == 200
    mirror.clock.advance(8 * 86400)          # past blob_ttl and manifest_ttl (7d)
    await mirror.app.cache.expire()
    assert rows(mirror.cache_dir) == [] and mirror.cached_files() == []


async def test_a_paginated_answer_is_served_as_its_first_page_without_the_link(mirror, caplog):
    """Following the upstream's Link through the mirror would get the cached first page again
    (the next page's query is not forwarded): the Link is not passed on, and the log says why
    (at info: nothing to attend to)."""
    caplog.set_level(logging.INFO, "dockermirror")
    image = seed(mirror.registry)

    def paginate(request: httpx.Request, answer: Answer) -> None:
        answer.headers["link"] = f'</v2/acme/tool/referrers/{image.digest}?n=1&last=x>; rel="next"'.encode()

    mirror.registry.alter_referrers = paginate
    response = await mirror.client.get(f"/v2/acme/tool/referrers/{image.digest}")
    assert response.status_code == 200 and "link" not in response.headers
    assert response.content == mirror.registry.referrers_body("acme/tool", image.digest)
    assert any("paginates the referrers" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
