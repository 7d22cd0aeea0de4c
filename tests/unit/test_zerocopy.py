"""sendfile on a non-blocking socket, waiting on the event loop: a slow reader gets every byte,
one that takes nothing is given up on, and no thread waits for either."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from dockermirror.service import zerocopy

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def connected_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(server.getsockname())
        peer, _ = server.accept()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setblocking(False)
    return peer, client


async def test_a_slow_steady_reader_gets_every_byte_however_long_it_takes(tmp_path):
    data = os.urandom(512 * 1024)
    (tmp_path / "blob").write_bytes(data)
    peer, client = connected_pair()
    client.setblocking(False)
    received = bytearray()

    async def read_slowly() -> None:        # 4 KiB every 5 ms, ~1 s in all: a stall deadline of
        while len(received) < len(data):    # 0.2 s is passed many times over, never without progress
            try:
                received.extend(client.recv(4096))
            except BlockingIOError:
                pass
            await asyncio.sleep(0.005)

    with open(tmp_path / "blob", "rb") as f:
        reader = asyncio.create_task(read_slowly())
        sent = await zerocopy.sendfile(peer.fileno(), f.fileno(), 0, len(data), stall=0.2)
        await asyncio.wait_for(reader, 30)
    assert sent == len(data) and bytes(received) == data
    peer.close()
    client.close()


async def test_a_reader_that_takes_nothing_is_given_up_on_after_the_stall_deadline(tmp_path):
    (tmp_path / "blob").write_bytes(b"x" * (8 * 1024 * 1024))
    peer, client = connected_pair()
    with open(tmp_path / "blob", "rb") as f:
        sent = await asyncio.wait_for(zerocopy.sendfile(peer.fileno(), f.fileno(), 0, 8 * 1024 * 1024, stall=0.3),
                                      30)
    assert 0 < sent < 8 * 1024 * 1024
    peer.close()
    client.close()


async def test_buffers_reach_a_slow_reader_whole_and_in_order():
    """Bytes kept in memory (a download's window: several buffers, views among them) go out with
    writev: every byte, in order, across partial writes into a small socket buffer."""
    chunks = [os.urandom(n) for n in (1, 70_000, 300_000, 4096, 123_457)]
    buffers = [chunks[0], bytearray(chunks[1]), memoryview(b"xx" + chunks[2])[2:], chunks[3], chunks[4]]
    data = b"".join(chunks)
    peer, client = connected_pair()
    client.setblocking(False)
    received = bytearray()
    progress: dict = {}

    async def read_slowly() -> None:
        while len(received) < len(data):
            try:
                received.extend(client.recv(4096))
            except BlockingIOError:
                pass
            await asyncio.sleep(0.002)

    reader = asyncio.create_task(read_slowly())
    sent = await zerocopy.send_buffers(peer.fileno(), buffers, stall=5, progress=progress)
    await asyncio.wait_for(reader, 30)
    assert sent == len(data) == progress["sent"] and bytes(received) == data
    peer.close()
    client.close()


async def test_buffers_to_a_reader_that_takes_nothing_are_given_up_on_after_the_stall_deadline():
    peer, client = connected_pair()
    progress: dict = {}
    buffers = [b"z" * (1024 * 1024)] * 8
    sent = await asyncio.wait_for(zerocopy.send_buffers(peer.fileno(), buffers, stall=0.3, progress=progress), 30)
    assert 0 < sent < 8 * 1024 * 1024 and progress["sent"] == sent
    client.close()      # a peer that went away: what is left is not sent, nothing raises
    assert await asyncio.wait_for(zerocopy.send_buffers(peer.fileno(), buffers, stall=5), 30) < 8 * 1024 * 1024
    peer.close()


async def test_many_stalled_readers_hold_no_thread(tmp_path):
    """More stalled transfers than there are sendfile threads: another one still goes through."""
    (tmp_path / "blob").write_bytes(b"y" * (4 * 1024 * 1024))
    pairs = [connected_pair() for _ in range(zerocopy.SENDFILE_THREADS * 2)]
    with open(tmp_path / "blob", "rb") as f:
        stalled = [asyncio.create_task(zerocopy.sendfile(p.fileno(), f.fileno(), 0, 4 * 1024 * 1024, stall=60))
                   for p, _ in pairs]
        await asyncio.sleep(0.2)
        peer, client = connected_pair()
        sent = await asyncio.wait_for(zerocopy.sendfile(peer.fileno(), f.fileno(), 0, 1000, stall=60), 10)
        assert sent == 1000 and client.recv(1000, socket.MSG_WAITALL) == b"y" * 1000
        assert not any(task.done() for task in stalled)
        for task in stalled:
            task.cancel()
        await asyncio.gather(*stalled, return_exceptions=True)
    for p, c in [*pairs, (peer, client)]:
        p.close()
        c.close()


async def test_a_response_may_bring_its_own_reason_phrase():
    """``"reason"`` in the response start (the mirror's 401 for a missing client certificate: what
    containerd shows of a failed HEAD); one that cannot be sent falls back to the standard one."""
    import uvicorn

    reasons = iter(["Unauthorized: a client certificate is required (tls.client_auth: required)",
                    "Unauthorized\r\nX-Evil: 1", None])

    async def app(scope, receive, send):
        reason = next(reasons)
        await send({"type": "http.response.start", "status": 401, "reason": reason,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})

    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                            http=zerocopy.ZeroCopyHttpToolsProtocol)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        lines = []
        for _ in range(3):
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*sock.getsockname()), 10)
            writer.write(b"HEAD /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            lines.append(answer.split(b"\r\n")[0])
            assert b"x-evil" not in answer.lower()
        assert lines == [b"HTTP/1.1 401 Unauthorized: a client certificate is required (tls.client_auth: required)",
                         b"HTTP/1.1 401 Unauthorized", b"HTTP/1.1 401 Unauthorized"]
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
        sock.close()
