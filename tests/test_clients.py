"""Real clients pull through the mirror, over plain HTTP and over TLS.

Every client runs in a sandbox (tests/support/sandbox.py) whose private /etc/hosts pins
Docker Hub's names to 127.0.0.1, so a client that falls back from the mirror to "Docker
Hub" fails at once and never leaves loopback; a passing pull therefore came through the
mirror (its request log is checked too). The host's /etc is never written.
Each pulled image's digest must equal the upstream's; the clients verify every blob
against its digest as they pull.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import Upstream
from tests.support.clients import (
    Containerd,
    Dockerd,
    Podman,
    dir_manifest_digest,
    skopeo_copy,
)

IMAGES = [  # (seeded name, docker-style reference)
    ("busybox", "library/busybox:latest"),   # OCI index
    ("alpine", "library/alpine:3"),          # Docker manifest list
    ("tool", "acme/tool:1.0"),               # not an official image
]


@pytest.fixture(params=["http", "tls"])
def served(request, make_mirror, pki):
    """A fresh mirror, plain or with the test CA's certificate."""
    if request.param == "tls":
        return make_mirror(tls={"certificate": str(pki.certificate), "key": str(pki.key)})
    return make_mirror()


def pulled_through(mirror, repo: str) -> bool:
    return bool(mirror.access_lines(f"/v2/{repo}/manifests/"))


def test_skopeo(served, upstream: Upstream, pki, tmp_path: Path):
    cert_dir = pki.cert_dir if served.tls else None
    for name, ref in IMAGES:
        dest = skopeo_copy(f"{served.address}/{ref}", tmp_path / name, all_images=True, cert_dir=cert_dir)
        assert dir_manifest_digest(dest) == upstream.seeded[name].digest, name
        blobs = [p for p in dest.iterdir() if len(p.name) == 64]  # configs and layers, named by hex digest
        assert len(blobs) >= 2
        for blob in blobs:
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
        assert pulled_through(served, ref.split(":")[0])


def test_docker_pull(served, upstream: Upstream, pki):
    # dockerd reads a mirror's CA only from /etc/docker/certs.d/HOST:PORT/ (its sandbox's)
    daemon = Dockerd(served.url, insecure=None if served.tls else served.address,
                     ca=pki.ca if served.tls else None, mirror_address=served.address)
    daemon.start()
    try:
        assert served.url in daemon.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}").stdout
        for name, ref in IMAGES:
            short = ref.removeprefix("library/")
            daemon.docker("pull", short)
            digests = json.loads(daemon.docker("image", "inspect", "--format", "{{json .RepoDigests}}",
                                               short).stdout)
            assert f"{short.split(':')[0]}@{upstream.seeded[name].digest}" in digests
            assert pulled_through(served, ref.split(":")[0])
    finally:
        daemon.stop()


def test_podman_pull(served, upstream: Upstream, pki):
    insecure = "" if served.tls else "insecure = true\n"
    podman = Podman(f"""
[[registry]]
prefix = "docker.io"
location = "docker.io"

[[registry.mirror]]
location = "{served.address}"
{insecure}""")
    try:
        cert_args = ["--cert-dir", str(pki.cert_dir)] if served.tls else []
        for name, ref in IMAGES:
            podman("pull", *cert_args, f"docker.io/{ref}")
            assert f"docker.io/{ref.split(':')[0]}@{upstream.seeded[name].digest}" in podman.repo_digests(
                f"docker.io/{ref}")
            assert pulled_through(served, ref.split(":")[0])
    finally:
        podman.cleanup()


def test_containerd_pull_with_hosts_dir(served, upstream: Upstream, pki):
    daemon = Containerd()
    daemon.start()
    try:
        hosts = daemon.hosts_dir(served.url, ca=pki.ca if served.tls else None)
        for name, ref in IMAGES:
            daemon.ctr("images", "pull", "--hosts-dir", str(hosts), f"docker.io/{ref}")
            assert daemon.image_digest(f"docker.io/{ref}") == upstream.seeded[name].digest
        # containerd names the registry it means with ?ns= on every request to a mirror
        lines = served.access_lines("/v2/")
        assert lines and all("ns=docker.io" in line for line in lines if '"GET /v2/"' not in line)
    finally:
        daemon.stop()
