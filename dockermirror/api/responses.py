"""ASGI responses: registry errors as JSON, and blob bodies streamed from the cache."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from dockermirror.errors import RegistryError

log = logging.getLogger("dockermirror.api")


def error_response(error: RegistryError, *, head: bool = False) -> Response:
    body = json.dumps(error.body()).encode()
    headers = dict(error.headers)
    if head:  # same headers, no body
        headers["Content-Length"] = str(len(body))
        return Response(b"", status_code=error.status, headers=headers, media_type="application/json")
    return Response(body, status_code=error.status, headers=headers, media_type="application/json")


class Body(Protocol):
    def read(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]: ...

    def close(self) -> None: ...


class StreamResponse:
    """Streams ``body.read(start, end)`` and stops as soon as the client goes away.

    If the body fails part-way (a transfer whose bytes did not verify, a read error),
    the response is cut off rather than completed, so the client sees an error.
    """

    def __init__(self, body: Body, *, status: int, headers: list[tuple[bytes, bytes]],
                 start: int = 0, end: int | None = None) -> None:
        self.body = body
        self.status = status
        self.headers = headers
        self.start = start
        self.end = end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        disconnected = asyncio.get_running_loop().create_task(_wait_disconnect(receive))
        chunks = self.body.read(self.start, self.end)
        try:
            async for chunk in chunks:
                if disconnected.done():
                    scope.setdefault("state", {})["note"] = "client went away"
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception as exc:
            scope.setdefault("state", {})["note"] = f"response cut off: {exc}"
            log.error("%s %s: response cut off: %s", scope["method"], scope["path"], exc)
        finally:
            disconnected.cancel()
            await chunks.aclose()


async def _wait_disconnect(receive: Receive) -> Message:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return message
