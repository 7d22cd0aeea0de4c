"""A bounded cache: LRU eviction under max_size, shared content, pins, a full disk, a second server."""

from __future__ import annotations

import hashlib
import os
import random
import re
import sqlite3
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from tests.cachetools import MiB, Pushed, Sampler, cache_cli, disk_usage, pull, push_image, tmpfs
from tests.conftest import Upstream
from tests.support.procs import wait_until

LAYER = 8 * MiB


@pytest.fixture(scope="module")
def fillers(upstream: Upstream, tmp_path_factory) -> list[Pushed]:
    work = tmp_path_factory.mktemp("fillers")
    return [push_image(upstream, work, f"fill/img{i}", random_bytes=LAYER) for i in range(10)]


@pytest.fixture(scope="module")
def sharing(upstream: Upstream, tmp_path_factory) -> tuple[Pushed, Pushed]:
    work = tmp_path_factory.mktemp("sharing")
    return (push_image(upstream, work, "share/a", random_bytes=LAYER, shared="common base"),
            push_image(upstream, work, "share/b", random_bytes=LAYER, shared="common base"))


def cache_of(line: str) -> str:
    return line.split("cache=")[1].split()[0]


def cached_digests(mirror) -> set[str]:
    db = sqlite3.connect(mirror.cache_dir / "index.sqlite")
    try:
        return {row[0] for row in db.execute("SELECT digest FROM content")}
    finally:
        db.close()


def test_usage_stays_under_max_size_and_the_most_recently_used_remain(make_mirror, fillers):
    cap = 40 * MiB
    mirror = make_mirror(cache={"max_size": "40MiB", "min_free": 0})
    order: list[str] = []   # big layers, by last use
    with Sampler(mirror.cache_dir) as sampler, mirror.client() as client:
        for i in [0, 1, 2, 3, 4, 1, 5, 6, 2, 7, 8, 9]:
            pull(client, fillers[i].repo)
            big = fillers[i].big
            order = [d for d in order if d != big] + [big]
    wait_until(lambda: order[-1] in cached_digests(mirror), 10, what="the last layer indexed")
    peak = max(sampler.samples)
    print(f"\neviction accuracy: peak usage {peak / MiB:.2f} MiB of a {cap / MiB:.0f} MiB cap "
          f"= {peak / cap:.3f} ({len(sampler.samples)} samples)")
    assert len(sampler.samples) > 50
    assert peak <= cap
    cached = cached_digests(mirror) & set(order)
    assert 2 <= len(cached) < len(order)
    assert cached == set(order[-len(cached):]), "a less recently used layer outlived a more recent one"
    assert "evicted" in mirror.log_text()
    # everything evicted can be pulled again
    with mirror.client() as client:
        for pushed in fillers:
            pull(client, pushed.repo)


def test_shared_blob_survives_eviction_of_one_repository(make_mirror, fillers, sharing):
    a, b = sharing
    common = a.image.layers["amd64"][0]
    assert common == b.image.layers["amd64"][0]
    mirror = make_mirror(cache={"max_size": "30MiB", "min_free": 0})
    with mirror.client() as client:
        pull(client, a.repo)
        pull(client, b.repo)
        pull(client, fillers[0].repo)
        pull(client, fillers[1].repo)
    wait_until(lambda: fillers[1].big in cached_digests(mirror), 10, what="the last layer indexed")
    cached = cached_digests(mirror)
    assert a.big not in cached            # a's own layer was the least recently used
    assert common in cached and mirror.blob_file(common).exists()
    removed = cache_cli(mirror, "rm", "share/b")
    assert removed.returncode == 0, removed.stderr
    assert common in cached_digests(mirror)   # share/a still uses it
    with mirror.client() as client:           # both still pull after any eviction
        pull(client, a.repo)
        pull(client, b.repo)
        pull(client, fillers[2].repo)
        pull(client, b.repo)
        pull(client, a.repo)


def test_pinned_content_is_never_evicted(make_mirror, fillers):
    mirror = make_mirror(cache={"max_size": "30MiB", "min_free": 0, "pin": ["fill/img9"]})
    with mirror.client() as client:
        pinned = pull(client, fillers[9].repo)
        for pushed in fillers[:6]:
            last = pull(client, pushed.repo)
    # a prune that ran before the last commits would leave them behind
    wait_until(lambda: set(last) <= cached_digests(mirror), 10, what="the last pull indexed")
    assert set(pinned) <= cached_digests(mirror)
    pruned = cache_cli(mirror, "prune", "--older-than", "0s")
    assert pruned.returncode == 0, pruned.stderr
    assert cached_digests(mirror) == set(pinned)
    stats = cache_cli(mirror, "stats", "--json")
    assert '"pinned": {\n    "entries": 4' in stats.stdout


def test_blob_larger_than_the_cache_passes_through(make_mirror, fault_proxy, upstream: Upstream):
    digest = upstream.big_layer
    # The upstream answers after a second: all three meet the first (for readers that come
    # later, see test_transfers.py::test_late_slow_readers_of_a_blob_too_big_for_the_cache_share_one_fetch).
    fault_proxy.delay = (f"/blobs/{digest}", 1.0)
    mirror = make_mirror(fault_proxy.url, cache={"max_size": "50MiB", "min_free": 0})
    results: list[tuple[int, str]] = []
    barrier = threading.Barrier(3)

    def get() -> None:
        barrier.wait()
        response = httpx.get(f"{mirror.url}/v2/library/big/blobs/{digest}", timeout=120)
        results.append((response.status_code, "sha256:" + hashlib.sha256(response.content).hexdigest()))

    threads = [threading.Thread(target=get) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [(200, digest)] * 3
    assert len(fault_proxy.requests("GET", f"/blobs/{digest}")) == 1
    assert digest not in cached_digests(mirror)
    # it passed through a file outside the cache, removed once its last reader is done
    wait_until(lambda: list((mirror.cache_dir / "tmp").iterdir()) == [], 30, what="the pass-through file removed")
    assert disk_usage(mirror.cache_dir) == 0
    assert "cache=PASS" in mirror.access_lines("cache=PASS")[0]


@pytest.fixture
def small_filesystem():
    """A 40 MiB tmpfs, unmounted after the test."""
    with tmpfs("40m", "dm-small") as mountpoint:
        yield mountpoint


def test_small_filesystem_and_a_disk_that_fills_up(make_mirror, fault_proxy, fillers, upstream: Upstream,
                                                   small_filesystem: Path):
    """max_size says 100%, but the filesystem is 40 MiB and something else fills it mid-download."""
    mirror = make_mirror(fault_proxy.url, cache={"dir": str(small_filesystem / "cache"), "max_size": "100%",
                                                 "min_free": 0})
    with mirror.client() as client:
        for pushed in fillers:             # 80 MiB into 40: eviction keeps up
            pull(client, pushed.repo)
        big = client.get(f"/v2/library/big/blobs/{upstream.big_layer}")  # larger than the filesystem
        assert big.status_code == 200 and big.content == upstream.blob(upstream.big_layer)

        # a body without a length, and a disk that fills up while it downloads, with nothing
        # left to evict: it must still reach the client, uncached
        target = fillers[0]
        emptied = cache_cli(mirror, "prune", "--to-size", "0")
        assert emptied.returncode == 0, emptied.stderr
        fault_proxy.chunked = f"/blobs/{target.big}"
        fault_proxy.slow = (f"/blobs/{target.big}", 0.01)
        result: list[httpx.Response] = []
        getter = threading.Thread(target=lambda: result.append(
            client.get(f"/v2/{target.repo}/blobs/{target.big}", timeout=120)))
        getter.start()
        wait_until(lambda: any(p.stat().st_size > MiB for p in (mirror.cache_dir / "tmp").glob("*.part")), 30,
                   what="download under way")
        ballast = small_filesystem / "ballast"
        subprocess.run(["dd", "if=/dev/zero", f"of={ballast}", "bs=1M"], capture_output=True)  # until ENOSPC
        getter.join(120)
        ballast.unlink()
    response = result[0]
    assert response.status_code == 200
    assert "sha256:" + hashlib.sha256(response.content).hexdigest() == target.big
    assert target.big not in cached_digests(mirror)
    assert mirror.log_text().count(f"not caching {target.big}") == 1   # logged once, not per chunk
    # which shows first, the room reserved a step ahead running out or a write failing, is a race
    assert re.search(rf"not caching {target.big} .*: (it outgrew the room left in the cache|writing failed at byte)",
                     mirror.log_text())
    # the transfer removes its partial file just after the client's response has completed
    wait_until(lambda: list((mirror.cache_dir / "tmp").iterdir()) == [], 10, what="partial file removed")
    verify = cache_cli(mirror, "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert " 0 missing, 0 corrupt" in verify.stdout


def test_second_server_on_the_same_cache_is_refused(make_mirror, mirror):
    second = make_mirror(cache={"dir": str(mirror.cache_dir)}, start=False)
    second.start(wait=False)
    wait_until(lambda: not second.running(), 20, what="second server to give up")
    assert second.proc.returncode == 1
    assert f"{mirror.cache_dir} is in use by another docker-mirror server (pid {mirror.pid})" in second.log_text()
    assert httpx.get(f"{mirror.url}/v2/").status_code == 200


def test_clean_restart_keeps_the_cache_and_does_not_check_it(mirror, fillers):
    with mirror.client() as client:
        pull(client, fillers[3].repo)
    mirror.restart()
    assert "did not stop cleanly" not in mirror.log_text()
    with mirror.client() as client:
        assert client.get(f"/v2/{fillers[3].repo}/blobs/{fillers[3].big}").status_code == 200
    assert "cache=HIT" in mirror.access_lines(fillers[3].big, at_least=2)[-1]


def test_accounting_stays_exact_under_concurrency(make_mirror, fillers, sharing):
    """Ten clients pull at random while eviction runs; the cap holds and the index matches the disk."""
    cap = 30 * MiB
    mirror = make_mirror(cache={"max_size": "30MiB", "min_free": 0})
    repos = [p.repo for p in fillers] + [p.repo for p in sharing]
    errors: list[BaseException] = []

    def client_loop(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with mirror.client() as client:
                for _ in range(6):
                    pull(client, rng.choice(repos))
        except BaseException as exc:
            errors.append(exc)

    with Sampler(mirror.cache_dir) as sampler:
        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    assert errors == []
    print(f"\n{len(sampler.samples)} samples, peak {max(sampler.samples) / MiB:.2f} MiB of {cap / MiB:.0f} MiB")
    assert len(sampler.samples) > 50
    assert max(sampler.samples) <= cap
    wait_until(lambda: not any((mirror.cache_dir / "tmp").iterdir()), 10, what="transfers settled")
    db = sqlite3.connect(mirror.cache_dir / "index.sqlite")
    entries, total = db.execute("SELECT entries, bytes FROM totals").fetchone()
    assert (entries, total) == db.execute("SELECT count(*), sum(size) FROM content").fetchone()
    db.close()
    assert total == disk_usage(mirror.cache_dir) <= cap
    verify = cache_cli(mirror, "verify")
    assert verify.returncode == 0, verify.stdout


@pytest.fixture
def tmpfs_300m():
    """A 300 MiB tmpfs of its own, so that the disk it uses (open files included) can be measured."""
    with tmpfs("300m", "dm-lease") as mountpoint:
        yield mountpoint


class FilesystemSampler(threading.Thread):
    """Bytes used on a filesystem (deleted files still open included), less the index's own files."""

    def __init__(self, mountpoint: Path, cache_dir: Path) -> None:
        super().__init__(daemon=True)
        self.mountpoint, self.cache_dir = mountpoint, cache_dir
        self.samples: list[int] = []
        self._halt = threading.Event()

    def used(self) -> int:
        st = os.statvfs(self.mountpoint)
        index = sum(p.stat().st_size for p in self.cache_dir.glob("index.sqlite*") if p.exists())
        return (st.f_blocks - st.f_bfree) * st.f_frsize - index

    def run(self) -> None:
        while not self._halt.wait(0.005):
            try:
                self.samples.append(self.used())
            except FileNotFoundError:
                pass   # an index file went between glob and stat

    def __enter__(self) -> FilesystemSampler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._halt.set()
        self.join()


def test_followers_of_a_finished_download_keep_its_file_from_eviction(make_mirror, fault_proxy, fillers,
                                                                     upstream: Upstream, tmpfs_300m: Path):
    """Two clients follow the download of a 100 MiB blob and read it slowly after it committed;
    meanwhile other pulls need room. Their file is leased: not evicted, and the disk holds no
    more than max_size (a deleted file still being read would count on top of it)."""
    cap = 120 * MiB
    big = upstream.big_layer
    fault_proxy.delay = (f"/blobs/{big}", 1.0)      # both requests meet the download in flight
    mirror = make_mirror(fault_proxy.url, cache={"dir": str(tmpfs_300m / "cache"), "max_size": "120MiB",
                                                 "min_free": 0})
    go = threading.Event()
    results: list[tuple[int, str]] = []
    started = threading.Barrier(3)

    def slow_reader() -> None:
        digest = hashlib.sha256()
        with httpx.stream("GET", f"{mirror.url}/v2/library/big/blobs/{big}", timeout=120) as response:
            chunks = response.iter_bytes()
            digest.update(next(chunks))
            started.wait()
            go.wait(120)                          # a reader that is far behind the download
            for chunk in chunks:
                digest.update(chunk)
        results.append((response.status_code, "sha256:" + digest.hexdigest()))

    readers = [threading.Thread(target=slow_reader) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        started.wait(60)
        wait_until(lambda: big in cached_digests(mirror), 60, what="the followed blob committed")
        with FilesystemSampler(tmpfs_300m, mirror.cache_dir) as sampler, mirror.client() as client:
            for pushed in fillers[:5]:           # 40 MiB more: the cache must make room
                pull(client, pushed.repo)
            kept = big in cached_digests(mirror) and mirror.blob_file(big).exists()
    finally:
        go.set()
        for reader in readers:
            reader.join(120)
    peak = max(sampler.samples)
    print(f"\nleased followers: peak disk use {peak / MiB:.1f} MiB of a {cap / MiB:.0f} MiB cap "
          f"({len(sampler.samples)} samples); the followed file {'kept' if kept else 'evicted'}")
    assert kept, "a file being read was evicted"
    assert results == [(200, big)] * 2
    assert sorted(cache_of(line) for line in mirror.access_lines(big, at_least=2)) == ["COALESCED", "MISS"]
    assert len(sampler.samples) > 20
    assert peak <= cap + MiB       # + directories and the lock file


def test_a_lying_length_evicts_only_what_really_arrived(make_mirror, fault_proxy, fillers):
    """A full cache; the upstream announces 39 MiB for an 8 MiB blob, sends the 8 MiB and hangs up.
    The download fails (never completed to the client, nothing stored), and what it cost the cache
    is bounded by the bytes that came, not by the length it claimed."""
    mirror = make_mirror(fault_proxy.url, cache={"max_size": "40MiB", "min_free": 0})
    with mirror.client() as client:
        for pushed in fillers[:4]:
            pull(client, pushed.repo)
    held = [pushed.big for pushed in fillers[:4]]
    wait_until(lambda: set(held) <= cached_digests(mirror), 10, what="the fillers indexed")
    target = fillers[4]
    fault_proxy.lie = (f"/blobs/{target.big}", 39 * MiB)
    with pytest.raises(httpx.HTTPError):
        with httpx.stream("GET", f"{mirror.url}/v2/{target.repo}/blobs/{target.big}", timeout=60) as response:
            assert response.headers["content-length"] == str(39 * MiB)
            for _ in response.iter_bytes():
                pass
    wait_until(lambda: not any((mirror.cache_dir / "tmp").iterdir()), 30, what="the failed download removed")
    assert target.big not in cached_digests(mirror)
    # what it cost: the layers that must be fetched again (a room-making eviction may end just after)
    refetched = []
    with mirror.client() as client:
        for digest, pushed in zip(held, fillers[:4], strict=True):
            before = len(fault_proxy.requests("GET", f"/blobs/{digest}"))
            response = client.get(f"/v2/{pushed.repo}/blobs/{digest}")
            assert response.status_code == 200
            assert "sha256:" + hashlib.sha256(response.content).hexdigest() == digest
            if len(fault_proxy.requests("GET", f"/blobs/{digest}")) > before:
                refetched.append(digest)
    print(f"\na 39 MiB lie with 8 MiB of body: {len(held) - len(refetched)} of {len(held)} cached layers "
          "served from the cache")
    assert len(refetched) <= 1     # 8 MiB really arrived: one 8 MiB layer at most; before, all of them
