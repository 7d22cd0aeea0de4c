"""Several upstreams behind one mirror (issue 11), against three real registries on loopback:
docker.io (plain HTTP), ghcr.test (bearer tokens with credentials) and registry.test:5443 (TLS
from a private CA); see tests/support/upstreams.py."""

from __future__ import annotations

import httpx
import pytest

from tests.support.upstreams import ALL_MANIFESTS, GHCR, PRIVATE, Site, ThreeUpstreams

ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]


def pull(client: httpx.Client, site: Site, name: str, path_name: str, params: dict | None = None) -> None:
    """Manifest (by tag), then every manifest and blob of the image, each equal to the upstream's."""
    seeded = site.seeded[name]
    response = client.get(f"/v2/{path_name}/manifests/{seeded.tag}", headers=ACCEPT, params=params)
    assert response.status_code == 200, response.text
    assert response.headers["docker-content-digest"] == seeded.digest
    for digest, path in seeded.image.blob_paths.items():
        kind = "manifests" if digest in seeded.image.manifests.values() or digest == seeded.image.digest else "blobs"
        got = client.get(f"/v2/{path_name}/{kind}/{digest}", headers=ACCEPT, params=params)
        assert got.status_code == 200, (digest, got.text)
        assert got.content == path.read_bytes()


def test_fixture_smoke(make_mirror, three_upstreams: ThreeUpstreams):
    mirror = make_mirror(upstreams=three_upstreams.config())
    with mirror.client() as client:
        pull(client, three_upstreams.ghcr, "widget", "acme/widget", {"ns": GHCR})
        pull(client, three_upstreams.private, "app", "team/app", {"ns": PRIVATE})
        pull(client, three_upstreams.docker, "hello", "hello")


def test_fixture_layers(three_upstreams: ThreeUpstreams):
    """ghcr.test's widget carries docker.io's hello layer; the rest differs."""
    hello = three_upstreams.docker.seeded["hello"]
    widget = three_upstreams.ghcr.seeded["widget"]
    assert set(hello.image.layers["amd64"]) < set(widget.image.layers["amd64"])
    assert hello.digest != widget.digest
