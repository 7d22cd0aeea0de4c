"""Peak RSS and CPU time of a server's process tree while a measurement runs.

A background thread reads VmRSS of every process in the watched trees every 50 ms
(the tree itself is re-read from /proc once a second); CPU time is utime + stime of
the tree plus the root's reaped children (cutime + cstime), read at both ends.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (field 3 onwards)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def cpu_seconds(root: int) -> float:
    """CPU time used by the tree under ``root`` so far, reaped children included."""
    ticks = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            fields = _stat_fields(pid)
            ticks += int(fields[11]) + int(fields[12])          # utime, stime
            if pid == root:
                ticks += int(fields[13]) + int(fields[14])      # cutime, cstime
    return ticks / TICK


@dataclass
class Usage:
    peak_rss: int = 0        # bytes
    cpu: float = 0.0         # seconds


class Monitor:
    """Samples the RSS of the process trees inside :meth:`watch` blocks."""

    def __init__(self, interval: float = 0.05, tree_every: int = 20) -> None:
        self.interval = interval
        self.tree_every = tree_every
        self._watched: dict[int, tuple[list[int], Usage]] = {}   # root pid -> (tree, usage)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @contextlib.contextmanager
    def watch(self, root: int) -> Iterator[Usage]:
        """Usage of ``root``'s tree during the block: peak RSS, CPU seconds."""
        usage = Usage()
        tree = process_tree(root)
        usage.peak_rss = rss_bytes(tree)
        cpu_before = cpu_seconds(root)
        with self._lock:
            self._watched[root] = (tree, usage)
        try:
            yield usage
        finally:
            with self._lock:
                del self._watched[root]
            usage.peak_rss = max(usage.peak_rss, rss_bytes(process_tree(root)))
            usage.cpu = cpu_seconds(root) - cpu_before

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(self.interval):
            tick += 1
            with self._lock:
                watched = list(self._watched.items())
            for root, (tree, usage) in watched:
                if tick % self.tree_every == 0:
                    tree[:] = process_tree(root)
                usage.peak_rss = max(usage.peak_rss, rss_bytes(tree))
