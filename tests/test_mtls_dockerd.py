"""dockerd pulls through a mirror that wants TLS client certificates, with the pair in its
certs.d/<host:port>/ (client.cert, client.key, ca.crt as `docker-mirror cert client` writes
them); without a pair, or with a revoked one, the mirror refuses it and the image does not come.

dockerd counts every registry on 127.0.0.0/8 as insecure and reads no client certificate for
one, so here the mirror listens on 198.18.0.1 in a network namespace of the test's own
(tests/support/netns.py), with dockerd and an upstream registry (Debian's docker-registry,
serving the session upstream's seeded storage) beside it. The namespace has no route out, and
dockerd's sandbox pins Docker Hub's names to 127.0.0.1 there: its fallback from a refusing
mirror to "Docker Hub" fails at once, inside the namespace.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import Upstream
from tests.support.clients import Dockerd
from tests.support.netns import NetNamespace
from tests.support.procs import Daemon, Mirror, Registry, wait_until
from tests.test_mtls import MTLS, reload

PORT = 5443     # the mirror's, in the namespace (nothing else listens there)
PAIR = ("client.cert", "client.key", "ca.crt")


class InsideRegistry(Registry):
    """A docker-registry in the namespace (on its own 127.0.0.1) serving ``storage``."""

    def __init__(self, workdir: Path, storage: Path, netns: NetNamespace) -> None:
        super().__init__(workdir, storage)
        self.argv = netns.argv(self.argv)

    def start(self) -> None:
        Daemon.start(self)      # not Registry.start: its probe would ask the host's loopback
        wait_until(lambda: f"listening on {self.address}" in self.log_text() or not self.running(), 60,
                   what="the registry in the namespace")
        if not self.running():
            raise RuntimeError(f"registry did not start:\n{self.log_text()[-2000:]}")


class InsideMirror(Mirror):
    """docker-mirror in the namespace, on its non-loopback address."""

    def __init__(self, workdir: Path, config: dict, netns: NetNamespace, name: str) -> None:
        super().__init__(workdir, {**config, "listen": f"{netns.address}:{PORT}"}, name=name)
        self.port = PORT
        self.host = netns.address
        self.argv = netns.argv(self.argv)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@pytest.fixture(scope="module")
def netns(tmp_path_factory: pytest.TempPathFactory):
    namespace = NetNamespace(tmp_path_factory.mktemp("netns"))
    namespace.start()
    yield namespace
    namespace.stop()


@pytest.fixture(scope="module")
def inside(netns: NetNamespace, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory):
    """The upstream for mirrors in the namespace: the session upstream's images."""
    registry = InsideRegistry(tmp_path_factory.mktemp("inside"), upstream.registry.storage, netns)
    registry.start()
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def mtls_ns(netns: NetNamespace, tmp_path_factory: pytest.TempPathFactory) -> MTLS:
    """`cert init` for the namespace's address, `cert client` pairs, `cert revoke`."""
    return MTLS(tmp_path_factory.mktemp("mtls-ns"), ip=netns.address)


@pytest.fixture
def mirror_ns(netns: NetNamespace, inside: InsideRegistry, mtls_ns: MTLS, tmp_path: Path):
    """A mirror in the namespace with ``tls.client_auth: required``, upstream ``inside``."""
    mirror = InsideMirror(tmp_path, {"upstream": {"url": inside.url, "registry": "docker.io"},
                                     "tls": {**mtls_ns.tls, "client_auth": "required"}}, netns, "mirror")
    mirror.start()
    yield mirror
    mirror.stop()


def dockerd(netns: NetNamespace, mirror: Mirror, mtls: MTLS, client: str | None) -> Dockerd:
    """dockerd in the namespace, the mirror as its registry mirror, and in its certs.d/HOST:PORT/
    the mirror's CA and (``client``) that client's pair."""
    names = PAIR if client else ("ca.crt",)
    source = mtls.client(client) if client else mtls.ca.parent
    files = {f"docker/certs.d/{mirror.address}/{name}": (source / name).read_bytes() for name in names}
    daemon = Dockerd(mirror.url, netns=netns, etc=files)
    daemon.start()
    return daemon


def repo_digests(daemon: Dockerd, image: str) -> list[str]:
    return json.loads(daemon.docker("image", "inspect", "--format", "{{json .RepoDigests}}", image).stdout)


def absent(daemon: Dockerd, image: str) -> bool:
    try:
        daemon.docker("image", "inspect", image)
    except AssertionError:
        return True
    return False


def refused_pull(daemon: Dockerd, image: str) -> list[str]:
    """``docker pull image`` fails; dockerd's log lines about the endpoints it gave up on, in order
    (dockerd tries its mirror, then "Docker Hub"; docker itself prints only the last error)."""
    before = len(daemon.log_text().splitlines())
    with pytest.raises(AssertionError) as failed:
        daemon.docker("pull", image)
    assert "registry-1.docker.io" in str(failed.value)
    return [line for line in daemon.log_text().splitlines()[before:] if "Attempting next endpoint" in line]


def gave_up_on_the_mirror(tried: list[str]) -> bool:
    """dockerd's mirror failed (its error, whatever the words), then its fallback to Docker Hub,
    which the sandbox pins to the namespace's loopback."""
    return len(tried) == 2 and "registry-1.docker.io" not in tried[0] and "registry-1.docker.io" in tried[1]


def test_dockerd_with_a_client_pair_in_certs_d_pulls_through_the_mirror(netns, inside, mtls_ns, mirror_ns,
                                                                        upstream: Upstream):
    daemon = dockerd(netns, mirror_ns, mtls_ns, "dockerd")
    try:
        mark = inside.mark()
        assert mirror_ns.url in daemon.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}").stdout
        daemon.docker("pull", "busybox")
        assert f"busybox@{upstream.seeded['busybox'].digest}" in repo_digests(daemon, "busybox")
    finally:
        daemon.stop()
    # every request came with the certificate, and the mirror fetched the image from its upstream
    lines = mirror_ns.access_lines("/v2/library/busybox/", at_least=3)
    assert len(lines) >= 3 and all(line.endswith(' cert="CN=dockerd"') for line in lines)
    assert all(' cert="CN=dockerd"' in line for line in mirror_ns.access_lines(""))
    seen = inside.requests(mark, method="GET", path="^/v2/library/busybox/")
    assert any("/manifests/" in line for line in seen) and any("/blobs/sha256:" in line for line in seen)


def test_dockerd_without_a_client_certificate_is_refused_and_the_image_does_not_come(netns, inside, mtls_ns,
                                                                                      mirror_ns):
    daemon = dockerd(netns, mirror_ns, mtls_ns, None)
    try:
        mark = inside.mark()
        tried = refused_pull(daemon, "acme/tool:1.0")
        assert absent(daemon, "acme/tool:1.0")
        assert gave_up_on_the_mirror(tried), tried
    finally:
        daemon.stop()
    assert refused_without_certificate(mirror_ns)
    assert not inside.requests(mark, path="^/v2/acme/")


def logged(mirror: Mirror, pattern: str) -> list[str]:
    """Request-log lines matching ``pattern``, now (after a pull ended they are all written)."""
    return [line for line in mirror.log_text().splitlines() if " access: " in line and re.search(pattern, line)]


def refused_without_certificate(mirror: Mirror) -> bool:
    """The mirror told a client without a certificate why (401 at the HTTP layer, from its first
    request on: dockerd asks /v2/ and stops there) and served it no manifest or blob."""
    if any(re.search(r'" 200 ', line) for line in logged(mirror, "/v2/acme/")):
        return False
    return any(re.search(r'" 401 .* refused=no-client-certificate$', line) and "cert=" not in line
               for line in logged(mirror, '"GET /v2/"'))


def test_dockerd_with_a_revoked_certificate_is_refused_after_reload(netns, inside, mtls_ns, mirror_ns,
                                                                    upstream: Upstream):
    daemon = dockerd(netns, mirror_ns, mtls_ns, "dockerd-revoked")
    try:
        daemon.docker("pull", "hello")
        assert f"hello@{upstream.seeded['hello'].digest}" in repo_digests(daemon, "hello")
        assert "revoked dockerd-revoked" in mtls_ns.run("revoke", "dockerd-revoked")
        reload(mirror_ns)
        mark = inside.mark()
        tried = refused_pull(daemon, "alpine:3")
        assert absent(daemon, "alpine:3")
        assert gave_up_on_the_mirror(tried), tried
    finally:
        daemon.stop()
    assert "TLS handshake refused a client: certificate revoked" in mirror_ns.log_text()
    assert not logged(mirror_ns, "/v2/library/alpine/")
    assert not inside.requests(mark, path="^/v2/library/alpine/")
