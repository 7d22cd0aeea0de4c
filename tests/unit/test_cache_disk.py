"""What the cache does when its files or its index are changed under it, or cannot be written:
files altered on disk (size, stamp, bit rot), index.sqlite deleted or replaced, index writes
that fail. In-process, on real files."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from dockermirror import config as configuration
from dockermirror import cache as cache_module
from dockermirror.app import DockerMirror
from dockermirror.cache import Cache, CorruptFile, maintenance
from dockermirror.cache.index import Index
from dockermirror.cache.store import stamp, unchanged_since
from dockermirror.oci import Digest
from tests.unit.conftest import config_text
from tests.unit.fakes import ALL_MANIFESTS

pytestmark = pytest.mark.anyio
ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]
LAYER = os.urandom(300_000)


async def pulled(mirror, repo: str = "acme/tool", tag: str = "1.0"):
    """Push an image upstream and pull it through the mirror (all of it cached)."""
    image = mirror.registry.push(repo, tag, layer=LAYER)
    assert (await mirror.client.get(f"/v2/{repo}/manifests/{tag}", headers=ACCEPT)).status_code == 200
    for digest in image.blobs:
        assert (await mirror.client.get(f"/v2/{repo}/blobs/{digest}")).status_code == 200
    await mirror.app.cache.transfers.wait_all(5)
    await mirror.app.cache.flush()
    return image


def row(mirror, digest: str):
    return mirror.app.cache.index.content(digest)


def flip_in_place(path: Path, offset: int = 1000) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def hide_the_change(mirror, digest: str) -> None:
    """Bit rot: the bytes changed, but nothing the filesystem records about the file did.
    (A change made through the filesystem moves ctime, which nobody can set back: record the
    file's present stamp in the index as if it had been stored like this.)"""
    mirror.app.cache.index.set_stamp(digest, stamp(os.stat(mirror.blob_file(digest))))


# --- item 3: files changed on disk


@pytest.mark.parametrize("change", ["longer", "shorter", "same size, bytes flipped"])
async def test_a_cached_blob_changed_on_disk_is_fetched_again_never_served(mirror, caplog, change):
    image = await pulled(mirror)
    path = mirror.blob_file(image.layer)
    if change == "longer":
        with open(path, "ab") as f:
            f.write(b"junk")
    elif change == "shorter":
        os.truncate(path, len(LAYER) - 10)
    else:
        flip_in_place(path)
    caplog.set_level(logging.WARNING, "dockermirror.cache")
    response = await mirror.client.get(f"/v2/acme/tool/blobs/{image.layer}")
    assert response.status_code == 200 and response.content == LAYER
    assert len(mirror.registry.requests("GET", f"/blobs/{image.layer}")) == 2    # fetched again
    await mirror.app.cache.transfers.wait_all(5)
    assert path.read_bytes() == LAYER and row(mirror, image.layer).stamp == stamp(os.stat(path))
    assert f"cache file of {image.layer} is corrupt" in caplog.text


async def test_a_changed_manifest_is_fetched_again(mirror):
    image = await pulled(mirror)
    flip_in_place(mirror.blob_file(image.digest), 10)
    response = await mirror.client.get(f"/v2/acme/tool/manifests/{image.digest}", headers=ACCEPT)
    assert response.status_code == 200 and response.content == image.manifest
    assert len(mirror.registry.requests("GET", f"/manifests/{image.digest}")) == 2


async def test_a_touched_but_intact_file_is_rehashed_once_and_served_from_the_cache(mirror, caplog):
    image = await pulled(mirror)
    path = mirror.blob_file(image.layer)
    os.utime(path, (1, 1))
    caplog.set_level(logging.WARNING, "dockermirror.cache")
    for _ in range(2):
        response = await mirror.client.get(f"/v2/acme/tool/blobs/{image.layer}")
        assert response.status_code == 200 and response.content == LAYER
    assert len(mirror.registry.requests("GET", f"/blobs/{image.layer}")) == 1    # never fetched again
    assert caplog.text.count("still matches its digest") == 1                    # re-hashed once
    assert row(mirror, image.layer).stamp == stamp(os.stat(path))


async def test_background_verification_removes_what_only_rehashing_finds(mirror, caplog):
    image = await pulled(mirror)
    path = mirror.blob_file(image.layer)
    flip_in_place(path)
    hide_the_change(mirror, image.layer)
    cache = mirror.app.cache
    cache.limits = dataclasses.replace(cache.limits, verify_rate=1 << 30)
    caplog.set_level(logging.INFO, "dockermirror.cache")
    files, _, corrupt = await cache.verify_round()
    assert (files, corrupt) == (len(image.blobs) + 1, 1)
    assert not path.exists() and row(mirror, image.layer) is None
    assert "1 corrupt (removed)" in caplog.text
    response = await mirror.client.get(f"/v2/acme/tool/blobs/{image.layer}")
    assert response.content == LAYER
    assert len(mirror.registry.requests("GET", f"/blobs/{image.layer}")) == 2


async def test_background_verification_is_off_with_a_zero_rate(mirror):
    cache = mirror.app.cache
    cache.limits = dataclasses.replace(cache.limits, verify_rate=0)
    await pulled(mirror)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(cache.verify_round(), 0.5)   # waits for a rate, reads nothing


async def test_a_response_reading_a_file_found_corrupt_is_cut_off_before_its_last_byte(mirror):
    image = await pulled(mirror)
    cache = mirror.app.cache
    path = mirror.blob_file(image.layer)
    file = await cache.open_file(row(mirror, image.layer))
    pieces = file.read()
    first = await anext(pieces)
    assert (first.offset, first.count) == (0, len(LAYER) - 1)        # everything but the last byte
    flip_in_place(path)
    hide_the_change(mirror, image.layer)
    cache.limits = dataclasses.replace(cache.limits, verify_rate=1 << 30)
    await cache.verify_round()                                       # finds it while it is being sent
    with pytest.raises(CorruptFile):
        await anext(pieces)
    assert file.fd == -1 and image.layer not in cache._leases


async def test_a_file_changed_while_it_is_sent_is_cut_off(mirror):
    image = await pulled(mirror)
    file = await mirror.app.cache.open_file(row(mirror, image.layer))
    pieces = file.read()
    await anext(pieces)
    os.utime(mirror.blob_file(image.layer), (1, 1))
    with pytest.raises(CorruptFile, match="changed on disk while it was sent"):
        await anext(pieces)


async def test_a_file_removed_while_it_is_sent_is_sent_whole(mirror):
    """An eviction (or `cache prune`) may remove a file a response has just opened: the bytes
    are intact, only the ctime moved; the response completes."""
    image = await pulled(mirror)
    file = await mirror.app.cache.open_file(row(mirror, image.layer))
    pieces = file.read()
    first = await anext(pieces)
    os.unlink(mirror.blob_file(image.layer))
    last = await anext(pieces)
    assert os.pread(last.fd, last.count, last.offset) == LAYER[-1:] and first.count + last.count == len(LAYER)
    await pieces.aclose()


async def test_a_file_evicted_while_it_is_sent_is_sent_whole(mirror):
    """An eviction removes a file in two steps, a rename out of blobs/ and then the unlink; a
    response that reads the file between the two (the rename moved its ctime, it still has a
    link) completes: it was cut off one byte short before."""
    image = await pulled(mirror)
    cache = mirror.app.cache
    path = mirror.blob_file(image.layer)
    file = await cache.open_file(row(mirror, image.layer))
    # its ctime as if the rename below moved it (by hand: a kernel's ctime clock may be coarse)
    file.stamp = file.stamp.rsplit(":", 1)[0] + ":1"
    pieces = file.read()
    first = await anext(pieces)
    os.rename(path, cache.store.tmp / "evicting")        # what BlobStore.remove does first
    last = await anext(pieces)
    assert os.pread(last.fd, last.count, last.offset) == LAYER[-1:] and first.count + last.count == len(LAYER)
    await pieces.aclose()
    assert image.layer not in cache._leases


async def test_a_file_found_gone_while_this_process_removes_it_is_a_miss_not_a_missing_file(mirror, caplog,
                                                                                              monkeypatch):
    """Eviction removes the files, then the rows (in a thread). A request between the two finds a
    row without a file: a miss (fetched again), not "cache file ... is missing" at warning, and
    no second removal of its row queued behind the first."""
    image = await pulled(mirror)
    cache = mirror.app.cache
    path = mirror.blob_file(image.layer)
    entry = row(mirror, image.layer)
    entered, go_on = threading.Event(), threading.Event()
    remove_rows = cache.index.remove_content

    calls: list[list[str]] = []

    def held(digests):
        calls.append(list(digests))
        if len(calls) == 1:     # the eviction's: held; any other goes through
            entered.set()
            go_on.wait(10)
        return remove_rows(digests)

    monkeypatch.setattr(cache.index, "remove_content", held)
    caplog.set_level(logging.INFO, "dockermirror.cache")
    eviction = asyncio.create_task(cache._evict(1 << 40, "for the test"))
    try:
        for _ in range(500):
            if entered.is_set():
                break
            await asyncio.sleep(0.01)
        assert entered.is_set() and not path.exists() and row(mirror, image.layer) is not None
        assert await asyncio.wait_for(cache.open_file(entry), 5) is None
    finally:
        go_on.set()
        await eviction
    assert row(mirror, image.layer) is None
    assert not [r for r in caplog.records if "is missing" in r.getMessage()]
    assert len(calls) == 1      # the rows were removed once, by the eviction
    response = await mirror.client.get(f"/v2/acme/tool/blobs/{image.layer}")
    assert response.status_code == 200 and response.content == LAYER


class OtherProcess:
    """``docker-mirror cache prune | rm`` beside the server: its own connection to the index, its
    removal (files, then rows) held in a thread after the files are gone."""

    def __init__(self, mirror, digests: list[str]) -> None:
        cache = mirror.app.cache
        self.index = Index(cache.index.path)
        self.files_gone, self.go_on = threading.Event(), threading.Event()
        remove_rows = self.index.remove_content

        def held(batch):
            self.files_gone.set()
            self.go_on.wait(10)
            return remove_rows(batch)

        self.index.remove_content = held
        self.thread = threading.Thread(target=maintenance.remove, args=(cache.store, self.index, digests))

    def __enter__(self) -> OtherProcess:
        self.thread.start()
        assert self.files_gone.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.go_on.set()
        self.thread.join(10)
        self.index.close()


async def test_a_file_another_process_is_removing_is_a_miss_not_a_missing_file(mirror, caplog, monkeypatch):
    """`cache prune` while the server runs: a request between the command's removal of a file and
    of its row is a miss (fetched again), with no "is missing" warning and no row removal of the
    server's own; the row goes with the command's removal."""
    image = await pulled(mirror)
    cache = mirror.app.cache
    entry = row(mirror, image.layer)
    server_removals = []
    remove_rows = cache.index.remove_content
    monkeypatch.setattr(cache.index, "remove_content", lambda d: server_removals.append(d) or remove_rows(d))
    caplog.set_level(logging.INFO, "dockermirror.cache")
    with OtherProcess(mirror, [image.layer]):
        assert not mirror.blob_file(image.layer).exists() and row(mirror, image.layer) is not None
        assert await cache.open_file(entry) is None
    assert row(mirror, image.layer) is None
    assert not [r for r in caplog.records if "is missing" in r.getMessage()]
    assert server_removals == []
    assert cache.index.meta(f"removing:{image.layer}") is None     # the mark went with the row
    response = await mirror.client.get(f"/v2/acme/tool/blobs/{image.layer}")
    assert response.status_code == 200 and response.content == LAYER


async def test_a_stale_removal_mark_does_not_hide_a_missing_file(mirror, caplog):
    """A mark left by a command that was killed between files and rows counts for REMOVAL_MARK_TTL
    only: after that a row without its file is a missing file again (warned, its row dropped)."""
    image = await pulled(mirror)
    cache = mirror.app.cache
    cache.index.mark_removing([image.layer], time.time() - cache_module.REMOVAL_MARK_TTL - 1)
    fresh = "sha256:" + "a" * 64
    cache.index.mark_removing([fresh], time.time())
    os.unlink(mirror.blob_file(image.layer))
    caplog.set_level(logging.INFO, "dockermirror.cache")
    assert await cache.open_file(row(mirror, image.layer)) is None
    assert [r for r in caplog.records if "is missing" in r.getMessage() and r.levelno == logging.WARNING]
    assert row(mirror, image.layer) is None
    assert cache.index.removal_mark(image.layer) is None        # went with the row
    assert cache.index.removal_mark(fresh) is not None


def test_the_server_drops_stale_removal_marks_when_it_starts(tmp_path):
    root = tmp_path / "cache"
    asyncio.run(open_cache(root).close())
    index = Index(root / "index.sqlite")
    stale, odd, fresh = ("sha256:" + c * 64 for c in "abc")
    index.mark_removing([stale], time.time() - cache_module.REMOVAL_MARK_TTL - 1)
    index.set_meta(f"removing:{odd}", "not a time")
    index.mark_removing([fresh], time.time())
    index.close()
    cache = open_cache(root)
    try:
        assert cache.index.removal_mark(stale) is None and cache.index.removal_mark(odd) is None
        assert cache.index.removal_mark(fresh) is not None       # a command may be removing it now
    finally:
        asyncio.run(cache.close())


async def test_a_removal_the_index_cannot_mark_still_removes_files_and_rows_in_batches(mirror, monkeypatch):
    """On a full disk the marks cannot be written: the files still go first (freeing the space
    the rows' removal needs), then the rows, batch by batch."""
    image = await pulled(mirror)
    cache = mirror.app.cache
    index = Index(cache.index.path)
    steps = []
    remove_rows, remove_file = index.remove_content, cache.store.remove
    held = sum(row(mirror, d).size for d in image.blobs)

    def full(digests, when):
        steps.append(("mark", list(digests)))
        error = sqlite3.OperationalError("database or disk is full")
        error.sqlite_errorcode = sqlite3.SQLITE_FULL
        raise error

    monkeypatch.setattr(index, "mark_removing", full)
    monkeypatch.setattr(index, "remove_content", lambda d: steps.append(("rows", list(d))) or remove_rows(d))
    monkeypatch.setattr(cache.store, "remove", lambda d: steps.append(("file", str(d))) or remove_file(d))
    monkeypatch.setattr(maintenance, "REMOVE_BATCH", 2)
    try:
        assert maintenance.remove(cache.store, index, list(image.blobs)) == held
    finally:
        index.close()
    expected, digests = [], list(image.blobs)
    for start in range(0, len(digests), 2):
        batch = digests[start:start + 2]
        expected += [("mark", batch), *[("file", d) for d in batch], ("rows", batch)]
    assert steps == expected
    assert all(row(mirror, d) is None and not mirror.blob_file(d).exists() for d in image.blobs)


async def test_a_removal_the_index_cannot_mark_for_another_reason_removes_nothing(mirror, monkeypatch):
    """A locked or unreadable index: nothing is removed (the command reports the error)."""
    image = await pulled(mirror)
    cache = mirror.app.cache
    index = Index(cache.index.path)

    def locked(digests, when):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(index, "mark_removing", locked)
    try:
        with pytest.raises(sqlite3.OperationalError):
            maintenance.remove(cache.store, index, image.blobs)
    finally:
        index.close()
    assert all(row(mirror, d) is not None and mirror.blob_file(d).exists() for d in image.blobs)


def test_a_file_counts_as_changed_unless_only_its_removal_moved_its_ctime(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"content")
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        now = stamp(st)
        # as stored before its ctime moved (set by hand: a kernel's ctime clock may be coarser
        # than the few microseconds this test takes)
        then = f"{now.rsplit(':', 1)[0]}:{st.st_ctime_ns - 1}"
        assert unchanged_since(now, st, path)
        assert not unchanged_since(then, st, path)          # in its place, ctime moved: changed
        assert not unchanged_since(then, st, None)
        os.rename(path, tmp_path / "away")                  # removed from its place: the bytes count
        assert unchanged_since(then, os.fstat(fd), path)
        path.write_bytes(b"another file in its place")
        assert unchanged_since(then, os.fstat(fd), path)
        os.utime(tmp_path / "away", ns=(1, 1))              # and its mtime moved: changed
        assert not unchanged_since(then, os.fstat(fd), path)
    finally:
        os.close(fd)


async def test_a_file_being_opened_is_leased_before_it_is_checked(mirror, monkeypatch):
    """The re-hash of a changed file waits on a thread: the file must be leased during it, or
    an eviction in that window removes it under the response."""
    image = await pulled(mirror)
    cache = mirror.app.cache
    os.utime(mirror.blob_file(image.layer), (1, 1))                  # changed: re-hashed on open
    leased_during_check = []
    check = cache._check

    async def watched(entry, fd, st):
        leased_during_check.append(entry.digest in cache._leases)
        return await check(entry, fd, st)

    monkeypatch.setattr(cache, "_check", watched)
    file = await cache.open_file(row(mirror, image.layer))
    assert leased_during_check == [True]
    file.close()
    assert image.layer not in cache._leases


async def test_cache_verify_flags_a_corrupt_file_so_the_server_does_not_serve_it(mirror):
    image = await pulled(mirror)
    flip_in_place(mirror.blob_file(image.layer))
    hide_the_change(mirror, image.layer)
    cache = mirror.app.cache
    report = maintenance.verify(cache.store, cache.index, repair=False)   # what `cache verify` runs
    assert report.corrupt == [image.layer]
    response = await mirror.client.get(f"/v2/acme/tool/blobs/{image.layer}")
    assert response.content == LAYER
    assert len(mirror.registry.requests("GET", f"/blobs/{image.layer}")) == 2


# --- item 5: the index deleted or replaced


async def test_an_index_deleted_under_the_server_is_written_again(mirror, caplog):
    image = await pulled(mirror)
    cache = mirror.app.cache
    index = cache.index
    before = dict(index.sizes()), index.totals(), index.tag("docker.io", "acme/tool", "1.0")
    (mirror.cache_dir / "index.sqlite").unlink()
    caplog.set_level(logging.WARNING, "dockermirror.cache")
    await cache._watch_index()
    assert "was deleted while the server runs" in caplog.text
    db = sqlite3.connect(mirror.cache_dir / "index.sqlite")
    assert dict(db.execute("SELECT digest, size FROM content")) == before[0]
    db.close()
    assert (dict(index.sizes()), index.totals(), index.tag("docker.io", "acme/tool", "1.0")) == before
    image2 = mirror.registry.push("acme/other", "1", layer=b"other layer")
    assert (await mirror.client.get(f"/v2/acme/other/blobs/{image2.layer}")).status_code == 200
    await cache.transfers.wait_all(5)
    db = sqlite3.connect(mirror.cache_dir / "index.sqlite")   # writes go to the new file
    assert db.execute("SELECT 1 FROM content WHERE digest = ?", (image2.layer,)).fetchone() == (1,)
    db.close()
    assert image.layer in before[0]


def open_cache(root: Path) -> Cache:
    async def start() -> Cache:
        cache = Cache(root)
        await cache.start()
        return cache
    return asyncio.run(start())


def fill_cache(tmp_path: Path, registry, clock) -> tuple[Path, dict[str, int], set[str]]:
    cache_dir = tmp_path / "cache"

    async def run() -> set[str]:
        app = DockerMirror(configuration.loads(config_text(cache_dir)), clock=clock,
                           upstream_transport=registry.transport)
        import httpx
        async with app.running():
            transport = httpx.ASGITransport(app=app.asgi)
            async with httpx.AsyncClient(transport=transport, base_url="http://mirror.test") as client:
                image = registry.push("acme/tool", "1.0", layer=LAYER)
                assert (await client.get("/v2/acme/tool/manifests/1.0", headers=ACCEPT)).status_code == 200
                for digest in image.blobs:
                    assert (await client.get(f"/v2/acme/tool/blobs/{digest}")).status_code == 200
                await app.cache.transfers.wait_all(5)
                return {image.digest}
    manifests = asyncio.run(run())
    db = sqlite3.connect(cache_dir / "index.sqlite")
    sizes = dict(db.execute("SELECT digest, size FROM content"))
    db.close()
    return cache_dir, sizes, manifests


def test_files_without_an_index_are_adopted_or_removed_at_start(tmp_path, registry, clock, caplog):
    cache_dir, sizes, manifests = fill_cache(tmp_path, registry, clock)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{cache_dir / 'index.sqlite'}{suffix}").unlink(missing_ok=True)
    liar = cache_dir / "blobs" / "sha256" / "ab" / ("ab" + "0" * 62)
    liar.parent.mkdir(parents=True, exist_ok=True)
    liar.write_bytes(b"not what its name says")
    caplog.set_level(logging.WARNING, "dockermirror.cache")
    cache = open_cache(cache_dir)
    try:
        assert "is new or empty" in caplog.text
        assert cache.index.sizes() == sizes
        assert cache.index.totals() == (len(sizes), sum(sizes.values()))
        for digest in sizes:
            entry = cache.index.content(digest)
            assert entry.kind == ("manifest" if digest in manifests else "blob")
            assert entry.stamp is not None
        assert not liar.exists()
    finally:
        asyncio.run(cache.close())


def test_an_index_replaced_under_the_server_is_checked_at_the_next_start(tmp_path, registry, clock, caplog):
    cache_dir, sizes, _ = fill_cache(tmp_path, registry, clock)
    caplog.set_level(logging.WARNING, "dockermirror.cache")

    async def replace_it() -> None:
        cache = Cache(cache_dir)
        await cache.start()
        try:
            path = cache_dir / "index.sqlite"
            path.rename(tmp_path / "old.sqlite")
            Index(path).close()                       # an empty index, put there by someone
            await cache._watch_index()
        finally:
            await cache.close()

    asyncio.run(replace_it())
    assert "was replaced by another file" in caplog.text
    cache = open_cache(cache_dir)
    try:
        assert "was replaced while the previous run used it" in caplog.text
        assert cache.index.sizes() == sizes
        assert not (cache_dir / "index.recheck").exists()
    finally:
        asyncio.run(cache.close())


def test_an_index_of_the_previous_format_gets_the_stamp_column(tmp_path, registry, clock):
    cache_dir, sizes, _ = fill_cache(tmp_path, registry, clock)
    db = sqlite3.connect(cache_dir / "index.sqlite")
    db.execute("ALTER TABLE content DROP COLUMN stamp")
    db.close()
    cache = open_cache(cache_dir)
    try:
        digest = next(iter(sizes))
        entry = cache.index.content(digest)
        assert entry.stamp is None and cache.index.sizes() == sizes

        async def read() -> None:
            file = await cache.open_file(entry)     # re-hashed (nothing known about it), then served
            assert file is not None
            file.close()
        asyncio.run(read())
        assert cache.index.content(digest).stamp == stamp(os.stat(cache.store.path(Digest.parse(digest))))
    finally:
        asyncio.run(cache.close())


# --- item 13: index writes that fail


async def test_index_writes_that_fail_never_fail_a_request(mirror, monkeypatch, caplog):
    cached = await pulled(mirror, "acme/cached", "1")

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    for name in ("put_tag", "delete_tag", "add_content", "apply", "remove_content", "set_stamp", "set_meta"):
        monkeypatch.setattr(Index, name, full, raising=False)
    caplog.set_level(logging.WARNING, "dockermirror.cache")
    image = mirror.registry.push("acme/tool", "1.0", layer=b"another layer" * 1000)
    for _ in range(2):
        manifest = await mirror.client.get("/v2/acme/tool/manifests/1.0", headers=ACCEPT)
        assert manifest.status_code == 200 and manifest.content == image.manifest
        for digest, data in image.blobs.items():
            blob = await mirror.client.get(f"/v2/acme/tool/blobs/{digest}")
            assert blob.status_code == 200 and blob.content == data
    mirror.clock.advance(3600)                                      # past tag_ttl: the tag row is rewritten
    again = await mirror.client.get("/v2/acme/cached/manifests/1", headers=ACCEPT)
    assert again.status_code == 200 and again.content == cached.manifest
    blob = await mirror.client.get(f"/v2/acme/cached/blobs/{cached.layer}")
    assert blob.content == LAYER
    await mirror.app.cache.transfers.wait_all(5)
    await mirror.app.cache.flush()
    assert "the cache cannot be written" in caplog.text
    assert mirror.app.cache.degraded == "database or disk is full"
    on_disk = {f"sha256:{p.name}" for p in mirror.cached_files()}
    assert on_disk == set(mirror.app.cache.index.sizes())           # no file without its row
    assert not on_disk & {image.digest, *image.blobs}                # none of it cached


async def test_a_filesystem_turned_read_only_passes_uncached_blobs_through(mirror, monkeypatch):
    """(The kernel remounts a filesystem read-only on errors, with the server's files open.)"""
    from dockermirror.cache.store import BlobStore

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(BlobStore, "new_temp", read_only)
    image = mirror.registry.push("acme/tool", "1.0", layer=b"a layer" * 1000)
    manifest = await mirror.client.get("/v2/acme/tool/manifests/1.0", headers=ACCEPT)
    assert manifest.status_code == 200 and manifest.content == image.manifest
    for digest, data in image.blobs.items():
        blob = await mirror.client.get(f"/v2/acme/tool/blobs/{digest}")
        assert blob.status_code == 200 and blob.content == data
    await mirror.app.cache.transfers.wait_all(5)
    assert mirror.cached_files() == []
