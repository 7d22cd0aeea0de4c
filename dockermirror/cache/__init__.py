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
  by a background task;
* a file is served only if its size is the index's and it is unchanged since it was
  verified (inode, mtime, ctime), else it is re-hashed first; a file a check found bad is
  never served again, and a response reading it is cut off before its last byte;
* an index write that fails (a full or read-only filesystem) never fails a request:
  the cache runs degraded (serves what it has, passes the rest through uncached).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from dockermirror.cache import maintenance, threads
from dockermirror.lograte import RateLimited
from dockermirror.cache.index import (
    IMMUTABLE,
    MEMORY,
    RW,
    AccessBatch,
    Entry,
    ForeignDatabase,
    Index,
    ReferrersEntry,
    TagEntry,
)
from dockermirror.cache.inflight import Follower, Source, Transfer, Transfers
from dockermirror.cache.space import Limits, filesystem, resolve, shortfall
from dockermirror.cache.store import BlobStore, FileRange, TempBlob, open_regular, stamp, unchanged_since
from dockermirror import humanize
from dockermirror.meter import NULL_METER, Meter
from dockermirror.oci import Digest

__all__ = ["Cache", "CacheBusy", "CachedFile", "CorruptFile", "Entry", "FileRange", "Follower", "Limits",
           "ReferrersEntry", "TagEntry", "Transfer"]

log = logging.getLogger("dockermirror.cache")
room_log = RateLimited(log)    # per request while the disk is full: one warning a period

INDEX_NAME = "index.sqlite"
LOCK_NAME = "lock"
RECHECK_NAME = "index.recheck"   # present: check every file against the index at the next start
MAINTENANCE_INTERVAL = 60.0      # check limits this often
EXPIRY_INTERVAL = 600.0          # expire by TTL this often
PROBE_INTERVAL = 10.0            # degraded: try an index write this often
# a stop: transfers get `drain` s (close()) to end, then this long once cancelled (a commit under
# way); with uvicorn's 20 s for connections it stays within systemd's TimeoutStopSec=30
CANCEL_WAIT = 2.0
REMOVAL_MARK_TTL = 600.0         # another process's mark that a file is being removed counts this long
VERIFY_START = 300.0             # the background re-verification starts this long after start-up
VERIFY_ROUND = 86400.0           # and begins a new round of every file at most this often
VERIFY_CHUNK = 1024 * 1024
VERIFY_MIN_COST = 64 * 1024      # bytes of the rate a small file counts for


class CacheBusy(Exception):
    """Another server process holds this cache directory."""


class CorruptFile(Exception):
    """A cached file a response was reading turned out not to be what its digest says."""


class CachedFile:
    """An open, committed cache file, read by one response. Holds a lease until closed.

    Its last byte is sent only after a last check: a file that a check found bad (``bad``)
    or that changed on disk while it was sent ends in a cut-off response, never a complete one.
    """

    def __init__(self, fd: int, size: int, on_close: Callable[[], None] = lambda: None,
                 stamp: str | None = None, path: Path | None = None) -> None:
        self.fd = fd
        self.path = path            # its place in the cache (where an eviction removes it from)
        self.size = size
        self.stamp = stamp
        self.bad: str | None = None
        self._on_close = on_close

    async def read(self, start: int = 0, end: int | None = None) -> AsyncIterator[FileRange]:
        """The range asked for, as pieces of the open file (the last byte apart)."""
        try:
            end = self.size if end is None else end
            if end - start > 1:
                yield FileRange(self.fd, start, end - 1 - start)
                start = end - 1
            self.check()
            if end > start:
                yield FileRange(self.fd, start, end - start)
        finally:
            self.close()

    def check(self) -> None:
        if self.bad is None and self.stamp is not None and self.fd >= 0:
            st = os.fstat(self.fd)
            # removed while it was sent (an eviction that chose it just before this response
            # leased it, or `cache prune`): that moves the ctime, not the bytes
            if st.st_size != self.size or not unchanged_since(self.stamp, st, self.path):
                self.bad = "the file changed on disk while it was sent"
        if self.bad is not None:
            raise CorruptFile(self.bad)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._on_close()


class Cache:
    """Files, index, transfers and limits under one cache directory."""

    def __init__(self, root: Path, *, limits: Limits | None = None, clock: Callable[[], float] = time.time,
                 flush_interval: float = 1.0, meter: Meter = NULL_METER) -> None:
        self.root = Path(root)
        self.limits = limits or Limits()
        self.clock = clock
        self.meter = meter
        self.store = BlobStore(self.root)
        self.transfers = Transfers(self.store, self, meter, direct_writes=lambda: self.limits.direct_writes)
        self.index: Index | None = None
        self.reserved = 0
        self._leases: collections.Counter[str] = collections.Counter()
        # digests this process is removing (eviction, expiry, a corrupt file): their files go before
        # their rows, and a request that finds the file gone meanwhile is a miss, not a missing file
        self._removing: collections.Counter[str] = collections.Counter()
        self._batch = AccessBatch()
        self._flush_interval = flush_interval
        self._tasks: list[asyncio.Task[None]] = []
        self._space_lock: asyncio.Lock | None = None
        self._lock_fd = -1
        self._last_expiry = 0.0
        self._enforcing: asyncio.Task[None] | None = None
        self.degraded: str | None = None      # why the cache cannot be written, while it cannot
        self._write_failed = False            # a write failed this run: check the files at the next start
        self._last_probe = 0.0
        self._index_id: tuple[int, int] | None = None
        self._index_lost = False              # the index file was replaced (or could not be rewritten)
        self._readers: dict[str, set[CachedFile]] = {}
        self._bad: dict[str, str] = {}        # digest -> what a check found, until it is gone or fetched again
        self._checks: dict[tuple[str, str], asyncio.Task[str | None]] = {}
        self._verified: dict[str, str] = {}   # digest -> stamp verified while the index could not record it
        self.verify_start = VERIFY_START
        self.verified_rounds = 0

    # --- lifecycle

    def open(self) -> None:
        """Lock the directory, open the index; after an unclean stop, or with files the index does
        not know (it was deleted or replaced), make files and index agree. A filesystem that is
        full or read-only does not stop the start: the cache then runs degraded."""
        try:
            self.store.create_dirs()
        except OSError as exc:
            log.warning("cannot create the cache directories in %s: %s", self.root, exc.strerror or exc)
        self._lock_fd = _lock(self.root / LOCK_NAME)
        try:
            self._open_index()
        except BaseException:
            if self.index is not None:
                self.index.close()
                self.index = None
            self._release_lock()
            raise

    def _open_index(self) -> None:
        path = self.root / INDEX_NAME
        try:
            self.index = Index(path, pins=self.limits.pins)
        except ForeignDatabase:
            raise
        except (sqlite3.Error, OSError) as exc:
            self._degrade(exc, "opening the index")
            try:
                self.index = Index(path, pins=self.limits.pins, mode=IMMUTABLE)
                log.error("serving the cache as it is, read-only, from %s", path)
            except (sqlite3.Error, OSError, ForeignDatabase) as again:
                self.index = Index(path, pins=self.limits.pins, mode=MEMORY)
                log.error("cannot read %s either (%s): nothing cached is served; everything passes through",
                          path, again)
            return
        self._index_id = self.index.identity()
        try:
            try:
                removed = self.store.remove_temp_files()
            except FileNotFoundError:
                removed = 0
            if removed:
                log.info("removed %d unfinished file(s) left in %s", removed, self.store.tmp)
            recheck = self.root / RECHECK_NAME
            why = None
            if self.index.meta("running") == "1":
                why = "the previous run did not stop cleanly"
            elif recheck.exists():
                why = f"{path} was replaced while the previous run used it"
            elif self.index.totals()[0] == 0 and self.store.has_files():
                why = f"{path} is new or empty, but {self.store.blobs} holds files"
            if why is not None:
                log.warning("%s; checking the cache against its index", why)
                report = maintenance.reconcile(
                    self.store, self.index, self.clock,
                    on_unusable=lambda where, problem: log.warning(
                        "%s: %s; going on with the rest", humanize.printable(os.fsencode(where), quote=False), problem))
                log.warning("cache checked: %s", report)
                recheck.unlink(missing_ok=True)
            self.index.set_meta("running", "1")
        except (sqlite3.Error, OSError) as exc:
            self._degrade(exc, "starting")
            return
        try:
            self.index.drop_removal_marks(time.time() - REMOVAL_MARK_TTL)   # of a command that was killed
        except sqlite3.Error as exc:
            log.debug("could not drop old removal marks: %s", exc)

    def _degrade(self, exc: BaseException, doing: str) -> None:
        """A write to the cache failed: say so once, and run degraded until a write succeeds."""
        reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)
        self._write_failed = True
        if self.degraded is None:
            self.degraded = reason
            log.error("the cache cannot be written (%s, while %s): serving what is cached and passing "
                      "everything else through uncached until it can", reason, doing)
        else:
            log.debug("cache write failed while %s: %s", doing, reason)

    async def _write(self, doing: str, call: Callable[..., object], *args: object) -> bool:
        """An index (or file) write from the request path: False, never an error, if it fails.
        A cancellation waits for the write's thread to return (the caller may close what it uses)."""
        def failed(exc: BaseException) -> None:    # while this was being cancelled
            if isinstance(exc, (sqlite3.Error, OSError)):
                self._degrade(exc, doing)

        try:
            await threads.to_end(call, *args, on_error=failed)
        except (sqlite3.Error, OSError) as exc:
            self._degrade(exc, doing)
            return False
        return True

    async def _remove(self, doing: str, digests: list[str]) -> bool:
        """Remove entries (files, then rows) with :meth:`_write`; meanwhile they are marked as being removed."""
        self._removing.update(digests)
        try:
            # (no marks in the index: this process knows, and must free space even when the index is full)
            return await self._write(doing, functools.partial(maintenance.remove, mark=False),
                                     self.store, self._idx, digests)
        finally:
            self._removing -= collections.Counter(digests)     # (drops the counts that reach 0)

    async def _probe(self) -> None:
        """Degraded: is the index writable again?"""
        if self.degraded is None or self.index is None or self.index.mode != RW:
            return
        if time.monotonic() - self._last_probe < PROBE_INTERVAL:
            return
        self._last_probe = time.monotonic()
        try:
            await asyncio.to_thread(self.index.set_meta, "running", "1")
        except (sqlite3.Error, OSError):
            return
        log.warning("the cache can be written again (it could not: %s); caching resumes", self.degraded)
        self.degraded = None

    async def start(self) -> None:
        if self.index is None:
            self.open()
        self._space_lock = asyncio.Lock()
        self._last_expiry = time.monotonic() - EXPIRY_INTERVAL + MAINTENANCE_INTERVAL
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._flush_periodically(), name="index flush"),
                       loop.create_task(self._maintain_periodically(), name="cache limits"),
                       loop.create_task(self._verify_periodically(), name="cache verification")]

    async def close(self, drain: float = 5.0) -> None:
        await self.transfers.wait_all(drain)
        await self.transfers.cancel_all(CANCEL_WAIT)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self.flush()
        if self.index is not None:
            await self._watch_index()
            if self.index.mode == RW and not self._index_lost:
                try:
                    # a write failed: the files may not match the index, check them at the next start
                    self.index.set_meta("running", "1" if self._write_failed else "0")
                except (sqlite3.Error, OSError) as exc:
                    log.warning("could not record a clean stop in the index (%s)", exc)
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
        """Open a stored file for reading; None (a miss: fetch it again) if the file is gone, has
        another size than the index says, or changed since it was verified and no longer
        hashes to its digest (it is then removed)."""
        path = self.store.path(Digest.parse(entry.digest))
        try:
            fd, st = open_regular(path)    # (a FIFO in its place must not stop the event loop)
        except (FileNotFoundError, NotADirectoryError):
            if not self._being_removed(entry.digest) and self._idx.content(entry.digest) is not None:
                log.warning("cache file of %s is missing; dropping its index entry", entry.digest)
                await self._write("dropping the entry of a missing file", self._idx.remove_content, [entry.digest])
            return None
        except OSError as exc:      # unreadable, or not a regular file: a miss too, once the entry is gone
            await self._drop_unusable(entry.digest, exc)
            return None
        # leased before the first await: an eviction must not remove it while it is checked
        self._leases[entry.digest] += 1
        try:
            problem = self._bad.get(entry.digest)
            if problem is None and st.st_size != entry.size:
                problem = f"the file has {st.st_size} bytes, the index says {entry.size}"
            if (problem is None and stamp(st) != entry.stamp and self._verified.get(entry.digest) != stamp(st)
                    and not (entry.stamp is not None and unchanged_since(entry.stamp, st, path))):
                problem = await self._check(entry, fd, st)
        except BaseException:
            os.close(fd)
            self._unlease(entry.digest)
            raise
        if problem is not None:
            os.close(fd)
            self._unlease(entry.digest)
            await self._discard(entry.digest, st, problem)
            return None
        file = CachedFile(fd, entry.size, lambda: self._unlease(entry.digest, file), stamp=stamp(st), path=path)
        self._readers.setdefault(entry.digest, set()).add(file)
        return file

    async def _drop_unusable(self, digest: str, exc: OSError) -> None:
        """A stored file cannot be opened (no permission) or is not a regular file: say so once,
        remove what is in its place if possible, and drop its row, so the next request fetches it again."""
        if self._being_removed(digest) or self._idx.content(digest) is None:
            return
        self._removing[digest] += 1     # (concurrent requests for it: a miss, without a line of their own)
        try:
            removed = "removing it"
            try:
                await asyncio.to_thread(self.store.remove, Digest.parse(digest))
            except OSError as failed:
                removed = f"could not remove it: {failed.strerror or failed}"
            log.warning("cache file of %s cannot be used (%s); %s and dropping its index entry: the next "
                        "request fetches it again", digest, exc.strerror or exc, removed)
            await self._write("dropping the entry of an unusable file", self._idx.remove_content, [digest])
        finally:
            self._removing -= collections.Counter([digest])

    def _being_removed(self, digest: str) -> bool:
        """Whether this process, or another (``docker-mirror cache prune | rm | verify --repair``,
        by its mark in the index: read before the row), is removing ``digest``'s file and row."""
        if digest in self._removing:
            return True
        marked = self._idx.removal_mark(digest)
        return marked is not None and marked > time.time() - REMOVAL_MARK_TTL   # (wall time, as marked)

    def lease(self, digest: str) -> Callable[[], None]:
        """Keep ``digest`` from eviction and expiry until the returned function is called."""
        self._leases[digest] += 1
        return lambda: self._unlease(digest)

    def _unlease(self, digest: str, file: CachedFile | None = None) -> None:
        readers = self._readers.get(digest)
        if readers is not None:
            readers.discard(file)
            if not readers:
                del self._readers[digest]
        self._leases[digest] -= 1
        if self._leases[digest] <= 0:
            del self._leases[digest]

    async def _check(self, entry: Entry, fd: int, st: os.stat_result) -> str | None:
        """Re-hash a file that changed since it was verified (once for concurrent readers of it);
        what is wrong with it, or None (then its present state is recorded as verified)."""
        key = (entry.digest, stamp(st))
        task = self._checks.get(key)
        if task is None:
            digest = Digest.parse(entry.digest)
            own = os.dup(fd)

            async def run() -> str | None:
                try:
                    try:
                        actual, size = await asyncio.to_thread(maintenance.hash_fd, own, digest.algorithm)
                    except OSError as exc:
                        return f"cannot be read: {exc.strerror or exc}"
                    if size != entry.size or actual != digest.hex:
                        return f"{size} bytes hashing to {digest.algorithm}:{actual}"
                    if entry.stamp is not None:
                        log.warning("cache file of %s changed on disk (inode, mtime or ctime) but still "
                                    "matches its digest; serving it", entry.digest)
                    if not await self._write("recording a verified file", self._idx.set_stamp, entry.digest, key[1]):
                        self._verified[entry.digest] = key[1]   # the index cannot say it: remember it here
                    return None
                finally:
                    os.close(own)
                    self._checks.pop(key, None)

            task = self._checks[key] = asyncio.get_running_loop().create_task(run(), name=f"check {digest}")
        return await asyncio.shield(task)

    async def _discard(self, digest: str, st: os.stat_result, problem: str) -> None:
        """A stored file is not what its digest says: never serve it again; cut off the responses
        reading it before their last byte; remove it (unless a good copy replaced it meanwhile)."""
        if digest not in self._bad:
            log.warning("cache file of %s is corrupt (%s): removing it; the next request fetches it again",
                        digest, problem)
            self.meter.verification_failed("disk")
        self._bad[digest] = problem
        self._verified.pop(digest, None)
        for file in self._readers.get(digest, ()):
            file.bad = f"the cached file is corrupt ({problem})"
        path = self.store.path(Digest.parse(digest))
        try:
            if os.stat(path).st_ino != st.st_ino:
                self._bad.pop(digest, None)   # a new, verified copy was committed meanwhile
                return
        except FileNotFoundError:
            pass
        if await self._remove("removing a corrupt file", [digest]):
            self._bad.pop(digest, None)

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
            if await self._write(f"storing {digest}", self._commit, temp, entry, upstream, repository):
                self._bad.pop(str(digest), None)
                self.count_fetched(upstream, temp.written)

        transfer = self.transfers.start(digest, open_source, commit, shared=shared)
        transfer.origin = (upstream, repository)
        return transfer

    def _commit(self, temp: TempBlob, entry: Entry, upstream: str | None, repository: str | None) -> None:
        """Move a verified file into place and index it; without its row, no file stays."""
        self.store.commit(temp)
        try:
            self._idx.add_content(dataclasses.replace(entry, stamp=temp.stamp), upstream, repository)
        except BaseException:
            self.store.remove(temp.digest)
            raise

    async def put_manifest(self, digest: Digest, data: bytes, media_type: str | None,
                           upstream: str, repository: str) -> bool:
        """Store a manifest already verified against its digest; False if there is no room."""
        if not await self.reserve(len(data)):
            return False
        try:
            now = self.clock()
            entry = Entry(str(digest), len(data), media_type, "manifest", now, now)

            def write() -> None:
                temp = self.store.new_temp(digest)
                try:
                    temp.write([data])
                    self._commit(temp, entry, upstream, repository)
                finally:
                    temp.discard()

            await asyncio.to_thread(write)
        except OSError as exc:
            log.warning("could not cache manifest %s: %s", digest, exc.strerror or exc)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self.disk_full()
            else:
                self._degrade(exc, f"storing manifest {digest}")
            return False
        except sqlite3.Error as exc:
            self._degrade(exc, f"indexing manifest {digest}")
            return False
        finally:
            self.release(len(data))
        self._bad.pop(str(digest), None)
        self.count_fetched(upstream, len(data))
        return True

    # --- tags

    def tag(self, upstream: str, repository: str, tag: str, accept: str | None = None) -> TagEntry | None:
        return self._idx.tag(upstream, repository, tag, accept)

    def tags_of(self, upstream: str, repository: str) -> list[str]:
        return self._idx.tags_of(upstream, repository)

    async def put_tag(self, entry: TagEntry) -> bool:
        """Record a tag's digest; False (the tag is just not cached) if the index cannot be written."""
        return await self._write(f"recording tag {entry.tag}", self._idx.put_tag, entry)

    async def delete_tag(self, upstream: str, repository: str, tag: str, accept: str | None = None) -> bool:
        """Forget a tag's row for one accept class (None: every row); False if the index cannot be written."""
        return await self._write(f"forgetting tag {tag}", self._idx.delete_tag, upstream, repository, tag, accept)

    # --- referrers answers (a row like a tag's; the answer itself is stored as content)

    def referrers(self, upstream: str, repository: str, subject: str, artifact_type: str) -> ReferrersEntry | None:
        return self._idx.referrers(upstream, repository, subject, artifact_type)

    async def put_referrers(self, entry: ReferrersEntry) -> bool:
        return await self._write(f"recording the referrers of {entry.subject}", self._idx.put_referrers, entry)

    async def delete_referrers(self, upstream: str, repository: str, subject: str, artifact_type: str) -> bool:
        return await self._write(f"forgetting the referrers of {subject}", self._idx.delete_referrers,
                                 upstream, repository, subject, artifact_type)

    def touch_referrers(self, upstream: str, repository: str, subject: str, artifact_type: str) -> None:
        self._batch.touch_referrers(upstream, repository, subject, artifact_type, self.clock())

    def set_limits(self, limits: Limits) -> None:
        """New limits (a reload); pinned flags are recomputed if the pin list changed."""
        if limits.pins != self.limits.pins and self.index is not None:
            try:
                self.index.set_pins(limits.pins)
            except (sqlite3.Error, OSError) as exc:
                self._degrade(exc, "recording the new pins")
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
        if self.degraded is not None:
            return False
        async with self._space_lock:
            need = self._shortfall(size)
            if need is None:
                return False
            if need > 0:
                try:
                    await self._evict(need, f"to make room for {humanize.size(size)}")
                except (sqlite3.Error, OSError) as exc:
                    # a full disk can fail the index's own writes: do not cache, keep serving
                    room_log.log("no room", "could not make room for %s in the cache (%s); not caching it",
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
            chosen, chosen_bytes = [], 0
            for entry in candidates:
                if entry.digest in self._leases:
                    continue
                chosen.append(entry.digest)
                chosen_bytes += entry.size
                if freed + chosen_bytes >= need:
                    break
            freed += chosen_bytes
            if chosen:
                # a transfer cancelled while it makes room must not leave the removal running
                # outside the space lock: finish it, then stop
                work = asyncio.ensure_future(self._remove("evicting", chosen))
                try:
                    written = await asyncio.shield(work)
                except asyncio.CancelledError:
                    await work
                    raise
                if not written:
                    freed -= chosen_bytes
                    break
                removed += len(chosen)
                self.meter.evicted("lru", len(chosen), chosen_bytes)
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
                if not await self._remove("expiring", [e.digest for e in chosen]):
                    break
                entries += len(chosen)
                freed += sum(e.size for e in chosen)
                self.meter.evicted("ttl", len(chosen), sum(e.size for e in chosen))
        tag_ttl = max(self.limits.blob_ttl, self.limits.manifest_ttl)
        if tag_ttl > 0:
            await self._write("expiring tags and referrers", self._idx.delete_tags_before, now - tag_ttl)
        if entries:
            log.info("expired %d entr%s (%s) not used within their TTL", entries,
                     "y" if entries == 1 else "ies", humanize.size(freed))
        return entries, freed

    # --- accesses (memory only until the next flush)

    def touch(self, digest: str, upstream: str, repository: str) -> None:
        self._batch.touch(digest, self.clock(), upstream, repository)

    def ref_upstreams(self, digest: str) -> set[str]:
        """The upstreams that have served ``digest`` (recorded, or touched since the last flush)."""
        return self._idx.ref_upstreams(digest) | self._batch.ref_upstreams.get(digest, set())

    def has_ref(self, digest: str, upstream: str, repository: str) -> bool:
        """Whether ``digest`` was served for ``upstream``'s ``repository`` (recorded, or since the last flush)."""
        return (upstream, repository, digest) in self._batch.refs or self._idx.has_ref(upstream, repository, digest)

    def touch_tag(self, upstream: str, repository: str, tag: str) -> None:
        self._batch.touch_tag(upstream, repository, tag, self.clock())

    def count(self, name: str, value: int = 1) -> None:
        self._batch.count(name, value)

    def count_fetched(self, upstream: str | None, nbytes: int) -> None:
        """Bytes fetched and stored, in all and for their upstream (``upstream/<key>/bytes_fetched``)."""
        self.count("bytes_fetched", nbytes)
        if upstream:
            self.count(f"upstream/{upstream}/bytes_fetched", nbytes)

    async def flush(self) -> None:
        batch, self._batch = self._batch, AccessBatch()
        if batch and self.index is not None:
            await self._write("recording accesses", self.index.apply, batch)  # if it fails, they are lost

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            try:
                await self._watch_index()
                await self.flush()
                await self._probe()
            except Exception:
                log.exception("could not record cache accesses in the index")

    async def _watch_index(self) -> None:
        """The index file deleted under the server: write it out again from the open database.
        Replaced by another file: say so loudly, and have the next start check every file."""
        index = self.index
        if index is None or index.mode != RW or self._index_id is None or self._index_lost:
            return
        now = index.identity()
        if now == self._index_id:
            return
        if now is None:
            log.error("%s was deleted while the server runs: writing it out again from the open database",
                      index.path)
            try:
                placed = index.recreate()   # on the event loop, which owns the reader: a moment, once
            except (sqlite3.Error, OSError) as exc:
                log.error("could not write %s again (%s): the next start re-adopts the cached files",
                          index.path, exc)
                self._index_lost = True
                return
            if not placed:
                log.error("another file appeared at %s meanwhile: this server uses its copy %s until it "
                          "stops; the next start checks every cached file against %s", self.root / INDEX_NAME,
                          index.path, self.root / INDEX_NAME)
                self._index_lost = True
                with contextlib.suppress(OSError):
                    (self.root / RECHECK_NAME).touch()
                return
            self._index_id = index.identity()
            entries, nbytes = index.totals()
            log.warning("%s written again (%d entries, %s)", index.path, entries, humanize.size(nbytes))
            return
        log.error("%s was replaced by another file while the server runs: this server keeps using the "
                  "index it opened until it stops (what it records is lost); the next start checks "
                  "every cached file against the new index", index.path)
        self._index_lost = True
        try:
            (self.root / RECHECK_NAME).touch()
        except OSError as exc:
            log.error("could not leave %s for the next start (%s): run `docker-mirror cache verify --repair` "
                      "after a restart", self.root / RECHECK_NAME, exc)

    # --- background re-verification of stored files

    async def _verify_periodically(self) -> None:
        await asyncio.sleep(self.verify_start)
        while True:
            began = time.monotonic()
            try:
                await self.verify_round()
            except Exception:
                log.exception("background verification of the cache failed")
            await asyncio.sleep(max(MAINTENANCE_INTERVAL, VERIFY_ROUND - (time.monotonic() - began)))

    async def verify_round(self) -> tuple[int, int, int]:
        """Re-hash every stored file once, at most ``limits.verify_rate`` bytes a second, removing
        the ones that do not match their digest; resumes where the last round (or run) stopped.
        Returns (files, bytes, corrupt)."""
        cursor = self._idx.meta("verify_cursor") or ""
        files = nbytes = corrupt = 0
        saved = time.monotonic()
        while True:
            if self.limits.verify_rate <= 0:
                await asyncio.sleep(MAINTENANCE_INTERVAL)
                continue
            batch = self._idx.entries_after(cursor, 64)
            if not batch:
                break
            for entry in batch:
                cursor = entry.digest
                result = await self._reverify(entry)
                if result is not None:
                    files += 1
                    nbytes += entry.size
                    corrupt += not result
            if time.monotonic() - saved >= MAINTENANCE_INTERVAL and self.degraded is None:
                saved = time.monotonic()
                await self._write("recording verification progress", self._idx.set_meta, "verify_cursor", cursor)
        if self.degraded is None:
            await self._write("recording verification progress", self._idx.set_meta, "verify_cursor", "")
        self.verified_rounds += 1
        log.log(logging.WARNING if corrupt else logging.INFO,
                "re-verified %d cached file(s) (%s): %d corrupt (removed)", files, humanize.size(nbytes), corrupt)
        return files, nbytes, corrupt

    async def _reverify(self, entry: Entry) -> bool | None:
        """Re-hash one stored file at the configured rate: True if good, False if corrupt (then
        removed), None if it is gone."""
        digest = Digest.parse(entry.digest)
        try:
            fd, st = open_regular(self.store.path(digest))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            await self._drop_unusable(entry.digest, exc)
            return False
        try:
            hasher = hashlib.new(digest.algorithm)
            offset = 0
            while True:
                got = await asyncio.to_thread(_hash_chunk, hasher, fd, offset)
                offset += got
                await asyncio.sleep(max(got, VERIFY_MIN_COST) / max(self.limits.verify_rate, 1))
                if got < VERIFY_CHUNK:
                    break
            if offset != entry.size or hasher.hexdigest() != digest.hex:
                await self._discard(entry.digest, st,
                                    f"{offset} bytes hashing to {digest.algorithm}:{hasher.hexdigest()}")
                return False
            now = stamp(os.fstat(fd))
            if now == stamp(st) != entry.stamp:
                await self._write("recording a verified file", self._idx.set_stamp, entry.digest, now)
            return True
        finally:
            os.close(fd)

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
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
        try:  # a read-only filesystem: lock what is there (nothing can change the cache anyway)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            log.warning("%s is on a read-only filesystem and has no lock file: not locked", path.parent)
            return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise CacheBusy(f"{path.parent} is in use by another docker-mirror server (pid {holder})") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # read-only or full: the lock holds without the pid in it
    return fd


def _hash_chunk(hasher: "hashlib._Hash", fd: int, offset: int) -> int:
    data = os.pread(fd, VERIFY_CHUNK, offset)
    hasher.update(data)
    return len(data)


