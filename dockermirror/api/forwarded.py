"""Who the client is: the one place that decides the address every later part sees as
``scope["client"]`` (the request log, the access rules' ``from:`` networks, the status page,
the limit on refusal log lines).

Without ``server.trusted_proxies`` it is the TCP peer, and ``X-Forwarded-For`` means nothing.
When the peer is in one of those networks (a load balancer), the header is believed: its
entries (all its lines, as one list) are walked from the right, each parsed only when the walk
reaches it, and the first address that is not a trusted proxy is the client. What a proxy
appends is to the right; whatever the client itself sent is to the left, and is never parsed:
nginx ($proxy_add_x_forwarded_for) and HAProxy (option forwardfor: a line of its own after the
client's) both pass the client's text on. If every address is a trusted proxy, the left-most is
the client. An entry that is no address, reached before any untrusted one (a trusted proxy sent
it), or more than MAX_ADDRESSES entries walked, make the client ``unknown``: no ``from:``
network matches it, and it is never the proxy itself (which usually sits inside the networks
the rules allow); that is a warning once per ten minutes (saying how many since, at debug).
From a peer that is not trusted the header is ignored entirely: a client
cannot choose the address that access rules see.

The TCP peer stays in ``scope["peer"]``. uvicorn's own proxy_headers is off (service/server.py):
it would also take X-Forwarded-Proto and trusts by address only, without this walk.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence
from typing import Union

from starlette.types import ASGIApp, Receive, Scope, Send

from dockermirror.lograte import RateLimited

log = logging.getLogger("dockermirror")

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
HEADER = b"x-forwarded-for"
MAX_ADDRESSES = 64          # trusted proxies in a row walked past: more is not a chain of proxies
UNKNOWN = "unknown"         # the client when the chain is malformed where it is believed (no from: matches)


class Malformed(ValueError):
    pass


def _address(text: str) -> Address:
    """One entry of X-Forwarded-For: ``IP``, ``[IPv6]``, ``[IPv6]:port`` or ``IPv4:port``."""
    text = text.strip()
    if text.startswith("["):
        inner, bracket, port = text[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and port[1:].isdigit())):
            raise Malformed(text)
        text = inner
    elif text.count(":") == 1:
        text, _, port = text.partition(":")
        if not port.isdigit():
            raise Malformed(text)
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise Malformed(text) from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: Address, networks: Sequence[Network]) -> bool:
    return any(address in network for network in networks if address.version == network.version)


def _walk(forwarded: list[str]):
    """The entries of these header lines, right-most first, unparsed (one split per line)."""
    for value in reversed(forwarded):
        yield from reversed(value.split(","))


def client_of(peer: str, forwarded: list[str], networks: Sequence[Network]) -> str:
    """The client's address for a request from ``peer`` carrying these X-Forwarded-For values
    (each header's text, in order); Malformed if an entry reached before any untrusted address
    (one a trusted proxy sent) is no address, or more than MAX_ADDRESSES are walked."""
    if not networks or not forwarded:
        return peer
    try:
        peer_address = _address(peer)
    except Malformed:       # e.g. a Unix socket's peer: no address to trust
        return peer
    if not _trusted(peer_address, networks):
        return peer
    address = None
    for walked, entry in enumerate(_walk(forwarded), 1):
        if walked > MAX_ADDRESSES:
            raise Malformed(f"more than {MAX_ADDRESSES} trusted proxies in a row")
        address = _address(entry)
        if not _trusted(address, networks):
            return str(address)
    return str(address)        # every one a trusted proxy: the left-most


class ClientAddress:
    """ASGI middleware: ``scope["client"]`` becomes the client's address as :func:`client_of`
    says, with ``trusted()`` the networks of ``server.trusted_proxies`` in force (a reload changes them)."""

    def __init__(self, app: ASGIApp, trusted: Callable[[], Sequence[Network]]) -> None:
        self.app = app
        self.trusted = trusted
        # a proxy sending garbage: a warning a period (with how many since), the rest at debug
        self.said = RateLimited(log, quiet=logging.DEBUG)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        networks = self.trusted()
        if networks and scope["type"] in ("http", "websocket") and scope.get("client"):
            peer = scope["client"]
            forwarded = [value.decode("latin-1") for name, value in scope.get("headers", ()) if name == HEADER]
            try:
                client = client_of(str(peer[0]), forwarded, networks)
            except Malformed as exc:
                client = UNKNOWN
                self.said.log("x-forwarded-for", "X-Forwarded-For from the trusted proxy %s is not a list of IP "
                              "addresses where it is believed (%.60r); the client is taken as %s, which no from: "
                              "network matches", peer[0], str(exc), UNKNOWN)
            if client != peer[0]:
                scope["peer"] = peer
                scope["client"] = (client, 0)
        await self.app(scope, receive, send)
