"""Test upstream registries: Debian's docker-registry seeded with small images, and three of
them behind one mirror (issue 11).

- ``docker.io``: the session's plain-HTTP registry (tests/conftest.py ``upstream``);
- ``ghcr.test``: a second registry behind the fault proxy acting like a registry with bearer
  tokens and credentials (the mirror gets ``username`` and a 0600 ``password_file``);
- ``registry.test:5443`` (alias ``registry.test``): a third registry serving TLS with a
  certificate from a private CA (the mirror gets ``ca_bundle``).

The names are only keys of the mirror's configuration: the mirror dials the 127.0.0.1 URLs.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support import images
from tests.support.certs import TestPKI
from tests.support.clients import skopeo_push
from tests.support.faultproxy import FaultProxy
from tests.support.procs import Registry

ALL_MANIFESTS = images.ALL_MANIFESTS

DOCKER_IO, GHCR, PRIVATE = "docker.io", "ghcr.test", "registry.test:5443"
PRIVATE_ALIAS = "registry.test"
USER, PASSWORD = "mirror-bot", "gh-s3cret-pa55"


@dataclass
class Seeded:
    repo: str
    tag: str
    image: images.Image
    digest: str = ""            # what the upstream serves for the tag (after any format conversion)


@dataclass
class Upstream:
    """A seeded registry; requests made here go to it directly (not through any proxy)."""

    registry: Registry
    seeded: dict[str, Seeded] = field(default_factory=dict)
    ca: Path | None = None      # the private CA its certificate comes from (TLS only)

    @property
    def url(self) -> str:
        return self.registry.url

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=self.ca) if self.ca else True

    def head(self, repo: str, reference: str, accept: list[str] = ALL_MANIFESTS) -> httpx.Response:
        return httpx.head(f"{self.url}/v2/{repo}/manifests/{reference}", headers=[("Accept", a) for a in accept],
                          verify=self.verify)

    def get(self, repo: str, reference: str, accept: list[str] = ALL_MANIFESTS) -> httpx.Response:
        return httpx.get(f"{self.url}/v2/{repo}/manifests/{reference}", headers=[("Accept", a) for a in accept],
                         verify=self.verify)

    def blob(self, digest: str) -> bytes:
        for seeded in self.seeded.values():
            if digest in seeded.image.blob_paths:
                return seeded.image.blob_paths[digest].read_bytes()
        raise KeyError(digest)

    @property
    def big_layer(self) -> str:
        return self.seeded["big"].image.layers["amd64"][-1]


# name: (repo, tag, images.build keyword arguments, extra skopeo arguments)
Plan = dict[str, tuple[str, str, dict, tuple[str, ...]]]


def seed(up: Upstream, work: Path, plan: Plan) -> Upstream:
    """Build each image of ``plan`` under ``work``, push it to ``up`` and record the digest it serves."""
    for name, (repo, tag, kwargs, extra) in plan.items():
        layout, kwargs = work / name, {"name": name, "seed": name, **kwargs}
        image = images.build(layout, kwargs.pop("name"), tag=tag, **kwargs)
        skopeo_push(layout, tag, f"{up.registry.address}/{repo}:{tag}", *extra, all_images=True)
        up.seeded[name] = Seeded(repo, tag, image)
    for seeded in up.seeded.values():
        response = up.head(seeded.repo, seeded.tag)
        response.raise_for_status()
        seeded.digest = response.headers["docker-content-digest"]
    return up


# ghcr.test's "widget" has docker.io's "hello" layer (same name, arch and seed) on top of a
# base layer of its own: one layer carried by two registries.
GHCR_PLAN: Plan = {
    "widget": ("acme/widget", "1.0", {"name": "hello", "seed": "hello", "shared": "ghcr-base"}, ()),
    "gadget": ("acme/gadget", "latest", {"archs": ("amd64", "arm64")}, ()),
}
PRIVATE_PLAN: Plan = {
    "app": ("team/app", "v1", {}, ()),
}


@dataclass
class Site:
    """One upstream as a mirror is configured for it."""

    key: str                        # its registry name in the mirror's configuration
    upstream: Upstream              # the registry behind it, seeded
    url: str                        # what the mirror dials
    settings: dict = field(default_factory=dict)     # credentials, CA bundle
    proxy: FaultProxy | None = None                  # in front of it, if any

    @property
    def seeded(self) -> dict[str, Seeded]:
        return self.upstream.seeded

    def entry(self, **extra) -> dict:
        """Its item of the mirror's ``upstreams:`` list."""
        return {"registry": self.key, "url": self.url, **self.settings, **extra}

    def mark(self) -> int:
        """A position in what this upstream saw (its proxy's record, or else the registry's log)."""
        return len(self.proxy.seen) if self.proxy else self.upstream.registry.mark()

    def requests(self, since: int = 0, method: str | None = None, path: str | None = None) -> list[str]:
        """``METHOD PATH`` of each request the upstream received after ``since`` (``path``: a regex);
        for a proxied upstream, what reached the proxy (token requests included)."""
        if self.proxy is None:
            return self.upstream.registry.requests(since, method, path)
        return [f"{s.method} {s.path}" for s in self.proxy.seen[since:]
                if (not method or s.method == method) and (not path or re.search(path, s.path))]


@dataclass
class ThreeUpstreams:
    docker: Site
    ghcr: Site
    private: Site
    pki: TestPKI

    @property
    def sites(self) -> list[Site]:
        return [self.docker, self.ghcr, self.private]

    def site(self, key: str) -> Site:
        return next(site for site in self.sites if site.key == key)

    def config(self, *keys: str, **extra) -> list[dict]:
        """The ``upstreams:`` list for a mirror (``keys``: only these, in this order; the default
        is docker.io, then the token registry, then the TLS one); ``extra``: settings per key."""
        chosen = [self.site(key) for key in keys] if keys else self.sites
        return [site.entry(**extra.get(site.key, {})) for site in chosen]

    def reset(self) -> None:
        """Undo a test's faults on the token registry's proxy (it is shared by the session)."""
        proxy = self.ghcr.proxy
        assert proxy is not None
        proxy.status = proxy.delay = proxy.slow = proxy.hold = proxy.cut = None
        proxy.token_auth, proxy.credentials = True, (USER, PASSWORD)
        proxy.released.clear()
        if proxy._server is None:
            proxy.start()


def token_site(work: Path, started: list) -> Site:
    """A registry behind the fault proxy demanding bearer tokens for USER/PASSWORD; seeded.
    What it starts is appended to ``started`` at once (for the caller to stop)."""
    registry = Registry(work / "registry")
    started.append(registry)
    registry.start()
    up = seed(Upstream(registry), work / "img", GHCR_PLAN)
    proxy = FaultProxy(registry.address)
    proxy.token_auth, proxy.credentials = True, (USER, PASSWORD)
    started.append(proxy)
    proxy.start()
    password_file = work / "ghcr-password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    return Site(GHCR, up, proxy.url, {"username": USER, "password_file": str(password_file)}, proxy)


def tls_site(work: Path, pki: TestPKI, started: list) -> Site:
    """A registry serving TLS with a certificate from ``pki``'s private CA; seeded."""
    registry = Registry(work / "registry", tls=(pki.certificate, pki.key))
    started.append(registry)
    registry.start()
    up = seed(Upstream(registry, ca=pki.ca), work / "img", PRIVATE_PLAN)
    # the alias without a port: what a client can put in a reference's path (mirror/registry.test/...)
    return Site(PRIVATE, up, registry.url, {"ca_bundle": str(pki.ca), "aliases": [PRIVATE_ALIAS]})
