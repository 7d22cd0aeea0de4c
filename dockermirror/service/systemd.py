"""Talking to systemd: sd_notify states, the watchdog, the status line, and the
listening sockets it passes (socket activation).

Everything here is a no-op outside systemd (no ``NOTIFY_SOCKET``, no ``LISTEN_FDS``).
Messages are the ones systemd 219 understands (READY, RELOADING, STOPPING, STATUS,
WATCHDOG); newer fields (MONOTONIC_USEC, for Type=notify-reload) are ignored by older
managers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import sdnotify

log = logging.getLogger("dockermirror.systemd")

LISTEN_FDS_START = 3   # SD_LISTEN_FDS_START: the first descriptor systemd passes


class SocketError(Exception):
    """What systemd passed is not something to serve on."""


def listen_sockets() -> list[socket.socket]:
    """The listening sockets systemd passed to this process (socket activation), or none.

    Like ``sd_listen_fds(1)``: the variables are removed from the environment, and the
    descriptors are not inherited by anything this process starts.
    """
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()) or not count.isdigit():
        return []
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise SocketError(f"systemd passed descriptor {fd}, which is not a socket ({exc.strerror})") from None
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise SocketError(f"systemd passed descriptor {fd}, which is not a TCP socket "
                              f"(use ListenStream=PORT or ListenStream=ADDRESS:PORT)")
        sock.set_inheritable(False)
        sockets.append(sock)
    return sockets


def describe(sock: socket.socket) -> str:
    """HOST:PORT of a listening socket, IPv6 hosts in brackets."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Systemd:
    """The service manager, as far as this process talks to it."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        self._watchdog: asyncio.Task[None] | None = None

    def notify(self, *fields: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(fields))

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str) -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WatchdogSec), if this process is the one watched."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not self.enabled or not usec.isdigit() or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2e6

    def start_watchdog(self) -> None:
        """Ping from a task on the event loop: if the loop hangs, the pings stop and systemd restarts us."""
        interval = self.watchdog_interval()
        if interval is None or self._watchdog is not None:
            return

        async def ping() -> None:
            while True:
                self.notify("WATCHDOG=1")
                await asyncio.sleep(interval)

        self._watchdog = asyncio.get_running_loop().create_task(ping(), name="watchdog")
        log.debug("watchdog pings every %.1f s", interval)
