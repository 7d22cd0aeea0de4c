"""Shared fixtures: a real upstream registry seeded with test images, mirror processes, a test CA.

Everything listens on 127.0.0.1 and is stopped at the end, even when a test fails.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support import images
from tests.support.certs import TestPKI
from tests.support.faultproxy import FaultProxy
from tests.support.procs import Mirror, Registry

ALL_MANIFESTS = [  # what docker and c/image send: one Accept line per type
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/json",
]
BIG_BYTES = 100 * 1024 * 1024 + 12345


@dataclass
class Seeded:
    repo: str
    tag: str
    image: images.Image
    digest: str = ""            # what the upstream serves for the tag (after any format conversion)


@dataclass
class Upstream:
    registry: Registry
    seeded: dict[str, Seeded] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.registry.url

    def head(self, repo: str, reference: str, accept: list[str] = ALL_MANIFESTS) -> httpx.Response:
        return httpx.head(f"{self.url}/v2/{repo}/manifests/{reference}", headers=[("Accept", a) for a in accept])

    def get(self, repo: str, reference: str, accept: list[str] = ALL_MANIFESTS) -> httpx.Response:
        return httpx.get(f"{self.url}/v2/{repo}/manifests/{reference}", headers=[("Accept", a) for a in accept])

    def blob(self, digest: str) -> bytes:
        for seeded in self.seeded.values():
            if digest in seeded.image.blob_paths:
                return seeded.image.blob_paths[digest].read_bytes()
        raise KeyError(digest)

    @property
    def big_layer(self) -> str:
        return self.seeded["big"].image.layers["amd64"][-1]


def _push(layout: Path, tag: str, dest: str, *extra: str) -> None:
    subprocess.run(["skopeo", "copy", "--quiet", "--all", "--dest-tls-verify=false", *extra,
                    f"oci:{layout}:{tag}", f"docker://{dest}"], check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Upstream:
    """Debian's docker-registry on a free loopback port, seeded with images built here."""
    work = tmp_path_factory.mktemp("upstream")
    registry = Registry(work)
    registry.start()
    up = Upstream(registry)
    try:
        img = work / "img"
        plan = {
            # name: (repo, tag, build kwargs, extra skopeo args)
            "hello": ("library/hello", "latest", {}, ()),
            "busybox": ("library/busybox", "latest", {"archs": ("amd64", "arm64")}, ()),
            "alpine": ("library/alpine", "3", {"archs": ("amd64", "arm64")}, ("--format", "v2s2")),
            "tool": ("acme/tool", "1.0", {}, ()),
            "big": ("library/big", "latest", {"random_bytes": BIG_BYTES}, ()),
        }
        for name, (repo, tag, kwargs, extra) in plan.items():
            image = images.build(img / name, name, tag=tag, seed=name, **kwargs)
            _push(img / name, tag, f"{registry.address}/{repo}:{tag}", *extra)
            up.seeded[name] = Seeded(repo, tag, image)
        _push(img / "tool", "1.0", f"{registry.address}/acme/tool:1")
        for seeded in up.seeded.values():
            response = up.head(seeded.repo, seeded.tag)
            response.raise_for_status()
            seeded.digest = response.headers["docker-content-digest"]
        yield up
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """A CA and server certificate made by `docker-mirror cert init`, as an admin would."""
    directory = tmp_path_factory.mktemp("pki")
    pki = TestPKI(directory / "ca" / "ca.crt", directory / "server.crt", directory / "server.key",
                  directory / "certs.d")
    config = directory / "config.yml"
    config.write_text(f"tls:\n  certificate: {pki.certificate}\n  key: {pki.key}\n  ca: {pki.ca}\n")
    subprocess.run([sys.executable, "-m", "dockermirror", "cert", "init", "--config", str(config),
                    "--hostname", "localhost", "--ip", "127.0.0.1", "--ip", "::1"], check=True, capture_output=True)
    pki.cert_dir.mkdir()
    (pki.cert_dir / "ca.crt").write_bytes(pki.ca.read_bytes())  # only the CA: what --cert-dir wants
    return pki


@pytest.fixture
def make_mirror(tmp_path: Path, upstream: Upstream):
    """Start docker-mirror processes; every one is stopped after the test."""
    started: list[Mirror] = []
    count = 0

    def start(upstream_url: str | None = None, *, start: bool = True, **sections) -> Mirror:
        nonlocal count
        count += 1
        config = {"upstream": {"url": upstream_url or upstream.url, "registry": "docker.io"}}
        for section, values in sections.items():
            config.setdefault(section, {}).update(values)
        mirror = Mirror(tmp_path, config, name=f"mirror{count}")
        started.append(mirror)
        if start:
            mirror.start()
        return mirror

    yield start
    for mirror in started:
        mirror.stop()


@pytest.fixture
def mirror(make_mirror) -> Mirror:
    return make_mirror()


@pytest.fixture
def fault_proxy(upstream: Upstream):
    proxy = FaultProxy(upstream.registry.address).start()
    yield proxy
    proxy.stop()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
