"""One upstream transfer per digest, followed by every reader that wants it.

A :class:`Transfer` streams an upstream body into a temp file of the store, hashing
as bytes pass, while any number of readers (full or ranged) follow it. The client
that started the transfer is just another reader, so a client that goes away stops
nothing: the transfer finishes for the others and for the cache.

Where the bytes live while readers follow:

* first in memory: each batch received is handed to readers at once, while the hash and
  store lanes work on it (it is counted in the shared :class:`Buffers` until both are done;
  a chunk readers are still sending after that stays counted, once, until the last of them
  is done). A reader that falls behind what memory holds reads the file instead;
* normally in the temp file, reserved in the cache's accounting (and preallocated) a
  step ahead of the bytes received, written past the page cache where the filesystem
  allows it (direct.py): readers ``pread`` it as it grows. An unverified
  body can make the cache evict at most what it really sent plus one step
  (:func:`ahead`), whatever length it announced;
* when the content may not be cached (larger than the cache, no room left after
  eviction) it is *spilled*: the same temp file, outside the cache's accounting, as
  long as the filesystem keeps ``min_free``. Readers follow it exactly the same way,
  and readers that arrive after the download ended still share it while any reader
  remains, so the content is fetched once. It is deleted after the last reader;
* when not even that is possible (the disk is full, or filled up part-way), the bytes
  after what reached the file are kept in a bounded in-memory tail. The transfer then
  goes at the pace of its slowest reader, and ends early if every reader has gone.

Nothing but verified, cached content is ever indexed. Every reader holds a lease on the
digest (like a reader of a cached file), so the file it reads is never evicted under it.

Readers are never given the last byte before the digest has been verified, so a
client can never receive a complete response with wrong content: a bad transfer
always ends in a cut-off response. Verified means hashed: a response may end while the
store lane still writes the batches waiting in its queue (at most PIPELINE of them); the
content is committed once they are written. The queues are bounded, so with a disk slower
than the network the download, and its readers, go at the disk's pace.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

from dockermirror.cache.direct import DirectWriter
from dockermirror.cache.store import BlobStore, FileRange, TempBlob
from dockermirror.cache.threads import finished, retrieved
from dockermirror.lograte import RateLimited
from dockermirror.meter import NULL_METER, Meter
from dockermirror.oci import Digest

T = TypeVar("T")
log = logging.getLogger("dockermirror.cache")
not_caching_log = RateLimited(log)    # every client pulling a blob larger than the cache: one warning a period

READ_CHUNK = 1024 * 1024        # most bytes of the in-memory tail handed out at once
MEMORY_PIECE = 4 * 1024 * 1024  # most bytes of the window handed out at once (a list of its chunks: no copy)
WRITE_BATCH = 1024 * 1024       # bytes gathered before they are hashed and written in worker threads
COALESCE = 4 * 1024 * 1024      # most bytes a lane that fell behind takes in one thread call
PIPELINE = 6                    # batches that may wait to be hashed, or written, while more download
RESERVE_STEP = 64 * 1024 * 1024  # most room reserved ahead of the bytes received (see ahead())
MEMORY_TAIL = 64 * 1024 * 1024   # bytes an uncached transfer keeps for slower readers
SLOW_READER = 60.0               # seconds an uncached transfer waits for a reader that is behind
DIRECT_WRITES = True             # the default: temp files written with O_DIRECT where the filesystem can (direct.py)
DIRECT_FROM = 1024 * 1024        # ... if the content is announced to be at least this large (a small one costs nothing)
LATE_FETCHES = 4                 # most extra fetches in flight at once, for readers an in-memory tail left behind
# The hash and store lanes' threads: a pool of their own, not the loop's default executor that
# every to_thread shares (many cold blobs at once must not starve it, nor be starved by it).
LANE_THREADS = 16
_lanes: ThreadPoolExecutor | None = None


# Bytes of downloaded batches held in memory (waiting for, or in, the hash and store lanes) across
# all transfers of the process. One transfer alone never reaches it (PIPELINE batches); many cold
# blobs at once share it instead of each holding PIPELINE batches: 16 at once held ~160 MiB before.
DOWNLOAD_MEMORY = 32 * 1024 * 1024


class Buffers:
    """The memory every transfer's batches share: at most ``limit`` bytes in all, except that a
    transfer holding none may always take one batch (so each keeps moving, however many share it).
    A transfer that may not take more waits, and reads nothing more from its upstream meanwhile."""

    def __init__(self, limit: int = DOWNLOAD_MEMORY) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: list[asyncio.Future[None]] = []

    def try_take(self, size: int, held: int) -> bool:
        """Take ``size`` bytes if that needs no wait (``held``: what the taker holds now)."""
        if held and self.used + size > self.limit:
            return False
        self.used += size
        return True

    async def take(self, size: int, held: Callable[[], int]) -> None:
        """Take ``size`` bytes, waiting for room; ``held`` tells what the taker holds at each look."""
        while held() and self.used + size > self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.used += size

    def pin(self, size: int) -> None:
        """Count ``size`` bytes readers still hold after the transfer let go of them (no wait: the
        memory is in use already; it moved from the transfer's count to this one)."""
        self.used += size

    def give(self, size: int) -> None:
        self.used -= size
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


def lane_executor() -> ThreadPoolExecutor:
    global _lanes
    if _lanes is None:
        _lanes = ThreadPoolExecutor(max_workers=LANE_THREADS, thread_name_prefix="blob-lane")
    return _lanes


class Source(Protocol):
    """An upstream body: its length if announced, and its bytes."""

    size: int | None

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class TransferFailed(Exception):
    """The transfer a reader was following did not complete with verified content."""


class DigestMismatch(Exception):
    """The bytes received do not hash to the digest they were fetched for."""


class Space(Protocol):
    """What a transfer needs from the cache's accounting."""

    async def reserve(self, size: int) -> bool: ...

    def release(self, size: int) -> None: ...

    def disk_full(self) -> None: ...

    def capacity(self) -> int: ...

    def spill_room(self, size: int) -> bool:
        """True if ``size`` more bytes may be written outside the cache (the filesystem keeps min_free)."""

    def lease(self, digest: str) -> Callable[[], None]:
        """Keep ``digest`` from eviction and expiry until the returned function is called."""


def ahead(capacity: int) -> int:
    """Most bytes a transfer reserves (and so may evict) beyond what it has received:
    an eighth of the cache, at most RESERVE_STEP, at least one write batch."""
    return max(WRITE_BATCH, min(RESERVE_STEP, capacity // 8))


class Transfer:
    """A download of one digest, and the readers following it."""

    def __init__(self, digest: Digest, store: BlobStore, space: Space, *, cache: bool = True,
                 meter: Meter = NULL_METER, buffers: Buffers | None = None, direct: bool | None = None) -> None:
        self.digest = digest
        self._direct_writes = DIRECT_WRITES if direct is None else direct
        self._buffers = buffers or Buffers()
        self._held = 0                  # bytes of this transfer's batches taken from the buffers
        self._lanes_done = [0, 0]       # bytes each lane (hash, store) has finished with
        self.meter = meter
        self.origin: tuple[str, str] | None = None     # (upstream, repository) it is fetched for
        self.store = store
        self.space = space
        self.caching = cache            # the file is reserved in the cache and committed if verified
        self.spilling = False           # the file is outside the cache, deleted after its last reader
        self.size: int | None = None
        self.arrived = 0                # bytes received from the upstream (held in memory until stored)
        self.received = 0               # bytes stored so far (in the file or the tail)
        self.file_end = 0               # bytes [0, file_end) are in the temp file
        self.verified = False
        self.error: BaseException | None = None
        # resolves once the upstream answered and the bytes have a place (or with the error)
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.finished = asyncio.Event()  # the download ended (readers may still read a spilled file)
        self.closed = asyncio.Event()    # ... and the temp file is closed: no new reader may join
        self._hasher = hashlib.new(digest.algorithm)
        self._temp: TempBlob | None = None
        self._direct: DirectWriter | None = None     # writes the temp file past the page cache
        self._reserved = 0              # bytes reserved in the cache's accounting
        self._claimed = 0               # bytes of the file reserved or checked for room (and preallocated)
        self._ahead = RESERVE_STEP
        self._tail: collections.deque[tuple[int, bytes]] = collections.deque()
        self._tail_start = 0            # offset of the first byte still in the tail
        self._tail_bytes = 0
        # batches received but not stored yet, by offset: readers take them from memory meanwhile
        # (they are in the shared buffers already, until the store lane is done with them)
        self._window: collections.deque[tuple[int, bytes]] = collections.deque()
        # window chunks readers are sending, by id: [readers holding it, the chunk, counted in the
        # buffers by pin() since the window let go of it]
        self._holds: dict[int, list] = {}
        self._progress = asyncio.Event()
        self._readers: dict[int, int] = {}   # reader id -> position
        self._reader_ids = itertools.count()
        self._reader_moved = asyncio.Event()
        self._had_readers = False
        self._jobs: list[Future] = []   # this transfer's work submitted to the lane threads

    # --- the writing side

    async def run(
        self,
        open_source: Callable[[], Awaitable[Source]],
        commit: Callable[[TempBlob, Transfer], Awaitable[None]],
    ) -> None:
        """Fetch, verify and (if caching) commit; never raises (readers see the outcome)."""
        source: Source | None = None
        unlease = None
        began = time.monotonic()
        streamed = False        # the upstream answered and readers were let in
        try:
            source = await open_source()
            self.size = source.size
            await self._open_file()
            self.started.set_result(None)
            streamed = True
            await self._pump(source)
            if self.caching and self._temp is not None and self.file_end == self.received:
                # from the commit on, readers that join read the indexed file: keep it from eviction
                unlease = self.space.lease(str(self.digest))
                # in a thread that uses the temp file: it ends before the file is closed, even
                # if this is cancelled meanwhile
                committing = asyncio.ensure_future(commit(self._temp, self))
                committing.add_done_callback(retrieved)     # raised below, unless cancelled first
                await finished(committing)
                committing.result()
        except BaseException as exc:
            if isinstance(exc, DigestMismatch):
                self.meter.verification_failed("download")
            self._fail(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            cancelled = False
            try:
                await self._lanes_idle()    # a preallocation of _open_file's, if that was cancelled
            except asyncio.CancelledError:
                cancelled = True
            self._close_direct()    # (if the store lane did not; no lane thread uses it now)
            try:
                if source is not None:
                    await source.aclose()
                    upstream = self.origin[0] if self.origin else None
                    self.meter.transfer_done(upstream, time.monotonic() - began, self.verified)
                    if streamed and not self.caching:
                        self.meter.pass_through(upstream)
            finally:
                self.space.release(self._reserved)
                self._reserved = 0
                self.finished.set()
                self._close_if_unread()
                if unlease is not None:
                    unlease()
            if cancelled:
                raise asyncio.CancelledError

    @property
    def followers(self) -> int:
        """Readers following this transfer now."""
        return len(self._readers)

    @property
    def _shared_after_end(self) -> bool:
        """A complete, verified spilled file: readers may still join until the last one leaves."""
        return self.verified and self.spilling and self._temp is not None and self.file_end == self.received

    def _close_if_unread(self) -> None:
        """Close (and, unless committed, delete) the temp file once the download has ended and,
        for a spilled file, its last reader has gone."""
        if not self.finished.is_set() or self.closed.is_set():
            return
        if self._shared_after_end and self._readers:
            return
        self.discard()

    def discard(self) -> None:
        """Close the temp file now; readers that have it open keep reading it."""
        # Closed on the event loop, so no reader can dup a stale descriptor.
        if self._temp is not None:
            self._temp.discard()
        self.closed.set()

    async def _open_file(self) -> None:
        """Find the content a place: the cache, a spilled file, or (failing both) memory."""
        capacity = self.space.capacity()
        self._ahead = ahead(capacity)
        if self.caching and self.size is not None and self.size > capacity:
            self._not_cached("it is larger than the cache")
        elif not self.caching:
            self.spilling = True
        try:
            self._temp = self.store.new_temp(self.digest)
        except OSError as exc:
            self._to_memory(f"no temp file ({exc.strerror})")
            return
        if self.spilling:
            self._temp.passing_through()
        if self._direct_writes and (self.size is None or self.size >= DIRECT_FROM):
            try:
                self._direct = DirectWriter(self._temp.path)
            except OSError:
                pass    # the filesystem has no O_DIRECT (tmpfs): written through the page cache
        if self.size:
            # only a step ahead: a length is a claim, not bytes (it may be a lie)
            await self._claim(min(self.size, self._ahead))

    def _not_cached(self, why: str) -> None:
        """The content will not be cached: the file goes on outside the cache's accounting."""
        if self.caching:
            not_caching_log.log("not caching", "not caching %s (%s bytes): %s; passing it through", self.digest,
                                self.size if self.size is not None else "unknown", why)
        self.caching = False
        self.spilling = True
        self.space.release(self._reserved)
        self._reserved = 0
        if self._temp is not None:
            self._temp.passing_through()

    def _to_memory(self, why: str) -> None:
        """No room for the file either: what follows goes through the in-memory tail."""
        if self.caching:
            self._not_cached(why)
        elif self.spilling:
            log.warning("passing %s through from memory from byte %d: %s", self.digest, self.file_end, why)
        self.caching = self.spilling = False
        self.space.release(self._reserved)
        self._reserved = 0
        self._keep_window(self.file_end, self.received)     # stored bytes the file did not take

    async def _claim(self, needed: int) -> bool:
        """Room for the file to reach ``needed`` bytes, claimed (and preallocated) up to one step
        ahead, never past the announced length; False (and the bytes go to memory) if there is none."""
        step = max(self._ahead, needed - self._claimed)
        if self.size is not None:
            step = min(step, max(self.size, needed) - self._claimed)
        if self.caching:
            if await self.space.reserve(step):
                self._reserved += step
            else:
                self._not_cached("it outgrew the room left in the cache" if self.file_end or self.size is None
                                 else "there is no room for it in the cache")
        if not self.caching and self.spilling and not self.space.spill_room(step):
            self._to_memory("not enough free disk space for it outside the cache")
        if not (self.caching or self.spilling) or self._temp is None:
            return False
        try:
            if self.size is not None:  # a body of unknown length is not preallocated: it may be short
                await self._in_lane(self._temp.preallocate, self._claimed + step)
        except OSError as exc:
            self.space.disk_full()
            self._to_memory(f"no room on disk ({exc.strerror})")
            return False
        self._claimed += step
        return True

    async def _pump(self, source: Source) -> None:
        """Copy the source into two ordered lanes running beside the download: one hashes,
        one stores (the file, or the tail); up to PIPELINE batches may wait in each."""
        lanes = [(asyncio.Queue(PIPELINE), self._hash_lane), (asyncio.Queue(PIPELINE), self._store_lane)]
        tasks = [asyncio.ensure_future(run(queue)) for queue, run in lanes]
        try:
            batch: list[bytes] = []
            batched = 0
            pumped = 0
            flush_at = 0
            async for chunk in source.chunks():
                pumped += len(chunk)
                if self.size is not None and pumped > self.size:
                    raise DigestMismatch(f"the upstream sent more than the {self.size} bytes it announced")
                batch.append(chunk)
                batched += len(chunk)
                # the first bytes go on at once (readers wait for them); then a batch at each
                # WRITE_BATCH boundary of the content
                if pumped >= flush_at:
                    await self._take(batched, tasks)
                    self._arrive(batch)
                    await self._feed(lanes, tasks, (batch, batched))
                    batch, batched = [], 0
                    flush_at = (pumped // WRITE_BATCH + 1) * WRITE_BATCH
            if batch:
                await self._take(batched, tasks)
                self._arrive(batch)
                await self._feed(lanes, tasks, (batch, batched))
            await self._feed(lanes, tasks, None)
            await tasks[0]
            # every byte hashed: readers may have the last one while the store lane finishes
            mismatch = self._verify()
            await tasks[1]
            if mismatch is not None:
                raise mismatch
        finally:
            for task in tasks:
                task.cancel()
            held, self._held = self._held, -1      # -1: the lanes give nothing back any more
            if held > 0:
                self._buffers.give(held)
            while self._window:      # (empty unless it failed) its memory went back to the buffers
                self._drop(self._window.popleft()[1])
            await finished(*tasks)      # the lanes' tasks end (and submit nothing more) ...
            await self._lanes_idle()    # ... and their threads return
            self._close_direct()

    def _verify(self) -> DigestMismatch | None:
        """Check what the hash lane saw; if it is the content, let readers have all of it."""
        if self.size is not None and self.arrived != self.size:
            return DigestMismatch(f"expected {self.size} bytes, got {self.arrived}")
        actual = self._hasher.hexdigest()
        if actual != self.digest.hex:
            return DigestMismatch(f"content hashes to {self.digest.algorithm}:{actual}")
        self.verified = True
        self._notify()
        return None

    def _arrive(self, batch: list[bytes]) -> None:
        """A batch taken from the upstream (and counted in the buffers): readers may have it now."""
        for chunk in batch:
            if chunk:
                self._window.append((self.arrived, chunk))
                self.arrived += len(chunk)
        self._notify()

    def _stored(self, end: int) -> None:
        """Bytes before ``end`` are in the file or the tail: forget them in the window."""
        while self._window and self._window[0][0] + len(self._window[0][1]) <= end:
            self._drop(self._window.popleft()[1])
        if self._window:
            offset, data = self._window[0]
            if offset < end and offset + len(data) <= self.received:
                # stored, but its end not in the file yet (the direct writer's partial block): its
                # memory went back to the buffers with its batch, so keep only a copy of that end
                self._window[0] = (end, bytes(memoryview(data)[end - offset:]))
                self._drop(data)

    def _drop(self, chunk: bytes) -> None:
        """The window lets go of ``chunk`` (its memory goes back to the buffers with the batch):
        if readers still send it, it stays counted, once, until the last of them is done."""
        hold = self._holds.get(id(chunk))
        if hold is not None and not hold[2]:
            hold[2] = True
            self._buffers.pin(len(chunk))

    def _hold(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            hold = self._holds.setdefault(id(chunk), [0, chunk, False])
            hold[0] += 1

    def _release(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            hold = self._holds[id(chunk)]
            hold[0] -= 1
            if not hold[0]:
                del self._holds[id(chunk)]
                if hold[2]:
                    self._buffers.give(len(chunk))

    async def _take(self, size: int, tasks: list[asyncio.Future[None]]) -> None:
        """Memory for a batch of ``size`` bytes, from the buffers every transfer shares; while it
        waits, a lane that ended (failed: its batches will never be given back) ends the wait."""
        if not self._buffers.try_take(size, self._held):
            take = asyncio.ensure_future(self._buffers.take(size, lambda: self._held))
            try:
                await asyncio.wait({take, *tasks}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                if take.done() and not take.cancelled() and take.exception() is None:
                    self._held += size      # it took the memory as this was cancelled: given back with the rest
                take.cancel()       # cancelled before it took anything: it takes only when it completes
                raise
            if not take.done():
                take.cancel()
                for task in tasks:
                    if task.done():
                        task.result()       # raises what stopped the lane
                raise TransferFailed("a transfer lane ended early")
            take.result()
        self._held += size

    async def _in_lane(self, call: Callable[..., T], *args: object) -> T:
        """``call(*args)`` in a lane thread. Cancelling the caller does not stop the thread:
        :meth:`_lanes_idle` waits for it before the temp file is closed."""
        self._jobs = [job for job in self._jobs if not job.done()]
        job = lane_executor().submit(call, *args)
        self._jobs.append(job)
        return await asyncio.wrap_future(job)

    async def _lanes_idle(self) -> None:
        """Wait until no lane thread is using the temp file (a cancelled lane's write or
        preallocation may still be running: closing the descriptor under it would let the
        thread write into whatever file or socket gets that number next)."""
        await finished(*self._jobs)
        self._jobs = []

    def _lane_done(self, lane: int, size: int) -> None:
        """A lane finished with a batch; once both have, its memory goes back to the buffers."""
        before = min(self._lanes_done)
        self._lanes_done[lane] += size
        freed = min(self._lanes_done) - before
        if freed and self._held > 0:
            self._held -= freed
            self._buffers.give(freed)

    @staticmethod
    async def _feed(lanes: list, tasks: list[asyncio.Future[None]], item: tuple[list[bytes], int] | None) -> None:
        """Give an item to every lane, waiting for room; a lane that failed stops the transfer."""
        for (queue, _), task in zip(lanes, tasks, strict=True):
            if queue.full():
                put = asyncio.ensure_future(queue.put(item))
                await asyncio.wait({put, task}, return_when=asyncio.FIRST_COMPLETED)
                if not put.done():
                    put.cancel()
            else:
                queue.put_nowait(item)
            if task.done() and item is not None:  # after the final None, a finished lane is expected
                task.result()  # raises what stopped the lane
                raise TransferFailed("a transfer lane ended early")

    @staticmethod
    async def _batches(queue: asyncio.Queue) -> AsyncIterator[tuple[list[bytes], int]]:
        """The lane's batches in order, each merged with those already waiting behind it (up to
        COALESCE bytes): a lane that fell behind catches up with one thread call for several."""
        while (item := await queue.get()) is not None:
            batch, size = list(item[0]), item[1]
            ended = False
            while size < COALESCE and not queue.empty():
                more = queue.get_nowait()
                if more is None:
                    ended = True
                    break
                batch += more[0]
                size += more[1]
            yield batch, size
            if ended:
                return

    async def _hash_lane(self, queue: asyncio.Queue) -> None:
        async for batch, size in self._batches(queue):
            await self._in_lane(self._hash, batch)
            self._lane_done(0, size)

    async def _store_lane(self, queue: asyncio.Queue) -> None:
        """Put each batch where readers find it: the file, or the tail; tell them."""
        async for batch, size in self._batches(queue):
            start = self.received
            if self.spilling and self._had_readers and not self._readers and not self.verified:
                raise TransferFailed("every reader of an uncached transfer has gone")
            to_file = (self.caching or self.spilling) and self._temp is not None
            # (the file may lag what was stored by the direct writer's partial block)
            if to_file and self.received + size > self._claimed:
                to_file = await self._claim(self.received + size)
            if to_file:
                temp = self._temp
                error = await self._in_lane(self._write, temp, self._direct, batch)
                self.received += size
                self.file_end = temp.written
                if error is None:
                    self._stored(self.file_end)
                    self._lane_done(1, size)
                    self._notify()
                    continue
                self._write_failed(error)   # the window's bytes from file_end on go to the tail
            else:
                self.received += size
                self._keep(b"".join(batch), start)
            self._stored(self.received)
            self._lane_done(1, size)    # its bytes are in the tail now (MEMORY_TAIL bounds that)
            self._notify()
            await self._trim()
        if self._direct is not None and (self.caching or self.spilling) and self._temp is not None:
            temp = self._temp
            error = await self._in_lane(self._finish, temp, self._direct)
            if error is None:
                self.file_end = temp.written
                self._stored(self.file_end)
            else:
                self._write_failed(error)
                self._stored(self.received)
            self._notify()

    def _write_failed(self, error: OSError) -> None:
        """The disk took no more: the content goes on from memory (the tail), uncached."""
        self.space.disk_full()
        self._to_memory(f"writing failed at byte {self.file_end} ({error.strerror})")

    def _close_direct(self) -> None:
        """Close the direct writer; only when no lane thread can be using it."""
        direct, self._direct = self._direct, None
        if direct is not None:
            direct.close()

    def _hash(self, batch: list[bytes]) -> None:
        for chunk in batch:
            self._hasher.update(chunk)

    @staticmethod
    def _write(temp: TempBlob, direct: DirectWriter | None, batch: list[bytes]) -> OSError | None:
        try:
            if direct is not None and direct.works():
                temp.written = direct.write(batch)
            else:
                temp.write(batch)
        except OSError as exc:
            return exc
        return None

    @staticmethod
    def _finish(temp: TempBlob, direct: DirectWriter) -> OSError | None:
        """The direct writer's last partial block (through the file's ordinary descriptor)."""
        try:
            if direct.works():
                temp.written = direct.finish(temp.fd)
        except OSError as exc:
            return exc
        return None

    def _keep_window(self, start: int, end: int) -> None:
        """Bytes [start, end) of the window go to the tail (the file could not take them)."""
        for offset, data in self._window:
            if offset >= end:
                break
            if offset + len(data) > start:
                self._keep(data[max(0, start - offset): end - offset], max(start, offset))

    def _keep(self, data: bytes, offset: int) -> None:
        if data:
            self._tail.append((offset, data))
            self._tail_bytes += len(data)
            if len(self._tail) == 1:
                self._tail_start = offset

    async def _trim(self) -> None:
        """Forget tail bytes every reader has passed; wait for readers that are far behind."""
        while True:
            lowest = min(self._readers.values(), default=self.received)
            while self._tail and self._tail[0][0] + len(self._tail[0][1]) <= lowest:
                _, data = self._tail.popleft()
                self._tail_bytes -= len(data)
            self._tail_start = self._tail[0][0] if self._tail else self.received
            if not self._readers and self._had_readers and not self.verified:
                raise TransferFailed("every reader of an uncached transfer has gone")
            if self._tail_bytes <= MEMORY_TAIL or not self._readers:
                return
            moved = self._reader_moved
            try:
                await asyncio.wait_for(moved.wait(), SLOW_READER)
            except TimeoutError:
                # a slow client's doing: info, never a warning (see the README's "Logs")
                log.info("a reader of %s fell %d bytes behind; dropping what it has not read",
                            self.digest, self._tail_bytes)
                _, data = self._tail.popleft()
                self._tail_bytes -= len(data)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        if not self.started.done():
            self.started.set_exception(exc)
            self.started.exception()  # mark retrieved: readers may all be gone
        self._notify()

    def _notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    # --- the reading side

    @property
    def available(self) -> int:
        """Bytes readers may have: all once verified, else all but the last (all that arrived
        while fewer than the announced length have: none of them can be the last)."""
        if self.verified or (self.size is not None and self.arrived < self.size):
            return self.arrived
        return max(0, self.arrived - 1)

    def follow(self, start: int = 0) -> Follower | None:
        """A reader from ``start``; None if an uncached transfer already dropped those bytes,
        or its file is gone."""
        if start < self._tail_start and self.file_end < self._tail_start:
            return None     # bytes [file_end, _tail_start) it would need next are gone from memory
        if self.closed.is_set() and not (self._temp is not None and self._temp.committed):
            return None
        return Follower(self, start)

    def _open_fd(self) -> int:
        """A file descriptor for one reader: the file being written (valid after its rename)."""
        if self._temp is not None and self._temp.fd >= 0:
            return os.dup(self._temp.fd)
        if self._temp is not None and self._temp.committed:
            return os.open(self._temp.path, os.O_RDONLY | os.O_CLOEXEC)
        return -1

    def _from_window(self, pos: int, limit: int) -> tuple[list[bytes | memoryview], list[bytes]] | None:
        """The window's bytes from ``pos`` (before ``limit``, at most MEMORY_PIECE), as its own
        chunks (views of them where a chunk is cut): nothing is copied; and the chunks they are
        of. None if the window has not those bytes."""
        window = self._window
        i = len(window) - 1
        while i >= 0 and window[i][0] > pos:     # a reader keeping up reads the newest
            i -= 1
        if i < 0 or pos >= window[i][0] + len(window[i][1]):
            return None
        pieces: list[bytes | memoryview] = []
        chunks: list[bytes] = []
        at = pos
        # up to MEMORY_PIECE, less when the shared memory is short (a client that stops reading
        # keeps what it was handed counted until its send gives up): at least one chunk
        most = min(MEMORY_PIECE, max(0, self._buffers.limit - self._buffers.used) // 2)
        while i < len(window) and at < limit and (at == pos or at - pos < most):
            offset, data = window[i]
            start, end = at - offset, min(len(data), limit - offset)
            pieces.append(data if start == 0 and end == len(data) else memoryview(data)[start:end])
            chunks.append(data)
            at = offset + end
            i += 1
        return pieces, chunks

    def _from_tail(self, pos: int, limit: int) -> bytes:
        """Bytes from ``pos`` (before ``limit``) kept in the in-memory tail."""
        for offset, data in self._tail:
            if offset <= pos < offset + len(data):
                return data[pos - offset: pos - offset + min(limit - pos, READ_CHUNK)]
        if self.error is not None:
            raise TransferFailed(str(self.error) or type(self.error).__name__)
        raise TransferFailed(f"bytes at {pos} of an uncached transfer are gone (the reader fell behind)")


class Follower:
    """One reader of a transfer; registered (so its bytes are kept) until it finishes or closes."""

    def __init__(self, transfer: Transfer, start: int) -> None:
        self.transfer = transfer
        self.size = transfer.size
        self._id = next(transfer._reader_ids)
        transfer._readers[self._id] = start
        transfer._had_readers = True
        # like a reader of a cached file: the file this reader reads once committed is not evicted
        self._unlease: Callable[[], None] | None = transfer.space.lease(str(transfer.digest))

    def close(self) -> None:
        transfer = self.transfer
        if transfer._readers.pop(self._id, None) is not None:
            transfer._reader_moved.set()
            transfer._reader_moved = asyncio.Event()
            transfer._close_if_unread()
        if self._unlease is not None:
            unlease, self._unlease = self._unlease, None
            unlease()

    async def read(self, start: int = 0, end: int | None = None
                   ) -> AsyncIterator[FileRange | list[bytes | memoryview] | bytes]:
        """Bytes ``[start, end)`` as they arrive: from memory (a list of consecutive buffers) while
        they are there, else as ranges of the file being written (or bytes of the in-memory tail);
        ``end=None`` reads to the end of the content."""
        t = self.transfer
        fd = -1
        held: list[bytes] = []      # the window's chunks this reader was handed last (see _drop)
        try:
            await t.started
            fd = t._open_fd()
            pos = start
            while end is None or pos < end:
                if held:
                    t._release(held)
                    held = []
                t._readers[self._id] = pos
                progress = t._progress
                limit = t.available if end is None else min(t.available, end)
                if pos < limit:
                    piece: FileRange | list[bytes | memoryview] | bytes
                    in_window = t._from_window(pos, limit)
                    if in_window is not None:
                        piece, held = in_window
                        t._hold(held)       # still counted while it is sent, if the window lets go of it
                        size = sum(len(buffer) for buffer in piece)
                    elif pos < t.file_end:
                        piece = FileRange(fd, pos, min(limit, t.file_end) - pos)
                        size = piece.count
                    else:
                        piece = t._from_tail(pos, limit)
                        size = len(piece)
                    # the bytes stay where they are until the reader has sent them
                    yield piece
                    pos += size
                    t._readers[self._id] = pos
                    t._reader_moved.set()
                    t._reader_moved = asyncio.Event()
                elif t.verified and pos >= t.arrived:
                    return  # complete, verified content (even if caching it failed)
                elif t.error is not None:
                    raise TransferFailed(str(t.error) or type(t.error).__name__)
                else:
                    await progress.wait()
        finally:
            if held:
                t._release(held)
            if fd >= 0:
                os.close(fd)
            self.close()


class Transfers:
    """The transfers in flight in this process, one per digest."""

    def __init__(self, store: BlobStore, space: Space, meter: Meter = NULL_METER,
                 direct_writes: Callable[[], bool] = lambda: DIRECT_WRITES) -> None:
        self.store = store
        self.space = space
        self.meter = meter
        self._direct_writes = direct_writes     # asked at each start (a reload may change it)
        self._active: dict[Digest, Transfer] = {}
        self._late = 0                  # unshared transfers running (each may hold a MEMORY_TAIL)
        self.buffers = Buffers()        # the memory all their batches share
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, digest: Digest) -> Transfer | None:
        return self._active.get(digest)

    def start(
        self,
        digest: Digest,
        open_source: Callable[[], Awaitable[Source]],
        commit: Callable[[TempBlob, Transfer], Awaitable[None]],
        *,
        shared: bool = True,
    ) -> Transfer:
        """Start a transfer. A shared one is the digest's single transfer (the caller checked
        there is none); an unshared one serves one late reader of an uncached transfer."""
        transfer = Transfer(digest, self.store, self.space, cache=shared, meter=self.meter, buffers=self.buffers,
                            direct=self._direct_writes())
        if shared:
            assert digest not in self._active
            self._active[digest] = transfer
        else:
            self._late += 1

        async def run() -> None:
            try:
                await transfer.run(open_source, commit)
                await transfer.closed.wait()   # a spilled file: until its last reader has gone
            finally:
                transfer.discard()
                if self._active.get(digest) is transfer:
                    del self._active[digest]
                if not shared:
                    self._late -= 1

        task = asyncio.get_running_loop().create_task(run(), name=f"transfer {digest}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return transfer

    def __len__(self) -> int:
        return len(self._active)

    def active(self) -> list[Transfer]:
        """The shared transfers in flight now (for the status page and the metrics)."""
        return list(self._active.values())

    @property
    def late_fetches_left(self) -> int:
        """How many more unshared transfers (for late readers of an in-memory pass-through) may start."""
        return LATE_FETCHES - self._late

    async def wait_all(self, timeout: float) -> None:
        """Let running transfers finish (shutdown), up to ``timeout`` seconds."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def cancel_all(self, timeout: float) -> None:
        """Cancel the transfers still running (shutdown) and give them ``timeout`` seconds to
        end: a commit under way in its thread finishes first if it can in that time (it writes
        the index; past it, the index closes under it: the blob is left unindexed, and the next
        start adopts or removes it)."""
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
