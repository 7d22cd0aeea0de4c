"""Which token services (``realm`` of a bearer challenge) an upstream may send us to.

The challenge comes from the upstream, and its realm is where the mirror sends the
upstream's credentials (Basic, to get a token). A realm is trusted with credentials if it is

* the upstream's own host (any port: a private registry with its token service beside it);
* on the upstream's own site: a host under the upstream host's parent domain, when that
  parent has at least two labels (``registry-1.docker.io`` -> ``auth.docker.io``;
  ``ghcr.io`` -> ``ghcr.io`` only, since its parent ``io`` may be a public suffix). No
  public-suffix library is a dependency, so this is the conservative reading, with one
  known gap: an upstream whose host sits directly under a two-label public suffix
  (``example.co.uk``) trusts its siblings (``*.co.uk``) too (the README says so);
* not for a host on a domain where tenants get hosts side by side (:data:`SHARED_DOMAINS`:
  ``myorg.azurecr.io`` trusts itself, not ``attacker.azurecr.io``); their registries all
  answer with a realm on their own host;
* an upstream on an IP address: only that same address;
* a host listed in the upstream's ``token_realms`` (``host`` or ``host:port``).

Whatever the host, a realm must be ``http`` or ``https``, must not carry user:password, and
must be ``https`` when the upstream is (no downgrade, with or without credentials).
"""

from __future__ import annotations

import ipaddress

import httpx


# Domains whose subdomains belong to different customers (registry hosting, cloud and app
# hosting): an upstream under one trusts only its own host as a token realm.
SHARED_DOMAINS = (
    "azurecr.io", "jfrog.io", "amazonaws.com", "pkg.dev", "cloudfront.net", "azurewebsites.net",
    "herokuapp.com", "appspot.com", "github.io", "gitlab.io", "ngrok.io", "ngrok.app", "fly.dev",
    "onrender.com", "vercel.app", "netlify.app", "trycloudflare.com", "workers.dev", "pages.dev",
    "r2.dev", "web.app", "firebaseapp.com", "digitaloceanspaces.com", "ondigitalocean.app",
)


class RealmRefused(Exception):
    """The upstream named a token realm the mirror does not trust; the message names it."""

    def __init__(self, message: str, realm: str) -> None:
        super().__init__(message)
        self.realm = realm


def normal_host(host: str) -> str:
    """Lower case, no trailing dot, no IPv6 brackets."""
    return host.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def same_site(upstream_host: str, realm_host: str) -> bool:
    """Whether ``realm_host`` is the upstream's own host or on its own site (see the module)."""
    upstream, realm = normal_host(upstream_host), normal_host(realm_host)
    if not upstream or not realm:
        return False
    if upstream == realm:
        return True
    if _is_ip(upstream) or _is_ip(realm):
        return False
    parent = upstream.partition(".")[2]
    if parent.count(".") < 1:       # fewer than two labels: possibly a public suffix
        return False
    if any(parent == shared or parent.endswith("." + shared) for shared in SHARED_DOMAINS):
        return False                # other tenants' hosts
    return realm == parent or realm.endswith("." + parent)


def shown(url: httpx.URL) -> str:
    """A realm for a log line or an error: scheme, host, port and path (no query, no userinfo)."""
    port = f":{url.port}" if url.port is not None else ""
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}{port}{url.path}"


def check_realm(upstream_url: str, realm: str, *, credentials: bool, listed: tuple[str, ...] = ()) -> httpx.URL:
    """The realm as a URL if the mirror may ask it for a token (with the upstream's credentials
    when ``credentials``); else :class:`RealmRefused` saying why."""
    try:
        url = httpx.URL(realm)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise RealmRefused(f"the token realm {realm[:200]!r} is not a URL", realm[:200]) from None
    upstream = httpx.URL(upstream_url)
    if url.scheme not in ("http", "https") or not url.host:
        raise RealmRefused(f"the token realm {realm[:200]!r} is not an http(s) URL", realm[:200])
    where = shown(url)
    if url.userinfo:
        raise RealmRefused(f"the token realm {where} carries credentials of its own", where)
    if upstream.scheme == "https" and url.scheme != "https":
        raise RealmRefused(f"the token realm {where} is plain HTTP for an HTTPS upstream", where)
    if credentials and not (same_site(upstream.host, url.host) or _listed(url, listed)):
        raise RealmRefused(f"the token realm {where} is not on the upstream's own domain ({upstream.host}) "
                           "nor in its token_realms; the credentials are not sent there", where)
    return url


def _listed(url: httpx.URL, listed: tuple[str, ...]) -> bool:
    host = normal_host(url.host)
    port = url.port if url.port is not None else (443 if url.scheme == "https" else 80)
    for entry in listed:
        name, port_text = _split_host_port(entry)
        if normal_host(name) == host and (port_text is None or int(port_text) == port):
            return True
    return False


def _split_host_port(entry: str) -> tuple[str, str | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` -> (host, port or None)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, port
    return entry, None
