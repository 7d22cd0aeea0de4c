"""Metrics in-process: the registry of dockermirror/service/metrics.py fed by the application
(request observer, the core's meter, readings), read back through the text exposition the
way Prometheus reads it (prometheus_client.parser)."""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dockermirror import cachectl
from dockermirror import config as configuration
from dockermirror.app import DockerMirror
from dockermirror.cache.index import Entry
from dockermirror.config import ConfigError
from dockermirror.meter import NULL_METER
from dockermirror.service.metrics import Metrics, MetricsListener, ProcessMetrics, bind
from dockermirror.service import readings
from dockermirror.service.server import Service, StartupError
from tests.unit.conftest import Harness, config_text
from tests.unit.fakes import FakeClock, FakeRegistry, digest_of, response

pytestmark = pytest.mark.anyio

UP = "docker.io"     # the single upstream: section's registry (its url is the fake)
PASSWORD = "pa55-W0rd-never-shown"
TOKEN = "t0ken-never-shown"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition: (name, sorted labels) -> value."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def series(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples(text).items() if n == name}


class Metered(Harness):
    metrics: Metrics

    def text(self) -> str:
        return self.metrics.exposition().decode()


async def metered(tmp_path: Path, registry: FakeRegistry, clock: FakeClock, extra: str = "",
                  transport: httpx.AsyncBaseTransport | None = None) -> AsyncIterator[Metered]:
    cache_dir = tmp_path / "cache"
    metrics = Metrics()
    app = DockerMirror(configuration.loads(config_text(cache_dir, extra)), clock=clock,
                       upstream_transport=transport or registry.transport, meter=metrics)
    app.open()
    metrics.attach(app)
    async with app.running():
        transport = httpx.ASGITransport(app=app.asgi, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://mirror.test") as client:
            harness = Metered(app, client, registry, clock, cache_dir)
            harness.metrics = metrics
            yield harness


@pytest.fixture
async def mirror(tmp_path: Path, registry: FakeRegistry, clock: FakeClock) -> AsyncIterator[Metered]:
    async for harness in metered(tmp_path, registry, clock):
        yield harness


async def pull(client: httpx.AsyncClient, repo: str, tag: str) -> int:
    """Manifest by tag, then its config and layers, as a client pulls; the body bytes received."""
    got = await client.get(f"/v2/{repo}/manifests/{tag}",
                           headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert got.status_code == 200
    total = len(got.content)
    manifest = json.loads(got.content)
    for descriptor in [manifest["config"], *manifest["layers"]]:
        blob = await client.get(f"/v2/{repo}/blobs/{descriptor['digest']}")
        assert blob.status_code == 200 and digest_of(blob.content) == descriptor["digest"]
        total += len(blob.content)
    return total


async def test_every_counter_exists_at_zero_from_start(mirror: Metered) -> None:
    text = mirror.text()
    requests = series(text, "docker_mirror_requests_total")
    # kinds x GET/HEAD x status classes x cache results, all at 0
    assert len(requests) == 5 * 2 * 4 * 6 and set(requests.values()) == {0.0}
    assert (("cache", "coalesced"), ("kind", "blob"), ("method", "HEAD"), ("status_class", "5xx")) in requests
    upstream = series(text, "docker_mirror_upstream_requests_total")
    assert len(upstream) == 6 * 5 and set(upstream.values()) == {0.0}
    assert {dict(k)["upstream"] for k in upstream} == {UP}
    for name in ("docker_mirror_pulls_saved_total", "docker_mirror_saved_bytes_total",
                 "docker_mirror_upstream_received_bytes_total", "docker_mirror_upstream_resumed_total",
                 "docker_mirror_pass_throughs_total"):
        assert series(text, name) == {(("upstream", UP),): 0.0}, name
    assert value(text, "docker_mirror_upstream_first_byte_seconds_count", upstream=UP) == 0
    assert value(text, "docker_mirror_upstream_transfer_seconds_count", upstream=UP) == 0
    assert len(series(text, "docker_mirror_tag_revalidations_total")) == 4
    assert set(series(text, "docker_mirror_verification_failures_total")) == {(("where", "download"),),
                                                                               (("where", "disk"),)}
    for name in ("docker_mirror_evictions_total", "docker_mirror_evicted_bytes_total"):
        assert series(text, name) == {(("reason", r),): 0.0 for r in ("lru", "ttl", "manual")}
    assert len(series(text, "docker_mirror_sent_bytes_total")) == 6
    assert value(text, "docker_mirror_build_info", version=__import__("dockermirror").__version__,
                 python=__import__("platform").python_version()) == 1
    # gauges from the readings; upstream_up is absent until the upstream was contacted
    assert value(text, "docker_mirror_cache_entries") == 0
    assert value(text, "docker_mirror_cache_max_bytes") > 0
    assert value(text, "docker_mirror_transfers_in_flight") == 0
    assert series(text, "docker_mirror_upstream_up") == {}
    assert "process_resident_memory_bytes" in text and "python_info" in text
    assert "_created" not in text


async def test_pulls_are_counted_as_the_clients_received_them(mirror: Metered) -> None:
    image = mirror.registry.push("library/alpine", "3.20")
    cold = await pull(mirror.client, "library/alpine", "3.20")
    await mirror.app.cache.transfers.wait_all(5)     # stored (else the next pull follows the transfers)
    warm = await pull(mirror.client, "library/alpine", "3.20")
    warm += await pull(mirror.client, "library/alpine", "3.20")
    text = mirror.text()

    def requests(kind: str, cache: str, method: str = "GET", status: str = "2xx") -> float:
        return value(text, "docker_mirror_requests_total", kind=kind, method=method, status_class=status, cache=cache)

    assert requests("manifest", "miss") == 1 and requests("manifest", "hit") == 2
    assert requests("blob", "miss") == 2 and requests("blob", "hit") == 4
    assert value(text, "docker_mirror_sent_bytes_total", cache="miss") == cold
    assert value(text, "docker_mirror_sent_bytes_total", cache="hit") == warm
    assert value(text, "docker_mirror_request_duration_seconds_count", kind="blob") == 6
    assert value(text, "docker_mirror_pulls_saved_total", upstream=UP) == 2
    assert value(text, "docker_mirror_saved_bytes_total", upstream=UP) == warm
    # upstream: a HEAD for the tag, the manifest by digest, two blobs; their bodies
    assert value(text, "docker_mirror_upstream_requests_total", upstream=UP, kind="manifest", status_class="2xx") == 2
    assert value(text, "docker_mirror_upstream_requests_total", upstream=UP, kind="blob", status_class="2xx") == 2
    assert value(text, "docker_mirror_upstream_first_byte_seconds_count", upstream=UP) == 4
    assert value(text, "docker_mirror_upstream_received_bytes_total", upstream=UP) == cold
    assert value(text, "docker_mirror_upstream_transfer_seconds_count", upstream=UP) == 2
    assert value(text, "docker_mirror_upstream_up", upstream=UP) == 1
    assert value(text, "docker_mirror_cache_entries") == 3
    assert value(text, "docker_mirror_cache_used_bytes") == len(image.manifest) + sum(map(len, image.blobs.values()))


async def test_an_unreachable_upstream_and_odd_requests_stay_within_the_fixed_labels(mirror: Metered) -> None:
    mirror.registry.down = True
    assert (await mirror.client.get("/v2/library/alpine/manifests/latest")).status_code == 503
    assert (await mirror.client.request("BREW", "/v2/library/alpine/manifests/latest")).status_code == 405
    text = mirror.text()
    assert value(text, "docker_mirror_upstream_requests_total", upstream=UP, kind="manifest", status_class="error") == 1
    assert value(text, "docker_mirror_upstream_up", upstream=UP) == 0
    assert value(text, "docker_mirror_requests_total", kind="manifest", method="GET", status_class="5xx",
                 cache="none") == 1
    odd = {dict(k)["method"] for k, v in series(text, "docker_mirror_requests_total").items() if v}
    assert odd == {"GET", "other"}
    assert "BREW" not in text


async def test_no_series_carries_a_secret_a_repository_or_a_client(tmp_path: Path, clock: FakeClock) -> None:
    registry = FakeRegistry(token=TOKEN)
    extra = f"  username: robot\n  password: {PASSWORD}\n  token_realms: [auth.test]\n"
    text = config_text(tmp_path / "cache").replace(f"  url: {'https://registry.test'}\n",
                                                   f"  url: https://registry.test\n{extra}")
    assert PASSWORD in text
    metrics = Metrics()
    app = DockerMirror(configuration.loads(text), clock=clock, upstream_transport=registry.transport, meter=metrics)
    app.open()
    metrics.attach(app)
    registry.push("secret-team/private-app", "v1")
    async with app.running():
        transport = httpx.ASGITransport(app=app.asgi, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://mirror.test") as client:
            await pull(client, "secret-team/private-app", "v1")
        exposed = metrics.exposition().decode()
    assert value(exposed, "docker_mirror_upstream_requests_total", upstream=UP, kind="token", status_class="2xx") == 1
    assert value(exposed, "docker_mirror_upstream_requests_total", upstream=UP, kind="manifest",
                 status_class="4xx") == 1          # the first request's 401 challenge
    for secret in (PASSWORD, TOKEN, "robot", "secret-team", "private-app", "192.0.2.7", "https://", "auth.test"):
        assert secret not in exposed, secret


async def test_a_tampered_blob_is_a_download_verification_failure(mirror: Metered) -> None:
    image = mirror.registry.push("library/alpine", "3.20")
    mirror.registry.tamper.add(image.layer)
    with pytest.raises(Exception):  # noqa: B017 - cut off before its last byte: whatever the client library raises
        await mirror.client.get(f"/v2/library/alpine/blobs/{image.layer}")
    await mirror.app.cache.transfers.wait_all(5)
    text = mirror.text()
    assert value(text, "docker_mirror_verification_failures_total", where="download") == 1
    assert value(text, "docker_mirror_verification_failures_total", where="disk") == 0
    assert value(text, "docker_mirror_upstream_transfer_seconds_count", upstream=UP) == 0   # only verified ones


async def test_a_file_changed_on_disk_is_a_disk_verification_failure(mirror: Metered) -> None:
    image = mirror.registry.push("library/alpine", "3.20")
    assert (await mirror.client.get(f"/v2/library/alpine/blobs/{image.layer}")).status_code == 200
    await mirror.app.cache.transfers.wait_all(5)
    path = mirror.blob_file(image.layer)
    path.write_bytes(b"X" + path.read_bytes()[1:])
    _, _, corrupt = await mirror.app.cache.verify_round()
    assert corrupt == 1
    assert value(mirror.text(), "docker_mirror_verification_failures_total", where="disk") == 1


async def test_tag_revalidations_by_result(mirror: Metered) -> None:
    mirror.registry.push("library/alpine", "3.20", layer=b"one\n" * 100)
    await pull(mirror.client, "library/alpine", "3.20")
    mirror.clock.advance(301)       # past cache.tag_ttl (5m)
    await pull(mirror.client, "library/alpine", "3.20")
    mirror.registry.push("library/alpine", "3.20", layer=b"two\n" * 100)
    mirror.clock.advance(301)
    await pull(mirror.client, "library/alpine", "3.20")
    mirror.registry.status = 503
    mirror.clock.advance(301)
    await pull(mirror.client, "library/alpine", "3.20")
    mirror.registry.status = None
    del mirror.registry.manifests[("library/alpine", "3.20")]
    mirror.clock.advance(301)
    got = await mirror.client.get("/v2/library/alpine/manifests/3.20",
                                  headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert got.status_code == 404
    text = mirror.text()
    assert {dict(k)["result"]: v for k, v in series(text, "docker_mirror_tag_revalidations_total").items()} == {
        "unchanged": 1, "changed": 1, "stale": 1, "failed": 1}
    assert value(text, "docker_mirror_requests_total", kind="manifest", method="GET", status_class="2xx",
                 cache="stale") == 1


async def test_clients_that_shared_one_manifest_get_are_pulls_saved(tmp_path: Path, registry: FakeRegistry,
                                                                    clock: FakeClock,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.unit.test_coalesced import N, sharing     # (it imports this module)
    registry.push("library/alpine", "3.20")
    async for shared in sharing(tmp_path, registry, clock, monkeypatch):
        shared.holding.match = lambda r: "/manifests/" in r.url.path
        got = await shared.meet("GET", "/v2/library/alpine/manifests/3.20", "manifest", upstream_requests=2)
        assert [r.status_code for r in got] == [200] * N
        assert len(registry.requests("GET", "/manifests/")) == 1      # Docker Hub counts 1 pull
        text = shared.m.text()
        requests = {cache: value(text, "docker_mirror_requests_total", kind="manifest", method="GET",
                                 status_class="2xx", cache=cache) for cache in ("miss", "coalesced", "hit")}
        assert requests == {"miss": 1, "coalesced": N - 1, "hit": 0}
        assert value(text, "docker_mirror_pulls_saved_total", upstream=UP) == N - 1
        assert value(text, "docker_mirror_saved_bytes_total", upstream=UP) == value(
            text, "docker_mirror_sent_bytes_total", cache="coalesced") > 0


async def test_evictions_by_reason(mirror: Metered) -> None:
    image = mirror.registry.push("library/alpine", "3.20")
    await pull(mirror.client, "library/alpine", "3.20")
    await mirror.app.cache.transfers.wait_all(5)
    layer = len(image.blobs[image.layer])
    cache = mirror.app.cache
    # manual: `docker-mirror cache rm` is another process; what it removed reaches the counters
    # through the index, at the next scrape
    config = configuration.loads(config_text(mirror.cache_dir))
    await cache.flush()
    opened = cachectl.open_cache(config)
    try:
        assert cachectl.rm(opened, image.layer) == 0
    finally:
        opened.index.close()
    text = mirror.text()
    assert value(text, "docker_mirror_evictions_total", reason="manual") == 1
    assert value(text, "docker_mirror_evicted_bytes_total", reason="manual") == layer
    assert mirror.text().count('reason="manual"} 1.0') == 1       # read once, not at every scrape
    # ttl: not used within cache.blob_ttl (7d) and manifest_ttl
    mirror.clock.advance(8 * 86400)
    entries, freed = await cache.expire()
    assert entries == 2
    text = mirror.text()
    assert value(text, "docker_mirror_evictions_total", reason="ttl") == 2
    assert value(text, "docker_mirror_evicted_bytes_total", reason="ttl") == freed
    assert value(text, "docker_mirror_evictions_total", reason="lru") == 0


async def test_cache_prune_by_another_process_counts_as_manual(mirror: Metered) -> None:
    image = mirror.registry.push("library/alpine", "3.20")
    await pull(mirror.client, "library/alpine", "3.20")
    await mirror.app.cache.transfers.wait_all(5)
    await mirror.app.cache.flush()
    opened = cachectl.open_cache(configuration.loads(config_text(mirror.cache_dir)))
    try:
        assert cachectl.prune(opened, older_than=None, to_size=0, dry_run=True) == 0    # a dry run removes nothing
        assert value(mirror.text(), "docker_mirror_evictions_total", reason="manual") == 0
        assert cachectl.prune(opened, older_than=None, to_size=0, dry_run=False) == 0
    finally:
        opened.index.close()
    text = mirror.text()
    assert value(text, "docker_mirror_evictions_total", reason="manual") == 3
    assert value(text, "docker_mirror_evicted_bytes_total", reason="manual") == len(image.manifest) + sum(
        map(len, image.blobs.values()))
    assert value(text, "docker_mirror_cache_entries") == 0


async def test_lru_evictions_and_pass_throughs(tmp_path: Path, registry: FakeRegistry, clock: FakeClock) -> None:
    big = b"big layer\n" * 300                    # 3000 bytes: more than the whole cache
    async for mirror in metered(tmp_path, registry, clock, extra="  max_size: 2500\n  min_free: 0\n"):
        first = registry.push("library/one", "1", layer=b"1" * 1000)
        second = registry.push("library/two", "2", layer=b"2" * 1000)
        third = registry.push("library/three", "3", layer=b"3" * 1000)
        wide = registry.push("library/wide", "4", layer=big)
        for image in (first, second, third):
            assert (await mirror.client.get(f"/v2/{image.repo}/blobs/{image.layer}")).status_code == 200
            await mirror.app.cache.transfers.wait_all(5)
        got = await mirror.client.get(f"/v2/library/wide/blobs/{wide.layer}")
        assert got.content == big
        await mirror.app.cache.transfers.wait_all(5)    # the response may end before the transfer does
        text = mirror.text()
        assert value(text, "docker_mirror_evictions_total", reason="lru") >= 1
        assert value(text, "docker_mirror_evicted_bytes_total", reason="lru") >= 1000
        assert value(text, "docker_mirror_pass_throughs_total", upstream=UP) == 1
        assert value(text, "docker_mirror_requests_total", kind="blob", method="GET", status_class="2xx",
                     cache="pass") == 1


def test_process_metrics_where_only_the_process_own_proc_entry_is_visible(tmp_path: Path) -> None:
    """The unit's ProcSubset=pid hides /proc/stat (the boot time): CPU, memory, fds and the start
    time are still reported, the start time as the kernel has it."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "self").symlink_to("/proc/self")        # /proc/self, and no /proc/stat
    registry = CollectorRegistry()
    ProcessMetrics(proc=str(proc), registry=registry)
    text = generate_latest(registry).decode()
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert value(text, name) > 0, name
    btime = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                 if line.startswith("btime "))
    ticks = os.sysconf("SC_CLK_TCK")
    started = btime + float(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
    assert abs(value(text, "process_start_time_seconds") - started) < 2


class CutOff(httpx.AsyncByteStream):
    """The first ``keep`` bytes of a body, then the connection breaks."""

    def __init__(self, data: bytes, keep: int) -> None:
        self.data, self.keep = data, keep

    async def __aiter__(self):
        yield self.data[:self.keep]
        raise httpx.ReadError("connection reset by peer")


async def test_a_download_that_broke_off_and_was_resumed(tmp_path: Path, registry: FakeRegistry,
                                                         clock: FakeClock) -> None:
    image = registry.push("library/alpine", "3.20", layer=b"resumable layer\n" * 1000)
    data = image.blobs[image.layer]

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(f"/blobs/{image.layer}") and request.method == "GET":
            if "range" not in request.headers:
                return httpx.Response(200, headers={"Content-Length": str(len(data))}, stream=CutOff(data, 5000))
            start = int(request.headers["range"][6:-1])
            return response(206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}, data[start:])
        return registry.handle(request)

    async for mirror in metered(tmp_path, registry, clock, transport=httpx.MockTransport(handle)):
        got = await mirror.client.get(f"/v2/library/alpine/blobs/{image.layer}")
        assert got.content == data
        await mirror.app.cache.transfers.wait_all(5)
        text = mirror.text()
        assert value(text, "docker_mirror_upstream_resumed_total", upstream=UP) == 1
        assert value(text, "docker_mirror_upstream_received_bytes_total", upstream=UP) == len(data)
        assert value(text, "docker_mirror_upstream_requests_total", upstream=UP, kind="blob", status_class="2xx") == 2
        assert value(text, "docker_mirror_upstream_transfer_seconds_count", upstream=UP) == 1


async def test_pinned_content(tmp_path: Path, registry: FakeRegistry, clock: FakeClock) -> None:
    async for mirror in metered(tmp_path, registry, clock, extra="  pin: [library/alpine]\n"):
        pinned = registry.push("library/alpine", "3.20", layer=b"pinned\n" * 100)
        other = registry.push("library/busybox", "1", layer=b"not pinned\n" * 100)
        await pull(mirror.client, "library/alpine", "3.20")
        await pull(mirror.client, "library/busybox", "1")
        await mirror.app.cache.transfers.wait_all(5)
        await mirror.app.cache.flush()
        text = mirror.text()
        assert value(text, "docker_mirror_cache_pinned_entries") == 3
        assert value(text, "docker_mirror_cache_pinned_bytes") == len(pinned.manifest) + sum(
            map(len, pinned.blobs.values()))
        assert value(text, "docker_mirror_cache_entries") == 6
        assert other.layer not in text


async def test_a_scrape_does_not_scan_the_pinned_entries(tmp_path: Path, registry: FakeRegistry,
                                                        clock: FakeClock) -> None:
    """The index work of a scrape, counted in SQLite virtual machine steps (not time), is the same
    for 2000 pinned entries as for none: the pinned gauges come from the index's totals row."""
    async for mirror in metered(tmp_path, registry, clock, extra="  pin: [library/alpine]\n"):
        index = mirror.app.cache.index
        steps = 0

        def step() -> int:
            nonlocal steps
            steps += 1
            return 0

        def scrape() -> tuple[str, int]:
            nonlocal steps
            steps = 0
            index._reader.set_progress_handler(step, 1)
            try:
                return mirror.text(), steps
            finally:
                index._reader.set_progress_handler(None, 1)

        scrape()        # the first read also loads the schema
        text, empty = scrape()
        assert value(text, "docker_mirror_cache_pinned_entries") == 0
        index.add_contents(Entry(f"sha256:{n:064x}", 1000, None, "blob", 1.0, 1.0, pinned=True) for n in range(2000))
        text, full = scrape()
        assert value(text, "docker_mirror_cache_pinned_entries") == 2000
        assert value(text, "docker_mirror_cache_pinned_bytes") == 2_000_000
        assert full == empty


async def test_gauges_that_cannot_be_read_leave_the_counters_in_the_scrape(
        mirror: Metered, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(app):
        raise sqlite3.OperationalError("disk I/O error")

    caplog.set_level(logging.INFO, "dockermirror.metrics")
    monkeypatch.setattr(readings, "read", broken)
    for _ in range(3):
        text = mirror.text()
    assert value(text, "docker_mirror_evictions_total", reason="lru") == 0
    assert "docker_mirror_cache_entries" not in text
    assert caplog.text.count("gauges could not be read") == 1      # once, not at every scrape
    monkeypatch.undo()
    assert value(mirror.text(), "docker_mirror_cache_entries") == 0
    assert "gauges can be read again" in caplog.text


async def test_a_reload_adds_the_new_upstreams_series(mirror: Metered, tmp_path: Path) -> None:
    more = config_text(mirror.cache_dir).replace("upstream:\n  url: https://registry.test\n", (
        "upstreams:\n  - registry: registry.test\n    url: https://registry.test\n"
        "  - registry: ghcr.io\n    url: https://ghcr.test\n"))
    assert mirror.app.reconfigure(configuration.loads(more)) == []
    mirror.metrics.add_upstreams(u.key for u in mirror.app.mirror.upstreams)
    text = mirror.text()
    assert value(text, "docker_mirror_upstream_requests_total", upstream="ghcr.io", kind="blob",
                 status_class="2xx") == 0
    assert value(text, "docker_mirror_pulls_saved_total", upstream="ghcr.io") == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_the_listener_serves_metrics_and_nothing_else(mirror: Metered, host: str) -> None:
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    listener = MetricsListener(mirror.metrics, bind((host, 0)))
    await listener.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://{listener.address}") as client:
            got = await client.get("/metrics")
            assert got.status_code == 200
            assert got.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
            assert value(got.text, "docker_mirror_cache_entries") == 0
            assert (await client.get("/healthz")).text == "ok\n"
            head = await client.head("/metrics")
            assert head.status_code == 200 and head.content == b""
            assert (await client.get("/v2/")).status_code == 404
            assert (await client.post("/metrics")).status_code == 405
    finally:
        await listener.stop()


@pytest.mark.parametrize("bad", ["localhost:9401", "9401", ":9401", "127.0.0.1:0", "127.0.0.1:65536", "[::1",
                                 "::1:9401"])
def test_a_bad_metrics_listen_is_one_line_with_file_and_line(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        configuration.loads(f"listen: 0.0.0.0:5000\nmetrics:\n  listen: \"{bad}\"\n", source="/etc/x.yml")
    message = str(caught.value)
    assert message.startswith("/etc/x.yml:3: metrics.listen: ") and "\n" not in message


@pytest.mark.parametrize(("text", "address"), [
    ("", None), ("metrics:\n  listen:\n", None), ("metrics:\n  listen: \"\"\n", None),
    ("metrics:\n  listen: 127.0.0.1:9401\n", ("127.0.0.1", 9401)),
    ("metrics:\n  listen: \"[::1]:9401\"\n", ("::1", 9401)),
    ("metrics:\n  listen: 0.0.0.0:9401\n", ("0.0.0.0", 9401)),
])
def test_metrics_listen_is_off_by_default(text: str, address: tuple[str, int] | None) -> None:
    assert configuration.loads(text).metrics.listen_address == address


# --- the service: metrics.listen at start and at reload


def metrics_config(cache_dir: Path, port: int, upstreams: str = "") -> configuration.Config:
    text = config_text(cache_dir) + f"metrics:\n  listen: 127.0.0.1:{port}\n"
    if upstreams:
        text = text.replace("upstream:\n  url: https://registry.test\n", upstreams)
    return configuration.loads(text, source="/etc/docker-mirror/config.yml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_reload_keeps_the_listener_says_a_new_address_needs_a_restart_and_adds_upstreams(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    configs = [metrics_config(tmp_path / "cache", port)]
    service = Service(configs[0], reload_config=lambda: configs[-1])
    try:
        assert service.app.meter is service.metrics
        configs.append(metrics_config(tmp_path / "cache", port, upstreams=(
            "upstreams:\n  - registry: docker.io\n    url: https://registry.test\n"
            "  - registry: ghcr.io\n    url: https://ghcr.test\n")))
        await service.reload()
        assert service.app.meter is service.metrics        # the same meter: counters go on
        text = service.metrics.exposition().decode()
        assert value(text, "docker_mirror_upstream_requests_total", upstream="ghcr.io", kind="manifest",
                     status_class="2xx") == 0
        assert "restart to apply" not in caplog.text
        configs.append(metrics_config(tmp_path / "cache", free_port()))
        await service.reload()
        assert "restart to apply: metrics.listen" in caplog.text
        assert service.metrics_listener.sock.getsockname() == ("127.0.0.1", port)
    finally:
        service.metrics_listener.sock.close()
        await service.app.cache.close()


async def test_an_address_in_use_stops_the_start_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError) as caught:
            Service(metrics_config(tmp_path / "cache", port), reload_config=lambda: None)
    assert str(caught.value) == f"metrics.listen: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_without_metrics_listen_the_core_has_the_null_meter(tmp_path: Path) -> None:
    app = DockerMirror(configuration.loads(config_text(tmp_path / "cache")))
    assert app.meter is NULL_METER and app.cache.meter is NULL_METER and app.mirror.meter is NULL_METER
    assert app.upstream_client.meter is NULL_METER
    assert not any(getattr(o, "__self__", None).__class__ is Metrics for o in app.request_observers)


async def test_what_is_exported_is_what_the_dashboard_and_alerts_were_written_against(mirror: Metered) -> None:
    """The contract in tests/support/monitoring.py (the shipped dashboard's and alert rules' names
    are checked against it) is exactly what /metrics serves: names, types and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.support.monitoring import CONTRACT, OTHERS

    mirror.registry.push("library/hello", "latest")
    await pull(mirror.client, "library/hello", "latest")        # upstream_up and the histograms have samples
    client = mirror.app.mirror.upstream.client                  # as Docker Hub's answers set them
    client.ratelimit_remaining, client.ratelimit_limit = "97;w=21600", "100;w=21600"
    exported = {}
    for family in text_string_to_metric_families(mirror.text()):
        labels = set()
        for sample in family.samples:
            labels |= set(sample.labels) - {"le"}
        exported[family.name] = (family.type, labels)
    ours = {name.removeprefix("docker_mirror_"): value for name, value in exported.items()
            if name.startswith("docker_mirror_")}
    # counters are parsed under their name without _total
    contract = {(name.removesuffix("_total") if kind == "counter" else name): (kind, set(labels))
                for name, (kind, labels) in CONTRACT.items()}
    assert ours == contract
    others = {name.removesuffix("_total") for name in OTHERS - {"up"}}     # "up" is Prometheus' own
    assert others <= set(exported)
