"""Progress lines for long steps, so a run is never silent for more than a minute.

pytest captures what tests print. :func:`install` (called by the conftest before any
test runs, while pytest's capture is suspended) keeps a duplicate of the real standard
output; :func:`step` writes to it when a long step starts and ends, and a heartbeat
thread says what is still going on every HEARTBEAT seconds, for steps and for tests.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

HEARTBEAT = 45.0

_fd: int | None = None
_lock = threading.Lock()
_active: list[list] = []        # [what, started, last said], innermost last
_thread: threading.Thread | None = None


def install(fd: int) -> None:
    """Write progress to ``fd`` (a duplicate of the terminal's stdout) from now on."""
    global _fd, _thread
    _fd = fd
    if _thread is None:
        _thread = threading.Thread(target=_heartbeat, name="progress heartbeat", daemon=True)
        _thread.start()


def _clock() -> str:
    return time.strftime("%H:%M:%S")


def duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def say(text: str) -> None:
    line = f"\n[tests {_clock()}] {text}\n".encode()
    with _lock:
        if _fd is None:
            sys.stderr.write(line.decode())
            sys.stderr.flush()
        else:
            os.write(_fd, line)


@contextlib.contextmanager
def step(what: str, *, announce: bool = True) -> Iterator[None]:
    """A long step: said when it starts and ends, and every HEARTBEAT seconds in between."""
    entry = [what, time.monotonic(), time.monotonic()]
    if announce:
        say(f"{what} ...")
    with _lock:
        _active.append(entry)
    ok = False
    try:
        yield
        ok = True
    finally:
        with _lock:
            _active.remove(entry)
        took = duration(time.monotonic() - entry[1])
        if announce:
            say(f"{what}: done in {took}" if ok else f"{what}: failed after {took}")


def _heartbeat() -> None:
    while True:
        time.sleep(5)
        now = time.monotonic()
        with _lock:
            if not _active or now - max(entry[2] for entry in _active) < HEARTBEAT:
                continue
            for entry in _active:
                entry[2] = now
            inner, outer = _active[-1], _active[0]
        where = f" (in {outer[0]}, {duration(now - outer[1])})" if outer is not inner else ""
        say(f"... still {inner[0]}: {duration(now - inner[1])}{where}")
