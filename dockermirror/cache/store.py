"""Content-addressed files on local disk.

Layout under the cache directory::

    blobs/<algorithm>/<first 2 hex>/<hex>   complete, verified content (layers and manifests)
    tmp/<algorithm>-<hex>.<random>.part     downloads in progress
    tmp/<algorithm>-<hex>.<random>.pass     content passing through, not cached (outside max_size)
    tmp/<algorithm>-<hex>.<random>.evict    content being deleted

A file reaches ``blobs/`` only through :meth:`BlobStore.commit`: written to ``tmp/``
on the same filesystem, digest checked by the writer, fsynced, renamed. A file leaves
``blobs/`` by a rename into ``tmp/`` first, so a commit of the same digest that races
with a deletion is never deleted by it. Everything in ``tmp/`` is garbage at start-up.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dockermirror.oci import Digest, InvalidDigest


@dataclass(frozen=True, slots=True)
class FileRange:
    """Bytes ``[offset, offset + count)`` of an open file, for a response to send as it can
    (``sendfile`` on plain TCP, reads otherwise). The file stays open while the range is used."""

    fd: int
    offset: int
    count: int

    def fileno(self) -> int:
        return self.fd


class NotRegularFile(OSError):
    """What is at a cache file's place is not a regular file (a directory, a FIFO, a device...)."""


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def open_regular(path: os.PathLike, *, follow_symlinks: bool = True) -> tuple[int, os.stat_result]:
    """Open a cache file for reading: (descriptor, fstat). Never blocks on a FIFO or a device
    (O_NONBLOCK, then S_ISREG on the open file); anything but a regular file raises
    :class:`NotRegularFile`, an OSError like the open's own (FileNotFoundError, PermissionError...)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
            raise NotRegularFile(errno.EINVAL, f"{kind}, not a regular file", os.fspath(path))
        os.set_blocking(fd, True)    # (a regular file: reads as before, whoever gets the descriptor)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def unlink_any(path: os.PathLike) -> None:
    """Remove what is at ``path``, never following a symbolic link: a directory with what it
    holds (as much of it as can be), anything else (a file, a FIFO, a link) by unlinking it.
    Gone already is fine."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


class TempBlob:
    """A file being written in ``tmp/``.

    ``write`` is blocking and meant for a worker thread; one thread writes at a time.
    """

    def __init__(self, path: Path, digest: Digest) -> None:
        self.path = path
        self.digest = digest
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        self.written = 0
        self.committed = False
        self.stamp: str | None = None   # the committed file's stamp (see :func:`stamp`)

    def passing_through(self) -> None:
        """Rename to ``.pass``: this content will not be cached (it is outside max_size)."""
        if self.path.suffix == ".part":
            target = self.path.with_suffix(".pass")
            try:
                os.rename(self.path, target)
            except OSError:
                return
            self.path = target

    def preallocate(self, size: int) -> None:
        """Claim the disk space up front, so a full disk shows now rather than mid-download."""
        if size <= 0:
            return
        try:
            os.posix_fallocate(self.fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise  # ENOSPC, EDQUOT, EIO: the caller decides

    def write(self, chunks: list[bytes]) -> int:
        """Append chunks; returns the new length. On an error, ``written`` says what landed."""
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
                self.written += n
        return self.written

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Close, and delete the file unless it was committed."""
        self.close()
        if not self.committed:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


class BlobStore:
    """The files of the cache, addressed by digest."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"

    def create_dirs(self) -> None:
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def new_temp(self, digest: Digest) -> TempBlob:
        name = f"{digest.algorithm}-{digest.hex}.{secrets.token_hex(4)}.part"
        return TempBlob(self.tmp / name, digest)

    def commit(self, temp: TempBlob) -> Path:
        """Make a verified temp file permanent: fsync, rename into place, fsync the directory.

        The file descriptor stays open (readers may be duplicating it); the owner closes it.
        """
        os.ftruncate(temp.fd, temp.written)  # drop any preallocated tail
        os.fsync(temp.fd)
        final = self.path(temp.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp.path, final)
        temp.path, temp.committed = final, True
        temp.stamp = stamp(os.fstat(temp.fd))   # after the rename, which changes ctime
        _fsync_dir(final.parent)
        return final

    def write_bytes(self, digest: Digest, data: bytes) -> str | None:
        """Store small content (a manifest) already checked against its digest; returns its stamp."""
        temp = self.new_temp(digest)
        try:
            temp.write([data])
            self.commit(temp)
            return temp.stamp
        finally:
            temp.discard()

    def remove(self, digest: Digest) -> int:
        """Delete a stored file; returns the bytes it held (0 if it was not there)."""
        trash = self.tmp / f"{digest.algorithm}-{digest.hex}.{secrets.token_hex(4)}.evict"
        try:
            os.rename(self.path(digest), trash)
        except (FileNotFoundError, NotADirectoryError):   # (NotADirectoryError: blobs/ or a prefix is a file)
            return 0
        size = os.lstat(trash).st_blocks * 512
        unlink_any(trash)    # (not always a file: whatever was in its place)
        return size

    def remove_temp_files(self) -> int:
        """Delete downloads and deletions left behind by a previous process; returns how many."""
        count = 0
        for entry in self.tmp.iterdir():
            if entry.suffix in (".part", ".pass", ".evict"):
                unlink_any(entry)   # (an .evict may be a directory that was in a file's place)
                count += 1
        return count

    def has_files(self) -> bool:
        """Whether anything is under ``blobs/`` (stops at the first file). A directory of the
        tree that cannot be walked (see :meth:`walk`) counts: it may hold files."""
        unusable: list[Path] = []
        for _ in self.walk(on_unusable=lambda path, exc: unusable.append(path)):
            return True
        return bool(unusable)

    def walk(self, on_unusable: Callable[[Path, OSError], None] | None = None,
             ) -> Iterator[tuple[Digest | None, Path, int]]:
        """Every file under ``blobs/``: its digest (None for a name that is not one), path, size.

        Never through a symbolic link below ``blobs/``. What stands where a directory of the tree
        should be and cannot be walked (a file, a FIFO, a link, a directory that cannot be read)
        is passed to ``on_unusable`` with the error (NotADirectoryError, or errno ELOOP for a
        link, PermissionError...), and the walk goes on with the rest; a directory gone meanwhile
        is skipped."""
        report = on_unusable or (lambda path, exc: None)
        try:
            algorithm_names = _names(self.blobs)
        except (FileNotFoundError, NotADirectoryError):   # (blobs/ a file: see maintenance.verify)
            return
        except OSError as exc:
            report(self.blobs, exc)
            return
        for algorithm in algorithm_names:
            algorithm_dir = self.blobs / algorithm
            try:
                prefixes = _names(algorithm_dir, nofollow=True)
            except FileNotFoundError:
                continue
            except OSError as exc:
                report(algorithm_dir, exc)
                continue
            for prefix in prefixes:
                prefix_dir = algorithm_dir / prefix
                try:
                    fd = _open_dir(prefix_dir, nofollow=True)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    report(prefix_dir, exc)
                    continue
                try:
                    yield from _files(fd, algorithm, prefix, prefix_dir, report)
                finally:
                    os.close(fd)


def stamp(st: os.stat_result) -> str:
    """What changes when a file is written, truncated, touched or replaced: its inode, mtime and
    ctime (ctime cannot be set back by anyone but the kernel). The size is checked apart. A file
    removed from its place (renamed away, unlinked) is compared without its ctime: see
    :func:`unchanged_since`."""
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def unchanged_since(then: str, st: os.stat_result, path: os.PathLike | None) -> bool:
    """Whether an open file whose stamp was ``then`` still has the same bytes, as far as the
    filesystem records (``st``: its fstat now; the size is checked apart). Removing a file moves
    its ctime but not its bytes, and :meth:`BlobStore.remove` does it in two steps (a rename
    out of ``blobs/``, then the unlink): once the file is no longer at ``path`` (its place in
    the cache; None: unknown), its ctime is not compared, only its inode and mtime."""
    now = stamp(st)
    if now == then:
        return True
    if st.st_nlink > 0:
        if path is None:
            return False        # no place to look in: only an unlinked file may have a new ctime
        try:
            at_path = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            at_path = None
        except OSError:
            return False        # cannot tell where it is: as strict as for a file in its place
        if at_path is not None and (at_path.st_dev, at_path.st_ino) == (st.st_dev, st.st_ino):
            return False        # still in its place: a ctime that moved is a change
    return now.rsplit(":", 1)[0] == then.rsplit(":", 1)[0]


def walk_problem(path: os.PathLike, exc: OSError) -> str:
    """What is wrong with a place of the tree :meth:`BlobStore.walk` passed over, in words."""
    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            mode = 0
        kind = ("a symbolic link" if stat.S_ISLNK(mode) else "a regular file" if stat.S_ISREG(mode)
                else next((name for test, name in _KINDS if test(mode)), "something else"))
        return f"{kind}, not a directory, in the place of a directory of the cache's files"
    return f"directory that cannot be read ({exc.strerror or exc})"


def _open_dir(path: Path, *, nofollow: bool) -> int:
    """A descriptor of the directory at ``path``: NotADirectoryError for anything else (never
    waiting on a FIFO or a device), ELOOP for a symbolic link with ``nofollow``."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK | (os.O_NOFOLLOW if nofollow else 0)
    return os.open(path, flags)


def _names(path: Path, *, nofollow: bool = False) -> list[str]:
    fd = _open_dir(path, nofollow=nofollow)
    try:
        with os.scandir(fd) as entries:
            return sorted(entry.name for entry in entries)
    finally:
        os.close(fd)


def _files(fd: int, algorithm: str, prefix: str, prefix_dir: Path,
           report: Callable[[Path, OSError], None]) -> Iterator[tuple[Digest | None, Path, int]]:
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                try:
                    digest = Digest.parse(f"{algorithm}:{entry.name}")
                except InvalidDigest:
                    digest = None
                if digest is not None and digest.hex[:2] != prefix:
                    digest = None
                try:
                    size = entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
                yield digest, prefix_dir / entry.name, size
    except OSError as exc:    # (reading the directory failed part way: EIO)
        report(prefix_dir, exc)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
