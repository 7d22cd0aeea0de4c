"""A failed answer to an upstream's 401 (here: a token realm it may not send us to) gives the blob
pool's connection back: 70 such failures in a row (the pool has 64) leave room for the next blob."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest

from dockermirror.errors import Denied
from dockermirror.upstream.client import BLOB_POOL, UpstreamClient
from tests.unit.test_blob_transport import Request, serve  # noqa: F401 - the fixture

pytestmark = pytest.mark.anyio
DATA = os.urandom(100_000)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
UNREACHABLE = "sha256:" + "0" * 64


def answer(conn: socket.socket, request: Request) -> bool:
    if request.target.endswith(DIGEST):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(DATA) + DATA)
    else:   # a token service on another host, which is refused
        conn.sendall(b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm="http://127.0.0.2:1/token",'
                     b'service="x"\r\nContent-Length: 2\r\n\r\n{}')
    return True


async def test_a_failed_token_answer_gives_the_connection_back(serve):  # noqa: F811
    server = serve(answer)
    client = UpstreamClient(server.url, username="u", password="p", read_timeout=5)   # credentials: realms checked
    assert BLOB_POOL.max_connections < 70

    async def pulls() -> bytes:
        for _ in range(70):
            with pytest.raises(Denied):
                await client.open_blob("acme/tool", UNREACHABLE)
        stream = await client.open_blob("acme/tool", DIGEST)
        try:
            return b"".join([chunk async for chunk in stream.chunks()])
        finally:
            await stream.aclose()

    try:
        assert await asyncio.wait_for(pulls(), 30) == DATA   # not a pool wait of 60 s and a 503
    finally:
        await client.aclose()
