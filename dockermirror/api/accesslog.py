"""One log line per request, and the registry API version header on every response.

With a node name (``node:`` of the configuration, read per request: a reload changes it) each
response also carries ``Docker-Mirror-Node: NAME`` (errors too) and the line ends with ``node=NAME``.

Handlers leave notes for the line in ``scope["state"]``: ``cache`` (HIT, MISS, STALE,
COALESCED, PASS), ``upstream`` (the upstream the request was routed to),
``upstream_status`` (the upstream's HTTP status), ``identity`` (who asked, once the access
guard or a client certificate says), ``refused`` (a short reason, e.g. ``no-client-certificate``,
dockermirror/api/gate.py), ``quiet`` (log this line at debug: a refusal repeated too often
for info), ``note`` (why a request failed), ``kind`` (manifest, blob, tags, referrers; else
other), ``repository`` and ``reference`` (tag or digest) and ``digest`` (the one served).

Each finished request is also one :class:`RequestDone`: handed to ``on_done`` (counters,
metrics) and attached to the log record as ``record.request`` (structured journal fields).
A request on a connection with a verified client certificate names its subject (``cert=``).

``sent`` is the body bytes that went out: a body message counts once ``send`` returned (none
if it raised); the server may say less by putting ``"sent"`` in the message (our server does
for a body it dropped because the client had gone, and for a zero-copy range, whose ``"sent"``
it keeps current while it sends and leaves set when it raises part-way).

Everything in the line that a client (or an upstream, through a note) chose is escaped
like nginx does (``\x0d``, ``\x1b``, ``\x22``): a request cannot forge or split a line.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dockermirror.api.responses import BUFFERS, ZERO_COPY
from dockermirror.cacheresults import is_pull
from dockermirror.humanize import printable

log = logging.getLogger("dockermirror.access")

API_VERSION = (b"docker-distribution-api-version", b"registry/2.0")
NODE_HEADER = b"docker-mirror-node"
_PLAIN = re.compile(r"[A-Za-z0-9._:@*-]+")


@functools.lru_cache(maxsize=1024)     # the same few identities, request after request
def _identity(text: str) -> str:
    """`` identity=user:ci``; quoted and escaped when it holds more than a plain name (a
    certificate's common name can hold anything; its whole subject follows as ``cert=``)."""
    return f" identity={text}" if _PLAIN.fullmatch(text) else f' identity="{printable(text)}"'



KINDS = ("manifest", "blob", "tags", "referrers", "other")


@dataclass(slots=True, frozen=True)
class RequestDone:
    """One finished request, as the log line says it (``client``: the TCP peer's address, or the
    client a trusted proxy named in X-Forwarded-For: api/forwarded.py)."""
    client: str
    method: str
    path: str                   # path and query as received (not escaped; the query's bytes as latin-1)
    status: int                 # 0: no response was started
    sent: int                   # body bytes that went out
    seconds: float
    complete: bool              # the whole body went out
    kind: str                   # one of KINDS
    cache: str | None           # HIT, MISS, STALE, COALESCED, PASS; None: not a cache answer
    upstream: str | None        # the upstream's key (docker.io, ghcr.io, ...) once routed
    upstream_status: int | None
    repository: str | None      # within its upstream
    reference: str | None       # tag or digest
    identity: str | None        # str(Identity): anonymous, user:NAME, cert:CN
    certificate: str | None     # the client certificate's subject
    note: str | None
    digest: str | None = None   # the digest served (Docker-Content-Digest: what a tag resolved to)
    node: str | None = None     # this node's name (``node:``), if it has one

    @property
    def pull(self) -> bool:
        """A manifest GET answered 2xx: what Docker Hub counts as a pull."""
        return is_pull(self.kind, self.method, self.status)


class AccessLog:
    def __init__(self, app: ASGIApp, on_done: Callable[[RequestDone], None] | None = None,
                 node: Callable[[], str] = lambda: "") -> None:
        """``node``: this node's name now ('' for none; config.py checked it is a short label)."""
        self.app = app
        self.on_done = on_done
        self.node = node

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        node = self.node()
        headers_added = [API_VERSION, (NODE_HEADER, node.encode("ascii"))] if node else [API_VERSION]
        status = 0
        sent = 0
        complete = False
        short = False

        async def send_and_count(message: Message) -> None:
            nonlocal status, sent, complete, short
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *headers_added]
            elif message["type"] == "http.response.body":
                await send(message)     # counted once it went out: nothing if this raises
                size = len(message.get("body", b""))
                went = message.get("sent", size)
                sent += went
                short = short or went < size     # a dropped piece: never complete, whatever follows
                complete = not short and not message.get("more_body", False)
                return
            elif message["type"] in (ZERO_COPY, BUFFERS):
                try:
                    await send(message)
                except BaseException:
                    sent += message.get("sent", 0)  # the part that went out before the client did
                    raise
                sent += message.get("sent", message["count"])
                return
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            state = scope.get("state") or {}
            cache = state.get("cache")
            query = scope.get("query_string") or b""
            raw_path = scope["path"] + ("?" + query.decode("latin-1") if query else "")
            client = scope.get("client") or ("-", 0)
            note = state.get("note") or ("" if complete or not status else "incomplete")
            upstream = state.get("upstream")
            identity = state.get("identity")
            certificate = scope.get("client_certificate")
            upstream_status = state.get("upstream_status")
            refused = state.get("refused")
            done = RequestDone(
                client=str(client[0]), method=scope["method"], path=raw_path, status=status, sent=sent,
                seconds=time.perf_counter() - started, complete=complete, kind=state.get("kind") or "other",
                cache=cache, upstream=upstream, upstream_status=upstream_status,
                repository=state.get("repository"), reference=state.get("reference"),
                identity=str(identity) if identity is not None else None,
                certificate=certificate["subject"] if certificate else None, note=note or None,
                digest=state.get("digest"), node=node or None)
            log.log(
                logging.DEBUG if state.get("quiet") else logging.INFO,
                '%s "%s %s" %d %d %.1fms cache=%s upstream=%s upstream_status=%s%s%s%s%s%s',
                printable(done.client), printable(done.method),
                printable(scope["path"]) + ("?" + printable(query) if query else ""), status, sent,
                done.seconds * 1000, cache or "-", printable(str(upstream or "-")),
                printable(str(upstream_status or "-")),
                _identity(done.identity) if done.identity is not None else "",
                f" refused={printable(str(refused))}" if refused else "",
                f' cert="{printable(done.certificate)}"' if certificate else "",
                f' note="{printable(str(note))}"' if note else "",
                f" node={node}" if node else "",
                extra={"request": done},
            )
            if self.on_done is not None:
                self.on_done(done)
