"""Work on a whole cache: removal, crash recovery, verification, pruning, statistics.

Blocking functions over a :class:`BlobStore` and its :class:`Index`; the server calls
them from worker threads, the ``docker-mirror cache`` commands call them directly (also
while a server runs: SQLite serialises the writes, and a file deleted under a reader
stays readable through the reader's open descriptor).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dockermirror.cache.index import AccessBatch, Entry, Index
from dockermirror.cache.store import BlobStore, open_regular, unlink_any
from dockermirror.cache.store import walk_problem
from dockermirror.cache.store import stamp as store_stamp
from dockermirror.oci import MANIFEST_TYPES, Digest

HASH_CHUNK = 4 * 1024 * 1024
MANIFEST_MAX = 4 * 1024 * 1024   # the largest manifest a file without a row is looked into for
ADOPT_BATCH = 1000               # files without a row indexed per transaction
REMOVE_BATCH = 500               # entries removed per pair of transactions (marks, rows)


# the index's lifetime counters of entries (and bytes) an operator's command removed
# (`docker-mirror cache prune | rm`, another process): the server's metrics read them
MANUAL_EVICTIONS, MANUAL_EVICTED_BYTES = "evictions_manual", "evicted_bytes_manual"


def count_manual(index: Index, entries: int, nbytes: int) -> None:
    """Add removals by an operator's command to the index's counters."""
    if entries:
        batch = AccessBatch()
        batch.count(MANUAL_EVICTIONS, entries)
        batch.count(MANUAL_EVICTED_BYTES, nbytes)
        index.apply(batch)


def remove(store: BlobStore, index: Index, digests: Iterable[str], *, mark: bool = True,
           clock: Callable[[], float] = time.time) -> int:
    """Delete entries, REMOVE_BATCH at a time: files first (renamed away, then unlinked), then
    their rows. With ``mark`` the rows are first marked as being removed (see
    :meth:`Index.mark_removing`), so that a server running meanwhile takes a file found gone for
    a miss, not a lost file; if the index cannot take the marks because the disk is full, the
    files still go first, which frees the space the rows' removal needs. Returns the bytes the
    rows held."""
    digests = list(digests)
    freed = 0
    for start in range(0, len(digests), REMOVE_BATCH):
        batch = digests[start:start + REMOVE_BATCH]
        if mark:
            try:
                index.mark_removing(batch, clock())
            except sqlite3.Error as exc:
                if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
                    raise       # (locked, unreadable: nothing is removed, the command says why)
        for digest in batch:
            store.remove(Digest.parse(digest))
        freed += index.remove_content(batch)
    return freed


def hash_file(path: os.PathLike, algorithm: str) -> tuple[str, int]:
    """(hex digest, size) of a file, read in large chunks."""
    fd, _ = open_regular(path)
    try:
        return hash_fd(fd, algorithm)
    finally:
        os.close(fd)


def hash_fd(fd: int, algorithm: str) -> tuple[str, int]:
    """(hex digest, size) of an open file, from its start."""
    hasher = hashlib.new(algorithm)
    size = 0
    while chunk := os.pread(fd, HASH_CHUNK, size):
        hasher.update(chunk)
        size += len(chunk)
    return hasher.hexdigest(), size


def _kind(fd: int, size: int) -> tuple[str, str | None]:
    """('manifest', its media type) for a file that is a manifest which names its type, else ('blob', None)."""
    if size > MANIFEST_MAX:
        return "blob", None
    try:
        document = json.loads(os.pread(fd, size, 0))
    except ValueError:
        return "blob", None
    media_type = document.get("mediaType") if isinstance(document, dict) else None
    if isinstance(media_type, str) and media_type in MANIFEST_TYPES and "schemaVersion" in document:
        return "manifest", media_type
    return "blob", None


def adoptable(digest: Digest, path: os.PathLike, clock: Callable[[], float]) -> Entry | None:
    """The entry for a file that has no row, if its bytes hash to its name (a manifest as a
    manifest); else None, and the file is deleted. Its access time is its mtime, so eviction
    takes it early."""
    try:
        fd, st = open_regular(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError:   # a symbolic link, not a regular file, or nothing we can read
        fd, st = -1, None
    try:
        if st is not None:
            actual, size = hash_fd(fd, digest.algorithm)
            if actual == digest.hex and size == st.st_size:
                kind, media_type = _kind(fd, size)
                return Entry(str(digest), size, media_type, kind, st.st_mtime, min(st.st_mtime, clock()),
                             stamp=store_stamp(st))
    finally:
        if fd >= 0:
            os.close(fd)
    unlink_any(path)
    return None


def adopt(index: Index, digest: Digest, path: os.PathLike, clock: Callable[[], float]) -> bool:
    """Index a file that has no row if it is what its name says, else delete it; True if adopted."""
    entry = adoptable(digest, path, clock)
    if entry is not None:
        index.add_contents([entry])
    return entry is not None


@dataclass
class Unusable:
    """Something in the place of a directory of the cache's files that cannot be walked."""
    path: str        # relative to the cache directory
    problem: str     # what it is, and what was done about it
    removed: bool = False


@dataclass
class Report:
    checked: int = 0
    missing: list[str] = field(default_factory=list)     # rows without a file
    corrupt: list[str] = field(default_factory=list)     # files whose bytes do not match
    adopted: list[str] = field(default_factory=list)     # verified files without a row, now indexed
    stray: list[str] = field(default_factory=list)       # files that are not valid content (removed)
    misplaced: list[str] = field(default_factory=list)   # a file where a directory of the cache should be
    unusable: list[Unusable] = field(default_factory=list)   # directories of the tree not walked
    kept: list[str] = field(default_factory=list)   # entries under one that cannot be read: not removed

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.corrupt) + len(self.misplaced) + len(self.unusable)

    @property
    def removed(self) -> int:
        """With ``repair``: how many of the problems were removed."""
        return (len(self.missing) + len(self.corrupt) - len(self.kept) + len(self.misplaced)
                + sum(u.removed for u in self.unusable))

    def __str__(self) -> str:
        return (f"{self.checked} entries checked, {len(self.missing)} missing, {len(self.corrupt)} corrupt, "
                f"{len(self.adopted)} unindexed file(s) adopted, {len(self.stray)} stray file(s) removed")


def reconcile(store: BlobStore, index: Index, clock: Callable[[], float],
              on_unusable: Callable[[str, str], None] = lambda path, problem: None) -> Report:
    """After an unclean stop: drop rows whose file is gone or has the wrong length, and
    adopt (after re-hashing) or remove files that have no row. Files with a row and the
    right length are trusted: they were fsynced before their row was written.
    One query and one walk of the directory tree, whatever the number of entries.
    A directory of the tree that cannot be walked is passed to ``on_unusable`` (its path,
    what is wrong) and left as it is, and so are the rows of the files it would hold."""
    report = Report()
    known = index.sizes()
    report.checked = len(known)
    seen: set[str] = set()
    adopted: list[Entry] = []
    unwalked: list[str] = []

    def unusable(path, exc: OSError) -> None:
        if not _not_a_directory(exc):
            unwalked.append(os.fspath(path))   # (rows of files in a directory not read: kept)
        report.unusable.append(Unusable(str(path.relative_to(store.root)), walk_problem(path, exc)))
        on_unusable(os.fspath(path), walk_problem(path, exc))

    for digest, path, size in store.walk(on_unusable=unusable):
        name = str(digest) if digest is not None else None
        if name is not None and name in known:
            seen.add(name)
            if size != known[name]:
                report.corrupt.append(name)
            continue
        entry = adoptable(digest, path, clock) if digest is not None else None
        if entry is not None:
            adopted.append(entry)
            if len(adopted) >= ADOPT_BATCH:
                index.add_contents(adopted)
                report.adopted += [e.digest for e in adopted]
                adopted = []
            continue
        if digest is None:
            unlink_any(path)
        report.stray.append(path.name)
    index.add_contents(adopted)
    report.adopted += [e.digest for e in adopted]
    report.missing = [digest for digest in known
                      if digest not in seen and not _under(store, digest, unwalked)]
    remove(store, index, report.missing + report.corrupt, mark=False)   # (the server, before it serves)
    return report


def verify(store: BlobStore, index: Index, *, repair: bool,
           progress: Callable[[Entry, str], None] = lambda entry, problem: None,
           clock: Callable[[], float] = time.time) -> Report:
    """Re-hash every indexed file. A bad one (also one that cannot be read, or that is not a
    regular file: a directory, a FIFO...) is removed with ``repair``, else flagged in the index,
    so that the server re-hashes it before serving it again (and then removes it).
    A good one whose file was touched is recorded as verified in its present state. With
    ``repair``, files without a row are adopted (if they hash to their name) or removed."""
    report = Report()
    for entry in index.entries():
        digest = Digest.parse(entry.digest)
        try:
            fd, st = open_regular(store.path(digest))   # (a FIFO or a device in its place: no wait)
        except (FileNotFoundError, NotADirectoryError):    # (NotADirectoryError: blobs/ or a prefix is a file)
            if index.content(entry.digest) is None:
                continue  # removed meanwhile (the server evicted it)
            report.checked += 1
            report.missing.append(entry.digest)
            progress(entry, "missing")
            continue
        except OSError as exc:
            unusable = exc
        else:
            try:
                actual, size = hash_fd(fd, digest.algorithm)
                unusable = None
            except OSError as exc:   # (EIO: a bad sector)
                unusable = exc
            finally:
                os.close(fd)
        if unusable is not None:
            if index.content(entry.digest) is None:
                continue
            report.checked += 1
            report.corrupt.append(entry.digest)
            progress(entry, f"cannot be read ({unusable.strerror or unusable})")
            if not repair:
                index.set_stamp(entry.digest, None)
            continue
        report.checked += 1
        if actual != digest.hex or size != entry.size:
            report.corrupt.append(entry.digest)
            progress(entry, f"corrupt ({size} bytes hashing to {digest.algorithm}:{actual})")
            if not repair:
                index.set_stamp(entry.digest, None)
        elif store_stamp(st) != entry.stamp and index.content(entry.digest) is not None:
            index.set_stamp(entry.digest, store_stamp(st))
    if os.path.lexists(store.blobs) and not store.blobs.is_dir():
        report.misplaced.append(store.blobs.name)    # (every entry is then missing)
        if repair:
            unlink_any(store.blobs)
            store.blobs.mkdir()
    unwalked: list[str] = []

    def unusable(path, exc: OSError) -> None:
        problem, removed = walk_problem(path, exc), False
        if _not_a_directory(exc):
            if repair:    # (as a stray file: unlinked, a link never followed; a directory is refused)
                try:
                    os.unlink(path)
                    removed = True
                except FileNotFoundError:
                    removed = True
                except OSError as again:
                    problem += f"; cannot be removed ({again.strerror or again})"
            if not removed:
                problem += " (--repair removes it)" if not repair else ""
            else:
                problem += ": removed"
        else:
            unwalked.append(os.fspath(path))
            problem += ": the files in it are not checked" + (
                "; not removed (fix its permissions, or remove it by hand)" if repair else "")
        report.unusable.append(Unusable(str(path.relative_to(store.root)), problem, removed))

    for digest, path, _ in store.walk(on_unusable=unusable):
        if digest is None or index.content(str(digest)) is None:
            if repair and digest is not None and adopt(index, digest, path, clock):
                report.adopted.append(str(digest))
                continue
            if repair and digest is None:
                unlink_any(path)
            report.stray.append(str(path.relative_to(store.root)))
    if repair:
        # (a file in a directory that cannot be read is not proven to be bad, nor can it be moved:
        # flagged, as without --repair, and left)
        report.kept = [d for d in report.missing + report.corrupt if _under(store, d, unwalked)]
        for digest in report.kept:
            if index.content(digest) is not None:
                index.set_stamp(digest, None)
        remove(store, index, [d for d in report.missing + report.corrupt if d not in report.kept])
    return report


def _not_a_directory(exc: OSError) -> bool:
    return exc.errno in (errno.ENOTDIR, errno.ELOOP)


def _under(store: BlobStore, digest: str, directories: list[str]) -> bool:
    """Whether the file of ``digest`` would be in one of ``directories`` (or below)."""
    if not directories:
        return False
    path = os.fspath(store.path(Digest.parse(digest)))
    return any(path.startswith(directory.rstrip("/") + "/") for directory in directories)


def prune(store: BlobStore, index: Index, *, cutoffs: dict[str, float], to_size: int | None,
          dry_run: bool) -> list[Entry]:
    """Remove unpinned entries of each kind not accessed since its cutoff time, then the least
    recently used until the cache holds at most ``to_size`` bytes. Returns what was removed."""
    chosen: dict[str, Entry] = {}
    for kind, before in cutoffs.items():
        for entry in index.expired(kind, before, 1 << 62):
            chosen[entry.digest] = entry
    if to_size is not None:
        total = index.totals()[1] - sum(e.size for e in chosen.values())
        cursor = None
        while total > to_size:
            batch = index.lru(1000, after=cursor)
            if not batch:
                break
            cursor = (batch[-1].last_access, batch[-1].digest)
            for entry in batch:
                if total <= to_size:
                    break
                if entry.digest not in chosen:
                    chosen[entry.digest] = entry
                    total -= entry.size
    if not dry_run:
        remove(store, index, chosen)
    return list(chosen.values())
