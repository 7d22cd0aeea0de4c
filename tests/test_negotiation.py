"""Content negotiation end to end with the real registry (Debian's docker-registry 2.x).

``library/alpine:3`` is a Docker manifest list (amd64 + arm64): a client that takes no list
gets the linux/amd64 manifest from the registry. ``library/busybox:latest`` is an OCI index:
such a client gets 404. Neither may change what a client that takes lists gets from the
mirror, in either order, fresh or revalidated, nor take the tag away from it when the
upstream fails afterwards.
"""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from tests.conftest import ALL_MANIFESTS, Upstream

SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EVERYTHING = [("Accept", a) for a in ALL_MANIFESTS]
SCHEMA2_ONLY = [("Accept", SCHEMA2)]


def platform_digest(listing: bytes, architecture: str) -> str:
    return next(m["digest"] for m in json.loads(listing)["manifests"]
                if m["platform"]["architecture"] == architecture)


@pytest.mark.parametrize("tag_ttl", ["1h", "0s"])       # fresh / revalidated on every pull
@pytest.mark.parametrize("order", ["schema2-only first", "multi-platform first"])
def test_an_arm64_client_gets_the_list_whoever_pulled_first(make_mirror, fault_proxy, upstream: Upstream,
                                                            order, tag_ttl):
    seeded = upstream.seeded["alpine"]
    listing = upstream.get(seeded.repo, seeded.tag).content
    amd64, arm64 = platform_digest(listing, "amd64"), platform_digest(listing, "arm64")
    direct = upstream.get(seeded.repo, seeded.tag, [SCHEMA2])
    assert direct.status_code == 200 and direct.headers["docker-content-digest"] == amd64  # what the registry does
    mirror = make_mirror(fault_proxy.url, cache={"tag_ttl": tag_ttl})
    path = f"/v2/{seeded.repo}/manifests/{seeded.tag}"

    def multi_platform_client(client: httpx.Client, method: str) -> None:
        response = client.request(method, path, headers=EVERYTHING)
        assert response.status_code == 200, response.text
        assert response.headers["docker-content-digest"] == seeded.digest
        assert response.headers["content-type"] == DOCKER_LIST
        if method == "GET":
            assert response.content == listing
            # an arm64 client goes on with the arm64 manifest
            child = client.get(f"/v2/{seeded.repo}/manifests/{platform_digest(response.content, 'arm64')}",
                               headers=EVERYTHING)
            assert child.status_code == 200 and child.headers["docker-content-digest"] == arm64
            assert json.loads(child.content)["mediaType"] == SCHEMA2

    def schema2_only_client(client: httpx.Client, method: str) -> None:
        response = client.request(method, path, headers=SCHEMA2_ONLY)
        assert response.status_code == 200, response.text
        assert response.headers["docker-content-digest"] == amd64
        assert response.headers["content-type"] == SCHEMA2
        if method == "GET":
            assert response.content == direct.content

    clients = [schema2_only_client, multi_platform_client]
    if order == "multi-platform first":
        clients.reverse()
    with mirror.client() as client:
        for method in ("HEAD", "GET", "GET"):
            for pull in clients + clients[:1]:
                pull(client, method)
        # the upstream fails: each client keeps getting what it got
        fault_proxy.status = (r"/manifests/", 503)
        for pull in clients:
            pull(client, "GET")
    assert "Traceback" not in mirror.log_text()


def test_a_404_for_a_client_that_takes_no_index_leaves_the_tag_to_the_others(make_mirror, fault_proxy,
                                                                             upstream: Upstream):
    seeded = upstream.seeded["busybox"]
    index = upstream.get(seeded.repo, seeded.tag).content
    assert upstream.get(seeded.repo, seeded.tag, [SCHEMA2]).status_code == 404   # what the registry does
    mirror = make_mirror(fault_proxy.url, cache={"tag_ttl": "0s"})
    path = f"/v2/{seeded.repo}/manifests/{seeded.tag}"
    with mirror.client() as client:
        first = client.get(path, headers=EVERYTHING)
        assert first.status_code == 200 and first.content == index
        narrow = client.get(path, headers=SCHEMA2_ONLY)
        assert narrow.status_code == 404 and narrow.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        fault_proxy.status = (r"/manifests/", 503)
        stale = client.get(path, headers=EVERYTHING)
        assert stale.status_code == 200, stale.text
        assert stale.content == index and stale.headers["content-type"] == OCI_INDEX
        assert "sha256:" + hashlib.sha256(stale.content).hexdigest() == seeded.digest
    assert "cache=STALE" in mirror.access_lines(path, at_least=3)[-1]
