"""What the access log (RequestDone.sent: the metrics' sent and saved bytes, the journal's
DOCKER_MIRROR_BYTES, the report) counts as sent: the body bytes that really went out, on the
zero-copy path and on the copying one, also when the client goes away part-way."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
import uvicorn

from dockermirror.api.accesslog import AccessLog, RequestDone
from dockermirror.api.responses import StreamResponse
from dockermirror.cache.store import FileRange
from dockermirror.service import zerocopy

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


SCOPE = {"type": "http", "method": "GET", "path": "/v2/x/blobs/sha256:00", "query_string": b"",
         "client": ("192.0.2.1", 1)}


def scope() -> dict:
    return {**SCOPE, "state": {"cache": "HIT", "kind": "blob"}}


async def test_a_zero_copy_range_cut_off_part_way_counts_what_went_out():
    seen: list[RequestDone] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1000000")]})
        await send({"type": "http.response.zerocopysend", "file": None, "offset": 0, "count": 999_999,
                    "more_body": True})

    async def server_send(message):
        if message["type"] == "http.response.zerocopysend":
            message["sent"] = 900_000       # as zerocopy._Send does when sendfile got that far
            raise ConnectionError("the client went away or stopped reading after 900000 of 999999 bytes")

    with pytest.raises(ConnectionError):
        await AccessLog(app, on_done=seen.append)(scope(), None, server_send)
    assert seen[0].sent == 900_000 and not seen[0].complete


async def test_buffers_cut_off_part_way_count_what_went_out():
    seen: list[RequestDone] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"3000000")]})
        await send({"type": zerocopy.BUFFERS, "buffers": [b"a" * 1_000_000] * 3, "count": 3_000_000,
                    "more_body": True})

    async def server_send(message):
        if message["type"] == zerocopy.BUFFERS:
            message["sent"] = 1_500_000     # as zerocopy._Send does when writev got that far
            raise ConnectionError("the client went away or stopped reading after 1500000 of 3000000 bytes")

    with pytest.raises(ConnectionError):
        await AccessLog(app, on_done=seen.append)(scope(), None, server_send)
    assert seen[0].sent == 1_500_000 and not seen[0].complete


async def test_a_body_whose_send_raises_or_is_dropped_is_not_counted():
    """The copying path (TLS, or a server without the extension): a chunk counts once it went out."""
    seen: list[RequestDone] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a" * 1000, "more_body": True})
        await send({"type": "http.response.body", "body": b"b" * 500, "more_body": True})     # dropped
        await send({"type": "http.response.body", "body": b"c" * 2000, "more_body": False})   # raises

    async def server_send(message):
        if message.get("body", b"").startswith(b"b"):
            message["sent"] = 0             # as zerocopy._Send says of a body uvicorn dropped
        elif message.get("body", b"").startswith(b"c"):
            raise ConnectionError("gone")

    with pytest.raises(ConnectionError):
        await AccessLog(app, on_done=seen.append)(scope(), None, server_send)
    assert seen[0].sent == 1000 and not seen[0].complete


async def test_a_last_body_that_was_dropped_does_not_complete_the_response():
    seen: list[RequestDone] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def server_send(message):
        if message["type"] == "http.response.body":
            message["sent"] = 0

    await AccessLog(app, on_done=seen.append)(scope(), None, server_send)
    assert seen[0].sent == 0 and not seen[0].complete and seen[0].note == "incomplete"


async def test_a_dropped_piece_is_not_made_whole_by_the_empty_last_body_that_follows():
    """StreamResponse's shape: pieces with more_body, then an empty last body; a piece dropped
    because the client had gone leaves the response incomplete."""
    seen: list[RequestDone] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1500")]})
        await send({"type": "http.response.body", "body": b"a" * 1000, "more_body": True})
        await send({"type": "http.response.body", "body": b"b" * 500, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def server_send(message):
        if message.get("body", b"").startswith(b"b"):
            message["sent"] = 0         # as service/zerocopy.py marks a body uvicorn dropped

    await AccessLog(app, on_done=seen.append)(scope(), None, server_send)
    assert seen[0].sent == 1000 and not seen[0].complete and seen[0].note == "incomplete"


class _Server:
    """uvicorn with the mirror's protocol on 127.0.0.1, serving ``AccessLog(app)``."""

    def __init__(self, app, send_timeout: float = 60.0) -> None:
        self.done: list[RequestDone] = []

        class Protocol(zerocopy.ZeroCopyHttpToolsProtocol):
            limits = zerocopy.ClientLimits(send_timeout=send_timeout)

        self.sock = socket.create_server(("127.0.0.1", 0))
        config = uvicorn.Config(AccessLog(app, on_done=self.done.append), lifespan="off", log_config=None,
                                access_log=False, http=Protocol)
        self.server = uvicorn.Server(config)

    async def __aenter__(self) -> _Server:
        self.serving = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.serving, 10)
        self.sock.close()

    async def finished(self) -> RequestDone:
        for _ in range(1000):
            if self.done:
                return self.done[0]
            await asyncio.sleep(0.01)
        raise AssertionError("the request never finished")


class _File:
    """A body of one file range (as a cached blob is sent)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size

    async def read(self, start=0, end=None):
        yield FileRange(self.fd, 0, self.size)

    def close(self) -> None:
        pass


async def test_a_cached_blob_the_client_stops_reading_counts_the_bytes_sendfile_sent(tmp_path):
    size = 64 * 1024 * 1024     # far more than the socket buffers hold
    path = tmp_path / "blob"
    with open(path, "wb") as f:
        f.truncate(size)
    with open(path, "rb") as f:
        async def app(scope, receive, send):
            assert zerocopy.EXTENSION in scope["extensions"]
            await StreamResponse(_File(f.fileno(), size), status=200,
                                 headers=[(b"content-length", str(size).encode())])(scope, receive, send)

        async with _Server(app, send_timeout=0.3) as server:
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            client.connect(server.sock.getsockname())
            client.sendall(b"GET /v2/x/blobs/sha256:00 HTTP/1.1\r\nHost: x\r\n\r\n")
            client.setblocking(False)
            done = await server.finished()      # nothing read: the send deadline cuts it off
            client.close()
    assert done.note == "client went away" and not done.complete
    assert 0 < done.sent < size


async def test_a_body_dropped_after_the_client_went_away_is_not_counted():
    """The copying path: uvicorn drops, without a word, a body sent after the client went away."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"300000")]})
        await send({"type": "http.response.body", "body": b"a" * 1000, "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        await send({"type": "http.response.body", "body": b"b" * 100_000, "more_body": True})  # in pieces
        await send({"type": "http.response.body", "body": b"c" * 1000, "more_body": True})

    async with _Server(app) as server:
        reader, writer = await asyncio.open_connection(*server.sock.getsockname())
        writer.write(b"GET /v2/x/blobs/sha256:00 HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(1000) == b"a" * 1000
        writer.close()
        done = await server.finished()
    assert done.sent == 1000 and not done.complete


class _Mixed:
    """A body of every kind of piece a transfer's reader yields: bytes and a bytearray (the
    in-memory tail), a list of buffers (the download's window), a file range (the temp file)."""

    def __init__(self, pieces: list) -> None:
        self.pieces = pieces

    async def read(self, start=0, end=None):
        for piece in self.pieces:
            yield piece

    def close(self) -> None:
        pass


@pytest.mark.parametrize("zero_copy", [True, False], ids=["plain", "copying"])
async def test_every_kind_of_piece_reaches_the_client_whole_and_is_counted(tmp_path, zero_copy):
    window = [os.urandom(300_000), bytearray(os.urandom(1_000_000)), memoryview(b"--" + os.urandom(70_000))[2:]]
    on_file = os.urandom(200_000)
    (tmp_path / "part").write_bytes(b"x" * 5 + on_file)
    head, tail = os.urandom(10), bytearray(os.urandom(100_001))
    expected = head + bytes(tail) + b"".join(bytes(b) for b in window) + on_file
    with open(tmp_path / "part", "rb") as f:
        async def app(scope, receive, send):
            assert zerocopy.BUFFERS in scope["extensions"]
            if not zero_copy:
                scope["extensions"].pop(zerocopy.EXTENSION)
                scope["extensions"].pop(zerocopy.BUFFERS)
            await StreamResponse(_Mixed([head, tail, window, FileRange(f.fileno(), 5, len(on_file))]), status=200,
                                 headers=[(b"content-length", str(len(expected)).encode())])(scope, receive, send)

        async with _Server(app) as server:
            reader, writer = await asyncio.open_connection(*server.sock.getsockname())
            writer.write(b"GET /v2/x/blobs/sha256:00 HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            got = await asyncio.wait_for(reader.readexactly(len(expected)), 30)
            writer.close()
            done = await server.finished()
    assert got == expected
    assert done.sent == len(expected) and done.complete and not done.note
