"""One upstream fetch per blob, however many clients ask, and whoever leaves."""

from __future__ import annotations

import hashlib
import sqlite3
import threading

import httpx

from tests.conftest import Upstream
from tests.support.procs import wait_until


def _get_all(url: str, headers: dict | None = None) -> tuple[int, str, int]:
    digest = hashlib.sha256()
    size = 0
    with httpx.stream("GET", url, headers=headers, timeout=120) as response:
        for chunk in response.iter_bytes():
            digest.update(chunk)
            size += len(chunk)
        return response.status_code, "sha256:" + digest.hexdigest(), size


def test_concurrent_cold_gets_make_one_upstream_fetch(make_mirror, fault_proxy, upstream: Upstream):
    # a download of a few seconds, so that all eight requests meet it in flight even on a busy machine
    fault_proxy.slow = (r"/blobs/", 0.002)
    mirror = make_mirror(fault_proxy.url)
    digest = upstream.big_layer
    url = f"{mirror.url}/v2/library/big/blobs/{digest}"
    results: list[tuple[int, str, int]] = []
    barrier = threading.Barrier(8)

    def client() -> None:
        barrier.wait()
        results.append(_get_all(url))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    size = len(upstream.blob(digest))
    assert results == [(200, digest, size)] * 8
    assert [seen.path for seen in fault_proxy.requests("GET", f"/blobs/{digest}")] == [
        f"/v2/library/big/blobs/{digest}"]
    results_logged = [line.split("cache=")[1].split()[0] for line in mirror.access_lines(digest, at_least=8)]
    assert sorted(results_logged) == ["COALESCED"] * 7 + ["MISS"]
    wait_until(lambda: mirror.blob_file(digest).exists(), 30, what="blob committed")
    assert "sha256:" + hashlib.sha256(mirror.blob_file(digest).read_bytes()).hexdigest() == digest


def test_ranged_readers_join_a_transfer_in_flight(make_mirror, fault_proxy, upstream: Upstream):
    """Slow the upstream down so the range requests arrive while the blob downloads."""
    fault_proxy.slow = (r"/blobs/", 0.002)
    mirror = make_mirror(fault_proxy.url)
    digest = upstream.big_layer
    data = upstream.blob(digest)
    url = f"{mirror.url}/v2/library/big/blobs/{digest}"
    full: list = []
    first = threading.Thread(target=lambda: full.append(_get_all(url)))
    first.start()
    wait_until(lambda: any((mirror.cache_dir / "tmp").glob("*.part")), 30, what="transfer started")
    # the head range answers at once from the growing file; the tail range waits for the end
    head = httpx.get(url, headers={"Range": "bytes=0-99"}, timeout=120)
    tail = httpx.get(url, headers={"Range": f"bytes={len(data) - 1000}-"}, timeout=120)
    first.join(180)
    assert tail.status_code == 206 and tail.content == data[-1000:]
    assert tail.headers["content-range"] == f"bytes {len(data) - 1000}-{len(data) - 1}/{len(data)}"
    assert head.status_code == 206 and head.content == data[:100]
    assert full == [(200, digest, len(data))]
    assert len(fault_proxy.requests("GET", f"/blobs/{digest}")) == 1
    ranged = mirror.access_lines("206", at_least=2)
    assert all("cache=COALESCED" in line for line in ranged), ranged


def test_download_continues_when_its_client_leaves(make_mirror, fault_proxy, upstream: Upstream):
    fault_proxy.slow = (r"/blobs/", 0.001)
    mirror = make_mirror(fault_proxy.url)
    digest = upstream.big_layer
    url = f"{mirror.url}/v2/library/big/blobs/{digest}"
    with httpx.stream("GET", url, timeout=60) as response:
        assert response.status_code == 200
        next(response.iter_bytes())  # take a little, then hang up
    wait_until(lambda: mirror.blob_file(digest).exists(), 120, what="blob committed after the client left")
    db = sqlite3.connect(mirror.cache_dir / "index.sqlite")
    size = db.execute("SELECT size FROM content WHERE digest = ?", (digest,)).fetchone()
    assert size == (len(upstream.blob(digest)),)
    assert _get_all(url) == (200, digest, size[0])
    assert len(fault_proxy.requests("GET", f"/blobs/{digest}")) == 1
    assert "cache=HIT" in mirror.access_lines("cache=HIT")[0]
