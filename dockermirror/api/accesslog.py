"""One log line per request, and the registry API version header on every response.

Handlers leave notes for the line in ``scope["state"]``: ``cache`` (HIT, MISS, STALE,
COALESCED, PASS), ``upstream`` (the upstream the request was routed to),
``upstream_status`` (the upstream's HTTP status), ``identity`` (who asked, once the access
guard or a client certificate says) and ``note`` (why a request failed).
A request on a connection with a verified client certificate names its subject (``cert=``).

Everything in the line that a client (or an upstream, through a note) chose is escaped
like nginx does (``\x0d``, ``\x1b``, ``\x22``): a request cannot forge or split a line.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dockermirror.humanize import printable

log = logging.getLogger("dockermirror.access")

API_VERSION = (b"docker-distribution-api-version", b"registry/2.0")
_PLAIN = re.compile(r"[A-Za-z0-9._:@*-]+")


@functools.lru_cache(maxsize=1024)     # the same few identities, request after request
def _identity(text: str) -> str:
    """`` identity=user:ci``; quoted and escaped when it holds more than a plain name (a
    certificate's common name can hold anything; its whole subject follows as ``cert=``)."""
    return f" identity={text}" if _PLAIN.fullmatch(text) else f' identity="{printable(text)}"'



class AccessLog:
    def __init__(self, app: ASGIApp, on_done: Callable[[str | None, int, str | None], None] | None = None) -> None:
        self.app = app
        self.on_done = on_done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        sent = 0
        complete = False

        async def send_and_count(message: Message) -> None:
            nonlocal status, sent, complete
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), API_VERSION]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
                complete = not message.get("more_body", False)
            elif message["type"] == "http.response.zerocopysend":
                await send(message)
                sent += message["count"]  # counted once it went out
                return
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            state = scope.get("state") or {}
            cache = state.get("cache")
            query = scope.get("query_string") or b""
            path = printable(scope["path"]) + ("?" + printable(query) if query else "")
            client = scope.get("client") or ("-", 0)
            note = state.get("note") or ("" if complete or not status else "incomplete")
            upstream = state.get("upstream")
            identity = state.get("identity")
            certificate = scope.get("client_certificate")
            log.info(
                '%s "%s %s" %d %d %.1fms cache=%s upstream=%s upstream_status=%s%s%s%s',
                printable(str(client[0])), printable(scope["method"]), path, status, sent,
                (time.perf_counter() - started) * 1000, cache or "-", printable(str(upstream or "-")),
                printable(str(state.get("upstream_status") or "-")),
                _identity(str(identity)) if identity is not None else "",
                f' cert="{printable(certificate["subject"])}"' if certificate else "",
                f' note="{printable(str(note))}"' if note else "",
            )
            if self.on_done is not None:
                self.on_done(cache, sent, upstream)
