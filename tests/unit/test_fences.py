"""The start-up self-check of the library internals the server reaches into (service/internals.py,
upstream/readsize.py): it passes on the installed (pinned) versions, so a pinned upgrade that breaks
them fails here; and a simulated drift turns the optimisation off with one log line while the
server still serves the right bytes."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path

import httpcore
import pytest
import uvicorn
from uvicorn.protocols.http import httptools_impl

from dockermirror import config as configuration
from dockermirror.service import internals, zerocopy
from dockermirror.service.server import Service
from dockermirror.upstream import readsize
from tests.unit.conftest import Harness, config_text

pytestmark = pytest.mark.anyio

LAYER = os.urandom(3 * 1024 * 1024 + 17)     # several sendfile calls' and reads' worth


def test_the_self_check_passes_on_the_installed_versions() -> None:
    """What requirements.lock pins (uvicorn 0.54, httptools 0.9, httpcore 1.0) is what the
    protocol and the read size were built against: an upgrade that changes them fails here."""
    assert internals.check(zerocopy.ZeroCopyHttpToolsProtocol) == internals.Verdict()
    import dockermirror.upstream.client  # noqa: F401  (sets the read size)

    assert readsize.check() == ""
    assert httpcore.AsyncHTTP11Connection.READ_NUM_BYTES == readsize.READ_SIZE


def test_the_http_client_steps_the_blob_transport_overrides_are_still_there() -> None:
    """upstream/blobtransport.py's response overrides two private steps of the standard library's
    ``http.client`` (every interim answer skipped; a trailer read at most so far): a Python whose
    http.client no longer calls them by these names would silently undo both."""
    import http.client
    import inspect

    from dockermirror.upstream.blobtransport import _Response

    for name in ("_read_status", "_read_and_discard_trailer"):
        assert name in vars(http.client.HTTPResponse) and name in vars(_Response)
    assert "self._read_status()" in inspect.getsource(http.client.HTTPResponse.begin)
    assert "self._read_and_discard_trailer()" in inspect.getsource(http.client.HTTPResponse._get_chunk_left)


def _hold_the_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """A uvicorn whose send holds the response head until the first body message (as a release
    could well do: one write instead of two). Correct for plain bodies; with zero-copy the file's
    bytes would go out before the head."""
    send = httptools_impl.RequestResponseCycle.send

    async def holding(self, message):
        if message["type"] == "http.response.start":
            real, held = self.transport, []

            class Holder:
                write = staticmethod(held.append)

                def __getattr__(self, name):
                    return getattr(real, name)

            self.transport = Holder()
            try:
                await send(self, message)
            finally:
                self.transport = real
            self.held_head = b"".join(held)
            return
        if getattr(self, "held_head", b""):
            self.transport.write(self.held_head)
            self.held_head = b""
        await send(self, message)

    monkeypatch.setattr(httptools_impl.RequestResponseCycle, "send", holding)


def _service(tmp_path: Path) -> Service:
    return Service(configuration.loads(config_text(tmp_path / "service-cache")), reload_config=lambda: None)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def _get_blob(harness: Harness, protocol: type, path: str) -> bytes:
    """GET ``path`` from the harness's app served by a real uvicorn with ``protocol`` on 127.0.0.1."""
    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(harness.app.asgi, lifespan="off", log_config=None, access_log=False, http=protocol)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*sock.getsockname()), 10)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: mirror.test\r\nConnection: close\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return body


async def _cached_blob(mirror: Harness) -> str:
    image = mirror.registry.push("library/app", "1", layer=LAYER)
    path = f"/v2/library/app/blobs/{image.layer}"
    assert (await mirror.client.get(path)).content == LAYER
    await mirror.app.cache.transfers.wait_all(5)    # committed: a cached blob now
    assert mirror.blob_file(image.layer).exists()
    return path


def _count_sendfile(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.sendfile

    def counting(out, fd, offset, count):
        calls.append(count)
        return real(out, fd, offset, count)

    monkeypatch.setattr(os, "sendfile", counting)
    return calls


async def test_uvicorn_response_drift_turns_zero_copy_off_in_one_line_and_the_bytes_stay_right(
        mirror: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    path = await _cached_blob(mirror)
    _hold_the_head(monkeypatch)
    caplog.set_level(logging.INFO)
    service = _service(tmp_path)
    try:
        assert service.protocol.zero_copy is False
        assert issubclass(service.protocol, zerocopy.ZeroCopyHttpToolsProtocol)     # the client limits stay
        lines = _warnings(caplog)
        assert len(lines) == 1 and lines[0].startswith("self-check: uvicorn ")
        assert "zero-copy send off: responses stream through uvicorn as plain bytes" in lines[0]
        assert "the send deadline (server.send_timeout) is off" in lines[0]
        calls = _count_sendfile(monkeypatch)
        body = await _get_blob(mirror, service.protocol, path)
    finally:
        await service.app.cache.close()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(LAYER).hexdigest() and body == LAYER
    assert calls == []          # not one byte went by sendfile


async def test_without_drift_the_cached_blob_goes_by_sendfile(
        mirror: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The control for the test above: the same path, same server, zero-copy on."""
    path = await _cached_blob(mirror)
    service = _service(tmp_path)
    try:
        assert service.protocol.zero_copy is True and _warnings(caplog) == []
        calls = _count_sendfile(monkeypatch)
        body = await _get_blob(mirror, service.protocol, path)
    finally:
        await service.app.cache.close()
    assert body == LAYER and sum(calls) >= len(LAYER)


async def test_uvicorn_request_drift_falls_back_to_the_h11_protocol_in_one_line(
        mirror: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    path = await _cached_blob(mirror)
    monkeypatch.delattr(httptools_impl.HttpToolsProtocol, "_unset_keepalive_if_required")
    service = _service(tmp_path)
    try:
        lines = _warnings(caplog)
        assert len(lines) == 1 and "serving with uvicorn's h11 protocol instead" in lines[0]
        assert "_unset_keepalive_if_required" in lines[0]
        assert not issubclass(service.protocol, zerocopy.ZeroCopyHttpToolsProtocol)
        body = await _get_blob(mirror, service.protocol, path)
    finally:
        await service.app.cache.close()
    assert body == LAYER


def test_httpcore_ignoring_the_read_size_is_said_in_one_line_and_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    """An httpcore that keeps the attribute but reads a fixed 64 KiB: said, not silently nothing."""
    import h11
    from httpcore._async import http11

    import dockermirror.upstream.client  # noqa: F401  (sets the read size)

    async def fixed_reads(self, timeout=None):
        while True:
            event = self._h11_state.next_event()
            if event is not h11.NEED_DATA:
                return event
            self._h11_state.receive_data(await self._network_stream.read(64 * 1024, timeout=timeout))

    monkeypatch.setattr(http11.AsyncHTTP11Connection, "_receive_event", fixed_reads)
    monkeypatch.setattr(http11.AsyncHTTP11Connection, "READ_NUM_BYTES", readsize.READ_SIZE)
    line = readsize.check()
    assert line.startswith("self-check: httpcore ") and "READ_NUM_BYTES ignored" in line
    assert "read at httpcore's default size" in line
    assert http11.AsyncHTTP11Connection.READ_NUM_BYTES == 64 * 1024


def test_httpcore_without_the_attribute_is_said_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from httpcore._async import http11

    monkeypatch.delattr(http11.AsyncHTTP11Connection, "READ_NUM_BYTES")
    line = readsize.check()
    assert line.startswith("self-check: httpcore ") and "has no READ_NUM_BYTES" in line


def test_the_keepalive_default_of_75_s_reaches_uvicorn(tmp_path: Path) -> None:
    """server.keepalive_timeout (75 s: longer than load balancers' 60 s idle pools) is what uvicorn
    closes idle connections after."""
    service = _service(tmp_path)
    try:
        server = service.server()
        assert server.config.timeout_keep_alive == 75
    finally:
        asyncio.run(service.app.cache.close())


def _stall(monkeypatch: pytest.MonkeyPatch) -> None:
    """A uvicorn whose send never ends: what the probe sees of a machine too busy to answer in time
    (no wrong bytes, nothing raised). Cancelled, uvicorn's 500 stalls again."""
    async def stalling(self, message):
        await asyncio.Event().wait()

    monkeypatch.setattr(httptools_impl.RequestResponseCycle, "send", stalling)


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_self_check_that_cannot_finish_in_time_keeps_the_mirrors_protocol_in_one_info_line(
        loop: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Inconclusive is not a drift: no fallback to h11 (which would cost client-certificate
    identities), and nothing the probe left behind reaches the log (asyncio: "Task was destroyed
    but it is pending" into a closed loop) or stderr (uvloop: "Exception ignored in" a coroutine)
    when it is destroyed."""
    if loop == "asyncio":       # the loop used where uvloop is not installed
        monkeypatch.setattr(internals, "_new_loop", asyncio.new_event_loop)
    unraisable: list[str] = []
    monkeypatch.setattr(sys, "unraisablehook",
                        lambda what: unraisable.append(f"{what.exc_type.__name__}: {what.object!r}"))
    _stall(monkeypatch)
    monkeypatch.setattr(internals, "PROBE_TIMEOUT", 0.2)
    monkeypatch.setattr(internals, "DRAIN_TIMEOUT", 0.1)
    caplog.set_level(logging.INFO)
    service = _service(tmp_path)
    try:
        assert issubclass(service.protocol, zerocopy.ZeroCopyHttpToolsProtocol)
        assert service.protocol.zero_copy is True
    finally:
        asyncio.run(service.app.cache.close())
    gc.collect()
    monkeypatch.undo()
    lines = [r.getMessage() for r in caplog.records if "self-check of the HTTP protocol" in r.getMessage()]
    assert len(lines) == 1 and "could not finish in time" in lines[0], lines
    assert [r.levelno for r in caplog.records if "self-check" in r.getMessage()] == [logging.INFO]
    assert _warnings(caplog) == [] and _errors(caplog) == []
    assert "Task was destroyed" not in caplog.text
    assert unraisable == []


def test_no_temporary_file_for_the_self_check_does_not_stop_the_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-dir"))
    caplog.set_level(logging.INFO)
    assert internals.check(zerocopy.ZeroCopyHttpToolsProtocol) == internals.Verdict()
    service = _service(tmp_path)
    try:
        assert issubclass(service.protocol, zerocopy.ZeroCopyHttpToolsProtocol)
    finally:
        asyncio.run(service.app.cache.close())
    lines = [r.getMessage() for r in caplog.records if "self-check" in r.getMessage()]
    assert lines and all("not run: no temporary file" in line for line in lines), lines
    assert _warnings(caplog) == []
