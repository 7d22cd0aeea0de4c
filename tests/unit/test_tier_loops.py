"""Request loops between tiers (dockermirror/via.py, api/loops.py): mirrors wired to each other
in-process through httpx transports. A loop is answered 508 Loop Detected at once (no waiting on
a timeout, no storm of requests), the upstream is not marked down, and a chain without a loop
carries one ``Via`` entry per hop and nothing a client made up."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import httpx
import pytest

from dockermirror import config as configuration
from dockermirror import via
from dockermirror.app import DockerMirror
from tests.unit.fakes import ALL_MANIFESTS, FakeClock, FakeRegistry

pytestmark = pytest.mark.anyio
ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]
BLOB = "sha256:" + "b" * 64
PATHS = ("/v2/library/x/manifests/latest", f"/v2/library/x/blobs/{BLOB}", "/v2/library/x/tags/list")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Wire(httpx.AsyncBaseTransport):
    """An upstream transport to another in-process app (set later), counting and keeping requests."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.target: httpx.AsyncBaseTransport | None = None
        self.seen: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        assert self.target is not None
        return await self.target.handle_async_request(request)


def _app(cache_dir: Path, upstream: str, transport: httpx.AsyncBaseTransport) -> DockerMirror:
    text = (f"listen: 127.0.0.1:5000\ntls:\n  enabled: false\nupstream:\n  url: {upstream}\n"
            "  registry: docker.io\n  read_timeout: 3s\n  connect_timeout: 1s\n"
            f"cache:\n  dir: {cache_dir}\n  tag_ttl: 5m\n")
    return DockerMirror(configuration.loads(text), clock=FakeClock(), upstream_transport=transport)


def _to(app: DockerMirror, client: str) -> httpx.ASGITransport:
    return httpx.ASGITransport(app=app.asgi, client=(client, 40000))


async def _get(app: DockerMirror, path: str, headers: list[tuple[str, str]] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(transport=_to(app, "192.0.2.7"), base_url="http://mirror.test") as client:
        with anyio.fail_after(10):
            return await client.get(path, headers=[*ACCEPT, *(headers or [])])


def _loop_answered(response: httpx.Response) -> None:
    assert response.status_code == 508, (response.status_code, response.text)
    (error,) = response.json()["errors"]
    assert error["code"] == "UNAVAILABLE"
    assert error["message"].startswith("request loop: "), error
    # a GET's answer passes on the words of the mirror that found the loop (a HEAD's has no body)
    if response.request.url.path.endswith("/tags/list") or "/blobs/" in response.request.url.path:
        assert error["message"].startswith("request loop: this mirror's upstream leads back to it (Via: ")
    assert "via" not in response.headers


async def test_two_mirrors_each_the_others_upstream_answer_508_at_once(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO)
    to_b, to_a = Wire("a->b"), Wire("b->a")
    a = _app(tmp_path / "a", "http://b.test", to_b)
    b = _app(tmp_path / "b", "http://a.test", to_a)
    to_b.target, to_a.target = _to(b, "10.0.0.1"), _to(a, "10.0.0.2")
    async with a.running(), b.running():
        for path in PATHS:
            before = len(to_b.seen), len(to_a.seen)
            started = anyio.current_time()
            response = await _get(a, path)
            _loop_answered(response)
            assert anyio.current_time() - started < 2
            # A asked B once, B asked A once: A saw its own pseudonym and stopped there
            assert (len(to_b.seen) - before[0], len(to_a.seen) - before[1]) == (1, 1), path
            assert to_a.seen[-1].headers["via"] == f"1.1 {a.pseudonym}, 1.1 {b.pseudonym}"
        # neither upstream is taken for down, nor failing
        assert a.upstream_client.reachable is True and b.upstream_client.reachable is True
        assert not a.upstream_client.outage.failing and not b.upstream_client.outage.failing
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings and all("request loop" in w for w in warnings), warnings
    assert len(warnings) == 1       # the next ones of the period at info
    assert a.pseudonym in warnings[0] and "unreachable" not in " ".join(warnings)


async def test_a_mirror_that_is_its_own_upstream_answers_508(tmp_path) -> None:
    wire = Wire("self")
    a = _app(tmp_path / "a", "http://a.test", wire)
    wire.target = _to(a, "127.0.0.1")
    async with a.running():
        for path in PATHS:
            before = len(wire.seen)
            _loop_answered(await _get(a, path))
            assert len(wire.seen) - before == 1
        assert a.upstream_client.reachable is True


async def test_a_chain_carries_one_via_entry_per_hop_and_no_foreign_one(tmp_path) -> None:
    hub = FakeRegistry()
    image = hub.push("library/hello", "latest", b"hub layer\n" * 50)
    central = _app(tmp_path / "central", "https://hub.test", hub.transport)
    site = _app(tmp_path / "site", "http://central.test", _to(central, "10.0.0.2"))
    async with central.running(), site.running():
        foreign = [("Via", "1.1 squid.example (squid/6.1), 1.0 docker-mirror-nothex, 2 corp-proxy")]
        manifest = await _get(site, "/v2/library/hello/manifests/latest", foreign)
        assert manifest.status_code == 200 and "via" not in manifest.headers
        blob = await _get(site, f"/v2/library/hello/blobs/{image.layer}", foreign)
        assert blob.status_code == 200 and blob.content == b"hub layer\n" * 50 and "via" not in blob.headers
        tags = await _get(site, "/v2/library/hello/tags/list", foreign)
        assert tags.status_code == 200
    assert hub.seen
    for seen in hub.seen:       # the tag's and blob's fetches ran in single-flight tasks: they carry it too
        assert seen.headers["via"] == f"1.1 {site.pseudonym}, 1.1 {central.pseudonym}", seen.path
    assert {s.path for s in hub.seen} >= {"/v2/library/hello/manifests/latest",
                                          f"/v2/library/hello/blobs/{image.layer}", "/v2/library/hello/tags/list"}


async def test_more_than_max_hops_is_a_loop_and_other_entries_do_not_count(tmp_path) -> None:
    hub = FakeRegistry()
    hub.push("library/hello", "latest")
    a = _app(tmp_path / "a", "https://hub.test", hub.transport)
    others = [via.new_pseudonym() for _ in range(via.MAX_HOPS + 1)]
    async with a.running():
        many = await _get(a, "/v2/library/hello/tags/list", [("Via", ", ".join(f"1.1 {o}" for o in others))])
        assert many.status_code == 508 and "more than 10 mirrors" in many.json()["errors"][0]["message"]
        assert hub.seen == []
        ten = [("Via", ", ".join(f"1.1 {o}" for o in others[:via.MAX_HOPS]))] + [("Via", "1.1 proxy")] * 20
        assert (await _get(a, "/v2/library/hello/tags/list", ten)).status_code == 200
    assert hub.seen[-1].headers["via"] == ", ".join(f"1.1 {o}" for o in [*others[:via.MAX_HOPS], a.pseudonym])


def test_only_docker_mirror_pseudonyms_are_read() -> None:
    mine = via.new_pseudonym()
    assert len(mine) == len("docker-mirror-") + 12
    assert via.pseudonyms([f"1.1 {mine}", "HTTP/1.1 docker-mirror-0123456789ab (x), 1.1 docker-mirror-0123456789AB",
                           "1.1 docker-mirror-0123456789abc, 1.1 other, docker-mirror-0123456789ab"]) == \
        (mine, "docker-mirror-0123456789ab")
