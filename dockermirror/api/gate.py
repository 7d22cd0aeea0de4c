"""The first thing every request meets: with ``tls.client_auth: required``, a request on a
connection without a verified client certificate is answered 401 UNAUTHORIZED with an OCI
error body that says so (:meth:`Guard.admit`), whatever its method and path: nothing is routed,
nothing reaches the cache or an upstream. The status line says it too (``401 Unauthorized: a
client certificate is required ...``, see service/zerocopy.py): containerd shows nothing else
of an error to a HEAD request, which has no body.

One path is let through without a certificate: ``/healthz`` (service/statuspage.py), which names
no repository and asks for nothing, so that load balancers and probes (a kubelet's HTTPS probe
shows no certificate) can tell a serving mirror from a dead one. The status page ``/`` is not.

Its request-log line says ``identity=anonymous refused=no-client-certificate``; a client
that retries in a loop cannot flood the log: from one address, one such line a minute at
info (with how many were refused since), the others at debug.
"""

from __future__ import annotations

import http
import time
from collections import OrderedDict
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dockermirror.access.guard import Guard
from dockermirror.access.identity import ANONYMOUS
from dockermirror.api.responses import error_response
from dockermirror.errors import RegistryError

LOG_INTERVAL = 60.0     # seconds: at most one info line per client address this often
MAX_ADDRESSES = 4096    # addresses remembered (the oldest forgotten first)
OPEN_PATHS = frozenset({"/healthz"})     # answered without a client certificate


class RefusalLog:
    """Which refused requests get an info line: the first from an address, then one a
    minute; the others are counted (and logged at debug)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.seen: OrderedDict[str, tuple[float, int]] = OrderedDict()   # address: (last info line, quiet since)

    def loud(self, address: str) -> tuple[bool, int]:
        """Whether this refusal gets an info line, and how many went quietly before it."""
        now = self.clock()
        last, quiet = self.seen.pop(address, (None, 0))
        if last is not None and now - last < LOG_INTERVAL:
            self.seen[address] = (last, quiet + 1)
            return False, quiet + 1
        self.seen[address] = (now, 0)
        while len(self.seen) > MAX_ADDRESSES:
            self.seen.popitem(last=False)
        return True, quiet


class Gate:
    """ASGI middleware in front of the routes; ``guard`` gives the guard in force (a reload
    replaces it)."""

    def __init__(self, app: ASGIApp, guard: Callable[[], Guard]) -> None:
        self.app = app
        self.guard = guard
        self.refusals = RefusalLog()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        open_path = scope["type"] == "http" and scope["path"] in OPEN_PATHS
        if scope["type"] in ("http", "websocket") and not open_path:
            try:
                self.guard().admit(scope)
            except RegistryError as exc:
                if scope["type"] == "http":
                    await self.refuse(scope, receive, send, exc)
                else:   # no such route anyway (uvicorn answers 403 to a close before the accept)
                    await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)

    async def refuse(self, scope: Scope, receive: Receive, send: Send, error: RegistryError) -> None:
        state = scope.setdefault("state", {})
        client = scope.get("client") or ("-", 0)
        loud, quiet = self.refusals.loud(str(client[0]))
        state["identity"] = ANONYMOUS
        state["refused"] = getattr(error, "refused", error.code)
        state["quiet"] = not loud
        if loud and quiet:
            state["note"] = f"{quiet} more refused from this address since the last such line (logged at debug)"
        reason = f"{http.HTTPStatus(error.status).phrase}: {error.message}"

        async def send_with_reason(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "reason": reason}
            await send(message)

        await error_response(error, head=scope.get("method") == "HEAD")(scope, receive, send_with_reason)
