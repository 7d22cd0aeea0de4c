"""Tiered mirrors in-process (issue 14): a site mirror whose upstreams are a central docker-mirror
(the central app itself, through ``httpx.ASGITransport``). With ``send_ns: true`` each site
upstream names its registry with ``?ns=``, so one central serves several registries to a site;
without it every request would land on the central's default upstream."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from dockermirror import config as configuration
from dockermirror.app import DockerMirror
from tests.unit.fakes import ALL_MANIFESTS, FakeClock, FakeRegistry

pytestmark = pytest.mark.anyio
ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _text(cache_dir: Path, upstreams: list[tuple[str, str, str]]) -> str:
    lines = ["listen: 127.0.0.1:5000", "tls:", "  enabled: false", "upstreams:"]
    for registry, url, extra in upstreams:
        lines += [f"  - registry: {registry}", f"    url: {url}"] + ([f"    {extra}"] if extra else [])
    return "\n".join([*lines, "cache:", f"  dir: {cache_dir}", "  tag_ttl: 5m"]) + "\n"


async def _chain(tmp_path: Path, send_ns: bool):
    hub, ghcr = FakeRegistry(), FakeRegistry()
    by_host = {"hub.test": hub, "ghcr.test": ghcr}
    hub.push("library/hello", "latest", b"hub layer\n" * 50)
    ghcr.push("org/app", "1", b"ghcr layer\n" * 50)
    central = DockerMirror(configuration.loads(_text(tmp_path / "central", [
        ("docker.io", "https://hub.test", ""), ("ghcr.io", "https://ghcr.test", "")])), clock=FakeClock(),
        upstream_transport=httpx.MockTransport(lambda request: by_host[request.url.host].handle(request)))
    extra = "send_ns: true" if send_ns else ""
    site = DockerMirror(configuration.loads(_text(tmp_path / "site", [
        ("docker.io", "http://central.test:5000", extra), ("ghcr.io", "http://central.test:5000", extra)])),
        clock=FakeClock(), upstream_transport=httpx.ASGITransport(app=central.asgi, client=("10.0.0.2", 40000)))
    return hub, ghcr, central, site


async def _pull(site: DockerMirror, name: str, tag: str) -> tuple[httpx.Response, list[httpx.Response]]:
    transport = httpx.ASGITransport(app=site.asgi, client=("192.0.2.7", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://site.test") as client:
        manifest = await client.get(f"/v2/{name}/manifests/{tag}", headers=ACCEPT)
        if manifest.status_code != 200:
            return manifest, []
        layers = json.loads(manifest.content)["layers"]
        return manifest, [await client.get(f"/v2/{name}/blobs/{layer['digest']}") for layer in layers]


async def test_a_site_names_each_registry_to_the_central_mirror_with_ns(tmp_path) -> None:
    hub, ghcr, central, site = await _chain(tmp_path, send_ns=True)
    async with central.running(), site.running():
        hello, hello_blobs = await _pull(site, "hello", "latest")
        app, app_blobs = await _pull(site, "ghcr.io/org/app", "1")
    assert hello.status_code == 200 and [b.content for b in hello_blobs] == [b"hub layer\n" * 50]
    assert app.status_code == 200 and [b.content for b in app_blobs] == [b"ghcr layer\n" * 50]
    # each registry's content came from its own upstream of the central, once
    assert [s.path for s in hub.seen if "/blobs/" in s.path] == \
        ["/v2/library/hello/blobs/" + hello_blobs[0].request.url.path.rsplit("/", 1)[-1]]
    assert len([s for s in ghcr.seen if "/blobs/" in s.path]) == 1
    assert not [s for s in hub.seen if "org/app" in s.path] and not [s for s in ghcr.seen if "hello" in s.path]


async def test_without_send_ns_a_second_registry_lands_on_the_centrals_default(tmp_path) -> None:
    """Why send_ns exists: the central cannot tell which registry a site meant."""
    hub, ghcr, central, site = await _chain(tmp_path, send_ns=False)
    async with central.running(), site.running():
        app, _ = await _pull(site, "ghcr.io/org/app", "1")
    assert app.status_code == 404
    assert [s for s in hub.seen if "org/app" in s.path] and not ghcr.seen


def test_send_ns_adds_the_registry_to_every_request_path_query() -> None:
    config = configuration.loads("upstreams:\n  - registry: registry.example.org:5000\n"
                                 "    url: https://central.test\n    send_ns: true\n")
    assert config.upstreams[0].send_ns is True
    assert configuration.loads("listen: 127.0.0.1:5000\n").upstream.send_ns is False
    with pytest.raises(configuration.ConfigError):
        configuration.loads("upstream:\n  send_ns: maybe\n")


async def test_send_ns_goes_on_tag_lists_and_referrers_too(tmp_path) -> None:
    seen: list[httpx.Request] = []
    registry = FakeRegistry(on_request=seen.append)
    registry.push("org/app", "1")
    text = _text(tmp_path / "site", [("docker.io", "https://hub.test", ""),
                                     ("registry.example.org:5000", "https://central.test", "send_ns: true")])
    site = DockerMirror(configuration.loads(text), clock=FakeClock(), upstream_transport=registry.transport)
    async with site.running():
        transport = httpx.ASGITransport(app=site.asgi, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://site.test") as client:
            await client.get("/v2/org/app/tags/list?n=5&ns=registry.example.org:5000")
            await client.head("/v2/org/app/manifests/1?ns=registry.example.org:5000", headers=ACCEPT)
    queries = [dict(request.url.params) for request in seen if request.url.host == "central.test"]
    assert queries and all(q.get("ns") == "registry.example.org:5000" for q in queries), queries
    assert {"n": "5", "ns": "registry.example.org:5000"} in queries


async def test_a_central_mirror_with_users_and_rules_serves_a_site_with_its_credentials(tmp_path) -> None:
    """A central with auth.htpasswd and access: rules: a site whose upstream has a central user's
    credentials pulls (it answers the central's Basic challenge); a site without them gets the
    central's refusal, not content."""
    import bcrypt

    hub = FakeRegistry()
    hub.push("library/hello", "latest", b"hub layer\n" * 50)
    users = tmp_path / "htpasswd"
    users.write_text(f"site-a:{bcrypt.hashpw(b'site-secret', bcrypt.gensalt(4)).decode()}\n")
    central = DockerMirror(configuration.loads(
        _text(tmp_path / "central", [("docker.io", "https://hub.test", "")])
        + f"auth:\n  htpasswd: {users}\naccess:\n  - allow: [user:site-a]\n"), clock=FakeClock(),
        upstream_transport=hub.transport)
    sites = {}
    for name, extra in (("with", "username: site-a\n    password: site-secret"), ("without", "")):
        sites[name] = DockerMirror(configuration.loads(_text(tmp_path / name, [
            ("docker.io", "http://central.test:5000", extra)])), clock=FakeClock(),
            upstream_transport=httpx.ASGITransport(app=central.asgi, client=("10.0.0.2", 40000)))
    async with central.running(), sites["with"].running(), sites["without"].running():
        ok, blobs = await _pull(sites["with"], "hello", "latest")
        refused, _ = await _pull(sites["without"], "hello", "latest")
    assert ok.status_code == 200 and [b.content for b in blobs] == [b"hub layer\n" * 50]
    assert refused.status_code == 401 and "upstream.username" in refused.json()["errors"][0]["message"]
