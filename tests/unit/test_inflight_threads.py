"""A transfer's temp file stays open while a thread still uses it. Cancelling the task that waits
for a thread does not stop the thread: a write (or the commit's truncate and fsync) that outlives
its transfer's failure or cancellation would otherwise go to whatever file or socket is given
that descriptor number next. In-process, on real files; the store's file is made slow to write."""

from __future__ import annotations

import asyncio
import gc
import os
import sqlite3
import threading
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from dockermirror import config as configuration
from dockermirror.app import DockerMirror
from dockermirror.cache import inflight, threads
from dockermirror.cache.direct import DirectWriter
from dockermirror.cache.inflight import Transfer
from dockermirror.cache.store import BlobStore, TempBlob
from dockermirror.oci import Digest
from tests.unit.conftest import config_text
from tests.unit.fakes import RoomForAll, digest_of

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024
PATIENCE = 10.0     # seconds before a test gives up waiting (a failure, not a timing measurement)
GRACE = 0.5         # what a transfer that does not wait for its threads needs to close its file


class HeldTemp(TempBlob):
    """A temp file whose writes wait for ``release`` once they have started (a slow disk);
    records whether its descriptor was still open when each write went on."""

    entered = threading.Event()
    release = threading.Event()
    open_when_written: ClassVar[list[bool]] = []

    def write(self, chunks: list[bytes]) -> int:
        type(self).entered.set()
        assert type(self).release.wait(PATIENCE)
        type(self).open_when_written.append(self.fd >= 0)
        return super().write(chunks)


class HeldDirect(DirectWriter):
    """The same for the writes that bypass the page cache (what a disk that has O_DIRECT gets)."""

    def write(self, chunks: list[bytes]) -> int:
        HeldTemp.entered.set()
        assert HeldTemp.release.wait(PATIENCE)
        HeldTemp.open_when_written.append(self.fd >= 0)
        return super().write(chunks)


class HeldStore(BlobStore):
    def new_temp(self, digest: Digest) -> TempBlob:
        return HeldTemp(self.tmp / f"{digest.hex}.part", digest)


class Broken:
    """An upstream body: one chunk, then (once ``fail`` is set) a broken connection."""

    size = None

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.fail = asyncio.Event()

    async def chunks(self):
        yield self.data
        await self.fail.wait()
        raise httpx.ReadError("connection reset by the upstream")

    async def aclose(self) -> None:
        pass


class Whole:
    """An upstream body that arrives in one chunk, its length announced."""

    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    async def chunks(self):
        yield self.data

    async def aclose(self) -> None:
        pass


@pytest.fixture(params=["page cache", "direct"])
def store(tmp_path: Path, request, monkeypatch) -> BlobStore:
    if request.param == "direct":
        monkeypatch.setattr(inflight, "DirectWriter", HeldDirect)
    else:
        monkeypatch.setattr(inflight, "DIRECT_WRITES", False)
    HeldTemp.entered, HeldTemp.release, HeldTemp.open_when_written = threading.Event(), threading.Event(), []
    store = HeldStore(tmp_path / "cache")
    store.create_dirs()
    return store


async def until(condition, what: str) -> None:
    try:
        async with asyncio.timeout(PATIENCE):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"waited {PATIENCE:g} s for {what}")


async def test_a_failed_transfer_closes_its_file_only_after_the_write_under_way(store: BlobStore):
    data = os.urandom(MiB)
    source = Broken(data)
    transfer = Transfer(Digest.parse(digest_of(data + b"more")), store, RoomForAll())

    async def commit(temp, transfer) -> None:
        raise AssertionError("a failed transfer is not committed")

    run = asyncio.ensure_future(transfer.run(lambda: _ready(source), commit))
    await until(HeldTemp.entered.is_set, "the write to start")
    source.fail.set()                   # the download fails while its first batch is being written
    await asyncio.sleep(GRACE)
    HeldTemp.release.set()
    await asyncio.wait_for(run, PATIENCE)
    await until(lambda: HeldTemp.open_when_written, "the write to go on")
    assert isinstance(transfer.error, httpx.ReadError)
    assert HeldTemp.open_when_written == [True]
    assert transfer.closed.is_set() and list(store.tmp.iterdir()) == []


async def test_a_transfer_cancelled_while_it_commits_closes_its_file_after_the_commit(store: BlobStore):
    HeldTemp.release.set()
    data = os.urandom(MiB)
    in_commit, go_on = threading.Event(), threading.Event()
    seen: list[int] = []

    def fsync_slowly(temp: TempBlob) -> None:        # the commit's work on the file, in a thread
        in_commit.set()
        assert go_on.wait(PATIENCE)
        seen.append(temp.fd)
        os.fsync(temp.fd)

    async def commit(temp, transfer) -> None:
        await asyncio.to_thread(fsync_slowly, temp)

    transfer = await cancelled_while_held(store, data, commit, in_commit, go_on, seen, "commit")
    assert seen[0] >= 0                 # the thread found the file still open
    assert transfer.closed.is_set()


async def cancelled_while_held(store: BlobStore, data: bytes, commit, entered: threading.Event,
                               go_on: threading.Event, seen: list, what: str) -> Transfer:
    """Run a transfer of ``data``; once a thread of it has ``entered`` its held work, cancel the
    transfer (a shutdown), then let the thread go on (it appends to ``seen``); the transfer as it ended."""
    transfer = Transfer(Digest.parse(digest_of(data)), store, RoomForAll())
    run = asyncio.ensure_future(transfer.run(lambda: _ready(Whole(data)), commit))
    await until(entered.is_set, f"the {what} to start")
    run.cancel()
    await asyncio.sleep(GRACE)
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, PATIENCE)
    await until(lambda: seen, f"the {what} to go on")
    return transfer


async def _ready(source):
    return source


async def test_a_shutdown_waits_for_a_commit_under_way_before_it_closes_the_index(tmp_path: Path, registry, clock,
                                                                                  monkeypatch, caplog):
    """The server stops while a download is being stored (its fsync is slow): the stop lets that
    commit finish, so the blob is indexed, before it closes the index under it."""
    data = os.urandom(MiB)
    digest = digest_of(data)
    registry.blobs[digest] = data
    in_fsync, go_on = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        if threading.current_thread() is not threading.main_thread() and not in_fsync.is_set():
            in_fsync.set()                  # the commit's fsync of the blob, in its thread
            assert go_on.wait(PATIENCE)
        real_fsync(fd)

    app = DockerMirror(configuration.loads(config_text(tmp_path / "cache")), clock=clock,
                       upstream_transport=registry.transport)
    async with app.running():
        monkeypatch.setattr(os, "fsync", slow_fsync)
        blob = await app.mirror.blob(app.mirror.resolve("acme/tool"), Digest.parse(digest), head=False)
        reader = blob.body.read()
        reading = asyncio.ensure_future(_drain(reader))
        await until(in_fsync.is_set, "the commit's fsync")
        closing = asyncio.ensure_future(app.cache.close(drain=0.05))    # the stop, with a short drain
        await asyncio.sleep(GRACE)
        go_on.set()
        await asyncio.wait_for(closing, PATIENCE)
        await asyncio.wait_for(reading, PATIENCE)
    monkeypatch.undo()
    assert "cannot be written" not in caplog.text and "cache is not open" not in caplog.text
    index = sqlite3.connect(tmp_path / "cache" / "index.sqlite")
    try:
        assert index.execute("SELECT size FROM content WHERE digest = ?", (digest,)).fetchall() == [(len(data),)]
    finally:
        index.close()


async def _drain(reader) -> None:
    async for _ in reader:
        pass


async def test_a_transfer_cancelled_while_it_preallocates_closes_its_file_after_the_preallocation(
        store: BlobStore, monkeypatch):
    """The first room is claimed (and preallocated, in a lane thread) before the download
    starts; a shutdown in that moment waits for the preallocation before closing the file."""
    data = os.urandom(MiB)
    in_prealloc, go_on = threading.Event(), threading.Event()
    seen: list[int] = []
    preallocate = TempBlob.preallocate

    def slow_preallocate(temp: TempBlob, size: int) -> None:
        in_prealloc.set()
        assert go_on.wait(PATIENCE)
        seen.append(temp.fd)
        preallocate(temp, size)

    monkeypatch.setattr(HeldTemp, "preallocate", slow_preallocate)

    async def commit(temp, transfer) -> None:
        raise AssertionError("a cancelled transfer is not committed")

    transfer = await cancelled_while_held(store, data, commit, in_prealloc, go_on, seen, "preallocation")
    assert seen[0] >= 0                 # the thread found the file still open
    assert transfer.finished.is_set() and transfer.closed.is_set() and list(store.tmp.iterdir()) == []


async def test_a_commit_whose_own_task_is_cancelled_still_ends_before_its_file_is_closed(
        tmp_path: Path, registry, clock, monkeypatch):
    """At the end of a shutdown, asyncio cancels every task left, the commit's own included:
    the file is still closed only after the commit's thread (fsync, rename) has returned."""
    data = os.urandom(MiB)
    digest = digest_of(data)
    registry.blobs[digest] = data
    in_fsync, go_on = threading.Event(), threading.Event()
    outcome: list[str] = []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        if threading.current_thread() is not threading.main_thread() and not in_fsync.is_set():
            in_fsync.set()
            assert go_on.wait(PATIENCE)
            try:
                real_fsync(fd)
            except OSError as exc:
                outcome.append(exc.strerror)
                raise
            outcome.append("ok")
            return
        real_fsync(fd)

    app = DockerMirror(configuration.loads(config_text(tmp_path / "cache")), clock=clock,
                       upstream_transport=registry.transport)
    async with app.running():
        monkeypatch.setattr(os, "fsync", slow_fsync)
        before = asyncio.all_tasks()
        blob = await app.mirror.blob(app.mirror.resolve("acme/tool"), Digest.parse(digest), head=False)
        reading = asyncio.ensure_future(_drain(blob.body.read()))
        await until(in_fsync.is_set, "the commit's fsync")
        # what asyncio.run does to the tasks left at its end: here, those of this download
        for task in asyncio.all_tasks() - before - {asyncio.current_task()}:
            task.cancel()
        await asyncio.sleep(GRACE)
        go_on.set()
        await until(lambda: outcome, "the commit's fsync to return")
        await asyncio.gather(reading, return_exceptions=True)
        await app.cache.transfers.wait_all(PATIENCE)
        monkeypatch.undo()
    assert outcome == ["ok"]
    assert (tmp_path / "cache" / "blobs" / "sha256" / digest[7:9] / digest[7:]).read_bytes() == data


async def test_a_thread_that_fails_while_its_caller_is_cancelled_reports_its_error(caplog):
    """The write's error cannot be raised to a cancelled caller: it goes to on_error (the cache
    records it as a failed write), and nothing logs it as "never retrieved"."""
    started, go_on = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def failing_write() -> None:
        started.set()
        assert go_on.wait(PATIENCE)
        raise OSError(28, "No space left on device")

    call = asyncio.ensure_future(threads.to_end(failing_write, on_error=errors.append))
    await until(started.is_set, "the write to start")
    for _ in range(50):                     # cancelled, and cancelled again, while it runs
        call.cancel()
        await asyncio.sleep(0)
    tasks = len(asyncio.all_tasks())
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, PATIENCE)
    assert tasks <= 3                       # this test's, the call's: no task per cancellation
    assert [type(e) for e in errors] == [OSError] and errors[0].strerror == "No space left on device"
    gc.collect()
    await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text
