"""Check that a test run leaves the machine as it found it.

* :func:`snapshot` records every file under the system paths a test or a client could
  plausibly write (content hash, type, mode, owner; symlink targets), and :func:`changes`
  compares two snapshots. The conftest takes one before the first system test and one at
  the end, and fails the run if they differ.
* Every process the tests start inherits ``DM_TESTS_RUN=<id>`` in its environment;
  :func:`leftovers` finds those still running at the end (by that mark, so never another
  program's process), and :func:`stop` ends them by PID.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import stat
import time
from pathlib import Path

# What the suite's tests, clients and package builds could touch if something went wrong.
WATCHED = (
    "/etc/hosts", "/etc/hostname", "/etc/passwd", "/etc/group", "/etc/shadow",
    "/etc/gshadow", "/etc/subuid", "/etc/subgid", "/etc/docker", "/etc/containers", "/etc/containerd",
    "/etc/docker-mirror", "/etc/pki", "/etc/cni", "/etc/systemd/system", "/etc/ssl/certs", "/etc/ca-certificates.conf",
    "/etc/apt/sources.list", "/etc/apt/sources.list.d", "/etc/sysconfig",
    "/var/lib/containers", "/var/lib/docker-mirror", "/var/cache/docker-mirror", "/var/lib/machines",
    "/root/.docker", "/root/.config/containers", "/root/.local/share/containers",
    "/opt/docker-mirror", "/usr/bin/docker-mirror", "/usr/local/bin",
    "/lib/systemd/system/docker-mirror.service", "/usr/lib/systemd/system/docker-mirror.service",
    # tests/test_repo.py: dnf and apt keys, caches and logs, and the GnuPG home
    "/etc/dnf", "/etc/yum.repos.d", "/var/cache/dnf", "/var/lib/dnf", "/var/log/dnf.log", "/var/log/dnf.librepo.log",
    "/var/log/dnf.rpm.log", "/var/log/hawkey.log", "/etc/apt/keyrings", "/usr/share/keyrings", "/etc/apt/trusted.gpg",
    "/etc/apt/trusted.gpg.d", "/root/.gnupg",
)
MARK = "DM_TESTS_RUN"

Snapshot = dict[str, tuple]


def _entry(path: str, st: os.stat_result) -> tuple:
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return ("dir", mode, st.st_uid, st.st_gid)
    if stat.S_ISREG(st.st_mode):
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            return ("file", mode, st.st_uid, st.st_gid, f"unreadable: {exc.strerror}")
        return ("file", mode, st.st_uid, st.st_gid, digest.hexdigest())
    return ("other", stat.S_IFMT(st.st_mode), mode)


def snapshot(paths: tuple[str, ...] = WATCHED) -> Snapshot:
    """Every file and directory under ``paths`` (absent ones recorded as absent)."""
    found: Snapshot = {}
    for top in paths:
        try:
            st = os.lstat(top)
        except FileNotFoundError:
            found[top] = ("absent",)
            continue
        found[top] = _entry(top, st)
        if not stat.S_ISDIR(st.st_mode):
            continue
        for directory, dirs, files in os.walk(top, onerror=lambda exc: None):
            for name in dirs + files:
                path = os.path.join(directory, name)
                with contextlib.suppress(FileNotFoundError):
                    found[path] = _entry(path, os.lstat(path))
    return found


def changes(before: Snapshot, after: Snapshot) -> list[str]:
    """What differs, one line per path: created, removed or changed."""
    lines = []
    for path in sorted(set(before) | set(after)):
        old, new = before.get(path, ("absent",)), after.get(path, ("absent",))
        if old == new:
            continue
        if old == ("absent",):
            lines.append(f"created: {path}")
        elif new == ("absent",):
            lines.append(f"removed: {path}")
        elif old[0] != new[0]:
            lines.append(f"changed: {path} ({old[0]} -> {new[0]})")
        else:
            lines.append(f"changed: {path} ({_what_changed(old, new)})")
    return lines


def _what_changed(old: tuple, new: tuple) -> str:
    if old[0] == "link":
        return f"link {old[1]} -> {new[1]}"
    if old[0] == "other":
        return f"{old} -> {new}"
    what = []
    if old[1] != new[1]:
        what.append(f"mode {old[1]:04o} -> {new[1]:04o}")
    if old[2:4] != new[2:4]:
        what.append(f"owner {old[2]}:{old[3]} -> {new[2]}:{new[3]}")
    if old[0] == "file" and old[4] != new[4]:
        what.append("content")
    return ", ".join(what)


def leftovers(run_id: str, exclude: set[int]) -> dict[int, str]:
    """PID -> command line of the processes still running with this run's mark."""
    wanted = f"{MARK}={run_id}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            if wanted not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if _alive(int(entry.name)):      # a zombie is already gone
            found[int(entry.name)] = cmdline
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def stop(pids: dict[int, str], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL what is still there after ``grace`` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
