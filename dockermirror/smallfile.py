"""Small files an operator names (the configuration, auth.htpasswd, PEM files), read whole.

A path may name a FIFO, a device or a huge file by mistake: opened plainly, a FIFO blocks the
reader (the event loop, on a reload) until something writes to it, and ``/dev/zero`` is read until
memory runs out. :func:`read` opens without blocking, refuses anything but a regular file and
reads at most a limit; its refusals are OSErrors whose ``strerror`` says why, so callers that
report ``cannot read ...: {exc.strerror}`` report these too.
"""

from __future__ import annotations

import errno
import os
import stat

CONFIG_MAX = 1 << 20       # the configuration file (a real one is a few KiB)
HTPASSWD_MAX = 16 << 20    # auth.htpasswd (about 100,000 users at 70 bytes a line)
PEM_MAX = 16 << 20         # certificates, keys, CA bundles and CRLs (the system bundle is ~200 KiB)

_CHUNK = 1 << 20


class UnfitFile(OSError):
    """A file that is not a regular file, or is larger than the limit (``strerror`` says which)."""

    def __init__(self, reason: str, path: os.PathLike | str) -> None:
        super().__init__(errno.EINVAL, reason, os.fspath(path))


class TooLarge(UnfitFile):
    """A regular file larger than the limit."""


def limit_text(limit: int) -> str:
    """``1048576`` -> ``1 MiB`` (limits are round numbers)."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if limit >= factor and limit % factor == 0:
            return f"{limit // factor} {unit}"
    return f"{limit} bytes"


def read(path: os.PathLike | str, limit: int) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file of at most ``limit`` bytes, and its status. OSError if it cannot
    be opened or read; UnfitFile (an OSError) for a FIFO, socket or device, or a larger file.
    Never blocks on a FIFO (O_NONBLOCK); the file is closed on every path."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(st.st_mode):
            raise UnfitFile("not a regular file", path)
        if st.st_size > limit:
            raise TooLarge(f"larger than {limit_text(limit)}", path)
        chunks, size = [], 0
        while size <= limit:      # the file may grow while it is read: read one byte too many at most
            chunk = os.read(fd, min(_CHUNK, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise TooLarge(f"larger than {limit_text(limit)}", path)
        return b"".join(chunks), st
    finally:
        os.close(fd)
