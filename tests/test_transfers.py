"""One upstream fetch per blob, however many clients ask, and whoever leaves."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time

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
    db = sqlite3.connect(mirror.cache_dir / "index.sqlite")

    def indexed():  # the file is renamed into blobs/ a moment before its row is written
        return db.execute("SELECT size FROM content WHERE digest = ?", (digest,)).fetchone()

    size = wait_until(indexed, 120, what="blob committed and indexed after the client left")
    assert size == (len(upstream.blob(digest)),)
    assert _get_all(url) == (200, digest, size[0])
    assert len(fault_proxy.requests("GET", f"/blobs/{digest}")) == 1
    assert "cache=HIT" in mirror.access_lines("cache=HIT")[0]


def _peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_late_slow_readers_of_a_blob_too_big_for_the_cache_share_one_fetch(make_mirror, fault_proxy,
                                                                            upstream: Upstream):
    """12 clients read a 100 MiB blob at ~8 MiB/s, arriving 0.7 s apart, from a 50 MiB cache: the
    content passes through a file outside the cache that every reader follows, fetched once,
    whoever is behind; memory does not grow with the readers; nothing remains afterwards."""
    digest = upstream.big_layer
    size = len(upstream.blob(digest))
    mirror = make_mirror(fault_proxy.url, cache={"max_size": "50MiB", "min_free": 0})
    baseline = _peak_rss(mirror.pid)
    url = f"{mirror.url}/v2/library/big/blobs/{digest}"
    results: list[tuple[int, str, int]] = []

    def slow_client(delay: float) -> None:
        time.sleep(delay)
        sha, got = hashlib.sha256(), 0
        with httpx.stream("GET", url, timeout=120) as response:
            for chunk in response.iter_bytes(64 * 1024):
                sha.update(chunk)
                got += len(chunk)
                time.sleep(len(chunk) / (8 * 1024 * 1024))
            results.append((response.status_code, "sha256:" + sha.hexdigest(), got))

    threads = [threading.Thread(target=slow_client, args=(0.7 * i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    peak = _peak_rss(mirror.pid)
    fetches = len(fault_proxy.requests("GET", f"/blobs/{digest}"))
    print(f"\n12 late slow readers of a blob larger than the cache: {fetches} upstream GET(s), "
          f"mirror peak RSS {peak / 2**20:.0f} MiB (at start {baseline / 2**20:.0f} MiB)")
    assert results == [(200, digest, size)] * 12
    assert fetches == 1
    lines = mirror.access_lines(digest, at_least=12)
    assert sorted(line.split("cache=")[1].split()[0] for line in lines) == ["COALESCED"] * 11 + ["PASS"]
    assert peak - baseline < 64 * 2**20       # no copy of the content per reader (it was > 500 MiB)
    # the spilled file goes with its last reader; nothing was cached
    wait_until(lambda: list((mirror.cache_dir / "tmp").iterdir()) == [], 30, what="spilled file removed")
    db = sqlite3.connect(mirror.cache_dir / "index.sqlite")
    assert db.execute("SELECT count(*) FROM content WHERE digest = ?", (digest,)).fetchone() == (0,)
    db.close()
