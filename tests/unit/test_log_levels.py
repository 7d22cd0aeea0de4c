"""What uvicorn and asyncio log at warning about what a client did is an info line at most once a
minute (the rest at debug); every other warning stays a warning."""

from __future__ import annotations

import logging

import pytest

pytestmark = pytest.mark.anyio

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


# --- an upstream outage: one warning when it starts, one when it ends; a 5xx-answering upstream too

async def test_an_outage_is_one_warning_when_it_starts_and_one_when_it_ends(caplog: pytest.LogCaptureFixture):
    import httpx

    from dockermirror.upstream.client import UpstreamClient, UpstreamUnreachable
    from tests.unit.fakes import UPSTREAM, response

    state = {"answer": "down"}

    def handle(request: httpx.Request) -> httpx.Response:
        if state["answer"] == "down":
            raise httpx.ConnectError("connection refused", request=request)
        return response(int(state["answer"]))

    caplog.set_level(logging.INFO, "dockermirror")
    client = UpstreamClient(UPSTREAM, transport=httpx.MockTransport(handle))

    async def ask(times: int) -> None:
        for _ in range(times):
            try:
                await client.manifest("a/b", "1", ["application/json"], head=True)
            except UpstreamUnreachable:
                pass
            except Exception:
                pass

    def warnings() -> list[str]:
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        caplog.clear()
        return lines

    try:
        await ask(3)
        [down] = warnings()
        assert down.startswith("upstream registry.test is unreachable (") and "ConnectError" in down
        state["answer"] = "404"         # an answer (a 404 is the client's question, not an outage)
        await ask(3)
        assert warnings() == ["upstream registry.test answers again (it was unreachable: "
                              f"{client.last_error})"]
        state["answer"] = "503"
        await ask(3)
        assert warnings() == ["upstream registry.test fails: it answers HTTP 503; requests that need it fail "
                              "until it answers again"]
        state["answer"] = "404"
        await ask(2)
        assert warnings() == ["upstream registry.test answers again (it answered HTTP 503)"]
        state["answer"] = "429"         # Docker Hub's pull limit: once when it starts, once when it ends
        await ask(3)
        assert warnings() == ["upstream registry.test fails: it answers HTTP 429; requests that need it fail "
                              "until it answers again"]
        state["answer"] = "404"
        await ask(1)
        assert warnings() == ["upstream registry.test answers again (it answered HTTP 429)"]
    finally:
        await client.aclose()
