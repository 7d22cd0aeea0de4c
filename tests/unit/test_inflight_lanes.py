"""A cold transfer's first bytes reach its readers at once (not after a whole write batch), and
its hash and store lanes run in threads of their own: a loop whose default executor is busy
(every ``asyncio.to_thread`` shares it) does not hold a download up."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from pathlib import Path

import httpx
import pytest

from dockermirror import config as configuration
from dockermirror.app import DockerMirror
from dockermirror.cache.inflight import WRITE_BATCH
from dockermirror.oci import Digest
from tests.unit.conftest import config_text
from tests.unit.fakes import RoomForAll, digest_of, piece_bytes

pytestmark = pytest.mark.anyio
KiB, MiB = 1024, 1024 * 1024
PATIENCE = 10.0     # seconds before a test gives up waiting (a failure, not a timing measurement)


class Gated(httpx.AsyncByteStream):
    """64 KiB at once, then the rest when ``go`` is set."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.go = asyncio.Event()

    async def __aiter__(self):
        yield self.data[:64 * KiB]
        await self.go.wait()
        for offset in range(64 * KiB, len(self.data), 64 * KiB):
            yield self.data[offset: offset + 64 * KiB]


async def read_all(reader) -> bytes:
    out = bytearray()
    async for piece in reader:
        out += piece_bytes(piece)
    return bytes(out)


async def test_the_first_bytes_reach_a_reader_before_a_whole_batch_has_come(tmp_path: Path, clock):
    data = os.urandom(4 * MiB)
    body = Gated(data)
    assert 64 * KiB < WRITE_BATCH

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": str(len(data))}, stream=body)

    app = DockerMirror(configuration.loads(config_text(tmp_path / "cache")), clock=clock,
                       upstream_transport=httpx.MockTransport(handle))
    async with app.running():
        blob = await app.mirror.blob(app.mirror.resolve("acme/big"), Digest.parse(digest_of(data)), head=False)
        reader = blob.body.read()
        first = await asyncio.wait_for(anext(reader), PATIENCE)     # while the upstream holds the rest
        got = piece_bytes(first)
        assert 0 < len(got) <= 64 * KiB and data.startswith(got)
        body.go.set()
        assert got + await asyncio.wait_for(read_all(reader), PATIENCE) == data
        await app.cache.transfers.wait_all(5)
        assert app.cache.entry(digest_of(data)) is not None


async def test_a_busy_default_executor_does_not_hold_a_transfer_up(tmp_path: Path, registry, clock):
    data = os.urandom(3 * MiB + 5)
    registry.blobs[digest_of(data)] = data
    app = DockerMirror(configuration.loads(config_text(tmp_path / "cache")), clock=clock,
                       upstream_transport=registry.transport)
    loop = asyncio.get_running_loop()
    busy = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    free = threading.Event()
    async with app.running():
        loop.set_default_executor(busy)
        blocked = loop.run_in_executor(None, free.wait)     # every to_thread now waits behind this
        async def pull() -> bytes:
            blob = await app.mirror.blob(app.mirror.resolve("acme/tool"), Digest.parse(digest_of(data)), head=False)
            return await read_all(blob.body.read())

        try:
            assert await asyncio.wait_for(pull(), PATIENCE) == data
        finally:
            free.set()
            await blocked
        await app.cache.transfers.wait_all(5)
        assert app.cache.entry(digest_of(data)) is not None


class Counted(httpx.AsyncByteStream):
    """``data`` in 256 KiB pieces, counting what the mirror has taken."""

    taken = 0

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self):
        for offset in range(0, len(self.data), 256 * KiB):
            piece = self.data[offset: offset + 256 * KiB]
            Counted.taken += len(piece)
            yield piece


async def test_many_cold_blobs_share_one_memory_budget(tmp_path: Path, clock):
    """While the lanes cannot keep up (here: all their threads busy), the transfers together read
    no more from their upstreams than the shared buffers allow (plus a batch each), instead of
    PIPELINE batches each."""
    from dockermirror.cache.inflight import LANE_THREADS, PIPELINE, lane_executor
    base = os.urandom(12 * MiB)
    blobs = {digest_of(bytes([i]) + base): bytes([i]) + base for i in range(4)}

    def handle(request: httpx.Request) -> httpx.Response:
        # no length: nothing is preallocated, so the start of a transfer needs no lane thread
        return httpx.Response(200, stream=Counted(blobs[request.url.path.rsplit("/", 1)[-1]]))

    app = DockerMirror(configuration.loads(config_text(tmp_path / "cache")), clock=clock,
                       upstream_transport=httpx.MockTransport(handle))
    free = threading.Event()
    async with app.running():
        limit = app.cache.transfers.buffers.limit = 2 * MiB
        stuck = [lane_executor().submit(free.wait) for _ in range(LANE_THREADS)]
        Counted.taken = 0
        try:
            bodies = []
            for digest in blobs:
                blob = await app.mirror.blob(app.mirror.resolve("acme/many"), Digest.parse(digest), head=False)
                bodies.append(blob.body.read())
            await asyncio.sleep(1.0)    # room for the transfers to read as far as they may
            bound = limit + len(blobs) * (WRITE_BATCH + 256 * KiB)
            assert Counted.taken <= bound < len(blobs) * PIPELINE * WRITE_BATCH
        finally:
            free.set()
            for f in stuck:
                f.result()
        got = await asyncio.wait_for(asyncio.gather(*(read_all(b) for b in bodies)), PATIENCE * 3)
        assert got == list(blobs.values())
        await app.cache.transfers.wait_all(5)
        assert app.cache.transfers.buffers.used == 0
        assert all(app.cache.entry(d) is not None for d in blobs)


async def test_a_lane_that_fails_ends_a_wait_for_memory(tmp_path: Path):
    """A transfer waiting for room in the shared buffers while its store lane has failed (its
    batches will never be given back) fails too, and gives back what it held, instead of waiting
    for ever (and every transfer behind it with it)."""
    from dockermirror.cache.inflight import Buffers, Transfer, TransferFailed
    from dockermirror.cache.store import BlobStore

    data = os.urandom(12 * MiB)

    class Source:
        size = len(data)

        async def chunks(self):
            for offset in range(0, len(data), 256 * KiB):
                yield data[offset: offset + 256 * KiB]

        async def aclose(self) -> None:
            pass

    class LaneFails(Transfer):
        """The store lane stores one batch, then fails (as when every reader of an uncached
        transfer has gone)."""

        async def _store_lane(self, queue: asyncio.Queue) -> None:
            item = await queue.get()
            self._lane_done(1, item[1])
            raise TransferFailed("the store lane gave up")

    async def source() -> Source:
        return Source()

    async def commit(temp, transfer) -> None:
        pass

    store = BlobStore(tmp_path / "cache")
    store.create_dirs()
    buffers = Buffers(limit=WRITE_BATCH)
    transfer = LaneFails(Digest.parse(digest_of(data)), store, RoomForAll(), buffers=buffers)
    await asyncio.wait_for(transfer.run(source, commit), PATIENCE)
    assert isinstance(transfer.error, TransferFailed) and not transfer.verified
    assert buffers.used == 0
