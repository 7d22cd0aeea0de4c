"""What the status page and the metrics' gauges read from a running mirror (service/readings.py)."""

from __future__ import annotations

import asyncio

import pytest

from dockermirror.service.readings import allowance, read
from tests.unit.fakes import ALL_MANIFESTS

pytestmark = pytest.mark.anyio
ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]


@pytest.mark.parametrize("text, expected", [
    ("97;w=21600", 97), ("100", 100), (" 5 ; w=60", 5), (None, None), ("", None), ("-1", None),
    ("many", None), ("9" * 13, None), ("1e9", None), ("97;w=21600\\x00", 97),
])
def test_docker_hub_allowance_is_a_number_or_nothing(text, expected):
    assert allowance(text) == expected


async def test_a_reading_has_the_cache_the_upstreams_and_the_transfers_in_flight(mirror):
    before = read(mirror.app)
    assert before.cache.entries == 0 and before.cache.used_bytes == 0
    assert before.cache.max_bytes > 0 and before.cache.free_bytes > 0 and before.cache.degraded is None
    (upstream,) = before.upstreams
    assert (upstream.key, upstream.default, upstream.reachable) == ("docker.io", True, None)
    assert before.transfers == ()

    layer = b"x" * (4 * 1024 * 1024)
    image = mirror.registry.push("library/hello", "latest", layer=layer)
    gate = mirror.registry.held[image.layer] = asyncio.Event()
    await mirror.client.get("/v2/hello/manifests/latest", headers=ACCEPT)
    pulling = asyncio.ensure_future(mirror.client.get(f"/v2/hello/blobs/{image.layer}"))
    async with asyncio.timeout(60):         # until the download has started, however busy the machine
        while not read(mirror.app).transfers and not pulling.done():
            await asyncio.sleep(0.01)
    (transfer,) = read(mirror.app).transfers
    assert (transfer.digest, transfer.upstream, transfer.repository) == (image.layer, "docker.io", "library/hello")
    assert transfer.size == len(layer) and transfer.received < len(layer) and transfer.followers == 1
    gate.set()
    assert (await pulling).content == layer
    await mirror.app.cache.transfers.wait_all(5)
    after = read(mirror.app)
    assert after.transfers == () and after.upstreams[0].reachable is True
    assert after.cache.entries == 2     # the manifest and the layer and after.cache.used_bytes >= len(layer)
