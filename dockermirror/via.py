"""Request loops between tiers, found the way HTTP proxies find them (RFC 9110 7.6.3, ``Via``).

Each running mirror draws a random pseudonym when it starts (``docker-mirror-<12 hex>``); every
request its upstream clients send carries ``Via: 1.1 <pseudonym>``, after the docker-mirror
entries of the client request that caused it. A request whose ``Via`` already names this
mirror's pseudonym went round a loop (A's upstream is B, B's is A; or a mirror its own
upstream): it is answered 508 Loop Detected at once (dockermirror/api/loops.py), before any
cache or upstream work, instead of joining its own download in flight and waiting for it.

Only entries of that exact form are carried on (a client's or another proxy's are dropped, not
forwarded); more than MAX_HOPS of them is a loop too. The edge puts the incoming entries in
:data:`incoming` for the request (a ContextVar: the tasks a request starts, such as a download
that other clients then share, are created in its context and see them too); the upstream
client reads it. Clients are never sent a ``Via``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from contextvars import ContextVar

PREFIX = "docker-mirror-"
MAX_HOPS = 10
# "1.1 docker-mirror-0123456789ab", optionally "HTTP/1.1", optionally a (comment)
_ENTRY = re.compile(r"(?:HTTP/)?1\.[01][ \t]+(docker-mirror-[0-9a-f]{12})(?:[ \t]+\(.*\))?", re.ASCII)

# the docker-mirror pseudonyms of the client request being served, oldest first
incoming: ContextVar[tuple[str, ...]] = ContextVar("dockermirror_via", default=())


def new_pseudonym() -> str:
    return PREFIX + secrets.token_hex(6)


def pseudonyms(values: Iterable[str]) -> tuple[str, ...]:
    """The docker-mirror pseudonyms in ``Via`` header values, in order; other entries dropped."""
    found = []
    for value in values:
        for entry in value.split(","):
            match = _ENTRY.fullmatch(entry.strip())
            if match:
                found.append(match.group(1))
    return tuple(found)


def outgoing(own: str) -> str:
    """The ``Via`` of a request sent upstream on behalf of the request being served."""
    return ", ".join(f"1.1 {name}" for name in (*incoming.get(), own))
