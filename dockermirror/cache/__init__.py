"""The cache: content-addressed files, their SQLite index, transfers in flight, and its limits.

:class:`Cache` is what the mirror policy talks to. It keeps these invariants:

* a digest in the index means a complete, verified, fsynced file;
* at most one transfer per digest runs at a time, and every other reader follows it;
* bytes stored + bytes reserved by transfers in flight <= max_size, and at least
  min_free stays free on the filesystem: a transfer reserves room (evicting least
  recently used content first) a bounded step ahead of the bytes it has received, so a
  lying length cannot empty the cache; content that does not fit passes through
  uncached, in a file outside max_size while min_free allows (deleted after its last
  reader), else through memory;
* a file being read (by a response reading it, or by a follower of the transfer that
  wrote it) is leased and never evicted; pinned content never is;
* a cache hit costs no index write of its own: accesses are batched and flushed
  by a background task.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from dockermirror.cache import maintenance
from dockermirror.cache.index import AccessBatch, Entry, Index, TagEntry
from dockermirror.cache.inflight import Follower, Source, Transfer, Transfers
from dockermirror.cache.space import Limits, filesystem, resolve, shortfall
from dockermirror.cache.store import BlobStore, FileRange, TempBlob
from dockermirror import humanize
from dockermirror.oci import Digest

__all__ = ["Cache", "CacheBusy", "CachedFile", "Entry", "FileRange", "Follower", "Limits", "TagEntry", "Transfer"]

log = logging.getLogger("dockermirror.cache")

INDEX_NAME = "index.sqlite"
LOCK_NAME = "lock"
MAINTENANCE_INTERVAL = 60.0      # check limits this often
EXPIRY_INTERVAL = 600.0          # expire by TTL this often


class CacheBusy(Exception):
    """Another server process holds this cache directory."""


class CachedFile:
    """An open, committed cache file, read by one response. Holds a lease until closed."""

    def __init__(self, fd: int, size: int, on_close: Callable[[], None] = lambda: None) -> None:
        self.fd = fd
        self.size = size
        self._on_close = on_close

    async def read(self, start: int = 0, end: int | None = None) -> AsyncIterator[FileRange]:
        """The range asked for, as one piece of the open file."""
        try:
            yield FileRange(self.fd, start, (self.size if end is None else end) - start)
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._on_close()


class Cache:
    """Files, index, transfers and limits under one cache directory."""

    def __init__(self, root: Path, *, limits: Limits | None = None, clock: Callable[[], float] = time.time,
                 flush_interval: float = 1.0) -> None:
        self.root = Path(root)
        self.limits = limits or Limits()
        self.clock = clock
        self.store = BlobStore(self.root)
        self.transfers = Transfers(self.store, self)
        self.index: Index | None = None
        self.reserved = 0
        self._leases: collections.Counter[str] = collections.Counter()
        self._batch = AccessBatch()
        self._flush_interval = flush_interval
        self._tasks: list[asyncio.Task[None]] = []
        self._space_lock: asyncio.Lock | None = None
        self._lock_fd = -1
        self._last_expiry = 0.0
        self._enforcing: asyncio.Task[None] | None = None

    # --- lifecycle

    def open(self) -> None:
        """Lock the directory, open the index; after an unclean stop, make files and index agree."""
        self.store.create_dirs()
        self._lock_fd = _lock(self.root / LOCK_NAME)
        try:
            self.index = Index(self.root / INDEX_NAME, pins=self.limits.pins)
            removed = self.store.remove_temp_files()
            if removed:
                log.info("removed %d unfinished file(s) left in %s", removed, self.store.tmp)
            if self.index.meta("running") == "1":
                log.warning("the previous run did not stop cleanly; checking the cache against its index")
                report = maintenance.reconcile(self.store, self.index, self.clock)
                log.warning("cache checked: %s", report)
            self.index.set_meta("running", "1")
        except BaseException:
            self._release_lock()
            raise

    async def start(self) -> None:
        if self.index is None:
            self.open()
        self._space_lock = asyncio.Lock()
        self._last_expiry = time.monotonic() - EXPIRY_INTERVAL + MAINTENANCE_INTERVAL
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._flush_periodically(), name="index flush"),
                       loop.create_task(self._maintain_periodically(), name="cache limits")]

    async def close(self, drain: float = 5.0) -> None:
        await self.transfers.wait_all(drain)
        self.transfers.cancel_all()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self.flush()
        if self.index is not None:
            self.index.set_meta("running", "0")
            self.index.close()
            self.index = None
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    @property
    def _idx(self) -> Index:
        if self.index is None:
            raise RuntimeError("cache is not open")
        return self.index

    # --- content

    def entry(self, digest: Digest) -> Entry | None:
        return self._idx.content(str(digest))

    async def open_file(self, entry: Entry) -> CachedFile | None:
        """Open a stored file for reading; a row whose file is gone counts as a miss."""
        path = self.store.path(Digest.parse(entry.digest))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if self._idx.content(entry.digest) is not None:
                log.warning("cache file of %s is missing; dropping its index entry", entry.digest)
                await asyncio.to_thread(self._idx.remove_content, [entry.digest])
            return None
        self._leases[entry.digest] += 1
        return CachedFile(fd, entry.size, lambda: self._unlease(entry.digest))

    def lease(self, digest: str) -> Callable[[], None]:
        """Keep ``digest`` from eviction and expiry until the returned function is called."""
        self._leases[digest] += 1
        return lambda: self._unlease(digest)

    def _unlease(self, digest: str) -> None:
        self._leases[digest] -= 1
        if self._leases[digest] <= 0:
            del self._leases[digest]

    async def read_small(self, entry: Entry) -> bytes | None:
        """The bytes of a small stored file (a manifest); None if the file is gone."""
        file = await self.open_file(entry)
        if file is None:
            return None
        try:
            return await asyncio.to_thread(os.pread, file.fd, entry.size, 0)
        finally:
            file.close()

    def transfer(self, digest: Digest) -> Transfer | None:
        return self.transfers.get(digest)

    def start_transfer(
        self,
        digest: Digest,
        open_source: Callable[[], Awaitable[Source]],
        *,
        upstream: str,
        repository: str,
        shared: bool = True,
    ) -> Transfer:
        """Fetch a blob once into the store; readers follow the returned transfer."""

        async def commit(temp: TempBlob, transfer: Transfer) -> None:
            now = self.clock()
            entry = Entry(str(digest), temp.written, None, "blob", now, now)
            await asyncio.to_thread(self._commit, temp, entry, upstream, repository)
            self.count("bytes_fetched", temp.written)

        return self.transfers.start(digest, open_source, commit, shared=shared)

    def _commit(self, temp: TempBlob, entry: Entry, upstream: str, repository: str) -> None:
        self.store.commit(temp)
        self._idx.add_content(entry, upstream, repository)

    async def put_manifest(self, digest: Digest, data: bytes, media_type: str | None,
                           upstream: str, repository: str) -> bool:
        """Store a manifest already verified against its digest; False if there is no room."""
        if not await self.reserve(len(data)):
            return False
        try:
            now = self.clock()
            entry = Entry(str(digest), len(data), media_type, "manifest", now, now)

            def write() -> None:
                self.store.write_bytes(digest, data)
                self._idx.add_content(entry, upstream, repository)

            await asyncio.to_thread(write)
        except OSError as exc:
            log.warning("could not cache manifest %s: %s", digest, exc.strerror or exc)
            self.disk_full()
            return False
        finally:
            self.release(len(data))
        self.count("bytes_fetched", len(data))
        return True

    # --- tags

    def tag(self, upstream: str, repository: str, tag: str) -> TagEntry | None:
        return self._idx.tag(upstream, repository, tag)

    def tags_of(self, upstream: str, repository: str) -> list[str]:
        return self._idx.tags_of(upstream, repository)

    async def put_tag(self, entry: TagEntry) -> None:
        await asyncio.to_thread(self._idx.put_tag, entry)

    async def delete_tag(self, upstream: str, repository: str, tag: str) -> None:
        await asyncio.to_thread(self._idx.delete_tag, upstream, repository, tag)

    def set_limits(self, limits: Limits) -> None:
        """New limits (a reload); pinned flags are recomputed if the pin list changed."""
        if limits.pins != self.limits.pins and self.index is not None:
            self.index.set_pins(limits.pins)
        self.limits = limits

    # --- space

    def capacity(self) -> int:
        """max_size in bytes."""
        return resolve(self.limits.max_size, filesystem(self.root).total)

    def usage(self) -> tuple[int, int, int]:
        """(bytes stored, bytes reserved by transfers, capacity)."""
        return self._idx.totals()[1], self.reserved, self.capacity()

    def _shortfall(self, wanted: int) -> int | None:
        fs = filesystem(self.root)
        return shortfall(used=self._idx.totals()[1], reserved=self.reserved, wanted=wanted,
                         capacity=resolve(self.limits.max_size, fs.total),
                         low_watermark=self.limits.low_watermark, disk_available=fs.available,
                         min_free=resolve(self.limits.min_free, fs.total))

    async def reserve(self, size: int) -> bool:
        """Room for ``size`` more bytes, evicting if needed; False means: do not cache it."""
        assert self._space_lock is not None, "cache not started"
        async with self._space_lock:
            need = self._shortfall(size)
            if need is None:
                return False
            if need > 0:
                try:
                    await self._evict(need, f"to make room for {humanize.size(size)}")
                except (sqlite3.Error, OSError) as exc:
                    # a full disk can fail the index's own writes: do not cache, keep serving
                    log.warning("could not make room for %s in the cache (%s); not caching it",
                                humanize.size(size), exc)
                    return False
                if self._shortfall(size) != 0:
                    return False
            self.reserved += size
            return True

    def release(self, size: int) -> None:
        self.reserved -= size

    def spill_room(self, size: int) -> bool:
        """Room for ``size`` bytes of content passing through outside the cache (not counted
        in max_size): the filesystem must keep min_free."""
        fs = filesystem(self.root)
        return fs.available - size >= resolve(self.limits.min_free, fs.total)

    def disk_full(self) -> None:
        """A write failed for lack of space: bring the cache back within its limits soon."""
        if self._enforcing is None or self._enforcing.done():
            self._enforcing = asyncio.get_running_loop().create_task(self.enforce(), name="cache limits")

    async def enforce(self) -> int:
        """Evict until the cache is within max_size and min_free; returns bytes freed."""
        assert self._space_lock is not None, "cache not started"
        async with self._space_lock:
            need = self._shortfall(0)
            return await self._evict(need, "to stay within the cache limits") if need else 0

    async def _evict(self, need: int, why: str) -> int:
        """Remove least recently used, unpinned, unleased entries until ``need`` bytes are freed."""
        await self.flush()  # so the index's access times are current
        freed, removed = 0, 0
        cursor: tuple[float, str] | None = None
        while freed < need:
            candidates = self._idx.lru(256, after=cursor)
            if not candidates:
                break
            cursor = (candidates[-1].last_access, candidates[-1].digest)
            chosen = []
            for entry in candidates:
                if entry.digest in self._leases:
                    continue
                chosen.append(entry.digest)
                freed += entry.size
                if freed >= need:
                    break
            if chosen:
                # a transfer cancelled while it makes room must not leave the removal running
                # outside the space lock: finish it, then stop
                work = asyncio.ensure_future(asyncio.to_thread(maintenance.remove, self.store, self._idx, chosen))
                try:
                    await asyncio.shield(work)
                except asyncio.CancelledError:
                    await work
                    raise
                removed += len(chosen)
        used, _, capacity = self.usage()
        level = logging.INFO if freed >= need else logging.WARNING
        log.log(level, "evicted %d entr%s (%s) %s; cache holds %s of %s%s", removed,
                "y" if removed == 1 else "ies", humanize.size(freed), why, humanize.size(used), humanize.size(capacity),
                "" if freed >= need else f" (wanted to free {humanize.size(need)}: the rest is pinned or in use)")
        return freed

    async def expire(self) -> tuple[int, int]:
        """Delete content not accessed within its TTL; returns (entries, bytes)."""
        await self.flush()
        now = self.clock()
        entries, freed = 0, 0
        for kind, ttl in (("blob", self.limits.blob_ttl), ("manifest", self.limits.manifest_ttl)):
            if ttl <= 0:
                continue
            skip: set[str] = set()
            while True:
                batch = [e for e in self._idx.expired(kind, now - ttl, 500 + len(skip)) if e.digest not in skip]
                leased = {e.digest for e in batch if e.digest in self._leases}
                skip |= leased
                chosen = [e for e in batch if e.digest not in leased]
                if not chosen:
                    break
                await asyncio.to_thread(maintenance.remove, self.store, self._idx, [e.digest for e in chosen])
                entries += len(chosen)
                freed += sum(e.size for e in chosen)
        tag_ttl = max(self.limits.blob_ttl, self.limits.manifest_ttl)
        if tag_ttl > 0:
            await asyncio.to_thread(self._idx.delete_tags_before, now - tag_ttl)
        if entries:
            log.info("expired %d entr%s (%s) not used within their TTL", entries,
                     "y" if entries == 1 else "ies", humanize.size(freed))
        return entries, freed

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

    async def _maintain_periodically(self) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            try:
                await self.enforce()
                if time.monotonic() - self._last_expiry >= EXPIRY_INTERVAL:
                    self._last_expiry = time.monotonic()
                    await self.expire()
            except Exception:
                log.exception("cache maintenance failed")


def _lock(path: Path) -> int:
    """Hold an exclusive lock on the cache directory for this process's lifetime."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise CacheBusy(f"{path.parent} is in use by another docker-mirror server (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


