"""Request loops between tiers (dockermirror/via.py): ASGI middleware in front of the gate.

A request whose ``Via`` names this mirror's own pseudonym (or carries more than MAX_HOPS
docker-mirror entries) is answered 508 Loop Detected at once, with an OCI error that says so,
and a warning (rate limited: one a period per kind, the others at info). Any other request runs
with its docker-mirror entries in :data:`dockermirror.via.incoming`, for the upstream client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from dockermirror import via
from dockermirror.api.responses import error_response
from dockermirror.errors import LoopDetected
from dockermirror.lograte import RateLimited

log = logging.getLogger("dockermirror.api")


class LoopCheck:
    def __init__(self, app: ASGIApp, pseudonym: str, upstreams: Callable[[], str] = lambda: "") -> None:
        """``upstreams``: the upstream URLs in force, for the warning."""
        self.app = app
        self.pseudonym = pseudonym
        self.upstreams = upstreams
        self.warnings = RateLimited(log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        values = [value.decode("latin-1") for name, value in scope.get("headers", ()) if name.lower() == b"via"]
        names = via.pseudonyms(values) if values else ()
        if self.pseudonym in names or len(names) > via.MAX_HOPS:
            await self._refuse(scope, receive, send, names)
            return
        token = via.incoming.set(names)
        try:
            await self.app(scope, receive, send)
        finally:
            via.incoming.reset(token)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, names: tuple[str, ...]) -> None:
        chain = ", ".join(names[:via.MAX_HOPS + 1])
        if self.pseudonym in names:
            why = "this mirror's upstream leads back to it"
            kind = "loop"
        else:
            why = f"more than {via.MAX_HOPS} mirrors in a row"
            kind = "hops"
        error = LoopDetected(f"request loop: {why} (Via: {chain}); check upstream.url of the mirrors on the way",
                             detail={"via": list(names[:via.MAX_HOPS + 1]), "self": self.pseudonym})
        state = scope.setdefault("state", {})
        state["note"] = f"{error.code}: {error.message}"
        self.warnings.log(kind, "request loop: %s %s answered 508 Loop Detected: %s (Via: %s; this mirror is %s, "
                          "its upstream %s)", scope.get("method", "?"), scope.get("path", "?"), why, chain,
                          self.pseudonym, self.upstreams() or "?")
        await error_response(error, head=scope.get("method") == "HEAD")(scope, receive, send)
