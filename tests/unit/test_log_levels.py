"""What uvicorn and asyncio log at warning about what a client did is an info line at most once a
minute (the rest at debug); every other warning stays a warning."""

from __future__ import annotations

import logging

import pytest

from dockermirror.service import logs


def record(message: str, level: int = logging.WARNING, name: str = "uvicorn.error") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, (), None)


@pytest.fixture
def at_info():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    yield
    root.setLevel(level)


def test_client_caused_warnings_are_info_once_a_minute(monkeypatch: pytest.MonkeyPatch, at_info):
    now = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    demote = logs.ClientCaused()
    first = record("Invalid HTTP request received.")
    assert demote.filter(first) and first.levelno == logging.INFO and first.levelname == "INFO"
    for _ in range(3):
        again = record("Invalid HTTP request received.")
        assert not demote.filter(again) and again.levelno == logging.DEBUG      # at debug: not shown at info
    other = record("Exceeded concurrency limit.")                              # another kind: its own minute
    assert demote.filter(other) and other.levelno == logging.INFO and "server.max_connections" in other.getMessage()
    now[0] += logs.CLIENT_CAUSED_INTERVAL
    later = record("Invalid HTTP request received.")
    assert demote.filter(later) and later.levelno == logging.INFO
    assert later.getMessage() == "Invalid HTTP request received. (caused by a client; 3 more since, at debug)"


def test_other_warnings_and_errors_are_kept():
    demote = logs.ClientCaused()
    for level, message in ((logging.WARNING, "TLS certificate x expires in 9 day(s)"),
                           (logging.ERROR, "Invalid HTTP request received."),
                           (logging.ERROR, "Exception in ASGI application")):
        kept = record(message, level)
        assert demote.filter(kept) and kept.levelno == level and kept.getMessage() == message


def test_setup_attaches_it_to_uvicorn_and_asyncio_once():
    saved = logging.getLogger().handlers[:], logging.getLogger().level
    try:
        logs.setup("info")
        logs.setup("info")
        for name in ("uvicorn.error", "asyncio"):
            assert [f for f in logging.getLogger(name).filters if isinstance(f, logs.ClientCaused)] == [logs._client_caused]
    finally:
        logging.getLogger().handlers[:], level = saved
        logging.getLogger().setLevel(level)
        for name in ("uvicorn.error", "asyncio"):
            logging.getLogger(name).removeFilter(logs._client_caused)
