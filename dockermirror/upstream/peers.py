"""How far inside the network an upstream connection's peer is: where a redirect may lead.

A registry's blob answer is often a redirect to storage (S3, a CDN, a MinIO beside a private
registry). A hostile upstream could point one at this machine or its network instead: the
cloud's metadata service (169.254.169.254), a database on localhost, an admin page on 10.x; the
mirror would fetch it and stream it to the client until the digest check failed at the end.
So a redirect may lead no further inside than the upstream itself is:

* an upstream on a public address: its redirects must reach public addresses;
* one on a private address (RFC 1918, ULA, CGNAT, ... anything not globally routable): public
  or private ones;
* one on loopback or link-local: anywhere.

It is checked on the address the connection was actually made to (no second DNS lookup a
rebinding name could answer differently), once the answer's headers have come and before any
of its body is read: the request was sent, its answer is never read. A hop sent through a
proxy (HTTP(S)_PROXY, ALL_PROXY) is not checked: its peer is the proxy, which decides. But
then the upstream's own address is not known either: an upstream reached through a proxy
counts as public, so that a redirect sent round the proxy (a NO_PROXY host: 169.254.169.254 is
often one) is not measured against the proxy's loopback or private address. Token realms are held
to the same rule (a realm's answer goes back to the upstream as the token). ``private_redirects``
(per upstream) turns both checks off.
"""

from __future__ import annotations

import ipaddress
import logging
import urllib.request

import httpcore
import httpx

log = logging.getLogger("dockermirror.upstream")

PUBLIC, PRIVATE, LOCAL = 0, 1, 2
KIND = {PUBLIC: "public", PRIVATE: "private", LOCAL: "loopback or link-local"}
# the well-known NAT64 prefix (RFC 6052): globally routable itself, but a gateway (a cloud's NAT64,
# DNS64 networks) may translate 64:ff9b::a9fe:a9fe to 169.254.169.254 or 64:ff9b::a00:1 to 10.0.0.1
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def reach(address: str) -> int:
    """PUBLIC, PRIVATE or LOCAL for an IP address (text); LOCAL for anything unreadable."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])     # (an IPv6 scope: fe80::1%eth0)
    except ValueError:
        return LOCAL    # (a Unix socket path, or nothing an address should look like)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:     # a NAT64 gateway connects on to the IPv4 address in its last 32 bits
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
        return LOCAL
    return PUBLIC if ip.is_global else PRIVATE


def peer_address(response: httpx.Response) -> str | None:
    """The IP address the answer came from, if the transport says (None: it does not)."""
    address = response.extensions.get("server_addr")    # ours: dockermirror.upstream.blobtransport
    if address is None:
        stream = response.extensions.get("network_stream")     # httpcore's
        if stream is None:
            return None
        try:
            address = stream.get_extra_info("server_addr")
        except Exception:   # (a transport's stream without it)
            return None
    if isinstance(address, tuple) and address and isinstance(address[0], str):
        return address[0]
    return None


def through_proxy(client: httpx.AsyncClient, url: httpx.URL | str) -> bool | None:
    """Whether ``client`` sends a request for ``url`` through a proxy (then its connection's
    peer is the proxy). Without a proxy in the environment, False. Else httpx's own choice of
    transport for the URL: httpx internals (its version is bounded in pyproject.toml, and
    tests/unit/test_redirect_proxy.py checks this against a real proxy); if they cannot be read,
    None and one warning: the callers then count the upstream as public and check every hop
    (failing closed: a redirect through a private proxy is refused until private_redirects)."""
    if not urllib.request.getproxies():
        return False
    try:
        transport = client._transport_for_url(httpx.URL(url))
    except AttributeError as exc:
        global _drift_logged
        if not _drift_logged:
            _drift_logged = True
            log.warning("self-check: httpx %s internals are not what docker-mirror was built against (%s); "
                        "with proxies set, every redirect is checked by the address it reached, the proxy's "
                        "included (set upstream.private_redirects: true for a private proxy)", httpx.__version__, exc)
        return None
    return isinstance(getattr(transport, "_pool", None), _PROXIES)


_drift_logged = False
_PROXIES = tuple(getattr(httpcore, name) for name in ("AsyncHTTPProxy", "AsyncSOCKSProxy") if hasattr(httpcore, name))


def peer_reach(response: httpx.Response) -> int | None:
    address = peer_address(response)
    return None if address is None else reach(address)
