"""Which upstream a request is for: containerd's ``?ns=``, a registry path prefix, or the default.

One mirror serves several upstream registries. Clients name the registry three ways:

1. containerd sends ``?ns=<registry>`` on every request to a mirror;
2. podman/CRI-O (a prefixed mirror ``location``), containerd's ``override_path`` and a plain
   ``docker pull mirror/ghcr.io/org/image`` put the registry in front of the repository:
   ``/v2/ghcr.io/org/image/...``;
3. anything else is for the default upstream (dockerd's ``registry-mirrors``, which only
   ever mirrors Docker Hub).

A registry name is only ever a key into the configured list: a name that is not in it gets
404 NAME_UNKNOWN, and no address from a request is ever dialled.

Pure: the table maps names to keys; the mirror maps keys to its upstream clients.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")


def registry_key(name: str) -> str:
    """The canonical name of a registry host (Docker Hub has several)."""
    name = name.strip().lower()
    return DOCKER_HUB if name in DOCKER_HUB_ALIASES else name


def upstream_repository(registry: str, name: str) -> str:
    """The repository name a registry uses; Docker Hub keeps official images in library/."""
    if registry == DOCKER_HUB and "/" not in name:
        return f"library/{name}"
    return name


def looks_like_host(component: str) -> bool:
    """Whether a name's first component is a registry host (the rule docker and containerd use:
    it has a dot or a port, or is ``localhost``), not a repository namespace."""
    return "." in component or ":" in component or component == "localhost"


_HOST_WITH_PORT = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?:[0-9]{1,5}", re.ASCII)


def host_with_port(component: str) -> bool:
    """Whether a name's first component is a ``host:port`` (``registry.example.org:5000``): no
    repository name has a colon, so such a prefix passes the repository-name check on its own."""
    return _HOST_WITH_PORT.fullmatch(component) is not None


class UnknownRegistry(LookupError):
    """A request names a registry that is not configured."""

    def __init__(self, registry: str, known: Iterable[str], message: str = "") -> None:
        self.registry = registry
        self.known = tuple(known)
        # what a client is told: the name it sent, never the registries configured (some may be
        # private, behind access: rules); the admin's messages (configuration, access check) list them
        self.public = message or f"this mirror does not serve {registry}"
        super().__init__(message or f"{self.public} (it serves {', '.join(self.known)})")


@dataclass(frozen=True)
class Route:
    registry: str       # the upstream's key (its canonical registry name)
    repository: str     # the repository name on that upstream (library/ added for docker.io)
    prefixed: bool      # the registry was named in the path


class RegistryTable:
    """The configured registries: names and aliases -> key; the first is the default."""

    def __init__(self, registries: Iterable[tuple[str, Iterable[str]]], *, dotted_namespaces: bool = False) -> None:
        """``registries``: (name, aliases) of each upstream, the default first. Names must not
        collide (the configuration checks that); a later duplicate is ignored. ``dotted_namespaces``:
        the configuration names one registry the way it did before there were several (the single
        ``upstream:`` section), whose repositories may start with a dotted component."""
        self.keys: list[str] = []
        self._names: dict[str, str] = {}
        for name, aliases in registries:
            key = registry_key(name)
            if key in self.keys:
                continue
            self.keys.append(key)
            names = [key, *(registry_key(alias) for alias in aliases)]
            if key == DOCKER_HUB:
                names += DOCKER_HUB_ALIASES
            for alias in names:
                self._names.setdefault(alias, key)
        if not self.keys:
            raise ValueError("at least one registry is needed")
        self.dotted_namespaces = dotted_namespaces and len(self.keys) == 1 and self.default != DOCKER_HUB

    @property
    def default(self) -> str:
        return self.keys[0]

    def lookup(self, name: str) -> str | None:
        """The key of the registry called ``name`` (its name or an alias, any case), if configured."""
        return self._names.get(registry_key(name))

    def route(self, name: str, namespace: str | None = None) -> Route:
        """The upstream and repository for a request's repository name and its ``?ns=``.

        Raises :class:`UnknownRegistry` for an ``ns`` or a host-like first component that
        names no configured registry. ``name`` must already be a valid repository name."""
        first, _, rest = name.partition("/")
        if namespace is not None:
            key = self.lookup(namespace)
            if key is None:
                raise UnknownRegistry(namespace, self.keys)
            # containerd with override_path sends the prefix too: the same entry either way
            if rest and looks_like_host(first) and self.lookup(first) == key:
                return Route(key, upstream_repository(key, rest), True)
            return Route(key, upstream_repository(key, name), False)
        if rest and looks_like_host(first):
            key = self.lookup(first)
            if key is not None:
                return Route(key, upstream_repository(key, rest), True)
            if not self._namespaces_with_dots(first):
                raise UnknownRegistry(first, self.keys)
        elif looks_like_host(first):
            # "/v2/ghcr.io/manifests/x": a registry with no repository; a name like that is
            # no Docker Hub repository either
            if self.lookup(first) is not None:
                raise UnknownRegistry(first, self.keys, f"{first} is a registry: name a repository in it, "
                                                        f"as in {first}/<repository>")
            if not self._namespaces_with_dots(first):
                raise UnknownRegistry(first, self.keys)
        return Route(self.default, upstream_repository(self.default, name), False)

    def _namespaces_with_dots(self, first: str) -> bool:
        """A mirror of one registry that is not Docker Hub (GitLab, Harbor...) may have repositories
        whose first component has a dot (``my.group/app``): configured with the single ``upstream:``
        section, such a name is that registry's repository, as before there were several. Docker
        Hub has no such names, and with ``upstreams:`` a dotted first component must name one."""
        return self.dotted_namespaces and ":" not in first and first != "localhost"

    def pattern(self, pattern: str) -> str:
        """A repository pattern of the configuration (``cache.pin``) as ``key/repository``:
        ``ghcr.io/myorg/*`` is for ghcr.io, ``library/centos`` and ``centos`` for the default."""
        first, _, rest = pattern.partition("/")
        if rest and looks_like_host(first):
            key = self.lookup(first)
            if key is not None:
                return f"{key}/{upstream_repository(key, rest)}"
            if not self._namespaces_with_dots(first):
                raise UnknownRegistry(first, self.keys)
        elif looks_like_host(first) and self.lookup(first) is not None:
            raise UnknownRegistry(first, self.keys, f"{pattern} names a registry: add the repositories, "
                                                    f"as in {pattern}/*")
        return f"{self.default}/{upstream_repository(self.default, pattern)}"
