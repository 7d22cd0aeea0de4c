"""Upstream authentication and redirects, against a registry that behaves like Docker Hub:
bearer tokens from a token service, Basic credentials, blobs redirected to another host."""

from __future__ import annotations

import base64

import httpx
import pytest

from tests.conftest import ALL_MANIFESTS, Upstream
from tests.support.faultproxy import FaultProxy

ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]
USER, PASSWORD = "mirror-bot", "s3cret-pa55"


@pytest.fixture
def cdn(upstream: Upstream):
    proxy = FaultProxy(upstream.registry.address).start()
    yield proxy
    proxy.stop()


def pull_hello(mirror, upstream: Upstream) -> None:
    image = upstream.seeded["hello"].image
    with mirror.client() as client:
        manifest = client.get("/v2/library/hello/manifests/latest", headers=ACCEPT)
        assert manifest.status_code == 200, manifest.text
        assert manifest.headers["docker-content-digest"] == upstream.seeded["hello"].digest
        for digest in image.layers["amd64"]:
            blob = client.get(f"/v2/library/hello/blobs/{digest}")
            assert blob.status_code == 200 and blob.content == upstream.blob(digest)


def test_bearer_tokens_and_redirect_to_another_host(make_mirror, fault_proxy: FaultProxy, cdn: FaultProxy,
                                                   upstream: Upstream):
    fault_proxy.token_auth = True
    fault_proxy.credentials = (USER, PASSWORD)
    fault_proxy.redirect_blobs = cdn.url
    mirror = make_mirror(fault_proxy.url, upstream={"username": USER, "password": PASSWORD})
    pull_hello(mirror, upstream)
    # a second repository needs a token of its own scope
    with mirror.client() as client:
        assert client.get("/v2/acme/tool/manifests/1.0", headers=ACCEPT).status_code == 200

    token_requests = fault_proxy.requests(path=r"^/token")
    scopes = sorted(seen.path.split("scope=")[1] for seen in token_requests)
    assert scopes == ["repository%3Aacme%2Ftool%3Apull", "repository%3Alibrary%2Fhello%3Apull"]  # one per scope
    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert all(seen.header_values("Authorization") == [basic] for seen in token_requests)
    # everything sent to the registry after the first challenge carried a token
    registry_calls = [s for s in fault_proxy.seen if s.path.startswith("/v2/")]
    assert all(s.header_values("Authorization")[0].startswith("Bearer ")
               for s in registry_calls[1:] if s.path.startswith("/v2/library/hello"))
    # blobs came from the "CDN" host, which never saw our credentials
    cdn_blobs = cdn.requests("GET", r"/blobs/")
    assert len(cdn_blobs) == 1 and "signature=abc" in cdn_blobs[0].path
    assert all(seen.header_values("Authorization") == [] for seen in cdn.seen)
    assert PASSWORD not in mirror.log_text() and "Bearer" not in mirror.log_text()


def test_wrong_credentials_give_unauthorized(make_mirror, fault_proxy: FaultProxy):
    fault_proxy.token_auth = True
    fault_proxy.credentials = (USER, PASSWORD)
    mirror = make_mirror(fault_proxy.url, upstream={"username": USER, "password": "Wr0ng-Pa55"})
    response = httpx.get(f"{mirror.url}/v2/library/hello/manifests/latest", headers=ACCEPT)
    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
    assert "Wr0ng-Pa55" not in mirror.log_text()


def test_basic_auth_upstream(make_mirror, fault_proxy: FaultProxy, upstream: Upstream):
    fault_proxy.basic_auth = True
    fault_proxy.credentials = (USER, PASSWORD)
    mirror = make_mirror(fault_proxy.url, upstream={"username": USER, "password": PASSWORD})
    pull_hello(mirror, upstream)
    calls = [s for s in fault_proxy.seen if s.path.startswith("/v2/")]
    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert calls[0].header_values("Authorization") == []            # challenged once...
    assert all(s.header_values("Authorization") == [basic] for s in calls[2:])  # ...then sent up front


def test_anonymous_mirror_gets_unauthorized_from_basic_upstream(make_mirror, fault_proxy: FaultProxy):
    fault_proxy.basic_auth = True
    fault_proxy.credentials = (USER, PASSWORD)
    mirror = make_mirror(fault_proxy.url)
    response = httpx.get(f"{mirror.url}/v2/library/hello/manifests/latest", headers=ACCEPT)
    assert response.status_code == 401
    assert "upstream.username" in response.json()["errors"][0]["message"]
