"""Logging for the daemon and the CLI: one line per record, tracebacks folded onto it."""

from __future__ import annotations

import logging
import sys

# uvicorn reports a response our code cut off on purpose; the request line already says why.
_CUT_OFF = "ASGI callable returned without completing response."


class OneLineFormatter(logging.Formatter):
    """``2026-11-28 12:00:00 INFO access: ...`` with any traceback on the same line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(component)s: %(message)s", "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record.component = record.name.removeprefix("dockermirror.")
        return super().format(record).replace("\n", " | ")

    def formatException(self, ei) -> str:
        return " | ".join(line.strip() for line in super().formatException(ei).splitlines() if line.strip())


def _not_cut_off(record: logging.LogRecord) -> bool:
    return record.getMessage() != _CUT_OFF


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter())
    handler.addFilter(_not_cut_off)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every upstream request at INFO; our request line already covers them.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
