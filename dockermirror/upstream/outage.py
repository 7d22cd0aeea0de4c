"""When an upstream's trouble is worth a warning, and when it is only worth a count.

An outage is one warning when it starts and one when it ends: unreachable at the first failed
connection, failing after three 5xx answers in a row (one failing path that a client keeps asking
for, between answers that work, is not an outage). However the upstream flaps, or a client
alternates a failing path with a working one, at most one outage a quiet period (10 minutes) is
announced at warning; the others are logged at info, and the next warning says how many there
were. A 429 (Docker Hub's pull limit) is one warning a quiet period with the number of such answers
since: it neither starts an outage nor ends one, as a limit on pulls leaves HEADs answering.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("dockermirror.upstream")

FAILS_IN_A_ROW = 3
QUIET = 600.0


class OutageLog:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.failing = ""           # the outage going on ("it answers HTTP 503", "it was unreachable: ...")
        self._announced = False     # ... and whether it was announced at warning
        self._streak = 0            # 5xx answers in a row
        self._last_announced: float | None = None
        self._quiet_outages = 0     # outages logged at info since the last warning
        self._last_429: float | None = None
        self._count_429 = 0

    def _quiet(self, since: float | None) -> bool:
        return since is not None and self.clock() - since < QUIET

    def _start(self, message: str, *args: object) -> None:
        if self._quiet(self._last_announced):
            self._quiet_outages += 1
            log.info(message, *args)
            self._announced = False
            return
        if self._quiet_outages:
            message += " (%d more outage(s) in the last %d minutes were logged at info)"
            args = (*args, self._quiet_outages, QUIET // 60)
        log.warning(message, *args)
        self._quiet_outages = 0
        self._announced = True
        self._last_announced = self.clock()

    def answered(self, name: str, status: int) -> None:
        """The upstream sent an HTTP answer with this status."""
        if status == 508:       # a request loop (a configuration's mistake, logged where it is found): no outage
            return
        if status == 429:
            self._count_429 += 1
            if not self._quiet(self._last_429):
                log.warning("upstream %s answers HTTP 429 (too many requests; Docker Hub's pull limit?): "
                            "what is not cached fails while it lasts (%d such answer(s) since the last line)",
                            name, self._count_429)
                self._last_429, self._count_429 = self.clock(), 0
            return
        if status >= 500:
            self._streak += 1
            if not self.failing and self._streak >= FAILS_IN_A_ROW:
                self.failing = f"it answers HTTP {status}"
                self._start("upstream %s fails: %s; requests that need it fail until it answers again",
                            name, self.failing)
            return
        self._streak = 0
        if self.failing:
            was = self.failing.replace("it answers", "it answered")
            (log.warning if self._announced else log.info)("upstream %s answers again (%s)", name, was)
            self.failing, self._announced = "", False

    def unreachable(self, name: str, error: object) -> None:
        """A request could not reach the upstream (no HTTP answer)."""
        self._streak = 0
        if self.failing.startswith("it was unreachable"):
            return
        self.failing = f"it was unreachable: {error}"
        self._start("upstream %s is unreachable (%s): requests that need it fail until it answers again",
                    name, error)
