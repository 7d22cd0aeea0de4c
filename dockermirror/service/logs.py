"""Logging for the daemon and the CLI: one line per record, tracebacks folded onto it,
control characters escaped (``\x0d``, ``\x1b``) so that no text in a message forges a line.

When stderr is the journal (systemd sets ``JOURNAL_STREAM`` to its device:inode), each
line starts with its syslog priority (``<3>`` error ... ``<7>`` debug), which journald
turns into the entry's PRIORITY, and carries no timestamp (journald adds one).
Otherwise lines are plain: ``2026-11-28 12:00:00 INFO access: ...``.

With ``log.journal_fields`` (the default), records go to the journal through its native
protocol instead (:mod:`dockermirror.service.journal`): the same MESSAGE and PRIORITY, plus
fields (``DOCKER_MIRROR_CACHE``, ...) for each request; a record that cannot be sent that
way is still the stderr line.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from dockermirror.humanize import controls_escaped

# uvicorn reports a response our code cut off on purpose; the request line already says why.
_CUT_OFF = "ASGI callable returned without completing response."
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class OneLineFormatter(logging.Formatter):
    """``2026-11-28 12:00:00 INFO access: ...`` with any traceback on the same line."""

    def __init__(self, fmt: str = "%(asctime)s %(levelname)s %(component)s: %(message)s") -> None:
        super().__init__(fmt, "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record.component = record.name.removeprefix("dockermirror.")
        record.priority = _PRIORITY.get(record.levelno, 6)
        # a newline folds; any other control character (CR, ESC, ...) is shown, never obeyed
        return controls_escaped(super().format(record).replace("\n", " | "))

    def formatException(self, ei) -> str:
        return " | ".join(line.strip() for line in super().formatException(ei).splitlines() if line.strip())


class JournalFormatter(OneLineFormatter):
    """``<6>access: ...``: the priority prefix journald understands, no timestamp."""

    def __init__(self) -> None:
        super().__init__("<%(priority)d>%(component)s: %(message)s")


def stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return device.isdigit() and inode.isdigit() and (st.st_dev, st.st_ino) == (int(device), int(inode))


def _not_cut_off(record: logging.LogRecord) -> bool:
    return record.getMessage() != _CUT_OFF


# What uvicorn and asyncio log at warning about what a client did (our protocol logs the
# malformed and upgrade requests itself, at info): never a warning here.
_CLIENT_CAUSED = ("Invalid HTTP request received.", "Unsupported upgrade request.",
                  "No supported WebSocket library detected", "Exceeded concurrency limit.",
                  "socket.send() raised exception.")
_WHY = {"Exceeded concurrency limit.": "more connections than server.max_connections: answered 503; if this "
                                       "shows often, raise it"}
CLIENT_CAUSED_INTERVAL = 60.0
# ...but that one an admin must see (clients get 503s): a warning, once per ten minutes
_ADMIN_SEES = {"Exceeded concurrency limit.": 600.0}


class ClientCaused(logging.Filter):
    """Demotes a library's warning that a client can cause: the first of each kind an info line,
    then one a minute (saying how many came since, at debug). The concurrency limit stays a
    warning (clients got 503s: the admin should raise server.max_connections), once per ten
    minutes."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or not isinstance(record.msg, str):
            return True
        kind = next((k for k in _CLIENT_CAUSED if record.msg.startswith(k)), None)
        if kind is None:
            return True
        now = time.monotonic()
        last = self._last.get(kind)
        warn = kind in _ADMIN_SEES
        if last is not None and now - last < _ADMIN_SEES.get(kind, CLIENT_CAUSED_INTERVAL):
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        self._last[kind] = now
        quiet = self._quiet.pop(kind, 0)
        why = _WHY.get(kind, "caused by a client")
        record.msg = f"{record.getMessage()} ({why}" + (f"; {quiet} more since, at debug)" if quiet else ")")
        record.args = ()
        if warn:
            return True
        record.levelno, record.levelname = logging.INFO, "INFO"
        return logging.getLogger().isEnabledFor(logging.INFO)


_client_caused = ClientCaused()


def setup(level: str = "info", journal_fields: bool = True) -> None:
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    journal = stderr_is_journal()
    handler.setFormatter(JournalFormatter() if journal else OneLineFormatter())
    if journal and journal_fields:
        from dockermirror.service.journal import JournalHandler

        handler = JournalHandler(OneLineFormatter("%(component)s: %(message)s"), fallback=handler)
    handler.addFilter(_not_cut_off)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    for name in ("uvicorn.error", "asyncio"):
        if _client_caused not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_client_caused)


def set_level(level: str) -> None:
    root = logging.getLogger()
    root.setLevel(level.upper())
    # httpx logs every upstream request at INFO; our request line already covers them.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
