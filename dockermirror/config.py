"""Configuration: typed dataclasses, loaded from YAML with file/line/key errors.

Every key has a default, so an absent or empty file gives a working mirror.
Sizes ("200GiB") and durations ("5m") are parsed once, here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Callable
from urllib.parse import urlsplit

import yaml

from dockermirror import smallfile
from dockermirror.routing import DOCKER_HUB, DOCKER_HUB_ALIASES, RegistryTable, UnknownRegistry, registry_key

if TYPE_CHECKING:
    from dockermirror.access.rules import Rule

DEFAULT_PATH = Path("/etc/docker-mirror/config.yml")


class ConfigError(Exception):
    """A configuration problem, located by file, line and key."""

    def __init__(self, message: str, *, source: str = "", line: int | None = None, key: str = "") -> None:
        self.message, self.source, self.line, self.key = message, source, line, key
        where = source + (f":{line}" if line is not None else "")
        prefix = ": ".join(p for p in (where, key) if p)
        super().__init__(f"{prefix}: {message}" if prefix else message)


# --- value parsers: each takes the YAML value and returns the typed value or raises ValueError

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")
MAX_DURATION = 100 * 365 * 86400      # 100 years: longer is "never", and stays a number everything can store
MAX_SIZE = 2**63 - 1                  # what the index (SQLite) stores; far beyond any disk


def _finite_duration(seconds: float, value: Any) -> float:
    if seconds != seconds:    # NaN
        raise ValueError(f"{value!r} is not a duration; use e.g. 30s, 5m, 2h, 7d or 1h30m")
    if seconds > MAX_DURATION:
        raise ValueError(f"duration {value!r} is too long; give at most 100 years (36500d)")
    return float(seconds)


def _finite_size(size: float, value: Any) -> int:
    if size != size or size > MAX_SIZE:    # NaN, inf, 10**4000 (no float conversion: it overflows)
        raise ValueError(f"size {value!r} is too large; give at most 8EiB (e.g. 500GB or 2TB)")
    return int(size)


def parse_duration(value: Any) -> float:
    """Seconds from ``90``, ``"30s"``, ``"5m"``, ``"1h30m"``, ``"7d"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s, 5m, 2h or 7d, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return _finite_duration(value, value)
    text = str(value).strip().lower()
    if text.isascii() and text.isdigit():    # "90": a number of seconds, as 90 is
        return _finite_duration(float(text), value)
    pos, total = 0, 0.0
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise ValueError(f"invalid duration {value!r} (use e.g. 30s, 5m, 2h, 7d or 1h30m)")
    return _finite_duration(total, value)


def parse_size(value: Any) -> int:
    """Bytes from ``1048576``, ``"500MB"``, ``"200GiB"``."""
    if isinstance(value, (bool, float)):
        raise ValueError(f"expected a size such as 500MB or 200GiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return _finite_size(value, value)
    match = _SIZE_RE.fullmatch(str(value).strip().lower())
    if not match or match.group(2) not in _SIZE_UNITS:
        raise ValueError(f"invalid size {value!r} (use e.g. 500MB, 20GiB or a number of bytes)")
    return _finite_size(float(match.group(1)) * _SIZE_UNITS[match.group(2)], value)


def format_duration(seconds: float) -> str:
    """The shortest form :func:`parse_duration` reads back: ``300.0`` -> ``"5m"``."""
    if seconds != int(seconds):
        return f"{round(seconds * 1000)}ms"
    rest, parts = int(seconds), []
    for unit in ("d", "h", "m", "s"):
        size = int(_DURATION_UNITS[unit])
        if rest >= size or (unit == "s" and not parts):
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts)


def parse_capacity(value: Any) -> int | float:
    """A size in bytes, or ``"80%"``: a share of the filesystem (returned as a float)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            share = float(value.strip()[:-1]) / 100
        except ValueError:
            share = -1.0
        if not 0 < share <= 1:
            raise ValueError(f"invalid share {value!r} (use a percentage from 1% to 100%)")
        return share
    return parse_size(value)


def format_size(size: int) -> str:
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit.lower()] == 0:
            return f"{size // _SIZE_UNITS[unit.lower()]}{unit}"
    return str(size)


def format_capacity(value: int | float) -> str | int:
    return f"{value * 100:g}%" if isinstance(value, float) else format_size(value)


def parse_patterns(value: Any) -> tuple[str, ...]:
    """A list of repository name patterns (``library/centos``, ``myorg/*``)."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"expected a list of repository patterns, got {value!r}")
    for pattern in value:
        if not re.fullmatch(r"[a-z0-9._/*?\[\]:-]+", pattern):
            raise ValueError(f"invalid repository pattern {pattern!r} (lowercase name, may use * and ?, and may "
                             "start with a registry: ghcr.io/myorg/*)")
    return tuple(value)


NODE_NAME = re.compile(r"[A-Za-z0-9._-]{1,63}")


def parse_node(value: Any) -> str:
    """This node's name in a cluster (``node:``): a short label; empty (or null): none."""
    if value is None or value == "":
        return ""
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not NODE_NAME.fullmatch(str(value)):
        raise ValueError(f"invalid node name {value!r}: expected up to 63 letters, digits, '.', '-' or '_' "
                         "(e.g. mirror-1), or empty for none")
    return str(value)


_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_networks(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """A list of IP networks or addresses (``10.0.0.5``, ``10.0.0.0/8``, ``fd00::/8``); an
    IPv4-mapped one (``::ffff:10.0.0.5``) as its IPv4 network, as peers are compared."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"expected a list of IP networks, got {value!r}")
    networks = []
    for item in value:
        try:
            network = ipaddress.ip_network(str(item).strip(), strict=False)
        except ValueError:
            raise ValueError(f"invalid IP network {item!r}: expected an address or a network, e.g. 10.0.0.5, "
                             "10.0.0.0/24 or fd00::/64") from None
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_V4_MAPPED):
            network = ipaddress.IPv4Network((int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96))
        networks.append(network)
    return tuple(networks)


def parse_proxies(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``server.trusted_proxies``: networks, none of them every address (every client could then
    write the address the access rules see)."""
    networks = parse_networks(value)
    for network in networks:
        if network.prefixlen == 0:
            raise ValueError(f"{network} trusts every client to name its own address in X-Forwarded-For; "
                             "list only your load balancers' addresses, e.g. [10.0.0.5, 10.0.0.6]")
    return networks


def _show_networks(value: tuple) -> list[str]:
    return [str(network) for network in value]


def parse_listen(value: Any) -> str:
    """``HOST:PORT`` or ``[V6]:PORT``; returned unchanged once checked."""
    split_listen(str(value))
    return str(value)


def split_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid listen address {text!r}; use HOST:PORT with a port from 1 to 65535, "
                         "e.g. 0.0.0.0:5000 or [::]:5000")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"invalid listen address {text!r}: put an IPv6 address in brackets, e.g. [::1]:5000")
    return host or "0.0.0.0", int(port)


_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_NAME_ONLY = "give the name only, e.g. mirror.example.com"


def is_dns_name(text: str) -> bool:
    """Letters, digits and -, in labels separated by dots (a host name as certificates hold it)."""
    return 0 < len(text) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in text.split("."))


def host_port(host: str, port: int | str) -> str:
    """HOST:PORT as clients write it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_hostname(value: Any) -> str:
    """``hostname:``: the name clients use (a DNS name or an IP address): no port, scheme or path."""
    if value is None or value == "":
        return ""
    text = _string(value)
    if "://" in text:
        raise ValueError(f"{text!r} has a scheme; {_NAME_ONLY}")
    if "/" in text:
        raise ValueError(f"{text!r} has a path; {_NAME_ONLY}")
    if text.startswith("[") and text.endswith("]") and _is_ipv6(text[1:-1]):
        raise ValueError(f"{text!r} is an IPv6 address in brackets; give it without them: {text[1:-1]}")
    if "%" in text and _is_ipv6(text):
        scope = text[text.index("%"):]
        raise ValueError(f"{text!r} is a scoped address ({scope}): clients elsewhere cannot use it; give the name "
                         "or a global address")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    host, sep, port = text.rpartition(":")
    if sep and host and port.isdigit():
        raise ValueError(f"{text!r} has a port; {_NAME_ONLY} (the port comes from listen:)")
    name = text.removesuffix(".")
    if not is_dns_name(name):
        raise ValueError(f"{text!r} is not a DNS name or an IP address; give the name clients use, e.g. "
                         "mirror.example.com")
    return name


def parse_url(value: Any) -> str:
    text = _string(value)
    if "@" in text:
        # not echoed: it may hold a password (and a "/" in one moves it out of the host part)
        raise ValueError("the URL must not hold credentials (or any '@'): give them as username and password "
                         "(or password_file)")
    parts = urlsplit(text)
    if "://" not in text:
        raise ValueError(f"URL {text!r} has no scheme; write https://{text} (or http:// for a plain-HTTP registry)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid port in URL {text!r} (1 to 65535)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise ValueError(f"invalid URL {text!r}; use an https:// (or http://) URL, e.g. https://registry-1.docker.io")
    if parts.query or parts.fragment:
        raise ValueError(f"URL {text!r} must not have a query or fragment")
    return text.rstrip("/")


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}; give a value, or leave it out for its default")
    try:    # (surrogateescape: a non-UTF-8 file name given on the command line is a file name still)
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:    # "\ud800": a lone surrogate is no character of any file name or host
        raise ValueError(f"{value!r} holds an invalid character (a lone UTF-16 surrogate); write the "
                         "character itself, or its \\U escape") from None
    if "\0" in value:    # (not shown: it may be a password) no file name, host or password holds one
        raise ValueError("the value holds a NUL character (\\0); remove it")
    return value


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse_optional(value: Any) -> Any:
        return None if value is None or value == "" else parse(value)

    return parse_optional


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _path(value: Any) -> Path:
    value = _string(value)
    if (bad := _CONTROL.search(value)) is not None:    # a typo or a paste, never a file name meant
        raise ValueError(f"the path {value!r} holds a control character (#x{ord(bad.group()):04x}); remove it")
    return Path(value)


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse_choice(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    return parse_choice


def _setting(default: Any, parse: Callable[[Any], Any], *, secret: bool = False,
             show: Callable[[Any], Any] | None = None, sequence: bool = False) -> Any:
    metadata = {"parse": parse, "secret": secret, "show": show, "sequence": sequence}
    return field(default=default, metadata=metadata, repr=not secret)


def _duration(default: float) -> Any:
    return _setting(default, parse_duration, show=format_duration)


# --- the schema (etc/docker-mirror/config.yml documents every key)


def parse_switch(value: Any) -> str:
    """``auto``, or a YAML boolean (``true``/``false``, ``yes``/``no``, ``on``/``off``)."""
    if value is True or value is False:
        return "on" if value else "off"
    if value in ("auto", "on", "off"):
        return value
    raise ValueError(f"expected auto, true or false, got {value!r}")


@dataclass(frozen=True)
class TLSConfig:
    # auto: TLS when the certificate file exists, else plain HTTP; on: TLS or refuse to start
    enabled: str = _setting("auto", parse_switch)
    certificate: Path = _setting(Path("/etc/pki/tls/certs/docker-mirror.crt"), _path)
    key: Path = _setting(Path("/etc/pki/tls/private/docker-mirror.key"), _path)
    # the CA clients should trust (docker-mirror cert init keeps its key in private/ca.key beside it)
    ca: Path = _setting(Path("/etc/pki/docker-mirror/ca.crt"), _path)
    # client certificates (mTLS): none (not asked for), optional (verified when given),
    # required (a connection without a valid one fails in the handshake)
    client_auth: str = _setting("none", _choice("none", "optional", "required"))
    # the CA that client certificates must be signed by (None: ca, which cert client uses)
    client_ca: Path | None = _setting(None, _optional(_path))
    # revoked client certificates (cert revoke writes it); used when the file exists
    crl: Path = _setting(Path("/etc/pki/docker-mirror/crl.pem"), _path)
    # where client_auth was set ("file:line"), for the error when TLS turns out not to be active
    client_auth_where: str = field(default="", compare=False, repr=False, metadata={"internal": True})
    # where crl was set ("file:line"; empty: the default), for the warning when the file is missing
    crl_where: str = field(default="", compare=False, repr=False, metadata={"internal": True})

    @property
    def active(self) -> bool:
        """Whether the server speaks TLS with this configuration (looks at the disk for auto)."""
        if self.enabled == "auto":
            return self.certificate.exists()
        return self.enabled == "on"

    @property
    def client_ca_path(self) -> Path:
        return self.client_ca or self.ca

    def client_auth_error(self) -> str | None:
        """Why client_auth cannot apply (it needs TLS, and TLS is not active), or None."""
        if self.client_auth == "none" or self.active:
            return None
        where = f"{self.client_auth_where}: " if self.client_auth_where else ""
        why = ("tls.enabled is off" if self.enabled == "off"
               else f"there is no TLS certificate at {self.certificate}")
        return (f"{where}tls.client_auth: {self.client_auth} needs TLS, but {why} "
                "(create one with docker-mirror cert init, or set client_auth: none)")


# a registry name: a host, optionally with a port (as clients write it before a repository)
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_REGISTRY_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*(?::[0-9]{{1,5}})?")


def parse_registry(value: Any) -> str:
    """A registry name clients use (``docker.io``, ``ghcr.io``, ``registry.example.org:5000``)."""
    text = _string(value).lower()
    if not _REGISTRY_RE.fullmatch(text) or len(text) > 255:
        raise ValueError(f"invalid registry name {text!r} (a lowercase host name, optionally with :PORT, "
                         "e.g. ghcr.io or registry.example.org:5000)")
    port = text.rpartition(":")[2] if ":" in text else ""
    if port and not 0 < int(port) < 65536:
        raise ValueError(f"invalid port in registry name {text!r} (1 to 65535)")
    return text     # (without a dot or a port, clients can only name it with ?ns=, not as a path prefix)


def parse_registries(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"expected a list of registry names, got {value!r}")
    return tuple(parse_registry(v) for v in value)


def parse_hosts(value: Any) -> tuple[str, ...]:
    """Host names or IP addresses, each optionally with :PORT (``auth.example.org``,
    ``10.0.0.5:5001``, ``[::1]:5001``); no scheme, no path."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"expected a list of host names (e.g. [auth.example.org]), got {value!r}")
    hosts = []
    for item in value:
        text = _string(item).strip().lower()
        host, port = text, ""
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port = rest.removeprefix(":") if rest.startswith(":") else rest
            valid = _is_ipv6(host) and (not rest or rest.startswith(":"))
        else:
            if ":" in text:
                host, _, port = text.partition(":")
            valid = _REGISTRY_RE.fullmatch(host) is not None and ":" not in host
        if not valid or (port and not (port.isdigit() and 0 < int(port) < 65536)):
            raise ValueError(f"invalid host {text!r}: expected a host name or IP address, optionally with "
                             ":PORT (no scheme or path), e.g. auth.example.org")
        hosts.append(text)
    return tuple(hosts)


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = _setting("https://registry-1.docker.io", parse_url)
    # The registry name clients use for this upstream. containerd sends it as ?ns=,
    # and for docker.io one-component names get the library/ prefix.
    registry: str = _setting("docker.io", parse_registry)
    # other names clients may use for it (in ?ns= or as a path prefix)
    aliases: tuple[str, ...] = _setting((), parse_registries, sequence=True)
    username: str | None = _setting(None, _optional(_string))
    password: str | None = _setting(None, _optional(_string), secret=True)
    # a file holding the password (all of it but a final line break), readable by the service user only
    password_file: Path | None = _setting(None, _optional(_path))
    ca_bundle: Path | None = _setting(None, _optional(_path))
    connect_timeout: float = _duration(10.0)
    read_timeout: float = _duration(60.0)
    # the longest one blob download from the upstream may take, resumes included
    transfer_timeout: float = _duration(6 * 3600.0)
    # this upstream's cache.tag_ttl (None: cache.tag_ttl)
    tag_ttl: float | None = _setting(None, _optional(parse_duration), show=format_duration)
    # token services besides the upstream's own domain that may get its credentials
    token_realms: tuple[str, ...] = _setting((), parse_hosts, sequence=True)
    # the upstream is another mirror (a central docker-mirror): every request names the registry with ?ns=
    send_ns: bool = _setting(False, _boolean)
    # follow redirects and ask token realms at addresses further inside the network than the
    # upstream's own (loopback, link-local, private); see dockermirror/upstream/peers.py
    private_redirects: bool = _setting(False, _boolean)


@dataclass(frozen=True)
class CacheConfig:
    dir: Path = _setting(Path("/var/cache/docker-mirror"), _path)
    max_size: int | float = _setting(0.8, parse_capacity, show=format_capacity)
    min_free: int | float = _setting(0.05, parse_capacity, show=format_capacity)
    blob_ttl: float = _duration(7 * 86400.0)
    manifest_ttl: float = _duration(7 * 86400.0)
    tag_ttl: float = _duration(300.0)
    pin: tuple[str, ...] = _setting((), parse_patterns, sequence=True)
    # bytes per second the background re-verification of cached files may read (0: off)
    verify_rate: int = _setting(8 * 1024 * 1024, parse_size, show=format_size)
    # downloads are written past the page cache (O_DIRECT) where the filesystem allows it
    direct_writes: bool = _setting(True, _boolean)


def parse_count(value: Any) -> int:
    """A whole number, 0 or more."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number (0 or more), got {value!r}")
    return value


def _at_least(minimum: float, parse: Callable[[Any], Any], what: str) -> Callable[[Any], Any]:
    def parse_at_least(value: Any) -> Any:
        parsed = parse(value)
        if parsed < minimum:
            raise ValueError(f"must be at least {what}")
        return parsed

    return parse_at_least


def _timeout(default: float) -> Any:
    return _setting(default, _at_least(0.1, parse_duration, "100ms"), show=format_duration)


@dataclass(frozen=True)
class ServerConfig:
    # what one client connection may send, and how slowly (see etc/docker-mirror/config.yml)
    max_header_size: int = _setting(64 * 1024, _at_least(1024, parse_size, "1KiB"), show=format_size)
    header_timeout: float = _timeout(10.0)
    keepalive_timeout: float = _timeout(75.0)
    send_timeout: float = _timeout(60.0)
    max_connections: int = _setting(10000, parse_count)
    # peers (a load balancer) whose X-Forwarded-For names the client (api/forwarded.py); none: no one's
    trusted_proxies: tuple = _setting((), parse_proxies, show=_show_networks, sequence=True)


@dataclass(frozen=True)
class AuthConfig:
    # an htpasswd file of bcrypt entries (docker-mirror user add); unset: no Basic authentication
    htpasswd: Path | None = _setting(None, _optional(_path))
    # how long a verified user:password is remembered (in memory, as a keyed digest)
    cache_ttl: float = _duration(300.0)


def parse_metrics_listen(value: Any) -> str:
    """``IP:PORT`` or ``[IPv6]:PORT`` for the metrics listener; empty (or null, false): off."""
    if value is None or value is False or value == "":
        return ""
    text = str(value).strip()
    host, port = split_listen(text)
    if not text.rpartition(":")[0]:
        raise ValueError(f"invalid address {text!r}: give the IP address too, e.g. 127.0.0.1:{port}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"invalid address {text!r}: expected an IP address and a port, e.g. 127.0.0.1:9401, "
                         "[::1]:9401 or 0.0.0.0:9401 (a management network's address; firewall it)") from None
    return text


def upstream_loops(config: "Config") -> list[str]:
    """Upstreams whose URL is this mirror's own ``listen`` address (the same host, or a
    loopback host while it listens on every address, and the same port): each of its requests
    would come back to this mirror, and be answered 508 Loop Detected. Warnings, not errors:
    a host name may still reach another machine through /etc/hosts or a proxy."""
    host, port = split_listen(config.listen)
    host = host.strip("[]").lower()
    wildcard = host in ("0.0.0.0", "::", "")
    found = []
    for index, up in enumerate(config.registries):
        parts = urlsplit(up.url)
        target = (parts.hostname or "").lower().rstrip(".")
        target_port = parts.port or (443 if parts.scheme == "https" else 80)
        loopback = target == "localhost" or _is_loopback(target)
        if target_port == port and (target == host or (wildcard and loopback)):
            key = "upstream.url" if not config.upstreams else f"upstreams[{index}].url"
            found.append(f"{config.source}: {key} {up.url} is this mirror's own listen address ({config.listen}): "
                         "every request to it would come back here (508 Loop Detected); give the upstream "
                         "registry's URL")
    return found


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen_overlap(listen: str, metrics: str) -> str | None:
    """Why ``metrics.listen`` cannot be had next to ``listen`` (the same port, on the same or a
    wildcard address: one of the two listeners would take it from the other), or None."""
    if not metrics:
        return None
    (host, port), (metrics_host, metrics_port) = split_listen(listen), split_listen(metrics)
    wildcards = ("0.0.0.0", "::")
    if port != metrics_port or not (host == metrics_host or host in wildcards or metrics_host in wildcards):
        return None
    shown = f"[{metrics_host}]" if ":" in metrics_host else metrics_host
    return (f"{metrics} is the registry's own port (listen: {listen}); give the metrics a port of their own, "
            f"e.g. {shown}:9401")


@dataclass(frozen=True)
class MetricsConfig:
    # where GET /metrics (Prometheus text format) is served, apart from the registry port; empty: off
    listen: str = _setting("", parse_metrics_listen)

    @property
    def listen_address(self) -> tuple[str, int] | None:
        return split_listen(self.listen) if self.listen else None


@dataclass(frozen=True)
class LogConfig:
    level: str = _setting("info", _choice("debug", "info", "warning", "error"))
    # under systemd: send records natively, with DOCKER_MIRROR_* fields per request (service/journal.py)
    journal_fields: bool = _setting(True, lambda v: _boolean(v))


@dataclass(frozen=True)
class Config:
    listen: str = _setting("0.0.0.0:5000", parse_listen)
    # the name clients use to reach this mirror (empty: the machine's FQDN)
    hostname: str = _setting("", parse_hostname)
    # this node's name in a cluster: in the request log, a response header, /metrics, the journal
    node: str = _setting("", parse_node)
    # GET / answers the status page (false: 404); /healthz answers either way
    status_page: bool = _setting(True, _boolean)
    tls: TLSConfig = field(default_factory=TLSConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    # several upstreams: a list of upstream sections, the default first (instead of upstream:)
    upstreams: tuple[UpstreamConfig, ...] = field(default=(), metadata={"items": UpstreamConfig})
    cache: CacheConfig = field(default_factory=CacheConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # who may pull what (dockermirror/access/rules.py); none: anyone may pull everything
    access: tuple[Rule, ...] = field(default=(), metadata={"rules": True})
    source: str = field(default="(defaults)", compare=False, metadata={"internal": True})

    @property
    def listen_address(self) -> tuple[str, int]:
        return split_listen(self.listen)

    @property
    def registries(self) -> tuple[UpstreamConfig, ...]:
        """Every upstream, the default first: ``upstreams``, or else the one ``upstream``."""
        return self.upstreams or (self.upstream,)

    def registry_table(self) -> RegistryTable:
        """Names and aliases of the upstreams, as the server routes by them."""
        return RegistryTable(((up.registry, up.aliases) for up in self.registries),
                             dotted_namespaces=not self.upstreams)

    @property
    def default_upstream(self) -> UpstreamConfig:
        return self.registries[0]

    def with_overrides(self, **dotted: Any) -> Config:
        """A copy with ``section.key`` values replaced; the values are parsed like YAML ones."""
        config = self
        for key, raw in dotted.items():
            if raw is None:
                continue
            path = key.split(".")
            try:
                if path[0] == "upstream" and config.upstreams:    # the default upstream of the list
                    first = _replace_dotted(config.upstreams[0], path[1:], raw)
                    config = dataclasses.replace(config, upstreams=(first, *config.upstreams[1:]))
                    continue
                config = _replace_dotted(config, path, raw)
            except ConfigError as exc:
                raise ConfigError(exc.message, key=key) from None    # named as the caller gave it
        return config


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _is_section(f: dataclasses.Field) -> bool:
    return "parse" not in f.metadata and "items" not in f.metadata and "rules" not in f.metadata


def _replace_dotted(obj: Any, path: list[str], raw: Any) -> Any:
    f = _fields(type(obj))[path[0]]
    if len(path) > 1:
        return dataclasses.replace(obj, **{f.name: _replace_dotted(getattr(obj, f.name), path[1:], raw)})
    try:
        value = f.metadata["parse"](raw)
    except ValueError as exc:
        raise ConfigError(str(exc), key=".".join(path)) from None
    return dataclasses.replace(obj, **{f.name: value})


# --- loading


def load(path: Path | str | None = None) -> Config:
    """Load a config file; ``None`` means the default path if it exists, else defaults."""
    if path is None:
        if not DEFAULT_PATH.exists():
            return Config()
        path = DEFAULT_PATH
    path = Path(path)
    try:    # not a FIFO, a device or a huge file (smallfile.CONFIG_MAX)
        text = smallfile.read(path, smallfile.CONFIG_MAX)[0].decode("utf-8")
    except OSError as exc:
        hint = ("give an existing file (the packages install /etc/docker-mirror/config.yml), or leave out "
                "--config for the embedded defaults" if isinstance(exc, FileNotFoundError)
                else "give a readable YAML file (the packages install /etc/docker-mirror/config.yml)")
        raise ConfigError(f"cannot read configuration: {exc.strerror}; {hint}", source=str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("configuration is not UTF-8 text", source=str(path)) from None
    return loads(text, source=str(path))


def _yaml_error(exc: yaml.YAMLError, source: str, text: str) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    line = mark.line + 1 if mark else None
    if isinstance(exc, yaml.reader.ReaderError):    # a control character: no mark, a position
        line = text.count("\n", 0, exc.position) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return ConfigError(f"invalid YAML: control character #x{code:04x} ({exc.reason}); remove it (is this "
                           "the configuration file, as text?)", source=source, line=line)
    return ConfigError(f"invalid YAML: {problem}; fix the file at that line (indentation, a missing quote, "
                       "bracket or colon; the shipped config.yml shows each key)", source=source, line=line)


def loads(text: str, source: str = "<string>") -> Config:
    loader = None
    try:
        loader = yaml.SafeLoader(text)    # checks the characters: a NUL is a ReaderError here
        node = loader.get_single_node()
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source, text) from None
    except RecursionError:
        raise ConfigError("invalid YAML: nested too deeply; fix the file (a configuration nests a few levels)",
                          source=source) from None
    finally:
        if loader is not None:
            loader.dispose()
    if node is None or (isinstance(node, yaml.ScalarNode) and node.value == ""):
        return Config(source=source)
    config = _build(Config, node, loader, source, "")
    return dataclasses.replace(config, source=source)


_NOT_A_NAME = "a key that is not a string (a list or a mapping); keys are names"


def _build(cls: type, node: yaml.Node, loader: yaml.SafeLoader, source: str, prefix: str,
           lines: dict[str, int] | None = None) -> Any:
    """Build a section from its mapping node; ``lines`` collects the line of each key given."""
    line = node.start_mark.line + 1
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError("expected a mapping of keys to values", source=source, line=line, key=prefix or "(top)")
    fields = _fields(cls)
    values: dict[str, Any] = {}
    lines = {} if lines is None else lines
    lines[""] = line
    for key_node, value_node in node.value:
        key_line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode):    # "[a, b]: 1", "? {a: 1}"
            raise ConfigError(_NOT_A_NAME, source=source, line=key_line, key=prefix or "(top)")
        key = key_node.value
        dotted = f"{prefix}.{key}" if prefix else key
        f = fields.get(key)
        if f is None:
            raise ConfigError(f"unknown key (known here: {', '.join(fields)})",
                              source=source, line=key_line, key=dotted)
        if key in values or key in lines:
            raise ConfigError("key given twice", source=source, line=key_line, key=dotted)
        lines[key] = key_line
        if isinstance(value_node, yaml.SequenceNode):    # the line of each item: aliases[1]
            lines.update((f"{key}[{j}]", item.start_mark.line + 1) for j, item in enumerate(value_node.value))
        null = isinstance(value_node, yaml.ScalarNode) and value_node.tag.endswith(":null")
        if "rules" in f.metadata:
            if not null:
                values[key] = _build_rules(value_node, loader, source, dotted)
            continue
        if "items" in f.metadata:
            if null:
                continue
            if not isinstance(value_node, yaml.SequenceNode):
                raise ConfigError("expected a list of sections", source=source, line=key_line, key=dotted)
            values[key] = _build_items(f.metadata["items"], value_node, loader, source, dotted)
            continue
        if _is_section(f):
            if null:
                continue  # "tls:" with nothing under it keeps the defaults
            values[key] = _build(f.default_factory, value_node, loader, source, dotted)  # type: ignore[misc]
            continue
        wanted = yaml.SequenceNode if f.metadata.get("sequence") else yaml.ScalarNode
        if not isinstance(value_node, wanted) and not null:
            expected = "a list" if f.metadata.get("sequence") else "a single value"
            raise ConfigError(f"expected {expected}", source=source, line=key_line, key=dotted)
        secret = f.metadata.get("secret") and not null
        if secret and not value_node.tag.startswith("tag:yaml.org,2002:"):    # password: !ENV X is no "X"
            raise ConfigError(f"the tag {value_node.tag} is not read; write the value itself (or use password_file)",
                              source=source, line=value_node.start_mark.line + 1, key=dotted)
        # a secret is the text as written (password: 0123 is not the number 83), never echoed
        raw = value_node.value if secret else _construct(loader, value_node, source, dotted)
        try:
            values[key] = f.metadata["parse"](raw)
        except ValueError as exc:
            message = "invalid value (not shown: it is a secret)" if secret else str(exc)
            raise ConfigError(message, source=source, line=value_node.start_mark.line + 1, key=dotted) from None
    built = cls(**values)
    if cls is TLSConfig and "crl" in lines:
        built = dataclasses.replace(built, crl_where=f"{source}:{lines['crl']}")
    if cls is TLSConfig and "client_auth" in lines:
        built = dataclasses.replace(built, client_auth_where=f"{source}:{lines['client_auth']}")
        if built.client_auth != "none" and built.enabled == "off":
            raise ConfigError(f"{built.client_auth} needs TLS, but tls.enabled is off", source=source,
                              line=lines["client_auth"], key=f"{prefix}.client_auth")
    if cls is UpstreamConfig:
        built = _check_upstream(built, lines, source, prefix)
    if cls is Config and "upstream" in lines and "upstreams" in lines:
        raise ConfigError("give either upstream: (one registry) or upstreams: (a list, the default first), "
                          f"not both (upstream: is on line {lines['upstream']})", source=source,
                          line=lines["upstreams"], key="upstreams")
    if cls is Config and (problem := listen_overlap(built.listen, built.metrics.listen)) is not None:
        raise ConfigError(problem, source=source, line=lines.get("metrics", lines.get("listen")),
                          key="metrics.listen")
    if cls is Config and values.get("cache") is not None:
        _check_pins(built, source, node)
    if cls is Config and built.access:
        _check_rules(built, source)
    return built


def _construct(loader: yaml.SafeLoader, node: yaml.Node, source: str, key: str) -> Any:
    """The value of a node; an unknown tag (``!ENV x``), an integer of thousands of digits or a
    structure nested too deeply is the file's mistake, named by its line and key."""
    line = node.start_mark.line + 1
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{_one_line(problem)}; write a plain value (YAML tags such as !ENV are not read)",
                          source=source, line=line, key=key) from None
    except (ValueError, RecursionError):    # int("9" * 5000) is refused by Python itself
        raise ConfigError("cannot read this value (a number of thousands of digits, or nested too deeply); "
                          "write a plain value such as 500GB or 7d", source=source, line=line, key=key) from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _build_items(cls: type, node: yaml.SequenceNode, loader: yaml.SafeLoader, source: str,
                 prefix: str) -> tuple[Any, ...]:
    """A list of upstream sections: each checked, then checked against each other."""
    if not node.value:
        raise ConfigError("the list is empty: give at least one upstream, or leave the key out",
                          source=source, line=node.start_mark.line + 1, key=prefix)
    items, owners = [], {}    # owners: registry name or alias -> (item, its line)
    for i, item in enumerate(node.value):
        lines: dict[str, int] = {}
        built = _build(cls, item, loader, source, f"{prefix}[{i}]", lines)
        if "registry" not in lines:
            raise ConfigError("no registry: give the name clients use for this upstream (docker.io, ghcr.io, "
                              "registry.example.org:5000...)", source=source, line=lines[""],
                              key=f"{prefix}[{i}]")
        if "url" not in lines:    # the registry's own address (Docker Hub's API is elsewhere)
            built = dataclasses.replace(built, url=default_url(built.registry))
        names = [("registry", "registry", built.registry)]
        names += [("aliases", f"aliases[{j}]", alias) for j, alias in enumerate(built.aliases)]
        for key, where, name in names:
            line = lines.get(where, lines.get(key, lines[""]))
            if "." not in name and ":" not in name and name != "localhost":
                # (the single upstream: section keeps taking any host name, as it always did)
                raise ConfigError(f"registry name {name!r} needs a dot or a :PORT (or be localhost): clients "
                                  "tell a registry from a repository namespace that way", source=source,
                                  line=line, key=f"{prefix}[{i}].{key}")
            canonical = registry_key(name)
            if canonical in owners:
                other, other_line = owners[canonical]
                hub = f"{', '.join(DOCKER_HUB_ALIASES)} are all Docker Hub" if canonical == DOCKER_HUB else ""
                what = (f"the same upstream{f' ({hub})' if hub else ''}" if other == i
                        else f"{prefix}[{other}] (line {other_line}{f'; {hub}' if hub else ''})")
                raise ConfigError(f"{name!r} is already a name of {what}: each registry name and alias "
                                  "must name one upstream", source=source, line=line, key=f"{prefix}[{i}].{key}")
            owners[canonical] = (i, line)
        items.append(built)
    return tuple(items)


_RULE_KEYS = ("allow", "deny", "from", "repositories")


def _build_rules(node: yaml.Node, loader: yaml.SafeLoader, source: str, prefix: str) -> tuple[Rule, ...]:
    """The ``access:`` list: each rule one allow: or deny: with its identities, optional from:
    and repositories:; every error names the line of the item at fault."""
    from dockermirror.access import rules

    if not isinstance(node, yaml.SequenceNode):
        raise ConfigError("expected a list of rules (- allow: [...] or - deny: [...])", source=source,
                          line=node.start_mark.line + 1, key=prefix)
    built = []
    for i, item in enumerate(node.value):
        where = f"{prefix}[{i}]"
        line = item.start_mark.line + 1
        if not isinstance(item, yaml.MappingNode):
            raise ConfigError("expected a rule: a mapping with allow: or deny:", source=source, line=line, key=where)
        given: dict[str, Any] = {}
        for key_node, value_node in item.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError(_NOT_A_NAME, source=source, line=key_line, key=where)
            key = key_node.value
            if key not in _RULE_KEYS:
                raise ConfigError(f"unknown key (known here: {', '.join(_RULE_KEYS)})", source=source,
                                  line=key_line, key=f"{where}.{key}")
            if key in given:
                raise ConfigError("key given twice", source=source, line=key_line, key=f"{where}.{key}")
            if not isinstance(value_node, yaml.SequenceNode) or not value_node.value:
                raise ConfigError("expected a list with at least one entry", source=source, line=key_line,
                                  key=f"{where}.{key}")
            parse = {"allow": rules.parse_identity, "deny": rules.parse_identity, "from": rules.parse_network,
                     "repositories": rules.parse_repository_pattern}[key]
            values = []
            for j, entry in enumerate(value_node.value):
                try:
                    if not isinstance(entry, yaml.ScalarNode):
                        raise ValueError("expected a single value" + (
                            " (a colon then a space makes a mapping: quote it, as in 'user:ci')"
                            if isinstance(entry, yaml.MappingNode) else ""))
                    values.append(parse(_construct(loader, entry, source, f"{where}.{key}[{j}]")))
                except ValueError as exc:
                    raise ConfigError(str(exc), source=source, line=entry.start_mark.line + 1,
                                      key=f"{where}.{key}[{j}]") from None
            given[key] = tuple(values)
        if ("allow" in given) == ("deny" in given):
            raise ConfigError("a rule needs one of allow: or deny: (a list of identities), not "
                              + ("both" if given.get("allow") else "neither"), source=source, line=line, key=where)
        built.append(rules.Rule(allow="allow" in given, identities=given.get("allow") or given["deny"],
                                networks=given.get("from"), repositories=given.get("repositories", ("*",)),
                                index=i, line=line))
    return tuple(built)


def _check_rules(config: Config, source: str) -> None:
    """Every repository pattern of a rule that names a registry names a configured one."""
    from dockermirror.access.rules import compile_patterns
    from dockermirror.routing import RegistryTable, UnknownRegistry

    table = RegistryTable((up.registry, up.aliases) for up in config.registries)
    for rule in config.access:
        for pattern in rule.repositories:
            try:
                compile_patterns([pattern], table)
            except UnknownRegistry as exc:
                raise ConfigError(f"repository pattern {pattern!r}: {exc}", source=source, line=rule.line,
                                  key=f"access[{rule.index}].repositories") from None


def default_url(registry: str) -> str:
    """The URL of an ``upstreams:`` item that gives none: ``https://<registry>``, Docker Hub's API for docker.io."""
    return UpstreamConfig.url if registry_key(registry) == DOCKER_HUB else f"https://{registry}"


MAX_PASSWORD_FILE = 64 * 1024


def _check_upstream(up: UpstreamConfig, lines: dict[str, int], source: str, prefix: str) -> UpstreamConfig:
    """Credentials that go together; the password file read (and refused if others can read it);
    the CA bundle loaded."""
    def fail(message: str, key: str) -> ConfigError:
        return ConfigError(message, source=source, line=lines.get(key, lines.get("")),
                           key=f"{prefix}.{key}" if prefix else key)

    if up.password is not None and up.password_file is not None:
        raise fail("give password or password_file, not both", "password_file")
    if up.password_file is not None:
        path = up.password_file
        try:
            # the whole file but its final line break: a one-line password, or a multi-line
            # key (Google's _json_key); not a FIFO or a device
            data, st = smallfile.read(path, MAX_PASSWORD_FILE + 2)
            mode = st.st_mode
            first = data.decode("utf-8").rstrip("\r\n")
        except smallfile.TooLarge:
            raise fail(f"{path} is larger than {MAX_PASSWORD_FILE} bytes: not a password file", "password_file") from None
        except OSError as exc:
            raise fail(f"cannot read {path}: {exc.strerror}", "password_file") from None
        except UnicodeDecodeError:
            raise fail(f"{path} is not UTF-8 text", "password_file") from None
        if mode & 0o004:
            raise fail(f"{path} can be read by every user: make it readable by the service user only "
                       f"(chmod 600, or 640 with group docker-mirror)", "password_file")
        if not first:
            raise fail(f"{path} holds no password", "password_file")
        if len(first) > MAX_PASSWORD_FILE:
            raise fail(f"{path} is larger than {MAX_PASSWORD_FILE} bytes: not a password file", "password_file")
        up = dataclasses.replace(up, password=first)
    if up.ca_bundle is not None:
        # read now, as the upstream client will: a bad bundle is a configuration error, not a
        # traceback at start (or a reload that fails half way)
        try:
            smallfile.read(up.ca_bundle, smallfile.PEM_MAX)    # a regular file (cafile= blocks on a FIFO)
            ssl.create_default_context(cafile=str(up.ca_bundle))
        except ssl.SSLError:
            raise fail(f"{up.ca_bundle} holds no PEM certificate", "ca_bundle") from None
        except OSError as exc:
            raise fail(f"cannot read {up.ca_bundle}: {exc.strerror}", "ca_bundle") from None
    if up.password is not None and up.username is None:
        raise fail("a password needs a username", "password" if "password" in lines else "password_file")
    return up


def _check_pins(config: Config, source: str, node: yaml.MappingNode) -> None:
    """Every ``cache.pin`` pattern that names a registry names a configured one."""


    table = config.registry_table()
    for pattern in config.cache.pin:
        try:
            table.pattern(pattern)
        except UnknownRegistry as exc:
            raise ConfigError(f"pin {pattern!r}: {exc}", source=source, line=_pin_line(node, pattern),
                              key="cache.pin") from None


def _pin_line(node: yaml.MappingNode, pattern: str) -> int | None:
    for key_node, value_node in node.value:
        if getattr(key_node, "value", None) == "cache" and isinstance(value_node, yaml.MappingNode):
            for k, v in value_node.value:
                if getattr(k, "value", None) == "pin" and isinstance(v, yaml.SequenceNode):
                    for item in v.value:
                        if getattr(item, "value", None) == pattern:
                            return item.start_mark.line + 1
    return None


def _plain_rule(rule: Rule) -> dict[str, Any]:
    out: dict[str, Any] = {rule.action: list(rule.identities)}
    if rule.networks is not None:
        out["from"] = [str(network) for network in rule.networks]
    out["repositories"] = list(rule.repositories)
    return out


def dump(config: Config) -> str:
    """The effective configuration as YAML, secrets masked."""

    def plain(obj: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        fields = _fields(type(obj))
        if isinstance(obj, UpstreamConfig):    # its name first: the list reads as registry after registry
            fields = {"registry": fields["registry"], **fields}
        for name, f in fields.items():
            value = getattr(obj, name)
            if name == "upstream" and getattr(obj, "upstreams", None):
                continue    # upstreams: replaces it
            if name == "password" and getattr(obj, "password_file", None) is not None:
                continue    # read from password_file (shown): not given here
            if "rules" in f.metadata:
                if value:
                    out[name] = [_plain_rule(rule) for rule in value]
            elif "items" in f.metadata:
                if value:
                    out[name] = [plain(item) for item in value]
            elif _is_section(f):
                out[name] = plain(value)
            elif f.metadata.get("secret") and value is not None:
                out[name] = "********"
            elif f.metadata.get("show") and value is not None:
                out[name] = f.metadata["show"](value)
            elif isinstance(value, Path):
                out[name] = str(value)
            elif isinstance(value, tuple):
                out[name] = list(value)
            else:
                out[name] = value
        return out

    return yaml.safe_dump(plain(config), sort_keys=False, default_flow_style=False)
