"""``docker-mirror user add | del | list``: maintain an htpasswd file of bcrypt entries.

The file is rewritten atomically (a new file renamed over the old one, with its owner and
mode), every other line kept byte for byte. A new file is 0640 root:docker-mirror when that
group exists (the service reads it), else 0600.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import bcrypt

from dockermirror import smallfile
from dockermirror.access.htpasswd import MAX_PASSWORD, HtpasswdError, check_user, parse

COST = 12
GROUP = "docker-mirror"


class CommandError(Exception):
    """A problem to report in one line, with exit status 1."""


class BadName(CommandError):
    """A user name the file cannot hold: the user's mistake (exit status 2)."""


class BadFile(CommandError):
    """A path that is not a file to replace (a symbolic link, a device, ...): the user's mistake
    (exit status 2)."""


class BadPassword(CommandError):
    """An empty, too long or unsendable password: the user's mistake (exit status 2)."""


def check_password(password: str) -> None:
    secret = password.encode("utf-8", "surrogatepass")
    if not password:
        raise BadPassword("the password is empty")
    if len(secret) > MAX_PASSWORD:
        raise BadPassword(f"the password is longer than {MAX_PASSWORD} bytes (bcrypt reads no more)")
    if any(ord(c) < 0x20 or ord(c) == 0x7f for c in password):
        raise BadPassword("the password holds a control character (clients cannot send it)")


def _lines(path: Path) -> list[bytes]:
    try:
        return smallfile.read(path, smallfile.HTPASSWD_MAX)[0].splitlines(keepends=True)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}


def _check_file(path: Path) -> None:
    """Refuse what the rename would replace by a regular file: a symbolic link (its target
    would keep the old users) or anything but a regular file (a device, ``/dev/null``)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise BadFile(f"{path} is a symbolic link; give the file itself ({os.path.realpath(path)})")
    if not stat.S_ISREG(st.st_mode):
        raise BadFile(f"{path} is not a regular file ({_KINDS.get(stat.S_IFMT(st.st_mode), 'a special file')})")


def _is_user(line: bytes, name: str) -> bool:
    return line.startswith(name.encode() + b":")


def problem(path: Path) -> str | None:
    """Why the server would refuse the file as it is now, or None."""
    try:
        parse(b"".join(_lines(path)).decode("utf-8"), str(path))
    except UnicodeDecodeError:
        return f"{path}: not UTF-8 text"
    except HtpasswdError as exc:
        return str(exc)
    return None


def add(path: Path, name: str, password: str, cost: int = COST) -> bool:
    """Give ``name`` this password (a new entry, or in place of the old one); True if new."""
    why = check_user(name)
    if why:
        raise BadName(f"{name!r}: {why}")
    check_password(password)
    entry = name.encode() + b":" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost))
    with _locked(path):
        _check_file(path)
        lines, new = _lines(path), True
        out = []
        for line in lines:
            if _is_user(line, name):
                if new:     # the first entry of this user becomes the new one (same line ending); any other goes
                    out.append(entry + (line[len(line.rstrip(b"\r\n")):] or b"\n"))
                new = False
            else:
                out.append(line)
        if new:
            if out and not out[-1].endswith(b"\n"):
                out[-1] += b"\n"
            out.append(entry + b"\n")
        _write(path, b"".join(out))
    return new


def remove(path: Path, name: str) -> None:
    if check_user(name):
        raise CommandError(f"no user {name!r} in {path}")
    with _locked(path):
        _check_file(path)
        lines = _lines(path)
        if not path.exists():
            raise CommandError(f"no htpasswd file at {path}")
        kept = [line for line in lines if not _is_user(line, name)]
        if len(kept) == len(lines):
            raise CommandError(f"no user {name!r} in {path}")
        _write(path, b"".join(kept))


def names(path: Path) -> list[str]:
    """The user names in the file, in its order (also those of entries the server refuses)."""
    if not path.exists():
        raise CommandError(f"no htpasswd file at {path}")
    found = []
    for line in _lines(path):
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if text.strip() and not text.lstrip().startswith("#") and ":" in text:
            found.append(text.partition(":")[0])
    return found


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One change to the file at a time (a lock on its directory, which the rename changes)."""
    try:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise CommandError(f"cannot open the directory {path.parent}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    """Replace the file atomically, keeping its owner and mode (new: 0640 root:docker-mirror, or 0600)."""
    try:
        st = path.stat()
        uid, gid, mode = st.st_uid, st.st_gid, st.st_mode & 0o7777
    except FileNotFoundError:
        try:
            uid, gid, mode = -1, grp.getgrnam(GROUP).gr_gid, 0o640
        except KeyError:
            uid, gid, mode = -1, -1, 0o600
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise CommandError(f"cannot write in {path.parent}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if (uid, gid) != (-1, -1) and (uid, gid) != (os.geteuid(), os.getegid()):
                os.fchown(f.fileno(), uid, gid)
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CommandError(f"cannot write {path}: {exc.strerror}") from None
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
