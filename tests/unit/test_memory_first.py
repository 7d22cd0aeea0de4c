"""Readers of a cold transfer take each batch from memory as soon as it has been received, while
the store lane writes it behind them; the last byte still waits for the hash to verify, and a
reader that falls behind what memory holds reads the file (it pins no memory)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import httpx
import pytest

from dockermirror import config as configuration
from dockermirror.app import DockerMirror
from dockermirror.cache.direct import BLOCK, DirectWriter
from dockermirror.cache.inflight import COALESCE, WRITE_BATCH, Buffers, Transfer, TransferFailed
from dockermirror.cache.store import BlobStore, FileRange
from dockermirror.oci import Digest
from tests.unit.conftest import config_text
from tests.unit.fakes import FakeRegistry, RoomForAll, digest_of, piece_bytes

pytestmark = pytest.mark.anyio
KiB, MiB = 1024, 1024 * 1024
PATIENCE = 10.0     # seconds before a test gives up waiting (a failure, not a timing measurement)


class Source:
    size: int | None

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    async def chunks(self):
        for offset in range(0, len(self.data), 256 * KiB):
            yield self.data[offset: offset + 256 * KiB]

    async def aclose(self) -> None:
        pass


class HeldWrites(Transfer):
    """Every write of the store lane waits until ``go`` is set (a disk slower than the network)."""

    go: threading.Event

    @staticmethod
    def _write(*args):
        assert HeldWrites.go.wait(PATIENCE)
        return Transfer._write(*args)


as_bytes = piece_bytes


@pytest.fixture
def held(tmp_path: Path):
    HeldWrites.go = threading.Event()
    store = BlobStore(tmp_path / "cache")
    store.create_dirs()
    yield store
    HeldWrites.go.set()


def held_transfer(store: BlobStore, data: bytes) -> tuple[HeldWrites, Buffers]:
    """A transfer of ``data`` whose writes wait for HeldWrites.go, and the buffers it takes from."""
    buffers = Buffers()
    return HeldWrites(Digest.parse(digest_of(data)), store, RoomForAll(), buffers=buffers), buffers


async def start(transfer: Transfer, data: bytes, committed: list) -> asyncio.Task:
    """Run ``transfer`` of ``data`` (what it commits goes to ``committed``) until readers may follow it."""
    async def open_source() -> Source:
        return Source(data)

    async def commit(temp, t) -> None:
        committed.append(temp.path.read_bytes())

    task = asyncio.get_running_loop().create_task(transfer.run(open_source, commit))
    await asyncio.wait_for(transfer.started, PATIENCE)
    return task


async def test_a_reader_gets_the_whole_blob_before_the_store_lane_has_written_it(held):
    data = os.urandom(3 * MiB + 12345)
    transfer, buffers = held_transfer(held, data)
    committed: list[bytes] = []
    task = await start(transfer, data, committed)
    reader = transfer.follow()

    async def read_all() -> bytes:
        return b"".join([as_bytes(piece) async for piece in reader.read()])

    assert await asyncio.wait_for(read_all(), PATIENCE) == data
    assert transfer.file_end == 0 and transfer.verified      # nothing written yet: all from memory
    HeldWrites.go.set()
    await asyncio.wait_for(task, PATIENCE)
    assert committed == [data]          # then written, and cached
    assert buffers.used == 0


async def test_the_last_byte_of_a_bad_blob_never_leaves_memory(held):
    data = os.urandom(2 * MiB + 7)
    transfer = HeldWrites(Digest.parse(digest_of(b"something else")), held, RoomForAll())
    committed: list[bytes] = []
    task = await start(transfer, data, committed)
    got = bytearray()

    async def read_all() -> None:
        async for piece in transfer.follow().read():
            got.extend(as_bytes(piece))

    reading = asyncio.ensure_future(read_all())
    # every byte arrives and is hashed (the writes are held): the reader has all but the last
    while transfer.arrived < len(data) or len(got) < len(data) - 1:
        await asyncio.wait_for(asyncio.sleep(0.01), PATIENCE)
        assert not reading.done()
    assert bytes(got) == data[:-1]
    HeldWrites.go.set()
    with pytest.raises(TransferFailed):
        await asyncio.wait_for(reading, PATIENCE)
    await asyncio.wait_for(task, PATIENCE)
    assert bytes(got) == data[:-1] and committed == [] and not transfer.verified


async def test_a_reader_that_falls_behind_reads_the_file_and_pins_no_memory(held):
    data = os.urandom(4 * MiB + 3)
    transfer, buffers = held_transfer(held, data)
    committed: list[bytes] = []
    task = await start(transfer, data, committed)
    pieces = transfer.follow().read()
    first = await asyncio.wait_for(anext(pieces), PATIENCE)
    assert isinstance(first, list)            # from memory (nothing is written yet)
    slow_reader_holds = len(piece_bytes(first))
    while transfer.arrived < len(data):
        await asyncio.sleep(0.01)
    # what the reader holds (it is sending it) is counted in the shared buffers, besides the
    # batches themselves
    assert buffers.used >= transfer.arrived + slow_reader_holds - buffers.limit and buffers.used >= slow_reader_holds
    HeldWrites.go.set()
    await asyncio.wait_for(task, PATIENCE)
    assert committed == [data]
    # the download is over and its memory given back, but for the piece the reader still holds
    assert buffers.used == slow_reader_holds
    rest = [(isinstance(piece, FileRange), as_bytes(piece)) async for piece in pieces]
    assert rest and all(from_file for from_file, _ in rest)        # the rest from the file
    assert as_bytes(first) + b"".join(got for _, got in rest) == data
    assert buffers.used == 0


async def test_a_reader_that_goes_away_holding_a_piece_gives_it_back(held):
    data = os.urandom(2 * MiB)
    transfer, buffers = held_transfer(held, data)
    task = await start(transfer, data, [])
    pieces = transfer.follow().read()
    assert isinstance(await asyncio.wait_for(anext(pieces), PATIENCE), list)
    await pieces.aclose()
    HeldWrites.go.set()
    await asyncio.wait_for(task, PATIENCE)
    assert buffers.used == 0 and transfer.followers == 0


def test_direct_writes_are_whole_blocks_until_finished(disk_dir: Path):
    path = disk_dir / "blob"
    data = os.urandom(3 * MiB + 5555)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    writer = DirectWriter(path)
    try:
        sizes = [1, 4095, 70000, MiB + 3, 5]
        chunks, at = [], 0
        for size in sizes * 10:
            if at >= len(data):
                break
            chunks.append(data[at: at + size])
            at += size
        chunks.append(data[at:])
        written = 0
        for i in range(0, len(chunks), 3):
            written = writer.write(chunks[i: i + 3])
            assert written % BLOCK == 0 and written <= sum(map(len, chunks[: i + 3]))
            assert os.pread(fd, written, 0) == data[:written]
        assert writer.finish(fd) == len(data)
        assert path.read_bytes() == data
    finally:
        writer.close()
        os.close(fd)


class Paused(Source):
    """256 KiB, then the rest once ``go`` is set; announces its length unless told not to."""

    def __init__(self, data: bytes, announce: bool) -> None:
        super().__init__(data)
        self.size = len(data) if announce else None
        self.go = asyncio.Event()

    async def chunks(self):
        yield self.data[:256 * KiB]
        await self.go.wait()
        yield self.data[256 * KiB:]


@pytest.mark.parametrize("announce", [True, False])
async def test_only_the_last_byte_of_the_content_waits_for_the_hash(tmp_path: Path, announce: bool):
    """With the length announced, bytes that arrived before the end cannot be the last: a reader
    has all of them (whole, as they arrived); without it, all but the newest byte."""
    store = BlobStore(tmp_path / "cache")
    store.create_dirs()
    data = os.urandom(MiB)
    source = Paused(data, announce)
    transfer = Transfer(Digest.parse(digest_of(data)), store, RoomForAll())

    async def open_source() -> Paused:
        return source

    async def commit(temp, t) -> None:
        pass

    task = asyncio.get_running_loop().create_task(transfer.run(open_source, commit))
    await asyncio.wait_for(transfer.started, PATIENCE)
    pieces = transfer.follow().read()
    first = as_bytes(await asyncio.wait_for(anext(pieces), PATIENCE))
    assert first == (data[:256 * KiB] if announce else data[:256 * KiB - 1])
    source.go.set()
    rest = bytearray()
    async for piece in pieces:
        rest += as_bytes(piece)
    await asyncio.wait_for(task, PATIENCE)
    assert transfer.verified and first + rest == data


def _resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache (util-linux's fincore)."""
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
                          capture_output=True, text=True, check=True)
    return int(done.stdout.split()[0])


@pytest.fixture
def disk_dir(tmp_path: Path):
    """A directory on a filesystem that takes O_DIRECT (tmp_path, or a directory made in /var/tmp
    where tmp_path is a tmpfs)."""
    for parent in (tmp_path, Path("/var/tmp")):
        probe = Path(tempfile.mkdtemp(dir=parent, prefix="dm-direct-"))
        try:
            os.close(os.open(probe / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
        except OSError:
            shutil.rmtree(probe)
            continue
        yield probe
        shutil.rmtree(probe)
        return
    pytest.skip("no filesystem here takes O_DIRECT")


@pytest.mark.parametrize("direct_writes", [True, False])
async def test_a_download_is_written_past_the_page_cache_unless_configured_otherwise(disk_dir: Path, clock,
                                                                                   direct_writes):
    """cache.direct_writes: the downloaded file is whole and indexed either way; with O_DIRECT
    (the default) its pages are not left in the page cache, without it they are."""
    registry = FakeRegistry()
    image = registry.push("acme/app", "v1", layer=os.urandom(8 * MiB + 5))
    layer = next(digest for digest, data in image.blobs.items() if len(data) > MiB)
    text = config_text(disk_dir / "cache", f"  direct_writes: {'true' if direct_writes else 'false'}\n")
    app = DockerMirror(configuration.loads(text), clock=clock, upstream_transport=registry.transport)
    async with app.running():
        transport = httpx.ASGITransport(app=app.asgi, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://mirror.test") as client:
            response = await client.get(f"/v2/acme/app/blobs/{layer}")
            assert response.status_code == 200 and response.content == image.blobs[layer]
            await app.cache.transfers.wait_all(PATIENCE)
    path = disk_dir / "cache" / "blobs" / "sha256" / layer[7:9] / layer[7:]
    assert path.stat().st_size == 8 * MiB + 5
    resident = _resident(path)
    if direct_writes:
        assert resident <= 2 * BLOCK        # the last partial block went through the page cache
    else:   # its pages are cached (most of them: the host may reclaim some at once, as DAMON does)
        assert resident > MiB
    assert hashlib.sha256(path.read_bytes()).hexdigest() == layer[7:]


async def test_memory_taken_as_the_transfer_is_cancelled_is_counted_and_so_given_back(tmp_path: Path):
    """The shared take completes in the loop turn its transfer is cancelled: the memory it took
    is the transfer's (given back when the transfer ends), not lost to every other transfer."""
    store = BlobStore(tmp_path / "cache")
    store.create_dirs()
    buffers = Buffers(limit=100)
    transfer = Transfer(Digest.parse(digest_of(b"x")), store, RoomForAll(), buffers=buffers)
    buffers.used, transfer._held = 100, 100       # it holds batches; the buffers are full
    lane = asyncio.get_running_loop().create_future()
    take = asyncio.ensure_future(transfer._take(40, [lane]))
    await asyncio.sleep(0)                        # waiting for room
    transfer._held -= 60
    buffers.give(60)                              # a lane is done with 60: the take completes ...
    await asyncio.sleep(0)
    take.cancel()                                 # ... as the transfer is cancelled
    with pytest.raises(asyncio.CancelledError):
        await take
    assert buffers.used == transfer._held == 80


async def test_many_readers_sending_the_same_chunks_count_them_once(held):
    """Eight readers each hold the first piece (the same chunks of the window) while they send it:
    the memory is counted once, not once per reader, so other transfers are not starved of it;
    once the window lets go of the chunks they stay counted until the last reader is done."""
    data = os.urandom(3 * MiB)
    transfer, buffers = held_transfer(held, data)
    task = await start(transfer, data, [])
    readers = [transfer.follow().read() for _ in range(8)]
    firsts = [await asyncio.wait_for(anext(reader), PATIENCE) for reader in readers]
    assert all(isinstance(first, list) for first in firsts)
    while transfer.arrived < len(data):
        await asyncio.sleep(0.01)
    assert buffers.used == transfer._held            # the batches, counted once; nothing more
    HeldWrites.go.set()
    while transfer.file_end < len(data):              # stored: the window lets go of every chunk
        await asyncio.wait_for(asyncio.sleep(0.01), PATIENCE)
    await asyncio.wait_for(task, PATIENCE)
    sizes = {len(piece_bytes(first)) for first in firsts}
    assert len(sizes) == 1
    whole_chunks = -(-sizes.pop() // (256 * KiB)) * 256 * KiB    # the source's chunks the piece is of
    assert buffers.used == whole_chunks             # what the readers still send, counted once
    for reader in readers:
        await reader.aclose()
    assert buffers.used == 0


async def test_an_uncached_transfer_whose_readers_finished_from_memory_still_completes(held):
    """Not cached (spilled to a file outside the cache): its only reader has every byte from memory
    before the slow disk has them. The transfer goes on writing (it is verified: its readers did
    not give up on it), so a reader that joins meanwhile gets the whole blob from the file."""
    data = os.urandom(4 * MiB + 3)      # all of it fits in the lanes' queues while the disk waits
    transfer = HeldWrites(Digest.parse(digest_of(data)), held, RoomForAll(), cache=False)
    task = await start(transfer, data, [])

    async def read_all(reader) -> bytes:
        return b"".join([piece_bytes(piece) async for piece in reader.read()])

    assert await asyncio.wait_for(read_all(transfer.follow()), PATIENCE) == data
    assert transfer.verified and transfer.file_end < len(data)
    late = transfer.follow()
    HeldWrites.go.set()
    assert await asyncio.wait_for(read_all(late), PATIENCE) == data
    await asyncio.wait_for(task, PATIENCE)
    assert transfer.error is None


class FailsSecondWrite(Transfer):
    """The disk fills up at the second write: the rest passes through the in-memory tail."""

    writes = 0

    @staticmethod
    def _write(temp, direct, batch):
        FailsSecondWrite.writes += 1
        if FailsSecondWrite.writes == 2:
            return OSError(28, "No space left on device")
        return Transfer._write(temp, direct, batch)


class SlowToClose(Source):
    async def aclose(self) -> None:
        await asyncio.sleep(0.3)        # the transfer is still open to readers meanwhile


async def test_a_late_reader_is_not_let_in_where_the_memory_tail_already_dropped_bytes(tmp_path: Path):
    """The disk filled up after the first batch: the rest went through memory, and the reader
    ahead (served from memory) let the tail drop it. A reader from byte 0 now would read the
    file and then find the next bytes gone: it is refused (the mirror fetches for it), never
    let in to be cut off part-way."""
    store = BlobStore(tmp_path / "cache")
    store.create_dirs()
    FailsSecondWrite.writes = 0
    data = os.urandom(4 * MiB + 3)
    transfer = FailsSecondWrite(Digest.parse(digest_of(data)), store, RoomForAll())

    async def open_source() -> Source:
        return SlowToClose(data)

    async def commit(temp, t) -> None:
        raise AssertionError("not cached: the disk is full")

    task = asyncio.get_running_loop().create_task(transfer.run(open_source, commit))
    await asyncio.wait_for(transfer.started, PATIENCE)

    async def read_all(reader) -> bytes:
        return b"".join([piece_bytes(piece) async for piece in reader.read()])

    assert await asyncio.wait_for(read_all(transfer.follow()), PATIENCE) == data
    while transfer.received < len(data):       # the store lane catches up (the reader was ahead)
        await asyncio.wait_for(asyncio.sleep(0.01), PATIENCE)
    assert 0 < transfer.file_end < len(data) and not transfer.finished.is_set()
    late = transfer.follow()
    assert late is None or await asyncio.wait_for(read_all(late), PATIENCE) == data
    await asyncio.wait_for(task, PATIENCE)


class PausedAfter(Source):
    """``chunks`` (sizes), then nothing until ``go`` is set, then the rest."""

    def __init__(self, data: bytes, chunks: list[int]) -> None:
        super().__init__(data)
        self.first = chunks
        self.go = asyncio.Event()

    async def chunks(self):
        at = 0
        for size in self.first:
            yield self.data[at: at + size]
            at += size
        await self.go.wait()
        yield self.data[at:]


async def test_what_waits_for_the_next_block_is_kept_as_a_small_copy(disk_dir: Path):
    """Written with O_DIRECT, the file ends at a block boundary: the bytes after it wait for more.
    The chunk they are the end of is not kept whole in memory (its batch's memory went back to
    the buffers: it would be held uncounted while the upstream is slow), only a copy of its end."""
    store = BlobStore(disk_dir / "cache")
    store.create_dirs()
    data = os.urandom(3 * MiB)
    buffers = Buffers()
    transfer = Transfer(Digest.parse(digest_of(data)), store, RoomForAll(), buffers=buffers, direct=True)
    source = PausedAfter(data, [MiB + 4321, MiB + 4321])

    async def open_source() -> Source:
        return source

    async def commit(temp, t) -> None:
        pass

    task = asyncio.get_running_loop().create_task(transfer.run(open_source, commit))
    while transfer.received < 2 * MiB + 2 * 4321:
        await asyncio.wait_for(asyncio.sleep(0.01), PATIENCE)
    assert transfer._direct is not None and transfer.file_end % BLOCK == 0 < transfer.received - transfer.file_end
    assert buffers.used == 0
    in_memory = sum(len(data) for _, data in transfer._window)
    assert in_memory == transfer.received - transfer.file_end < BLOCK
    got = piece_bytes((await asyncio.wait_for(anext(transfer.follow().read(transfer.file_end)), PATIENCE)))
    assert got == data[transfer.file_end: transfer.received]
    source.go.set()
    await asyncio.wait_for(task, PATIENCE)
    assert transfer.verified


def test_the_block_that_tries_a_direct_write_is_zeros(disk_dir: Path):
    """The aligned buffers are shared: the trial write at open never carries another blob's bytes."""
    (disk_dir / "other").touch()
    other = DirectWriter(disk_dir / "other")
    assert other.works()
    other.write([b"SECRET" * 100_000])          # a shared buffer now holds these bytes
    other.close()
    (disk_dir / "new").touch()
    writer = DirectWriter(disk_dir / "new")
    try:
        assert writer.works()
        assert (disk_dir / "new").read_bytes() == bytes(BLOCK)
    finally:
        writer.close()


async def test_a_reader_takes_one_chunk_at_a_time_when_memory_is_short(held):
    """Pieces from memory are up to MEMORY_PIECE, but one chunk when the shared buffers are nearly
    used up: a client that stops reading keeps what it was handed counted for a while."""
    data = os.urandom(3 * MiB)
    transfer, buffers = held_transfer(held, data)
    task = await start(transfer, data, [])
    while transfer.arrived < len(data):
        await asyncio.sleep(0.01)
    roomy = await asyncio.wait_for(anext(transfer.follow().read()), PATIENCE)
    assert len(roomy) > 1                       # several chunks at once
    buffers.used += buffers.limit               # another transfer's batches fill the buffers
    short = await asyncio.wait_for(anext(transfer.follow().read()), PATIENCE)
    assert len(short) == 1 and len(piece_bytes(short)) == 256 * KiB
    buffers.used -= buffers.limit
    HeldWrites.go.set()
    await asyncio.wait_for(task, PATIENCE)


async def test_a_lane_that_fell_behind_takes_the_waiting_batches_in_one_call(held):
    """The disk held the store lane while batches queued up: once it moves, it writes what waits
    in calls of up to COALESCE bytes, not one call (and one hand-off to a thread) per batch."""
    calls: list[int] = []

    class Counting(HeldWrites):
        @staticmethod
        def _write(temp, direct, batch):
            calls.append(sum(len(chunk) for chunk in batch))
            return HeldWrites._write(temp, direct, batch)

    data = os.urandom(6 * MiB)
    transfer = Counting(Digest.parse(digest_of(data)), held, RoomForAll())
    committed: list[bytes] = []
    task = await start(transfer, data, committed)
    while transfer.arrived < len(data):          # every batch has arrived; the first write waits
        await asyncio.wait_for(asyncio.sleep(0.01), PATIENCE)
    HeldWrites.go.set()
    await asyncio.wait_for(task, PATIENCE)
    assert committed == [data]
    assert len(calls) < 6 and max(calls) > WRITE_BATCH and max(calls) <= COALESCE
