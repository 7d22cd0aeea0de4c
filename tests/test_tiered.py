"""Tiered mirrors (issue 14): two site mirrors whose upstream is a central docker-mirror over
TLS (private CA from `docker-mirror cert init`, the ``pki`` fixture), the central one's upstream
being Debian's docker-registry (the session's ``upstream``).

Asserted: a blob pulled at both sites is fetched from the real upstream once; once the TTLs of
the sites and the central have passed, a tag pull revalidates through the chain with HEAD only;
with the central mirror stopped, both sites still serve what they cached (tags stale, blobs
hits) and say so in their logs. No timing assertions: the test sleeps past 1 s TTLs.
"""

from __future__ import annotations

import hashlib
import json
import re
import time

import pytest
import yaml

from tests.support.images import ALL_MANIFESTS

pytestmark = pytest.mark.system

TTL = "1s"


def _pull(client, repo: str, tag: str) -> tuple[dict, dict[str, bytes]]:
    """GET the tag's manifest and every blob it names (config and layers), as a client would."""
    response = client.get(f"/v2/{repo}/manifests/{tag}", headers=[("Accept", a) for a in ALL_MANIFESTS])
    assert response.status_code == 200, response.text
    manifest = json.loads(response.content)
    blobs = {}
    for descriptor in [manifest["config"], *manifest["layers"]]:
        blob = client.get(f"/v2/{repo}/blobs/{descriptor['digest']}")
        assert blob.status_code == 200, blob.text
        assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == descriptor["digest"]
        blobs[descriptor["digest"]] = blob.content
    return response, blobs


@pytest.fixture
def tiers(make_mirror, upstream, pki):
    """central (TLS, upstream: the registry) and two sites (upstream: the central, its CA)."""
    central = _named(make_mirror(upstream.url, start=False, cache={"tag_ttl": TTL},
                                 tls={"enabled": True, "certificate": str(pki.certificate), "key": str(pki.key)}),
                     "central")
    sites = [_named(make_mirror(central.url, start=False, upstream={"ca_bundle": str(pki.ca)},
                                cache={"tag_ttl": TTL}), f"site-{n}") for n in ("a", "b")]
    return central, sites


def _named(mirror, node: str):
    """Start ``mirror`` with ``node: NAME`` in its configuration."""
    mirror.config["node"] = node
    mirror.config_path.write_text(yaml.safe_dump(mirror.config))
    mirror.start()
    return mirror


def test_a_blob_pulled_at_two_sites_is_fetched_from_the_upstream_once(tiers, upstream) -> None:
    central, sites = tiers
    seeded = upstream.seeded["hello"]
    registry = upstream.registry
    mark = registry.mark()
    pulled = []
    for site in sites:
        with site.client() as client:
            response, blobs = _pull(client, "library/hello", "latest")
            pulled.append(blobs)
            assert response.headers["docker-content-digest"] == seeded.digest
            assert response.headers["docker-mirror-node"] == site.config["node"]
    assert pulled[0] == pulled[1] and pulled[0]
    for digest in pulled[0]:
        fetched = registry.requests(mark, method="GET", path=f"/blobs/{re.escape(digest)}$")
        assert len(fetched) == 1, (digest, fetched)
        # the central stored it, and served the second site from its cache
        assert central.committed_blob(digest) == pulled[0][digest]
        assert len(central.access_lines(rf'"GET /v2/library/hello/blobs/{re.escape(digest)}" 200 .* cache=HIT',
                                        at_least=1)) == 1
    # the manifest was GET from the upstream once too (the second site was a HIT at the central)
    assert len(registry.requests(mark, method="GET", path=r"/manifests/")) == 1
    # the sites asked the central for library/hello, not library/library/hello
    assert not central.access_lines("library/library", at_least=0)


def test_tags_revalidate_through_the_chain_with_head_only(tiers, upstream) -> None:
    central, sites = tiers
    for site in sites:
        with site.client() as client:
            _pull(client, "library/hello", "latest")
    time.sleep(1.5)         # past the sites' and the central's tag_ttl
    registry = upstream.registry
    mark = registry.mark()
    central_lines = len(central.access_lines("", at_least=0))
    for site in sites:
        site_lines = len(site.access_lines("", at_least=0))
        with site.client() as client:
            response, _ = _pull(client, "library/hello", "latest")
        assert response.headers["docker-content-digest"] == upstream.seeded["hello"].digest
        line = site.access_lines(r'"GET /v2/library/hello/manifests/latest"', at_least=2)[-1]
        assert " upstream_status=200" in line and "cache=HIT" in line, line
        assert len(site.access_lines("", at_least=0)) > site_lines
        time.sleep(1.5)     # the central's tag expires again before the next site asks
    manifests = registry.requests(mark, path=r"/manifests/")
    assert manifests and all(request.startswith("HEAD ") for request in manifests), manifests
    assert not registry.requests(mark, method="GET", path="/blobs/")
    asked = [line for line in central.access_lines("", at_least=0)[central_lines:] if "/manifests/" in line]
    assert len(asked) == 2 and all('"HEAD /v2/library/hello/manifests/latest"' in line for line in asked), asked


def test_the_sites_serve_what_they_cached_with_the_central_mirror_stopped(tiers, upstream) -> None:
    central, sites = tiers
    before = []
    for site in sites:
        with site.client() as client:
            before.append(_pull(client, "library/hello", "latest")[1])
    central.stop()
    time.sleep(1.5)         # the sites' tags are past their TTL: they ask the central, which is gone
    for site, blobs in zip(sites, before, strict=True):
        with site.client() as client:
            response, again = _pull(client, "library/hello", "latest")
        assert again == blobs
        assert response.headers["docker-content-digest"] == upstream.seeded["hello"].digest
        assert site.access_lines(r'"GET /v2/library/hello/manifests/latest" 200 .* cache=STALE')
        for digest in blobs:
            assert site.access_lines(rf'"GET /v2/library/hello/blobs/{re.escape(digest)}" 200 .* cache=HIT',
                                     at_least=2)
        assert re.search(r"upstream failed for .*hello:latest .*serving the cached tag", site.log_text())


def test_one_central_mirror_serves_two_registries_to_a_site_with_send_ns(make_mirror, upstream, pki) -> None:
    """A site with two upstreams, both the central mirror (``send_ns: true``): the central routes
    each request to the upstream of the registry the site named (its request log says which)."""
    second = "registry.test:5443"
    central = make_mirror(start=False, upstreams=[{"registry": "docker.io", "url": upstream.url},
                                                  {"registry": second, "url": upstream.url}],
                          tls={"enabled": True, "certificate": str(pki.certificate), "key": str(pki.key)})
    central.start()
    site = make_mirror(upstreams=[{"registry": "docker.io", "url": central.url, "ca_bundle": str(pki.ca),
                                   "send_ns": True},
                                  {"registry": second, "url": central.url, "ca_bundle": str(pki.ca),
                                   "send_ns": True}])
    tool = upstream.seeded["tool"]
    with site.client() as client:
        response, blobs = _pull(client, f"{second}/acme/tool", tool.tag)
        hello, _ = _pull(client, "hello", "latest")
    assert response.headers["docker-content-digest"] == tool.digest
    assert hello.headers["docker-content-digest"] == upstream.seeded["hello"].digest
    for digest in blobs:
        line = central.access_lines(rf'"GET /v2/acme/tool/blobs/{re.escape(digest)}\?ns=registry.test%3A5443" 200')
        assert line and " upstream=registry.test:5443 " in line[0], line
    assert " upstream=docker.io " in central.access_lines(r'"GET /v2/library/hello/blobs/.*\?ns=docker.io" 200')[0]
