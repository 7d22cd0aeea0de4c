"""What ``serve`` checks before it changes anything: the listen address can be bound and a new
cache directory can be made. A user's mistake here is one line naming the key, and nothing is
created on disk (the cache directory, its index and lock are made only after these checks).

An existing cache (it has an index) on a read-only filesystem is served as it is, degraded
(see :meth:`dockermirror.cache.Cache.open`); on a writable one, its directory, lock and index
must be writable for this user (a cache made by root or another user is not).

Under systemd (``INVOCATION_ID`` is set) a read-only path is most likely the unit's sandbox
(``ProtectSystem=strict``: only the cache and state directories are writable), and the hint
says how to allow another one (``ReadWritePaths=`` in a drop-in).
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from dockermirror.cache import INDEX_NAME, LOCK_NAME


def listen_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (and what to do), or None. Binds a socket to every
    address the host name gives, as the server will, and closes it again."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        return (f"cannot listen on {shown}: {host!r} is not an address of this host ({reason}); "
                "use one of its addresses or names, or 0.0.0.0")
    for family, kind, proto, _, address in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as sock:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
            except OSError as exc:
                return f"cannot listen on {shown}: {exc.strerror or exc}; {_listen_hint(exc.errno, port)}"
    return None


def _listen_hint(code: int | None, port: int) -> str:
    if code == errno.EADDRINUSE:
        return (f"another process listens there (see: ss -ltnp 'sport = :{port}'); stop it, or choose "
                "another port")
    if code == errno.EACCES:
        return "a port below 1024 needs root or CAP_NET_BIND_SERVICE; choose a port above 1023"
    if code == errno.EADDRNOTAVAIL:
        return "no interface of this host has that address; use one of its addresses, or 0.0.0.0"
    return "choose another address"


def cache_dir_problem(root: Path) -> str | None:
    """Why the cache cannot be made in ``root`` (and what to do), or None."""
    if os.path.exists(root / INDEX_NAME):
        return _existing_cache_problem(root)
    user = _user()
    path = root       # the nearest of root and its parents that this user can see
    while True:
        try:
            os.stat(path)
            break
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            if path == path.parent:
                return None     # nothing to say here: the cache says what it finds
            path = path.parent
        except OSError as exc:
            return f"cannot use {root}: {exc.strerror or exc}; choose another directory"
    if path == root:
        if not root.is_dir():
            return f"{root} is not a directory; choose a directory for the cache (or move the file away)"
        if _read_only(root):
            return f"{root} {_read_only_hint(root, root)}"
        if not os.access(root, os.W_OK | os.X_OK):
            return (f"{root} is not writable for {user}; make it the service user's (chown -R {_who()}: {root}) "
                    "or choose another directory")
        return None
    if not path.is_dir():
        return f"cannot create {root}: {path} is a file, not a directory; choose another directory"
    if _read_only(path):
        return f"cannot create {root}: {path} {_read_only_hint(path, root)}"
    if not os.access(path, os.W_OK | os.X_OK):
        return (f"cannot create {root}: {path} is not writable for {user}; create it first "
                f"(mkdir -p {root} && chown {_who()} {root}) or choose another directory")
    return None


def _existing_cache_problem(root: Path) -> str | None:
    """An existing cache on a writable filesystem that this user cannot write (made by root, or
    copied from another host): without this, the lock fails with a bare 'Permission denied'."""
    if _read_only(root):
        return None     # served degraded, as it is
    denied = [path for path, wanted in ((root, os.W_OK | os.X_OK), (root / LOCK_NAME, os.R_OK | os.W_OK),
                                        (root / INDEX_NAME, os.R_OK | os.W_OK))
              if os.path.exists(path) and not os.access(path, wanted)]
    if not denied:
        return None
    return (f"the cache in {root} is not writable for {_user()} ({', '.join(str(p) for p in denied)}); give it to "
            f"the service user (chown -R {_who()}: {root}) or choose another directory")


def _read_only_hint(path: Path, root: Path) -> str:
    """'is on a read-only filesystem; ...': under systemd, most likely the unit's sandbox."""
    if not os.environ.get("INVOCATION_ID"):
        return "is on a read-only filesystem; choose a directory on a writable one"
    first = "" if path == root else f"create it first (mkdir -p {root} && chown {_who()}: {root}), then "
    return (f"is read-only for the service (the unit's ProtectSystem=strict allows writing only in its cache and "
            f"state directories); to use it, {first}run systemctl edit docker-mirror, add the lines [Service] "
            f"and ReadWritePaths={root}, then systemctl restart docker-mirror")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _user() -> str:
    return f"this user ({_who()})"


def _who() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())
