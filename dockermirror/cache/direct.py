"""Writes that bypass the page cache (``O_DIRECT``), for a download's temp file.

Copying a download into the page cache of a new file can cost more than everything else a
cold transfer does (on a virtual machine, each fresh page may be faulted in by the host);
readers of a download are served from memory while it is written (see inflight.py), so the
file's pages need not be cached as it is written. ``O_DIRECT`` needs aligned memory, offsets
and lengths: bytes are copied into an aligned buffer and written a whole number of blocks at a
time; the last, partial block goes through the ordinary descriptor by :meth:`finish`.

The aligned buffers are shared: a write borrows one for its duration (writes run in the lane
threads, so there are never more buffers than threads), and a writer keeps only the partial
block between writes. Memory for direct writes is thus bounded by the lane threads, not by
the number of downloads.

Blocking; a writer is used by one thread at a time (the store lane).
"""

from __future__ import annotations

import mmap
import os
import queue

BLOCK = 4096                    # the alignment O_DIRECT needs (at most the page size on Linux)
BUFFER = 1024 * 1024            # an aligned buffer: bytes are written at most this many at once

_buffers: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()    # aligned buffers not in use
_ZEROS = memoryview(mmap.mmap(-1, BLOCK))                       # an aligned block of zeros (only read)


def _borrow() -> mmap.mmap:
    try:
        return _buffers.get_nowait()
    except queue.Empty:
        return mmap.mmap(-1, BUFFER)    # page-aligned; kept for reuse once given back


class DirectWriter:
    """Appends to ``path`` from byte 0 without the page cache.

    Opening raises OSError if the filesystem refuses O_DIRECT (tmpfs); :meth:`works` is False
    if it takes the flag but not the writes (a device whose blocks are larger than BLOCK). Either
    way the caller writes as usual."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        self._works: bool | None = None     # not tried yet
        self._carry = b""           # the last partial block: written with the next bytes, or by finish()
        self.written = 0            # bytes [0, written) are in the file

    def works(self) -> bool:
        """Whether direct writes work on this file: tried once, with a block of zeros at the start
        (the file is new: overwritten later). Blocking (it waits for the device): call it where
        the writes are made, before the first."""
        if self._works is None:
            try:
                self._works = os.pwrite(self.fd, _ZEROS, 0) == BLOCK
            except OSError:
                self._works = False
        return self._works

    def write(self, chunks: list[bytes]) -> int:
        """Append ``chunks``; returns how many bytes are in the file now (whole blocks: up to
        BLOCK - 1 bytes may wait for more, or for :meth:`finish`)."""
        buffer = _borrow()
        try:
            view = memoryview(buffer)
            staged = len(self._carry)
            view[:staged] = self._carry
            for chunk in chunks:
                data = memoryview(chunk).cast("B")
                while data:
                    n = min(len(data), BUFFER - staged)
                    view[staged:staged + n] = data[:n]
                    staged += n
                    data = data[n:]
                    if staged == BUFFER:
                        staged = self._flush(view, staged)
            staged = self._flush(view, staged)
            self._carry = bytes(view[:staged])
            view.release()
        finally:
            _buffers.put(buffer)
        return self.written

    def _flush(self, view: memoryview, staged: int) -> int:
        """Write the whole blocks of ``view[:staged]``; returns the bytes left (moved to the front)."""
        whole = staged - staged % BLOCK
        done = 0
        while done < whole:
            n = os.pwrite(self.fd, view[done:whole], self.written)
            if n <= 0 or n % BLOCK:
                raise OSError(f"short direct write ({n} of {whole - done} bytes)")
            done += n
            self.written += n
        rest = staged - done
        if done and rest:
            view[:rest] = view[done:staged]
        return rest

    def finish(self, fd: int) -> int:
        """Write what is left (less than a block) through ``fd``, an ordinary descriptor of the
        same file; returns the bytes in the file."""
        done = 0
        while done < len(self._carry):
            done += os.pwrite(fd, self._carry[done:], self.written + done)
        self.written += done
        self._carry = b""
        return self.written

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
