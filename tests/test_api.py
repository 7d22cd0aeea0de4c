"""The registry API as clients see it: manifests of every kind, blobs, ranges, tags, errors."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import socket
import struct
import time

import httpx
import pytest

from tests.conftest import ALL_MANIFESTS, Upstream
from tests.support.procs import wait_until

MANIFEST_CASES = {
    # name: (repo as requested, expected media type)
    "hello": ("library/hello", "application/vnd.oci.image.manifest.v1+json"),
    "busybox": ("library/busybox", "application/vnd.oci.image.index.v1+json"),
    "alpine": ("library/alpine", "application/vnd.docker.distribution.manifest.list.v2+json"),
    "tool": ("acme/tool", "application/vnd.oci.image.manifest.v1+json"),
}


def accept_all() -> list[tuple[str, str]]:
    return [("Accept", a) for a in ALL_MANIFESTS]


def test_version_check(mirror):
    response = httpx.get(f"{mirror.url}/v2/")
    assert response.status_code == 200
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"
    assert response.json() == {}


@pytest.mark.parametrize("name", MANIFEST_CASES)
def test_manifest_by_tag_matches_upstream(mirror, upstream: Upstream, name):
    repo, media_type = MANIFEST_CASES[name]
    seeded = upstream.seeded[name]
    expected = upstream.get(seeded.repo, seeded.tag)
    with mirror.client() as client:
        for _attempt in ("cold", "warm"):
            response = client.get(f"/v2/{repo}/manifests/{seeded.tag}", headers=accept_all())
            assert response.status_code == 200, response.text
            assert response.content == expected.content
            assert response.headers["content-type"] == media_type == expected.headers["content-type"]
            assert response.headers["docker-content-digest"] == seeded.digest
            assert "sha256:" + hashlib.sha256(response.content).hexdigest() == seeded.digest
            assert int(response.headers["content-length"]) == len(expected.content)
            assert response.headers["etag"] == f'"{seeded.digest}"'
    lines = mirror.access_lines(f"/v2/{repo}/manifests/{seeded.tag}", at_least=2)
    assert "cache=MISS" in lines[0] and "cache=HIT" in lines[1]


def test_docker_schema2_child_manifest_by_digest(mirror, upstream: Upstream):
    """The platform manifests of a Docker manifest list are Docker schema2."""
    listing = json.loads(upstream.get("library/alpine", "3").content)
    child = listing["manifests"][0]
    with mirror.client() as client:
        response = client.get(f"/v2/library/alpine/manifests/{child['digest']}", headers=accept_all())
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert "sha256:" + hashlib.sha256(response.content).hexdigest() == child["digest"]
    assert mirror.blob_file(child["digest"]).read_bytes() == response.content


def test_every_accept_line_is_forwarded(make_mirror, fault_proxy, upstream: Upstream):
    mirror = make_mirror(fault_proxy.url)
    with mirror.client() as client:
        assert client.get("/v2/library/busybox/manifests/latest", headers=accept_all()).status_code == 200
    sent = fault_proxy.requests(path=r"/manifests/latest$")[0]
    assert sorted(sent.header_values("Accept")) == sorted(ALL_MANIFESTS)


def test_one_component_name_gets_library_prefix(mirror, upstream: Upstream):
    seeded = upstream.seeded["hello"]
    with mirror.client() as client:
        short = client.get("/v2/hello/manifests/latest", headers=accept_all())
        full = client.get("/v2/library/hello/manifests/latest", headers=accept_all())
    assert short.status_code == full.status_code == 200
    assert short.headers["docker-content-digest"] == full.headers["docker-content-digest"] == seeded.digest
    assert "cache=HIT" in mirror.access_lines("/v2/library/hello/manifests/latest")[0]


def test_head_by_tag_asks_upstream_with_head_only(mirror, upstream: Upstream):
    seeded = upstream.seeded["tool"]
    length = len(upstream.get("acme/tool", "1.0").content)
    mark = upstream.registry.mark()
    with mirror.client() as client:
        response = client.head("/v2/acme/tool/manifests/1.0", headers=accept_all())
    assert response.status_code == 200
    assert response.headers["docker-content-digest"] == seeded.digest
    assert int(response.headers["content-length"]) == length
    assert upstream.registry.requests(mark, path="/v2/acme/tool/manifests") == ["HEAD /v2/acme/tool/manifests/1.0"]


def test_manifest_by_digest_is_served_without_upstream_once_cached(mirror, upstream: Upstream):
    seeded = upstream.seeded["busybox"]
    with mirror.client() as client:
        first = client.get(f"/v2/library/busybox/manifests/{seeded.digest}", headers=accept_all())
        mark = upstream.registry.mark()
        second = client.get(f"/v2/library/busybox/manifests/{seeded.digest}", headers=accept_all())
        head = client.head(f"/v2/library/busybox/manifests/{seeded.digest}")
    assert first.status_code == second.status_code == head.status_code == 200
    assert first.content == second.content
    assert head.headers["content-length"] == str(len(first.content))
    assert upstream.registry.requests(mark) == []


def test_blob_full_and_head(mirror, upstream: Upstream):
    seeded = upstream.seeded["hello"]
    layer = seeded.image.layers["amd64"][0]
    expected = upstream.blob(layer)
    with mirror.client() as client:
        cold = client.get(f"/v2/library/hello/blobs/{layer}")
        warm = client.get(f"/v2/hello/blobs/{layer}")
        head = client.head(f"/v2/library/hello/blobs/{layer}")
    for response in (cold, warm):
        assert response.status_code == 200
        assert response.content == expected
        assert response.headers["docker-content-digest"] == layer
    assert head.headers["content-length"] == str(len(expected))
    assert head.headers["accept-ranges"] == "bytes"
    assert mirror.committed_blob(layer) == expected
    results = [line.split("cache=")[1].split()[0] for line in mirror.access_lines(f"/blobs/{layer}", at_least=3)]
    # The second request may still find the first transfer committing (fsync, rename): COALESCED.
    assert results[0] == "MISS" and set(results[1:]) <= {"HIT", "COALESCED"}, results


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "cached"])
def test_range_requests(mirror, upstream: Upstream, warm):
    digest = upstream.big_layer
    data = upstream.blob(digest)
    with mirror.client() as client:
        if warm:
            assert client.get(f"/v2/library/big/blobs/{digest}").status_code == 200
        middle = client.get(f"/v2/library/big/blobs/{digest}", headers={"Range": "bytes=5000000-5999999"})
        assert middle.status_code == 206
        assert middle.headers["content-range"] == f"bytes 5000000-5999999/{len(data)}"
        assert middle.content == data[5000000:6000000]
        suffix = client.get(f"/v2/library/big/blobs/{digest}", headers={"Range": "bytes=-100"})
        assert suffix.status_code == 206 and suffix.content == data[-100:]
        bad = client.get(f"/v2/library/big/blobs/{digest}", headers={"Range": f"bytes={len(data)}-"})
        assert bad.status_code == 416
        assert bad.headers["content-range"] == f"bytes */{len(data)}"


def test_tags_list_is_proxied_with_pagination_parameters(make_mirror, fault_proxy, upstream: Upstream):
    mirror = make_mirror(fault_proxy.url)
    for params in ({}, {"n": "1"}, {"n": "1", "last": "1"}):
        ours = httpx.get(f"{mirror.url}/v2/acme/tool/tags/list", params=params)
        theirs = httpx.get(f"{upstream.url}/v2/acme/tool/tags/list", params=params)
        assert ours.status_code == 200
        assert ours.json() == theirs.json()
        assert ours.headers.get("link") == theirs.headers.get("link")
    assert sorted(ours.json()["tags"]) == ["1", "1.0"]
    forwarded = [seen.path for seen in fault_proxy.requests(path="/tags/list")]
    assert forwarded == ["/v2/acme/tool/tags/list", "/v2/acme/tool/tags/list?n=1",
                         "/v2/acme/tool/tags/list?n=1&last=1"]


def test_containerd_namespace_parameter(mirror, upstream: Upstream):
    seeded = upstream.seeded["hello"]
    with mirror.client() as client:
        ours = client.get("/v2/library/hello/manifests/latest", params={"ns": "docker.io"}, headers=accept_all())
        alias = client.head("/v2/library/hello/manifests/latest", params={"ns": "registry-1.docker.io"},
                            headers=accept_all())
        other = client.get("/v2/library/hello/manifests/latest", params={"ns": "quay.io"})
    assert ours.status_code == 200 and ours.headers["docker-content-digest"] == seeded.digest
    assert ours.headers["oci-namespace"] == "docker.io"
    assert alias.status_code == 200
    assert other.status_code == 404
    assert other.json()["errors"][0]["code"] == "NAME_UNKNOWN"


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", [
    "/v2/library/hello/manifests/latest",
    "/v2/library/hello/blobs/uploads/",
    "/v2/library/hello/blobs/sha256:" + "a" * 64,
])
def test_writes_are_refused(mirror, upstream: Upstream, method, path):
    before = sorted(p.relative_to(mirror.cache_dir) for p in mirror.cache_dir.rglob("*") if p.is_file())
    mark = upstream.registry.mark()
    response = httpx.request(method, mirror.url + path, content=b"{}")
    assert response.status_code == 405
    assert response.json()["errors"][0]["code"] == "UNSUPPORTED"
    assert upstream.registry.requests(mark) == []
    after = sorted(p.relative_to(mirror.cache_dir) for p in mirror.cache_dir.rglob("*") if p.is_file())
    assert [p for p in after if p.parts[0] == "blobs"] == [p for p in before if p.parts[0] == "blobs"]


@pytest.mark.parametrize("path, status, code", [
    ("/v2/Library/Hello/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/library/hello../manifests/latest", 400, "NAME_INVALID"),
    ("/v2/library/hello/manifests/-latest", 404, "MANIFEST_UNKNOWN"),
    ("/v2/library/hello/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),   # OCI conformance
    ("/v2/library/hello/manifests/sha256:1234", 400, "DIGEST_INVALID"),
    ("/v2/library/hello/blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
    ("/v2/library/hello/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", 400, "DIGEST_INVALID"),
    ("/v2/library/hello/blobs/notadigest", 400, "DIGEST_INVALID"),
    ("/v2/library/hello/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN"),
    ("/v2/library/hello/manifests/nosuchtag", 404, "MANIFEST_UNKNOWN"),
    ("/v2/library/hello/manifests/sha256:" + "0" * 64, 404, "MANIFEST_UNKNOWN"),
    ("/v2/nobody/nothing/tags/list", 404, "NAME_UNKNOWN"),
])
def test_errors_use_spec_codes(mirror, upstream: Upstream, path, status, code):
    mark = upstream.registry.mark()
    response = httpx.get(mirror.url + path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["errors"][0]["code"] == code
    if status == 400:  # rejected before anything reached the upstream
        assert upstream.registry.requests(mark) == []
    assert "Traceback" not in mirror.log_text()


def test_accept_decides_what_a_cached_tag_can_answer(make_mirror, fault_proxy, upstream: Upstream):
    """A cached OCI index must not be handed to a client that only accepts Docker schema2."""
    mirror = make_mirror(fault_proxy.url)
    docker_only = [("Accept", "application/vnd.docker.distribution.manifest.v2+json")]
    with mirror.client() as client:
        assert client.get("/v2/library/busybox/manifests/latest", headers=accept_all()).status_code == 200
        before = len(fault_proxy.requests(path="/manifests/latest"))
        narrow = client.get("/v2/library/busybox/manifests/latest", headers=docker_only)
    direct = httpx.get(f"{upstream.url}/v2/library/busybox/manifests/latest", headers=docker_only)
    assert len(fault_proxy.requests(path="/manifests/latest")) == before + 1  # asked the upstream again
    assert narrow.status_code == direct.status_code
    assert narrow.headers.get("content-type") != "application/vnd.oci.image.index.v1+json"


def test_manifest_fetched_through_blobs_endpoint_keeps_its_type(mirror, upstream: Upstream):
    seeded = upstream.seeded["hello"]
    with mirror.client() as client:
        assert client.get(f"/v2/library/hello/manifests/{seeded.digest}", headers=accept_all()).status_code == 200
        as_blob = client.get(f"/v2/library/hello/blobs/{seeded.digest}")
    assert as_blob.status_code == 200
    assert as_blob.headers["content-type"] == "application/vnd.oci.image.manifest.v1+json"
    assert "sha256:" + hashlib.sha256(as_blob.content).hexdigest() == seeded.digest


def open_descriptors(pid: int) -> dict[int, str]:
    """The process's open file descriptors and what each refers to."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue    # closed meanwhile
    return found


def settled_descriptors(pid: int) -> dict[int, str]:
    """The descriptors once two readings a moment apart agree (connections finish closing)."""

    def settled() -> dict[int, str] | None:
        first = open_descriptors(pid)
        time.sleep(0.2)
        second = open_descriptors(pid)
        return second if first == second else None

    return wait_until(settled, 30, what="the descriptor table to settle")


def abandoned_request(address: str, request: bytes) -> None:
    """Send a request and close the connection without reading the answer."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # RST, not FIN


def test_malformed_requests_leak_no_descriptor_and_the_blob_stays_evictable(make_mirror, upstream: Upstream):
    """Issue 10, item 6: each of these used to leave the cache file open with its eviction lease
    (a Range with a 5,000-digit number answered 500; ?ns=docker.io%0A a dropped connection).
    300 of them; then the process holds no more descriptors than before, and the blob is still
    evicted when room is needed."""
    small = upstream.seeded["hello"].image.layers["amd64"][0]
    big = upstream.big_layer
    small_size, big_size = len(upstream.blob(small)), len(upstream.blob(big))
    # room for the big layer, not for both: caching it must evict the small one
    mirror = make_mirror(cache={"max_size": big_size + small_size - 1, "min_free": 0})
    url = f"/v2/library/hello/blobs/{small}"
    with mirror.client() as client:
        assert client.get(url).content == upstream.blob(small)
    mirror.committed_blob(small)
    before = settled_descriptors(mirror.pid)
    path = str(mirror.blob_file(small))

    huge = "9" * 5000
    outcomes: collections.Counter[str] = collections.Counter()
    with mirror.client() as client:
        for i in range(300):
            kind = ("range-start", "namespace", "range-end", "abandoned")[i % 4]
            try:
                if kind == "range-start":
                    outcomes[f"{kind} {client.get(url, headers={'Range': f'bytes={huge}-'}).status_code}"] += 1
                elif kind == "namespace":
                    outcomes[f"{kind} {client.get(url + '?ns=docker.io%0A').status_code}"] += 1
                elif kind == "range-end":
                    outcomes[f"{kind} {client.get(url, headers={'Range': f'bytes=0-{huge}'}).status_code}"] += 1
                else:
                    abandoned_request(mirror.address, f"GET {url} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
                    outcomes[kind] += 1
            except httpx.HTTPError as exc:
                outcomes[f"{kind} {type(exc).__name__}"] += 1

    def no_leak() -> dict[int, str] | None:
        now = open_descriptors(mirror.pid)
        return now if len(now) <= len(before) and path not in now.values() else None

    try:
        wait_until(no_leak, 30, what="the descriptors to be closed")
    except TimeoutError:
        now = open_descriptors(mirror.pid)
        on_blob = sum(target.startswith(path) for target in now.values())
        raise AssertionError(f"{len(now)} descriptors open, {len(before)} before; {on_blob} on the blob file; "
                             f"answers: {dict(outcomes)}") from None
    assert outcomes == {"range-start 416": 75, "namespace 400": 75, "range-end 206": 75, "abandoned": 75}, outcomes

    # no lease left behind: making room for the big layer evicts the small one
    with mirror.client() as client:
        response = client.get(f"/v2/library/big/blobs/{big}")
    assert response.status_code == 200 and len(response.content) == big_size
    mirror.committed_blob(big, timeout=60)
    wait_until(lambda: not mirror.blob_file(small).exists(), 30, what="the small blob evicted")
    assert "cache=MISS" in mirror.access_lines(f"/blobs/{big}")[0]
    assert "Traceback" not in mirror.log_text()


def test_control_characters_in_a_request_are_escaped_in_the_log(mirror):
    """Issue 10, item 17: a request cannot write CR, LF or ESC into the log (nor forge a line)."""
    forged = "%0D%0A2026-01-01 00:00:00 INFO access: 10.0.0.1 %22GET /v2/x%22 200%1B[2K"
    response = httpx.get(f"{mirror.url}/v2/acme/tool{forged}/manifests/1.0?ns=%1B%5B31m")
    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == "NAME_INVALID"
    [line] = mirror.access_lines(r"/v2/acme/tool\\x0d\\x0a")   # waits for the line
    text = mirror.log_text()
    assert "\r" not in text and "\x1b" not in text
    assert ('"GET /v2/acme/tool\\x0d\\x0a2026-01-01 00:00:00 INFO access: 10.0.0.1 \\x22GET /v2/x\\x22 200'
            '\\x1b[2K/manifests/1.0?ns=%1B%5B31m" 400 ') in line
    assert sum(" access: " in line for line in text.splitlines()) == 1
