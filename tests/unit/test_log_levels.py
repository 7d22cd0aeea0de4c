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
    other = record("Invalid HTTP request received.".replace("Invalid HTTP request received.",
                                                            "Unsupported upgrade request."))  # another kind: its own minute
    assert demote.filter(other) and other.levelno == logging.INFO
    now[0] += logs.CLIENT_CAUSED_INTERVAL
    later = record("Invalid HTTP request received.")
    assert demote.filter(later) and later.levelno == logging.INFO
    assert later.getMessage() == "Invalid HTTP request received. (caused by a client; 3 more since, at debug)"


def test_the_concurrency_limit_is_a_warning_once_per_ten_minutes(monkeypatch: pytest.MonkeyPatch, at_info):
    """Clients got 503s: an admin must see it (raise server.max_connections), but not 1000 times."""
    now = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    demote = logs.ClientCaused()
    first = record("Exceeded concurrency limit.")
    assert demote.filter(first) and first.levelno == logging.WARNING and first.levelname == "WARNING"
    assert "server.max_connections" in first.getMessage()
    for _ in range(5):
        now[0] += 60
        again = record("Exceeded concurrency limit.")
        assert not demote.filter(again) and again.levelno == logging.DEBUG
    now[0] = 1000.0 + 600
    later = record("Exceeded concurrency limit.")
    assert demote.filter(later) and later.levelno == logging.WARNING
    assert later.getMessage().endswith("raise it; 5 more since, at debug)")


def test_a_blob_larger_than_the_cache_warns_once_per_ten_minutes(caplog: pytest.LogCaptureFixture, monkeypatch):
    """Every client pulling a public blob larger than max_size: one warning a period, the rest info."""
    from dockermirror.cache import inflight
    from dockermirror.lograte import RateLimited

    now = [0.0]
    monkeypatch.setattr(inflight, "not_caching_log", RateLimited(inflight.log, clock=lambda: now[0]))

    class Fake:
        caching, spilling, _reserved, _temp, size = True, False, 0, None, 10**12
        space = type("S", (), {"release": lambda self, n: None})()

    caplog.set_level(logging.INFO, logger="dockermirror.cache")
    for i in range(4):
        fake = Fake()
        fake.digest = f"sha256:{i:064x}"
        inflight.Transfer._not_cached(fake, "it is larger than the cache")
        now[0] += 60
    now[0] = 600.0
    fake = Fake()
    fake.digest = "sha256:" + "f" * 64
    inflight.Transfer._not_cached(fake, "it is larger than the cache")
    levels = [(r.levelname, r.getMessage()) for r in caplog.records if "not caching" in r.getMessage()]
    assert [level for level, _ in levels] == ["WARNING", "INFO", "INFO", "INFO", "WARNING"]
    assert levels[0][1].startswith(f"not caching sha256:{0:064x} (1000000000000 bytes): it is larger than the cache")
    assert levels[-1][1].endswith("(3 more like it in the last 10 min, at info)")


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
    now = [0.0]
    client.outage.clock = lambda: now[0]

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
        state["answer"] = "503"         # another outage, after the quiet period
        now[0] += 600
        await ask(3)
        assert warnings() == ["upstream registry.test fails: it answers HTTP 503; requests that need it fail "
                              "until it answers again"]
        state["answer"] = "404"
        await ask(2)
        assert warnings() == ["upstream registry.test answers again (it answered HTTP 503)"]
        state["answer"] = "429"         # Docker Hub's pull limit: one line with the count, not an outage
        await ask(3)
        [limit] = warnings()
        assert limit.startswith("upstream registry.test answers HTTP 429 (too many requests") and "(1 such" in limit
        state["answer"] = "404"
        await ask(1)
        assert warnings() == []
    finally:
        await client.aclose()


async def test_a_flapping_upstream_or_one_failing_path_cannot_flood_the_warnings(caplog):
    """A client alternating a failing path with a working one is no outage; an upstream that
    flaps is one warning pair a quiet period, the rest at info, counted in the next warning."""
    import dockermirror.upstream.outage as outage

    now = [1000.0]
    log = outage.OutageLog(clock=lambda: now[0])
    caplog.set_level(logging.INFO, "dockermirror")

    def warnings() -> list[str]:
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        caplog.clear()
        return lines

    for _ in range(20):                 # one path answers 503, another 404: never three 5xx in a row
        log.answered("up", 503)
        log.answered("up", 404)
    assert warnings() == []
    for _ in range(10):                 # a real outage, then it flaps within the quiet period
        for status in (503, 503, 503, 200):
            log.answered("up", status)
        log.unreachable("up", "connection refused")
        log.answered("up", 200)
    assert warnings() == ["upstream up fails: it answers HTTP 503; requests that need it fail until it answers again",
                          "upstream up answers again (it answered HTTP 503)"]
    now[0] += outage.QUIET
    log.unreachable("up", "connection refused")
    [down] = warnings()
    assert down.startswith("upstream up is unreachable (connection refused)") and "(19 more outage(s)" in down
    for _ in range(50):
        log.answered("up", 429)
    [limit] = warnings()
    assert "(1 such answer(s) since the last line)" in limit
    now[0] += outage.QUIET
    log.answered("up", 429)
    assert "(50 such answer(s)" in warnings()[0]
