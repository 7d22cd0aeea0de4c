"""When the upstream is down, slow, rate limiting or lying: serve what is cached, never corrupt."""

from __future__ import annotations

import secrets
import socket
import sqlite3
from urllib.parse import unquote

import httpx
import pytest

from dockermirror.upstream.client import NO_PROGRESS_ATTEMPTS
from tests.cachetools import MiB
from tests.conftest import ALL_MANIFESTS, Upstream
from tests.support import images
from tests.support.clients import skopeo_push
from tests.support.procs import Registry, free_port, wait_until

ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]


def cache_of(line: str) -> str:
    return line.split("cache=")[1].split()[0]


def indexed(mirror, digest: str) -> bool:
    db = sqlite3.connect(mirror.cache_dir / "index.sqlite")
    try:
        return db.execute("SELECT 1 FROM content WHERE digest = ?", (digest,)).fetchone() is not None
    finally:
        db.close()


def warm_hello(client: httpx.Client, upstream: Upstream) -> None:
    image = upstream.seeded["hello"].image
    assert client.get("/v2/library/hello/manifests/latest", headers=ACCEPT).status_code == 200
    for digest in image.layers["amd64"]:
        assert client.get(f"/v2/library/hello/blobs/{digest}").status_code == 200


def test_upstream_stopped_serves_cached_content(tmp_path, make_mirror, upstream: Upstream):
    second = Registry(tmp_path / "second", storage=upstream.registry.storage)
    second.start()
    try:
        mirror = make_mirror(second.url, cache={"tag_ttl": "0s"})
        with mirror.client() as client:
            warm_hello(client, upstream)
    finally:
        second.stop()
    seeded = upstream.seeded["hello"]
    layer = seeded.image.layers["amd64"][0]
    uncached_layer = upstream.seeded["busybox"].image.layers["amd64"][0]
    for attempt in ("running", "restarted while the upstream is down"):
        with mirror.client() as client:
            by_tag = client.get("/v2/library/hello/manifests/latest", headers=ACCEPT)
            head = client.head("/v2/library/hello/manifests/latest", headers=ACCEPT)
            by_digest = client.get(f"/v2/library/hello/manifests/{seeded.digest}", headers=ACCEPT)
            blob = client.get(f"/v2/library/hello/blobs/{layer}")
            tags = client.get("/v2/library/hello/tags/list")
            missing_blob = client.get(f"/v2/library/busybox/blobs/{uncached_layer}")
            missing_tag = client.get("/v2/library/busybox/manifests/latest", headers=ACCEPT)
        assert by_tag.status_code == head.status_code == by_digest.status_code == blob.status_code == 200, attempt
        assert by_tag.headers["docker-content-digest"] == head.headers["docker-content-digest"] == seeded.digest
        assert blob.content == upstream.blob(layer)
        assert tags.json() == {"name": "library/hello", "tags": ["latest"]}
        for response in (missing_blob, missing_tag):
            assert response.status_code == 503
            assert response.json()["errors"][0]["code"] == "UNAVAILABLE"
        assert cache_of(mirror.access_lines(r'"GET /v2/library/hello/manifests/latest"')[-1]) == "STALE"
        assert cache_of(mirror.access_lines(f"GET /v2/library/hello/blobs/{layer}")[-1]) == "HIT"
        assert "serving the cached tag" in mirror.log_text()
        mirror.restart()


@pytest.mark.parametrize("status, code", [(503, "UNAVAILABLE"), (429, "TOOMANYREQUESTS")])
def test_upstream_errors_serve_stale_tags(make_mirror, fault_proxy, upstream: Upstream, status, code):
    mirror = make_mirror(fault_proxy.url, cache={"tag_ttl": "0s"})
    with mirror.client() as client:
        warm_hello(client, upstream)
        fault_proxy.status = (r"/manifests/", status)
        cached = client.get("/v2/library/hello/manifests/latest", headers=ACCEPT)
        uncached = client.get("/v2/acme/tool/manifests/1.0", headers=ACCEPT)
    assert cached.status_code == 200
    assert cached.headers["docker-content-digest"] == upstream.seeded["hello"].digest
    assert cache_of(mirror.access_lines("GET /v2/library/hello/manifests/latest", at_least=2)[-1]) == "STALE"
    assert uncached.status_code == status
    assert uncached.json()["errors"][0]["code"] == code
    assert f"upstream_status={status}" in mirror.access_lines("/v2/acme/tool/manifests/1.0")[-1]


def test_tag_revalidation_uses_head_and_follows_changes(tmp_path, make_mirror, upstream: Upstream):
    def push(name: str) -> str:
        image = images.build(tmp_path / name, name, tag="v1", seed=name)
        skopeo_push(tmp_path / name, "v1", f"{upstream.registry.address}/test/retag:v1")
        return image.digest

    first = push("first")
    fresh = make_mirror(cache={"tag_ttl": "1h"})
    always = make_mirror(cache={"tag_ttl": "0s"})
    for mirror in (fresh, always):
        response = httpx.get(f"{mirror.url}/v2/test/retag/manifests/v1", headers=ACCEPT)
        assert response.headers["docker-content-digest"] == first
    mark = upstream.registry.mark()
    assert httpx.get(f"{fresh.url}/v2/test/retag/manifests/v1", headers=ACCEPT).status_code == 200
    assert upstream.registry.requests(mark) == []  # fresh: no upstream call at all
    assert httpx.get(f"{always.url}/v2/test/retag/manifests/v1", headers=ACCEPT).status_code == 200
    assert upstream.registry.requests(mark) == ["HEAD /v2/test/retag/manifests/v1"]  # stale: HEAD, no GET

    second = push("second")
    mark = upstream.registry.mark()
    changed = httpx.get(f"{always.url}/v2/test/retag/manifests/v1", headers=ACCEPT)
    assert changed.headers["docker-content-digest"] == second
    assert upstream.registry.requests(mark, path="/manifests/") == [
        "HEAD /v2/test/retag/manifests/v1", f"GET /v2/test/retag/manifests/{second}"]
    unchanged = httpx.get(f"{fresh.url}/v2/test/retag/manifests/v1", headers=ACCEPT)
    assert unchanged.headers["docker-content-digest"] == first  # within tag_ttl


def test_mirror_starts_with_upstream_down(make_mirror):
    mirror = make_mirror(f"http://127.0.0.1:{free_port()}")
    with mirror.client() as client:
        assert client.get("/v2/").status_code == 200
        response = client.get("/v2/library/hello/manifests/latest", headers=ACCEPT)
    assert response.status_code == 503
    assert response.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert "Traceback" not in mirror.log_text()


def test_tampered_blob_is_never_cached_or_served(make_mirror, fault_proxy, upstream: Upstream):
    layer = upstream.seeded["tool"].image.layers["amd64"][0]
    fault_proxy.tamper = f"/blobs/{layer}"
    mirror = make_mirror(fault_proxy.url)
    url = f"{mirror.url}/v2/acme/tool/blobs/{layer}"
    for _attempt in range(2):
        with pytest.raises(httpx.RemoteProtocolError):  # cut off before the last byte
            httpx.get(url)
    wait_until(lambda: len(mirror.access_lines(layer, at_least=2)) >= 2, what="request lines")
    # the failed transfer removes its temp file just after the client's response is cut off
    wait_until(lambda: list((mirror.cache_dir / "tmp").iterdir()) == [], what="temp file removed")
    assert not mirror.blob_file(layer).exists()
    assert not indexed(mirror, layer)
    assert len(fault_proxy.requests("GET", f"/blobs/{layer}")) == 2  # the second try went upstream again
    assert all("response cut off" in line for line in mirror.access_lines(layer))
    assert "hashes to" in mirror.log_text()

    fault_proxy.tamper = None
    good = httpx.get(url)
    assert good.status_code == 200 and good.content == upstream.blob(layer)


def test_tampered_manifest_is_refused(make_mirror, fault_proxy, upstream: Upstream):
    seeded = upstream.seeded["tool"]
    fault_proxy.tamper = "/manifests/sha256:"
    mirror = make_mirror(fault_proxy.url)
    by_tag = httpx.get(f"{mirror.url}/v2/acme/tool/manifests/1.0", headers=ACCEPT)
    by_digest = httpx.get(f"{mirror.url}/v2/acme/tool/manifests/{seeded.digest}", headers=ACCEPT)
    for response in (by_tag, by_digest):
        assert response.status_code == 502
        assert response.json()["errors"][0]["code"] == "DIGEST_INVALID"
    assert not mirror.blob_file(seeded.digest).exists()
    assert not indexed(mirror, seeded.digest)


def test_upstream_cut_mid_blob_is_resumed_where_it_stopped(make_mirror, fault_proxy, upstream: Upstream):
    digest = upstream.big_layer
    data = upstream.blob(digest)
    fault_proxy.cut = (f"/blobs/{digest}", 10 * MiB)
    fault_proxy.cuts = 2
    mirror = make_mirror(fault_proxy.url)
    response = httpx.get(f"{mirror.url}/v2/library/big/blobs/{digest}", timeout=60)
    assert response.status_code == 200 and response.content == data
    gets = fault_proxy.requests("GET", f"/blobs/{digest}")
    assert [get.header_values("Range") for get in gets] == [[], [f"bytes={10 * MiB}-"], [f"bytes={20 * MiB}-"]]
    assert mirror.committed_blob(digest) == data
    assert mirror.log_text().count(f"upstream broke off library/big@{digest}") == 2
    assert "cache=MISS" in mirror.access_lines(f"/blobs/{digest}")[0]


def test_upstream_cut_every_few_mib_is_resumed_to_the_end(make_mirror, fault_proxy, upstream: Upstream):
    """A link that drops every 4 MiB: resumed as long as each attempt moves forward, like wget."""
    digest = upstream.big_layer
    data = upstream.blob(digest)
    fault_proxy.cut = (f"/blobs/{digest}", 4 * MiB)        # every response, the resumed ones too
    mirror = make_mirror(fault_proxy.url)
    response = httpx.get(f"{mirror.url}/v2/library/big/blobs/{digest}", timeout=120)
    assert response.status_code == 200 and response.content == data
    gets = fault_proxy.requests("GET", f"/blobs/{digest}")
    assert len(gets) == -(-len(data) // (4 * MiB)) > 1 + 3   # more than the 3 resumes there used to be
    assert [get.header_values("Range") for get in gets[:3]] == [[], [f"bytes={4 * MiB}-"], [f"bytes={8 * MiB}-"]]
    assert mirror.committed_blob(digest) == data
    assert mirror.log_text().count(f"upstream broke off library/big@{digest}") == len(gets) - 1


def test_upstream_cut_at_the_same_offset_gives_up(make_mirror, fault_proxy, upstream: Upstream):
    """No attempt gets past 10 MiB: after NO_PROGRESS_ATTEMPTS resumes without progress the
    transfer fails (nothing cached), and the next pull after the upstream heals succeeds."""
    digest = upstream.big_layer
    fault_proxy.cut_at = (f"/blobs/{digest}", 10 * MiB)
    mirror = make_mirror(fault_proxy.url)
    url = f"{mirror.url}/v2/library/big/blobs/{digest}"
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(url, timeout=60)
    gets = fault_proxy.requests("GET", f"/blobs/{digest}")
    assert [get.header_values("Range") for get in gets] == [[]] + [[f"bytes={10 * MiB}-"]] * NO_PROGRESS_ATTEMPTS
    assert f"giving up after {NO_PROGRESS_ATTEMPTS} attempts in a row without progress" in mirror.log_text()
    assert not indexed(mirror, digest)
    wait_until(lambda: list((mirror.cache_dir / "tmp").iterdir()) == [], what="temp file removed")
    fault_proxy.cut_at = None
    response = httpx.get(url, timeout=60)
    assert response.status_code == 200 and response.content == upstream.blob(digest)


def test_manifests_and_tokens_never_wait_behind_blob_bodies(make_mirror, fault_proxy, upstream: Upstream):
    """72 blob downloads pinned by an upstream that trickles a byte every 0.5 s (never silent
    long enough for a read timeout): an uncached manifest, and the token it needs, are still
    answered while they are held; the trickles are then taken for the stalls they are."""
    fault_proxy.token_auth = True
    fault_proxy.hold = r"/blobs/sha256:00000000"
    mirror = make_mirror(fault_proxy.url, upstream={"read_timeout": "30s"})
    held = [f"sha256:00000000{secrets.token_hex(28)}" for _ in range(72)]
    host, port = mirror.url.removeprefix("http://").rsplit(":", 1)
    sockets = []
    try:
        for digest in held:
            sock = socket.create_connection((host, int(port)), timeout=60)
            sock.sendall(f"GET /v2/library/hello/blobs/{digest} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
            sockets.append(sock)
        wait_until(lambda: fault_proxy.holding >= 64, timeout=120, what="64 blob bodies held upstream")
        seeded = upstream.seeded["tool"]
        response = httpx.get(f"{mirror.url}/v2/acme/tool/manifests/1.0", headers=ACCEPT, timeout=60)
        assert response.status_code == 200
        assert response.headers["docker-content-digest"] == seeded.digest
        # what the upstream saw for it (token, HEAD, GET) came while 64 blob bodies were held
        asked = [s for s in fault_proxy.seen if "acme/tool" in unquote(s.path)]
        assert {s.method for s in asked} == {"GET", "HEAD"} and any(s.path.startswith("/token") for s in asked)
        assert all(s.holding >= 64 for s in asked), [(s.method, s.path, s.holding) for s in asked]
        # the trickling bodies are stalls: each is resumed where it stopped
        wait_until(lambda: "(UpstreamStalled: fewer than 64 KiB arrived in 30 s); resuming there"
                   in mirror.log_text(), timeout=120, what="a trickling body taken for a stall")
        wait_until(lambda: any(g.header_values("Range") for g in fault_proxy.requests("GET", "/blobs/sha256:0{8}")),
                   what="a resumed held body")
    finally:
        fault_proxy.released.set()
        for sock in sockets:
            sock.close()
    assert "Traceback" not in mirror.log_text()


def test_answer_headers_that_trickle_are_a_stall(make_mirror, fault_proxy, upstream: Upstream):
    """A status line and headers sent a byte every 0.2 s never trip the read timeout; they
    get 2 x read_timeout, then the upstream counts as unreachable."""
    fault_proxy.trickle_headers = r"/manifests/"
    fault_proxy.hold_interval = 0.2
    mirror = make_mirror(fault_proxy.url, upstream={"read_timeout": "2s"})
    try:
        response = httpx.get(f"{mirror.url}/v2/acme/tool/manifests/1.0", headers=ACCEPT, timeout=60)
    finally:
        fault_proxy.released.set()
    assert response.status_code == 503
    error = response.json()["errors"][0]
    assert error["code"] == "UNAVAILABLE"
    assert "UpstreamStalled: the answer's headers were not complete within 4 s" in error["message"]


def test_upstream_that_ignores_range_is_not_resumed(make_mirror, fault_proxy, upstream: Upstream):
    """A 200 with the whole body is no continuation: the transfer fails rather than guess."""
    digest = upstream.big_layer
    fault_proxy.cut = (f"/blobs/{digest}", 10 * MiB)
    fault_proxy.cuts = 1
    fault_proxy.ignore_range = True
    mirror = make_mirror(fault_proxy.url)
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"{mirror.url}/v2/library/big/blobs/{digest}", timeout=60)
    assert len(fault_proxy.requests("GET", f"/blobs/{digest}")) == 2
    assert f"did not resume {digest} at byte {10 * MiB} (answered 200" in mirror.log_text()
    assert not indexed(mirror, digest)
    wait_until(lambda: list((mirror.cache_dir / "tmp").iterdir()) == [], what="temp file removed")


def test_black_holed_upstream_is_not_retried_for_every_pull(make_mirror, fault_proxy, upstream: Upstream):
    """An upstream that accepts connections and never answers costs one read timeout, not one per pull."""
    mirror = make_mirror(fault_proxy.url, cache={"tag_ttl": "0s"}, upstream={"read_timeout": "1s"})
    with mirror.client() as client:
        warm_hello(client, upstream)
        fault_proxy.hang = 5.0
        before = len(fault_proxy.seen)
        answers = [client.get("/v2/library/hello/manifests/latest", headers=ACCEPT) for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4
    assert all(a.headers["docker-content-digest"] == upstream.seeded["hello"].digest for a in answers)
    assert len(fault_proxy.seen) == before + 1  # only the first pull waited for the upstream
    lines = mirror.access_lines('"GET /v2/library/hello/manifests/latest"', at_least=5)[-4:]
    assert [cache_of(line) for line in lines] == ["STALE"] * 4
    assert "ReadTimeout" in mirror.log_text()
