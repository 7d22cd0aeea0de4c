"""Warnings a client can cause over and over (a public blob larger than the cache, pulled by
every client): the first a warning, then at most one warning per period, saying how many were
told at info since. An admin sees that it happens; a client cannot flood the journal with
warnings."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

WARNING_PERIOD = 600.0    # seconds: one warning of a kind per ten minutes


class RateLimited:
    """``log(kind, message, *args)``: a warning if none of ``kind`` was logged in the last
    period (with the count of those logged since), else a line at ``quiet`` (info)."""

    def __init__(self, logger: logging.Logger, period: float = WARNING_PERIOD,
                 clock: Callable[[], float] = time.monotonic, quiet: int = logging.INFO) -> None:
        self.logger, self.period, self.clock, self.quiet = logger, period, clock, quiet
        self._last: dict[str, float] = {}     # kind -> when its last warning was logged
        self._since: dict[str, int] = {}      # kind -> how many at info since then

    def log(self, kind: str, message: str, *args: object) -> None:
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.period:
            self._since[kind] = self._since.get(kind, 0) + 1
            self.logger.log(self.quiet, message, *args)
            return
        self._last[kind] = now
        since = self._since.pop(kind, 0)
        minutes = round(self.period / 60)
        level = logging.getLevelName(self.quiet).lower()
        tail = (f" ({since} more like it in the last {minutes} min, at {level})" if since
                else f" (more like it in the next {minutes} min: at {level})")
        self.logger.warning(message + "%s", *args, tail)
