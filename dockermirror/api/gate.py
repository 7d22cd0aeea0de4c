"""The first thing every request meets: with ``tls.client_auth: required``, a request on a
connection without a verified client certificate is answered 401 UNAUTHORIZED with an OCI
error body that says so (:meth:`Guard.admit`), whatever its method and path: nothing is routed,
nothing reaches the cache or an upstream. The status line says it too (``401 Unauthorized: a
client certificate is required ...``, see service/zerocopy.py): containerd shows nothing else
of an error to a HEAD request, which has no body. So is a request whose connection's
certificate was refused since the connection opened (revoked, no longer issued by a client
CA, expired: service/clientcert.py), whatever ``client_auth`` is.

A refused request's answer closes its connection (``Connection: close``): a client without a
certificate holds no connection slot on keep-alive, and one whose certificate was revoked
cannot go on asking.

One path is let through without a certificate: ``/healthz`` (service/statuspage.py), which names
no repository and asks for nothing, so that load balancers and probes (a kubelet's HTTPS probe
shows no certificate) can tell a serving mirror from a dead one. The status page ``/`` is not.

Its request-log line says ``identity=anonymous refused=no-client-certificate`` (or
``refused=certificate-revoked`` and the like, with the certificate's subject in the note); a
client that retries in a loop, or many clients, cannot flood the log (api/refusals.py): from
one address (an IPv6 /64), one such line a minute at info (with how many were refused since),
at most BUDGET such lines a minute in all, the others at debug.
"""

from __future__ import annotations

import http
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dockermirror.access.guard import Guard
from dockermirror.access.identity import ANONYMOUS
from dockermirror.api.refusals import RefusalLog
from dockermirror.api.responses import error_response
from dockermirror.errors import RegistryError

OPEN_PATHS = frozenset({"/healthz"})     # answered without a client certificate


class Gate:
    """ASGI middleware in front of the routes; ``guard`` gives the guard in force (a reload
    replaces it)."""

    def __init__(self, app: ASGIApp, guard: Callable[[], Guard], refusals: RefusalLog | None = None) -> None:
        self.app = app
        self.guard = guard
        self.refusals = refusals if refusals is not None else RefusalLog()

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
        verdict = self.refusals.loud(str(client[0]))
        state["identity"] = ANONYMOUS
        state["refused"] = getattr(error, "refused", error.code)
        state["quiet"] = not verdict.loud
        notes = [note for note in (getattr(error, "note", ""), verdict.note()) if note]
        if notes:
            state["note"] = "; ".join(notes)
        reason = f"{http.HTTPStatus(error.status).phrase}: {error.message}"

        async def send_with_reason(message: Message) -> None:
            if message["type"] == "http.response.start":
                # closed once answered: no connection slot held on keep-alive, no more asking on it
                headers = [*message.get("headers", ()), (b"connection", b"close")]
                message = {**message, "headers": headers, "reason": reason}
            await send(message)

        await error_response(error, head=scope.get("method") == "HEAD")(scope, receive, send_with_reason)
