"""The whole application in-process: HTTP API -> mirror policy -> upstream client and cache.

What the client gets (status, bytes, headers), what the fake upstream saw, and what is
on disk afterwards.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from dockermirror.upstream.client import DOWN_WINDOW
from tests.unit.fakes import ALL_MANIFESTS, OCI_MANIFEST, digest_of

pytestmark = pytest.mark.anyio
ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]


async def test_version_check_answers_with_the_api_header(mirror):
    response = await mirror.client.get("/v2/")
    assert response.status_code == 200 and response.json() == {}
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"
    assert mirror.registry.seen == []          # it never needs the upstream


async def test_a_pull_is_fetched_once_then_served_from_disk(mirror, caplog):
    image = mirror.registry.push("library/hello", "latest")
    caplog.set_level(logging.INFO, "dockermirror.access")
    for round_ in range(2):
        manifest = await mirror.client.get("/v2/hello/manifests/latest", headers=ACCEPT)
        assert manifest.status_code == 200
        assert manifest.content == image.manifest
        assert manifest.headers["docker-content-digest"] == image.digest
        assert manifest.headers["content-type"] == OCI_MANIFEST
        for digest, data in image.blobs.items():
            blob = await mirror.client.get(f"/v2/library/hello/blobs/{digest}")
            assert blob.status_code == 200 and blob.content == data, round_
            assert blob.headers["docker-content-digest"] == digest
        await mirror.app.cache.transfers.wait_all(5)    # committed (fsync, rename) after the last byte
    # the upstream saw one HEAD for the tag, one GET of the manifest, one GET per blob
    seen = [(s.method, s.path) for s in mirror.registry.seen]
    assert seen.count(("GET", f"/v2/library/hello/manifests/{image.digest}")) == 1
    for digest in image.blobs:
        assert seen.count(("GET", f"/v2/library/hello/blobs/{digest}")) == 1
    assert len(seen) == 2 + len(image.blobs), seen
    for digest, data in image.blobs.items():
        assert mirror.blob_file(digest).read_bytes() == data
    lines = [r.getMessage() for r in caplog.records if r.name == "dockermirror.access"]
    assert sum("cache=MISS" in line for line in lines) == 1 + len(image.blobs)
    assert sum("cache=HIT" in line for line in lines) == 1 + len(image.blobs)
    assert all(line.startswith("192.0.2.7 ") for line in lines)


async def test_one_upstream_fetch_for_many_concurrent_readers(mirror):
    image = mirror.registry.push("acme/tool", "1.0", layer=b"x" * (3 * 1024 * 1024 + 17))
    results = await asyncio.gather(*(mirror.client.get(f"/v2/acme/tool/blobs/{image.layer}") for _ in range(8)))
    assert {r.status_code for r in results} == {200}
    assert all(r.content == image.blobs[image.layer] for r in results)
    assert len(mirror.registry.requests("GET", f"/blobs/{image.layer}")) == 1


async def test_tampered_blob_is_never_completed_nor_stored(mirror, caplog):
    image = mirror.registry.push("acme/tool", "1.0")
    mirror.registry.tamper.add(image.layer)
    with pytest.raises(Exception):  # noqa: B017 - the response is cut off: whatever the client library raises
        response = await mirror.client.get(f"/v2/acme/tool/blobs/{image.layer}")
        assert response.content != image.blobs[image.layer]
        raise AssertionError("a tampered blob was answered completely")
    await mirror.app.cache.transfers.wait_all(5)
    assert not mirror.blob_file(image.layer).exists()
    assert mirror.app.cache.entry(digest_of(image.blobs[image.layer])) is None
    assert list((mirror.cache_dir / "tmp").iterdir()) == []


async def test_manifest_that_does_not_match_its_digest_is_refused(mirror):
    image = mirror.registry.push("acme/tool", "1.0")
    wrong = digest_of(b"something else")
    mirror.registry.manifests[("acme/tool", wrong)] = (image.manifest, OCI_MANIFEST)
    response = await mirror.client.get(f"/v2/acme/tool/manifests/{wrong}", headers=ACCEPT)
    assert response.status_code == 502
    assert response.json()["errors"][0]["code"] == "DIGEST_INVALID"
    assert mirror.cached_files() == []


@pytest.mark.parametrize("method, path", [
    ("PUT", "/v2/acme/tool/manifests/1.0"),
    ("DELETE", "/v2/acme/tool/manifests/1.0"),
    ("POST", "/v2/acme/tool/blobs/uploads/"),
    ("PATCH", "/v2/acme/tool/blobs/uploads/0a1b"),
])
async def test_writes_are_refused(mirror, method, path):
    response = await mirror.client.request(method, path, content=b"{}")
    assert response.status_code == 405
    assert response.json()["errors"][0]["code"] == "UNSUPPORTED"
    assert mirror.registry.seen == []


@pytest.mark.parametrize("path, status, code", [
    ("/v2/UPPER/case/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/acme/tool/manifests/-bad-tag", 404, "MANIFEST_UNKNOWN"),   # neither tag nor digest
    ("/v2/acme/tool/blobs/sha256:1234", 400, "DIGEST_INVALID"),
    ("/v2/acme/tool/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", 400, "DIGEST_INVALID"),
    ("/v2/acme/tool/manifests/latest?ns=quay.io", 404, "NAME_UNKNOWN"),
    ("/v2/_catalog", 405, "UNSUPPORTED"),
    ("/v2/acme/tool/nothing-here", 404, "NAME_UNKNOWN"),
])
async def test_bad_requests_get_spec_errors_without_asking_upstream(mirror, path, status, code):
    response = await mirror.client.get(path, headers=ACCEPT)
    assert response.status_code == status
    body = response.json()
    assert body["errors"][0]["code"] == code and body["errors"][0]["message"]
    assert "Traceback" not in response.text
    assert mirror.registry.seen == []


async def test_containerd_namespace_is_checked_and_echoed(mirror):
    image = mirror.registry.push("library/busybox", "latest")
    response = await mirror.client.get("/v2/library/busybox/manifests/latest?ns=docker.io", headers=ACCEPT)
    assert response.status_code == 200 and response.content == image.manifest
    assert response.headers["oci-namespace"] == "docker.io"


async def test_official_images_get_the_library_prefix(mirror):
    mirror.registry.push("library/busybox", "latest")
    assert (await mirror.client.get("/v2/busybox/manifests/latest", headers=ACCEPT)).status_code == 200
    assert {s.path for s in mirror.registry.seen} <= {"/v2/library/busybox/manifests/latest",
                                                      *(f"/v2/library/busybox/manifests/{d}"
                                                        for d in [digest_of(mirror.registry.manifests[
                                                            ("library/busybox", "latest")][0])])}


async def test_range_requests_on_a_cached_blob(mirror):
    data = bytes(range(256)) * 40
    image = mirror.registry.push("acme/tool", "1.0", layer=data)
    url = f"/v2/acme/tool/blobs/{image.layer}"
    assert (await mirror.client.get(url)).content == data
    part = await mirror.client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    suffix = await mirror.client.get(url, headers={"Range": "bytes=-10"})
    assert suffix.status_code == 206 and suffix.content == data[-10:]
    beyond = await mirror.client.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(data)}"
    other = await mirror.client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"some-other-etag"'})
    assert other.status_code == 200 and other.content == data
    head = await mirror.client.head(url)
    assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(len(data))
    assert len(mirror.registry.requests("GET", "/blobs/")) == 1


async def test_blob_unknown_upstream_is_404_and_nothing_is_kept(mirror):
    missing = digest_of(b"never pushed")
    response = await mirror.client.get(f"/v2/acme/tool/blobs/{missing}")
    assert response.status_code == 404 and response.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert mirror.cached_files() == []


async def test_upstream_unreachable_without_a_cached_answer_is_503(mirror):
    mirror.registry.down = True
    response = await mirror.client.get("/v2/acme/tool/manifests/1.0", headers=ACCEPT)
    assert response.status_code == 503
    assert response.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert "unreachable" in response.json()["errors"][0]["message"]


async def test_tag_list_passes_through_and_is_served_from_cache_when_upstream_is_down(mirror):
    mirror.registry.push("acme/tool", "1.0")
    mirror.registry.push("acme/tool", "2.0")
    listed = await mirror.client.get("/v2/acme/tool/tags/list")
    assert listed.status_code == 200 and listed.json() == {"name": "acme/tool", "tags": ["1.0", "2.0"]}
    assert (await mirror.client.get("/v2/acme/tool/manifests/1.0", headers=ACCEPT)).status_code == 200
    mirror.registry.down = True
    stale = await mirror.client.get("/v2/acme/tool/tags/list")
    assert stale.status_code == 200 and json.loads(stale.content) == {"name": "acme/tool", "tags": ["1.0"]}
    bad = await mirror.client.get("/v2/acme/tool/tags/list?n=ten")
    assert bad.status_code == 400 and bad.json()["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"


class TestTagFreshness:
    """cache.tag_ttl with a fake clock: fresh tags cost nothing, stale ones a HEAD, and a
    failing upstream leaves the last known mapping in service."""

    async def pull_tag(self, mirror, tag: str = "1.0"):
        return await mirror.client.get(f"/v2/acme/tool/manifests/{tag}", headers=ACCEPT)

    async def test_fresh_tag_asks_nothing(self, mirror):
        image = mirror.registry.push("acme/tool", "1.0")
        assert (await self.pull_tag(mirror)).content == image.manifest
        before = len(mirror.registry.seen)
        mirror.clock.advance(299)
        again = await self.pull_tag(mirror)
        assert again.status_code == 200 and again.content == image.manifest
        assert len(mirror.registry.seen) == before

    async def test_stale_tag_is_revalidated_with_head_only(self, mirror):
        image = mirror.registry.push("acme/tool", "1.0")
        await self.pull_tag(mirror)
        before = len(mirror.registry.seen)
        mirror.clock.advance(301)
        again = await self.pull_tag(mirror)
        assert again.status_code == 200 and again.content == image.manifest
        assert [(s.method, s.path) for s in mirror.registry.seen[before:]] == [
            ("HEAD", "/v2/acme/tool/manifests/1.0")]

    async def test_changed_tag_fetches_the_new_manifest(self, mirror):
        mirror.registry.push("acme/tool", "1.0")
        await self.pull_tag(mirror)
        newer = mirror.registry.push("acme/tool", "1.0", layer=b"a new layer")
        mirror.clock.advance(301)
        again = await self.pull_tag(mirror)
        assert again.content == newer.manifest
        assert again.headers["docker-content-digest"] == newer.digest
        assert len(mirror.registry.requests("GET", f"/manifests/{newer.digest}")) == 1

    @pytest.mark.parametrize("failure", ["down", 500, 503, 429])
    async def test_failing_upstream_serves_the_cached_tag_stale(self, mirror, caplog, failure):
        image = mirror.registry.push("acme/tool", "1.0")
        await self.pull_tag(mirror)
        mirror.clock.advance(3600)
        if failure == "down":
            mirror.registry.down = True
        else:
            mirror.registry.status = failure
        caplog.set_level(logging.INFO)
        stale = await self.pull_tag(mirror)
        assert stale.status_code == 200 and stale.content == image.manifest
        assert any("serving the cached tag" in r.getMessage() and r.levelno == logging.INFO
                   for r in caplog.records)
        assert any("cache=STALE" in r.getMessage() for r in caplog.records if r.name == "dockermirror.access")

    async def test_after_an_unreachable_upstream_stale_tags_do_not_wait_for_it(self, mirror):
        mirror.registry.push("acme/tool", "1.0")
        await self.pull_tag(mirror)
        mirror.clock.advance(3600)
        mirror.registry.down = True
        assert (await self.pull_tag(mirror)).status_code == 200      # tried, failed, stale
        tried = len(mirror.registry.seen)
        assert (await self.pull_tag(mirror)).status_code == 200      # within DOWN_WINDOW: not tried
        assert len(mirror.registry.seen) == tried
        assert DOWN_WINDOW > 0

    async def test_unknown_tag_with_upstream_down_is_503_not_stale(self, mirror):
        mirror.registry.down = True
        response = await self.pull_tag(mirror, "never-seen")
        assert response.status_code == 503


async def test_each_finished_request_is_one_record_for_the_observers_and_the_log(mirror, caplog):
    """What metrics, the journal fields and the status page read: kind, cache result, upstream,
    repository and reference as routed, bytes that went out; the log record carries the same."""
    image = mirror.registry.push("library/hello", "latest")
    seen = []
    mirror.app.request_observers.append(seen.append)
    mirror.app.request_observers.insert(0, lambda done: 1 / 0)     # a broken observer costs nothing
    caplog.set_level(logging.INFO)
    await mirror.client.get("/v2/hello/manifests/latest", headers=ACCEPT)
    blob = await mirror.client.get(f"/v2/hello/blobs/{image.layer}")
    await mirror.client.get("/v2/hello/tags/list")
    await mirror.client.head("/v2/")
    await mirror.client.get("/v2/hello/manifests/..bad")
    manifest, layer, tags, version, bad = seen
    assert (manifest.kind, manifest.method, manifest.status, manifest.cache) == ("manifest", "GET", 200, "MISS")
    assert (manifest.upstream, manifest.repository, manifest.reference) == ("docker.io", "library/hello", "latest")
    assert manifest.sent == len(image.manifest) and manifest.complete and manifest.client == "192.0.2.7"
    assert (layer.kind, layer.reference, layer.sent) == ("blob", image.layer, len(blob.content))
    assert (tags.kind, tags.reference, tags.repository) == ("tags", None, "library/hello")
    assert (version.kind, version.method, version.upstream, version.cache) == ("other", "HEAD", None, None)
    assert (bad.kind, bad.status, bad.reference) == ("manifest", 404, "..bad") and "MANIFEST_UNKNOWN" in bad.note
    records = [r.request for r in caplog.records if r.name == "dockermirror.access"]
    assert records == seen
    # the broken observer: one traceback in the log for five requests, not five
    failed = [r for r in caplog.records if "request observer failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None
