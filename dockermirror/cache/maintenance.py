"""Work on a whole cache: removal, crash recovery, verification, pruning, statistics.

Blocking functions over a :class:`BlobStore` and its :class:`Index`; the server calls
them from worker threads, the ``docker-mirror cache`` commands call them directly (also
while a server runs: SQLite serialises the writes, and a file deleted under a reader
stays readable through the reader's open descriptor).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dockermirror.cache.index import Entry, Index
from dockermirror.cache.store import BlobStore
from dockermirror.oci import Digest

HASH_CHUNK = 4 * 1024 * 1024


def remove(store: BlobStore, index: Index, digests: Iterable[str]) -> int:
    """Delete entries: files first (renamed away, then unlinked), then their rows."""
    digests = list(digests)
    for digest in digests:
        store.remove(Digest.parse(digest))
    return index.remove_content(digests)


def hash_file(path: os.PathLike, algorithm: str) -> tuple[str, int]:
    """(hex digest, size) of a file, read in large chunks."""
    hasher = hashlib.new(algorithm)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(HASH_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return hasher.hexdigest(), size


@dataclass
class Report:
    checked: int = 0
    missing: list[str] = field(default_factory=list)     # rows without a file
    corrupt: list[str] = field(default_factory=list)     # files whose bytes do not match
    adopted: list[str] = field(default_factory=list)     # verified files without a row, now indexed
    stray: list[str] = field(default_factory=list)       # files that are not valid content (removed)

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.corrupt)

    def __str__(self) -> str:
        return (f"{self.checked} entries checked, {len(self.missing)} missing, {len(self.corrupt)} corrupt, "
                f"{len(self.adopted)} unindexed file(s) adopted, {len(self.stray)} stray file(s) removed")


def reconcile(store: BlobStore, index: Index, clock: Callable[[], float]) -> Report:
    """After an unclean stop: drop rows whose file is gone or has the wrong length, and
    adopt (after re-hashing) or remove files that have no row. Files with a row and the
    right length are trusted: they were fsynced before their row was written.
    One query and one walk of the directory tree, whatever the number of entries."""
    report = Report()
    known = index.sizes()
    report.checked = len(known)
    seen: set[str] = set()
    for digest, path, size in store.walk():
        name = str(digest) if digest is not None else None
        if name is not None and name in known:
            seen.add(name)
            if size != known[name]:
                report.corrupt.append(name)
            continue
        if digest is not None:
            actual, size = hash_file(path, digest.algorithm)
            if actual == digest.hex:
                mtime = path.stat().st_mtime
                index.add_content(Entry(name, size, None, "blob", mtime, min(mtime, clock())),
                                  upstream=None, repository=None)
                report.adopted.append(name)
                continue
        path.unlink(missing_ok=True)
        report.stray.append(path.name)
    report.missing = [digest for digest in known if digest not in seen]
    remove(store, index, report.missing + report.corrupt)
    return report


def verify(store: BlobStore, index: Index, *, repair: bool,
           progress: Callable[[Entry, str], None] = lambda entry, problem: None) -> Report:
    """Re-hash every indexed file; with ``repair``, remove the bad ones."""
    report = Report()
    for entry in index.entries():
        digest = Digest.parse(entry.digest)
        try:
            actual, size = hash_file(store.path(digest), digest.algorithm)
        except FileNotFoundError:
            if index.content(entry.digest) is None:
                continue  # removed meanwhile (the server evicted it)
            report.checked += 1
            report.missing.append(entry.digest)
            progress(entry, "missing")
            continue
        report.checked += 1
        if actual != digest.hex or size != entry.size:
            report.corrupt.append(entry.digest)
            progress(entry, f"corrupt ({size} bytes hashing to {digest.algorithm}:{actual})")
    for digest, path, _ in store.walk():
        if digest is None or index.content(str(digest)) is None:
            report.stray.append(str(path.relative_to(store.root)))
    if repair:
        remove(store, index, report.missing + report.corrupt)
    return report


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
