"""The OCI 1.1 referrers API against real upstreams.

Debian's docker-registry (distribution 2.8) has no referrers API: it answers 404, which the
mirror passes on so that clients fall back to the ``sha256-<hex>`` tag scheme. Nothing that
implements the API is installable on Debian 12 (no zot, no distribution 3 in its archive),
so the upstream that supports it is that same registry behind the FaultProxy, which answers
``/v2/<name>/referrers/<digest>`` from the registry's real manifests (every tag of the
repository whose ``subject`` is the digest).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import httpx
import pytest

from tests.conftest import Upstream

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"
REPO = "acme/signed"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_blob(registry_url: str, repo: str, data: bytes) -> None:
    location = httpx.post(f"{registry_url}/v2/{repo}/blobs/uploads/").headers["location"]
    location = httpx.URL(location) if location.startswith("http") else httpx.URL(registry_url + location)
    response = httpx.put(location.copy_merge_params({"digest": digest_of(data)}), content=data,
                         headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 201, response.text


def push_manifest(registry_url: str, repo: str, tag: str, document: dict) -> bytes:
    body = json.dumps(document).encode()
    response = httpx.put(f"{registry_url}/v2/{repo}/manifests/{tag}", content=body,
                         headers={"Content-Type": OCI_MANIFEST})
    assert response.status_code == 201, response.text
    return body


def manifest(layer: bytes, *, artifact_type: str | None = None, subject: bytes | None = None) -> dict:
    empty = b"{}"
    document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest_of(empty), "size": 2},
                "layers": [{"mediaType": "application/octet-stream", "digest": digest_of(layer),
                            "size": len(layer)}]}
    if artifact_type is not None:
        document["artifactType"] = artifact_type
        document["annotations"] = {"org.example.kind": artifact_type.rsplit("/", 1)[-1]}
    if subject is not None:
        document["subject"] = {"mediaType": OCI_MANIFEST, "digest": digest_of(subject), "size": len(subject)}
    return document


@pytest.fixture(scope="module")
def signed(upstream: Upstream) -> dict[str, bytes]:
    """An image in acme/signed with a signature and an SBOM that refer to it (pushed with tags, as
    the registry lists manifests by tag only); name -> manifest bytes."""
    url = upstream.url
    for data in (b"{}", b"image layer\n", b"signature\n", b"sbom\n"):
        push_blob(url, REPO, data)
    image = push_manifest(url, REPO, "1.0", manifest(b"image layer\n"))
    return {
        "image": image,
        "signature": push_manifest(url, REPO, "sig-1", manifest(b"signature\n", artifact_type=SIGNATURE,
                                                                 subject=image)),
        "sbom": push_manifest(url, REPO, "sbom-1", manifest(b"sbom\n", artifact_type=SBOM, subject=image)),
    }


def referrers_rows(cache_dir: Path) -> list[tuple]:
    db = sqlite3.connect(f"file:{cache_dir / 'index.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT upstream, repository, subject, artifact_type, digest FROM referrers").fetchall()
    finally:
        db.close()


def test_an_upstream_without_the_api_gets_its_404_passed_on(mirror, upstream: Upstream, signed):
    subject = digest_of(signed["image"])
    assert httpx.get(f"{upstream.url}/v2/{REPO}/referrers/{subject}").status_code == 404    # distribution 2.8
    mark = upstream.registry.mark()
    with mirror.client() as client:
        for _ in range(2):
            response = client.get(f"/v2/{REPO}/referrers/{subject}")
            assert response.status_code == 404, response.text
            error = response.json()["errors"][0]
            assert error["code"] == "MANIFEST_UNKNOWN" and error["detail"]["upstream_status"] == 404
    # asked each time: a 404 is not kept
    assert upstream.registry.requests(mark, path="/referrers/") == [f"GET /v2/{REPO}/referrers/{subject}"] * 2
    lines = mirror.access_lines("/referrers/", at_least=2)
    assert len(lines) == 2 and all('" 404 ' in line and "upstream_status=404" in line for line in lines)
    assert referrers_rows(mirror.cache_dir) == []


def test_an_upstream_with_the_api_is_forwarded_cached_and_filtered(make_mirror, fault_proxy, signed):
    fault_proxy.referrers = True
    mirror = make_mirror(fault_proxy.url)
    subject = digest_of(signed["image"])
    url = f"/v2/{REPO}/referrers/{subject}"
    direct = httpx.get(f"{fault_proxy.url}{url}")
    expected = [digest_of(signed["sbom"]), digest_of(signed["signature"])]
    assert sorted(m["digest"] for m in direct.json()["manifests"]) == sorted(expected)
    before = len(fault_proxy.requests(path="/referrers/"))
    with mirror.client() as client:
        for method in ("GET", "GET", "HEAD"):
            response = client.request(method, url)
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == OCI_INDEX
            assert response.headers["content-length"] == str(len(direct.content))
            assert response.content == (direct.content if method == "GET" else b"")
            assert "oci-filters-applied" not in response.headers
        assert len(fault_proxy.requests(path="/referrers/")) == before + 1
        filtered = client.get(url, params={"artifactType": SIGNATURE})
        assert filtered.status_code == 200
        assert [m["digest"] for m in filtered.json()["manifests"]] == [digest_of(signed["signature"])]
        assert filtered.headers["oci-filters-applied"] == "artifactType"
        assert filtered.content == httpx.get(f"{fault_proxy.url}{url}", params={"artifactType": SIGNATURE}).content
    forwarded = fault_proxy.requests(path="/referrers/.*artifactType")[0].path
    assert forwarded == f"{url}?artifactType=application%2Fvnd.dev.cosign.artifact.sig.v1%2Bjson"
    lines = mirror.access_lines("/referrers/", at_least=4)
    assert [line.split("cache=")[1].split()[0] for line in lines] == ["MISS", "HIT", "HIT", "MISS"]
    assert mirror.blob_file(digest_of(direct.content)).read_bytes() == direct.content
    assert sorted(referrers_rows(mirror.cache_dir)) == [
        ("docker.io", REPO, subject, "", digest_of(direct.content)),
        ("docker.io", REPO, subject, SIGNATURE, digest_of(filtered.content))]


def test_revalidated_after_the_tag_ttl_and_served_stale_when_the_upstream_fails(make_mirror, fault_proxy, signed):
    fault_proxy.referrers = True
    mirror = make_mirror(fault_proxy.url, cache={"tag_ttl": "0s"})    # revalidated on every request
    url = f"/v2/{REPO}/referrers/{digest_of(signed['image'])}"
    with mirror.client() as client:
        first = client.get(url)
        assert first.status_code == 200
        again = client.get(url)
        assert again.content == first.content
        assert len(fault_proxy.requests("GET", "/referrers/")) == 2
        fault_proxy.status = ("/referrers/", 503)
        stale = client.get(url)
        assert stale.status_code == 200 and stale.content == first.content
    lines = mirror.access_lines("/referrers/", at_least=3)
    assert [line.split("cache=")[1].split()[0] for line in lines] == ["MISS", "MISS", "STALE"]
    assert "upstream_status=503" in lines[2]
    assert "serving the cached answer" in mirror.log_text()
