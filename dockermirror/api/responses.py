"""ASGI responses: registry errors as JSON, and blob bodies streamed from the cache."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from dockermirror.errors import RegistryError
from dockermirror.humanize import printable

log = logging.getLogger("dockermirror.api")

# A header value we send: visible ASCII, spaces and tabs (RFC 9110 field-content without
# obs-text: no media type, digest or host name needs more), so never a CR, LF or NUL.
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*", re.ASCII)


def sendable(value: object) -> bool:
    """May this be sent as a header value (or forwarded upstream as one)?"""
    return isinstance(value, str) and _FIELD_VALUE.fullmatch(value) is not None


def error_response(error: RegistryError, *, head: bool = False) -> Response:
    body = json.dumps(error.body()).encode()
    # a header from the upstream (Retry-After) that could not be sent as it is, is left out
    headers = {name: value for name, value in error.headers.items() if sendable(value)}
    if head:  # same headers, no body
        headers["Content-Length"] = str(len(body))
        return Response(b"", status_code=error.status, headers=headers, media_type="application/json")
    return Response(body, status_code=error.status, headers=headers, media_type="application/json")


Buffer = bytes | bytearray | memoryview


class Piece(Protocol):
    """A range of an open file (see dockermirror.cache.store.FileRange)."""

    offset: int
    count: int

    def fileno(self) -> int: ...


class Body(Protocol):
    """Bytes as they come: bytes, a list of buffers (consecutive, kept in memory), or a file range."""

    def read(self, start: int = 0, end: int | None = None) -> AsyncIterator[Buffer | list[Buffer] | Piece]: ...

    def close(self) -> None: ...


ZERO_COPY = "http.response.zerocopysend"
BUFFERS = "dockermirror.response.buffers"    # ours (service/zerocopy.py): buffers written with writev
READ_CHUNK = 256 * 1024


class StreamResponse:
    """Streams ``body.read(start, end)`` and stops as soon as the client goes away.

    File ranges go out with the ASGI zero-copy extension when the server offers it
    (``sendfile``: no byte passes through Python), else in reads of READ_CHUNK bytes; a list
    of buffers goes out with our own extension of the same kind (service/zerocopy.BUFFERS:
    written to the socket as they are, several at once), else one body message each.
    If the body fails part-way (a transfer whose bytes did not verify, a read error),
    the response is cut off rather than completed, so the client sees an error.

    The response owns its body from the moment it is made: the body (an open file and its
    lease, or a reader registered with a transfer) is closed when the response ends, however
    it ends (sent, client gone, the response start refused, cancelled), or by :meth:`close`
    if the response is never sent.
    """

    def __init__(self, body: Body, *, status: int, headers: list[tuple[bytes, bytes]],
                 start: int = 0, end: int | None = None) -> None:
        self.body = body
        self.status = status
        self.headers = headers
        self.start = start
        self.end = end

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return self.headers

    def close(self) -> None:
        """Release the body without sending anything (the response will not be sent)."""
        self.body.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected: asyncio.Task[Message] | None = None
        pieces: AsyncGenerator[Buffer | list[Buffer] | Piece, None] | None = None
        note = None
        try:
            await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
            # sendfile cannot frame chunked encoding: only a response of known length goes zero-copy
            extensions = scope.get("extensions", {})
            known_length = any(name == b"content-length" for name, _ in self.headers)
            zero_copy = ZERO_COPY in extensions and known_length
            writev = BUFFERS in extensions and known_length
            disconnected = asyncio.get_running_loop().create_task(_wait_disconnect(receive))
            pieces = self.body.read(self.start, self.end)
            async for piece in pieces:
                if disconnected.done():
                    note = "client went away"
                    return
                if isinstance(piece, (bytes, bytearray, memoryview)):   # kept in memory
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                elif isinstance(piece, list):   # kept in memory, several buffers
                    if writev:
                        await send({"type": BUFFERS, "buffers": piece, "count": sum(len(b) for b in piece),
                                    "more_body": True})
                    else:
                        for buffer in piece:
                            await send({"type": "http.response.body", "body": buffer, "more_body": True})
                elif zero_copy:
                    await send({"type": ZERO_COPY, "file": piece, "offset": piece.offset, "count": piece.count,
                                "more_body": True})
                else:
                    for offset in range(piece.offset, piece.offset + piece.count, READ_CHUNK):
                        size = min(READ_CHUNK, piece.offset + piece.count - offset)
                        data = await asyncio.get_running_loop().run_in_executor(
                            None, os.pread, piece.fileno(), size, offset)
                        if len(data) != size:
                            raise OSError(f"file shorter than expected at byte {offset + len(data)}")
                        await send({"type": "http.response.body", "body": data, "more_body": True})
                        if disconnected.done():
                            break
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except ConnectionError:
            note = "client went away"
        except Exception as exc:
            note = f"response cut off: {exc}"
            log.error("%s %s: response cut off: %s", scope["method"], printable(scope["path"]), exc)
        finally:
            if note:
                scope.setdefault("state", {})["note"] = note
            if disconnected is not None:
                disconnected.cancel()
            try:
                if pieces is not None:
                    await pieces.aclose()
            finally:
                # a reader that never started (or whose clean-up was cut short) is released here
                self.body.close()


async def _wait_disconnect(receive: Receive) -> Message:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return message
