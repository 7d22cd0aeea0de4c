"""One upstream transfer per digest, followed by every reader that wants it.

A :class:`Transfer` streams an upstream body into a temp file of the store, hashing
as bytes pass, while any number of readers (full or ranged) read the growing file.
The client that started the transfer is just another reader, so a client that goes
away stops nothing: the transfer finishes for the others and for the cache.

Readers are never given the last byte before the digest has been verified, so a
client can never receive a complete response with wrong content: a bad transfer
always ends in a cut-off response.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from dockermirror.cache.store import BlobStore, TempBlob
from dockermirror.oci import Digest

log = logging.getLogger("dockermirror.cache")

READ_CHUNK = 1024 * 1024   # bytes per read handed to a client
WRITE_BATCH = 512 * 1024   # bytes gathered before one write+hash in a worker thread


class Source(Protocol):
    """An upstream body: its length if announced, and its bytes."""

    size: int | None

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class TransferFailed(Exception):
    """The transfer a reader was following did not complete with verified content."""


async def pread(fd: int, size: int, offset: int) -> bytes:
    """Read from a file at an offset in a worker thread."""
    return await asyncio.get_running_loop().run_in_executor(None, os.pread, fd, size, offset)


class Transfer:
    """A download of one digest into the store, and the readers following it."""

    def __init__(self, digest: Digest, store: BlobStore) -> None:
        self.digest = digest
        self.store = store
        self.size: int | None = None
        self.media_type: str | None = None
        self.written = 0
        self.verified = False
        self.error: BaseException | None = None
        # resolves once the upstream answered and the temp file exists (or with the error)
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.finished = asyncio.Event()
        self._progress = asyncio.Event()
        self._temp: TempBlob | None = None

    # --- the writing side

    async def run(
        self,
        open_source: Callable[[], Awaitable[Source]],
        commit: Callable[[TempBlob, Transfer], Awaitable[None]],
    ) -> None:
        """Fetch, verify and commit; never raises (readers see the outcome)."""
        source: Source | None = None
        try:
            source = await open_source()
            self.size = source.size
            self._temp = self.store.new_temp(self.digest)
            self.started.set_result(None)
            await self._pump(source)
            self._temp.verify(self.size)
            self.verified = True
            self._notify()
            await commit(self._temp, self)
        except BaseException as exc:
            self._fail(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            if source is not None:
                await source.aclose()
            # Closed here, on the event loop, so no reader can dup a stale descriptor.
            if self._temp is not None:
                self._temp.discard()
            self.finished.set()

    async def _pump(self, source: Source) -> None:
        """Copy the source into the temp file; the next batch downloads while one is written."""
        loop = asyncio.get_running_loop()
        temp = self._temp
        assert temp is not None
        pending: asyncio.Future[int] | None = None
        batch: list[bytes] = []
        batched = 0
        async for chunk in source.chunks():
            batch.append(chunk)
            batched += len(chunk)
            if batched >= WRITE_BATCH:
                if pending is not None:
                    self._advance(await pending)
                pending = loop.run_in_executor(None, temp.write, batch)
                batch, batched = [], 0
        if pending is not None:
            self._advance(await pending)
        if batch:
            self._advance(await loop.run_in_executor(None, temp.write, batch))

    def _advance(self, written: int) -> None:
        self.written = written
        self._notify()

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
        """Bytes readers may have: all once verified, else all but the last."""
        return self.written if self.verified else max(0, self.written - 1)

    def open_reader(self) -> int:
        """A file descriptor for one reader: the file being written (valid after its rename)."""
        if self._temp is not None and self._temp.fd >= 0:
            return os.dup(self._temp.fd)
        if self._temp is not None and self._temp.committed:
            return os.open(self._temp.path, os.O_RDONLY | os.O_CLOEXEC)
        raise TransferFailed(str(self.error) if self.error else "transfer ended without content")

    async def read(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)`` as they arrive; ``end=None`` reads to the end of the content."""
        await self.started
        fd = self.open_reader()
        try:
            pos = start
            while end is None or pos < end:
                progress = self._progress
                limit = self.available if end is None else min(self.available, end)
                if pos < limit:
                    data = await pread(fd, min(limit - pos, READ_CHUNK), pos)
                    if not data:
                        raise TransferFailed("temp file shorter than recorded")
                    pos += len(data)
                    yield data
                elif self.verified and pos >= self.written:
                    return  # complete, verified content (even if caching it failed)
                elif self.error is not None:
                    raise TransferFailed(str(self.error) or type(self.error).__name__)
                else:
                    await progress.wait()
        finally:
            os.close(fd)


class Transfers:
    """The transfers in flight in this process, one per digest."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self._active: dict[Digest, Transfer] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, digest: Digest) -> Transfer | None:
        return self._active.get(digest)

    def start(
        self,
        digest: Digest,
        open_source: Callable[[], Awaitable[Source]],
        commit: Callable[[TempBlob, Transfer], Awaitable[None]],
    ) -> Transfer:
        """Start a transfer; the caller checked that none is active for this digest."""
        assert digest not in self._active
        transfer = Transfer(digest, self.store)
        self._active[digest] = transfer

        async def run() -> None:
            try:
                await transfer.run(open_source, commit)
            finally:
                del self._active[digest]

        task = asyncio.get_running_loop().create_task(run(), name=f"transfer {digest}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return transfer

    def __len__(self) -> int:
        return len(self._active)

    async def wait_all(self, timeout: float) -> None:
        """Let running transfers finish (shutdown), up to ``timeout`` seconds."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    def cancel_all(self) -> None:
        for task in self._tasks:
            task.cancel()
