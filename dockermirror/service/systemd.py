"""Talking to systemd: sd_notify states, the watchdog, the status line.

Everything here is a no-op outside systemd (no ``NOTIFY_SOCKET``). Messages are the
ones systemd 219 understands (READY, RELOADING, STOPPING, STATUS, WATCHDOG); newer
fields (MONOTONIC_USEC, for Type=notify-reload) are ignored by older managers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import sdnotify

log = logging.getLogger("dockermirror.systemd")


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
