"""The cache in-process, on real files: TTL expiry (fake clock), a write that fails for lack
of space, recovery after an unclean stop, exact accounting."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dockermirror.cache import Cache, Limits
from dockermirror.cache.inflight import Transfer
from dockermirror.cache.store import BlobStore
from dockermirror.oci import Digest
from tests.unit.fakes import RoomForAll, piece_bytes

HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Body:
    """Bytes as an upstream body would deliver them (a Source)."""

    def __init__(self, data: bytes, *, announce_size: bool = True, chunk: int = 65536) -> None:
        self.data, self.chunk = data, chunk
        self.size = len(data) if announce_size else None

    async def chunks(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.data), self.chunk):
            yield self.data[i:i + self.chunk]
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        pass


def digest_of(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


async def fetch(cache: Cache, data: bytes, repository: str = "library/x", **body) -> bytes:
    """Run one transfer to the end, reading it like a client; returns what was read."""
    digest = digest_of(data)

    async def open_source() -> Body:
        return Body(data, **body)

    transfer = cache.start_transfer(digest, open_source, upstream="docker.io", repository=repository)
    await transfer.started
    follower = transfer.follow()
    got = await _collect(follower.read())
    await transfer.finished.wait()
    return got


def run(coro):
    return asyncio.run(coro)


def test_ttl_expiry_deletes_unused_content_and_keeps_used(tmp_path: Path):
    clock = Clock()
    limits = Limits(blob_ttl=24 * HOUR, manifest_ttl=2 * HOUR, pins=("docker.io/library/keep",))
    blobs = {name: os.urandom(10_000 + i) for i, name in enumerate(["old", "used", "fresh", "pinned"])}
    manifest = b'{"schemaVersion": 2}'

    async def scenario() -> None:
        cache = Cache(tmp_path, limits=limits, clock=clock)
        await cache.start()
        try:
            for name, data in blobs.items():
                assert await fetch(cache, data, "library/keep" if name == "pinned" else "library/x") == data
            await cache.put_manifest(digest_of(manifest), manifest, "application/json", "docker.io", "library/x")
            clock.now += 20 * HOUR
            cache.touch(str(digest_of(blobs["used"])), "docker.io", "library/x")   # a pull refreshes the TTL
            clock.now += 3 * HOUR
            assert await fetch(cache, blobs["fresh"]) == blobs["fresh"]  # fetched again: fresh
            clock.now += 2 * HOUR                                        # 25 h after the first fetches
            entries, freed = await cache.expire()
            assert entries == 2  # "old" blob (25 h) and the manifest (25 h > 2 h)
            assert freed == len(blobs["old"]) + len(manifest)
        finally:
            await cache.close()

    run(scenario())
    store = BlobStore(tmp_path)
    assert not store.path(digest_of(blobs["old"])).exists()
    assert not store.path(digest_of(manifest)).exists()
    for name in ("used", "fresh", "pinned"):
        assert store.path(digest_of(blobs[name])).read_bytes() == blobs[name], name


def test_write_failure_mid_download_serves_the_rest_from_memory(tmp_path: Path, caplog):
    """A 4 MiB filesystem and an accountant that says yes to everything: the write itself fails."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    data = os.urandom(10 * 1024 * 1024)

    async def scenario() -> tuple[bytes, bytes, Transfer]:
        store = BlobStore(mount)
        store.create_dirs()
        space = RoomForAll()
        transfer = Transfer(digest_of(data), store, space)
        committed = []

        async def commit(temp, t) -> None:
            committed.append(temp)

        async def open_source() -> Body:
            return Body(data, announce_size=False)

        task = asyncio.get_running_loop().create_task(transfer.run(open_source, commit))
        await transfer.started
        first, second = transfer.follow(), transfer.follow(5 * 1024 * 1024)
        got_first, got_second = await asyncio.gather(
            _collect(first.read()), _collect(second.read(5 * 1024 * 1024)))
        await task
        assert committed == [] and space.full == 1
        return got_first, got_second, transfer

    try:
        # the line is a warning once a period and info after it (the period is the process's)
        with caplog.at_level(logging.INFO, logger="dockermirror.cache"):
            got_first, got_second, transfer = run(scenario())
        assert got_first == data
        assert got_second == data[5 * 1024 * 1024:]
        assert not transfer.caching and transfer.verified
        assert 0 < transfer.file_end < len(data)
        assert len([r for r in caplog.records if "writing failed at byte" in r.getMessage()]) == 1
        assert list((mount / "tmp").iterdir()) == []     # the partial file is gone
        assert not any((mount / "blobs").rglob("*"))
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def _collect(pieces: AsyncIterator) -> bytes:
    """What a response would send: bytes as they are, file ranges read from the file."""
    out = bytearray()
    async for piece in pieces:
        out += piece_bytes(piece)
    return bytes(out)


def test_recovery_after_an_unclean_stop(tmp_path: Path, caplog):
    clock = Clock()
    kept, lost, orphan, bad = (os.urandom(5000 + i) for i in range(4))

    async def fill() -> Cache:
        cache = Cache(tmp_path, clock=clock)
        await cache.start()
        for data in (kept, lost):
            assert await fetch(cache, data) == data
        await cache.flush()
        return cache

    cache = run(fill())  # never closed: as if killed
    cache.index.close()
    os.close(cache._lock_fd)
    store = BlobStore(tmp_path)
    store.path(digest_of(lost)).unlink()                                   # row without a file
    for data in (orphan, bad):                                             # files without a row
        path = store.path(digest_of(data))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if data is orphan else b"not what the name says")
    (store.tmp / "sha256-abc.1234.part").write_bytes(b"half a download")

    async def restart() -> Cache:
        again = Cache(tmp_path, clock=clock)
        await again.start()
        return again

    with caplog.at_level(logging.INFO, logger="dockermirror.cache"):
        again = run(restart())
    try:
        assert "did not stop cleanly" in caplog.text
        assert again.entry(digest_of(kept)) is not None
        assert again.entry(digest_of(lost)) is None
        assert again.entry(digest_of(orphan)).size == len(orphan)          # adopted after re-hashing
        assert not store.path(digest_of(bad)).exists()                      # removed
        assert list(store.tmp.iterdir()) == []
        assert again.index.totals() == (2, len(kept) + len(orphan))
    finally:
        run(again.close())


def test_totals_stay_exact(tmp_path: Path):
    clock = Clock()
    sizes = [1000, 2000, 3000, 4000]

    async def scenario() -> None:
        cache = Cache(tmp_path, clock=clock, limits=Limits(max_size=9000, min_free=0))
        await cache.start()
        try:
            datas = [os.urandom(n) for n in sizes]
            for data in datas:
                assert await fetch(cache, data) == data
            used, reserved, capacity = cache.usage()
            assert reserved == 0 and capacity == 9000
            assert used <= 9000
            on_disk = sum(p.stat().st_size for p in (tmp_path / "blobs").rglob("*") if p.is_file())
            assert used == on_disk
            assert cache.entry(digest_of(datas[-1])) is not None   # the newest stays
        finally:
            await cache.close()

    run(scenario())


@pytest.mark.parametrize("announce", [True, False], ids=["known-length", "unknown-length"])
def test_content_larger_than_the_cache_passes_through(tmp_path: Path, announce: bool):
    data = os.urandom(3 * 1024 * 1024)

    async def scenario() -> None:
        cache = Cache(tmp_path, limits=Limits(max_size=1024 * 1024, min_free=0))
        await cache.start()
        try:
            assert await fetch(cache, data, announce_size=announce) == data
            assert cache.entry(digest_of(data)) is None
            assert cache.usage()[:2] == (0, 0)
        finally:
            await cache.close()

    run(scenario())
    assert list((tmp_path / "tmp").iterdir()) == []
