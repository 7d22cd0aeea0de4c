"""The cache: content-addressed files, their SQLite index, and transfers in flight.

:class:`Cache` is what the mirror policy talks to. It keeps these invariants:

* a digest in the index means a complete, verified, fsynced file;
* at most one transfer per digest runs at a time, and every other reader follows it;
* a cache hit costs no index write of its own: accesses are batched and flushed
  by a background task.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from dockermirror.cache.index import AccessBatch, Entry, Index, TagEntry
from dockermirror.cache.inflight import READ_CHUNK, Source, Transfer, Transfers, pread
from dockermirror.cache.store import BlobStore, TempBlob
from dockermirror.oci import Digest

__all__ = ["Cache", "CachedFile", "Entry", "TagEntry", "Transfer"]

log = logging.getLogger("dockermirror.cache")

INDEX_NAME = "index.sqlite"


class CachedFile:
    """An open, committed cache file, read by one response."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size

    async def read(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        end = self.size if end is None else end
        pos = start
        try:
            while pos < end:
                data = await pread(self.fd, min(end - pos, READ_CHUNK), pos)
                if not data:
                    raise OSError(f"cache file shorter than its recorded size {self.size}")
                pos += len(data)
                yield data
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Cache:
    """Files, index and transfers under one cache directory."""

    def __init__(self, root: Path, *, clock: Callable[[], float] = time.time, flush_interval: float = 1.0) -> None:
        self.root = Path(root)
        self.clock = clock
        self.store = BlobStore(self.root)
        self.transfers = Transfers(self.store)
        self.index: Index | None = None
        self._batch = AccessBatch()
        self._flush_interval = flush_interval
        self._flusher: asyncio.Task[None] | None = None

    # --- lifecycle

    def open(self) -> None:
        """Create the directories, open the index, drop leftovers of a previous process."""
        self.store.create_dirs()
        self.index = Index(self.root / INDEX_NAME)
        removed = self.store.remove_temp_files()
        if removed:
            log.info("removed %d unfinished download(s) left by a previous run", removed)

    async def start(self) -> None:
        if self.index is None:
            self.open()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_periodically(), name="index flush")

    async def close(self, drain: float = 5.0) -> None:
        await self.transfers.wait_all(drain)
        self.transfers.cancel_all()
        if self._flusher is not None:
            self._flusher.cancel()
            try:
                await self._flusher
            except asyncio.CancelledError:
                pass
        await self.flush()
        if self.index is not None:
            self.index.close()
            self.index = None

    @property
    def _idx(self) -> Index:
        if self.index is None:
            raise RuntimeError("cache is not open")
        return self.index

    # --- content

    def entry(self, digest: Digest) -> Entry | None:
        return self._idx.content(str(digest))

    async def open_file(self, entry: Entry) -> CachedFile | None:
        """Open a stored file; a row whose file is gone is dropped and counts as a miss."""
        path = self.store.path(Digest.parse(entry.digest))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            log.warning("cache file of %s is missing; dropping its index entry", entry.digest)
            await asyncio.to_thread(self._idx.remove_content, entry.digest)
            return None
        return CachedFile(fd, entry.size)

    async def read_small(self, entry: Entry) -> bytes | None:
        """The bytes of a small stored file (a manifest); None if the file is gone."""
        file = await self.open_file(entry)
        if file is None:
            return None
        return b"".join([chunk async for chunk in file.read()])

    def transfer(self, digest: Digest) -> Transfer | None:
        return self.transfers.get(digest)

    def start_transfer(
        self,
        digest: Digest,
        open_source: Callable[[], Awaitable[Source]],
        *,
        upstream: str,
        repository: str,
        media_type: str | None = None,
    ) -> Transfer:
        """Fetch a blob once into the store; readers follow the returned transfer."""

        async def commit(temp: TempBlob, transfer: Transfer) -> None:
            now = self.clock()
            entry = Entry(str(digest), temp.written, transfer.media_type or media_type, "blob", now, now)
            await asyncio.to_thread(self._commit, temp, entry, upstream, repository)
            self.count("bytes_fetched", temp.written)

        return self.transfers.start(digest, open_source, commit)

    def _commit(self, temp: TempBlob, entry: Entry, upstream: str, repository: str) -> None:
        self.store.commit(temp)
        self._idx.add_content(entry, upstream, repository)

    async def put_manifest(self, digest: Digest, data: bytes, media_type: str | None,
                           upstream: str, repository: str) -> None:
        """Store a manifest already verified against its digest."""
        now = self.clock()
        entry = Entry(str(digest), len(data), media_type, "manifest", now, now)

        def write() -> None:
            self.store.write_bytes(digest, data)
            self._idx.add_content(entry, upstream, repository)

        await asyncio.to_thread(write)
        self.count("bytes_fetched", len(data))

    # --- tags

    def tag(self, upstream: str, repository: str, tag: str) -> TagEntry | None:
        return self._idx.tag(upstream, repository, tag)

    def tags_of(self, upstream: str, repository: str) -> list[str]:
        return self._idx.tags_of(upstream, repository)

    async def put_tag(self, entry: TagEntry) -> None:
        await asyncio.to_thread(self._idx.put_tag, entry)

    async def delete_tag(self, upstream: str, repository: str, tag: str) -> None:
        await asyncio.to_thread(self._idx.delete_tag, upstream, repository, tag)

    # --- accesses (memory only until the next flush)

    def touch(self, digest: str, upstream: str, repository: str) -> None:
        self._batch.touch(digest, self.clock(), upstream, repository)

    def touch_tag(self, upstream: str, repository: str, tag: str) -> None:
        self._batch.touch_tag(upstream, repository, tag, self.clock())

    def count(self, name: str, value: int = 1) -> None:
        self._batch.count(name, value)

    async def flush(self) -> None:
        batch, self._batch = self._batch, AccessBatch()
        if batch and self.index is not None:
            await asyncio.to_thread(self.index.apply, batch)

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            try:
                await self.flush()
            except Exception:
                log.exception("could not record cache accesses in the index")
