"""Content-addressed files on local disk.

Layout under the cache directory::

    blobs/<algorithm>/<first 2 hex>/<hex>   complete, verified content (layers and manifests)
    tmp/<algorithm>-<hex>.<random>.part     downloads in progress

A file reaches ``blobs/`` only through :meth:`BlobStore.commit`: written to ``tmp/``
on the same filesystem, digest checked, fsynced, renamed. Nothing else writes there.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from dockermirror.oci import Digest


class DigestMismatch(Exception):
    """The bytes written do not hash to the digest they were fetched for."""


class TempBlob:
    """A file being written in ``tmp/``; hashes what is written.

    ``write`` is blocking and meant for a worker thread; only one thread writes at a time.
    """

    def __init__(self, path: Path, digest: Digest) -> None:
        self.path = path
        self.digest = digest
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        self.written = 0
        self.committed = False
        self._hasher = digest.hasher()

    def write(self, chunks: list[bytes]) -> int:
        """Append chunks and feed them to the hash; returns the new file length."""
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
            self._hasher.update(chunk)
            self.written += len(chunk)
        return self.written

    def verify(self, expected_size: int | None) -> None:
        if expected_size is not None and self.written != expected_size:
            raise DigestMismatch(f"expected {expected_size} bytes, got {self.written}")
        actual = self._hasher.hexdigest()
        if actual != self.digest.hex:
            raise DigestMismatch(f"content hashes to {self.digest.algorithm}:{actual}")

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
        os.fsync(temp.fd)
        final = self.path(temp.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp.path, final)
        temp.path, temp.committed = final, True
        dir_fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return final

    def write_bytes(self, digest: Digest, data: bytes) -> Path:
        """Store small content (a manifest) that is already in memory."""
        temp = self.new_temp(digest)
        try:
            temp.write([data])
            temp.verify(len(data))
            return self.commit(temp)
        finally:
            temp.discard()

    def read_bytes(self, digest: Digest) -> bytes:
        return self.path(digest).read_bytes()

    def remove(self, digest: Digest) -> None:
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            pass

    def remove_temp_files(self) -> int:
        """Delete downloads left behind by a previous process; returns how many."""
        count = 0
        for entry in self.tmp.glob("*.part"):
            try:
                entry.unlink()
                count += 1
            except FileNotFoundError:
                pass
        return count
