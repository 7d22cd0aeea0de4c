"""Reloads that change the upstream while a download is in flight: the clients they replace
are closed as soon as nothing uses them, however many reloads come."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import httpx
import pytest

from dockermirror import config as configuration
from dockermirror.app import DockerMirror
from tests.unit.conftest import config_text
from tests.unit.fakes import ALL_MANIFESTS, FakeClock, FakeRegistry

pytestmark = pytest.mark.anyio


class GatedBody(httpx.AsyncByteStream):
    """A blob body that sends its first half, then waits for ``gate``."""

    def __init__(self, data: bytes, gate: asyncio.Event, halfway: asyncio.Event) -> None:
        self.data, self.gate, self.halfway = data, gate, halfway

    async def __aiter__(self):
        half = len(self.data) // 2
        yield self.data[:half]
        self.halfway.set()
        await self.gate.wait()
        yield self.data[half:]


def with_upstream(config: configuration.Config, **changes) -> configuration.Config:
    return dataclasses.replace(config, upstream=dataclasses.replace(config.upstream, **changes))


async def test_reloads_during_a_download_close_each_replaced_client_once_unused(tmp_path: Path):
    registry = FakeRegistry()
    image = registry.push("library/hello", "latest", layer=b"z" * (2 * 1024 * 1024 + 3))
    gate, halfway = asyncio.Event(), asyncio.Event()

    def handle(request: httpx.Request) -> httpx.Response:
        answer = registry.handle(request)
        if request.method == "GET" and request.url.path.endswith(image.layer):
            return httpx.Response(200, headers=answer.headers, stream=GatedBody(image.blobs[image.layer], gate, halfway))
        return answer

    config = configuration.loads(config_text(tmp_path / "cache"))
    app = DockerMirror(config, clock=FakeClock(), upstream_transport=httpx.MockTransport(handle))
    async with app.running():
        transport = httpx.ASGITransport(app=app.asgi, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://mirror.test") as client:
            download = asyncio.create_task(client.get(f"/v2/library/hello/blobs/{image.layer}"))
            await asyncio.wait_for(halfway.wait(), 10)
            # the connection pools of the first client (the download's) and of every one after it
            pools = [app.upstream_client._client]
            for n in range(300):
                new = with_upstream(config, username=None if n % 2 else "mirror")
                assert app.reconfigure(new) == []
                config = new
                pools.append(app.upstream_client._client)
                await asyncio.sleep(0)
            for _ in range(10):
                await asyncio.sleep(0)
            assert not pools[0].is_closed          # the download still uses it
            assert not pools[-1].is_closed         # the current one
            assert all(pool.is_closed for pool in pools[1:-1])
            # manifests go through the current client meanwhile
            manifest = await client.get("/v2/library/hello/manifests/latest", headers=[("Accept", a) for a in ALL_MANIFESTS])
            assert manifest.status_code == 200
            gate.set()
            response = await asyncio.wait_for(download, 10)
            assert response.status_code == 200 and response.content == image.blobs[image.layer]
            await app.cache.transfers.wait_all(5)
            for _ in range(10):
                await asyncio.sleep(0)
            assert pools[0].is_closed              # closed once its download was done
            assert not pools[-1].is_closed


async def test_a_reload_that_changes_only_timeouts_keeps_the_client(tmp_path: Path):
    config = configuration.loads(config_text(tmp_path / "cache"))
    app = DockerMirror(config, clock=FakeClock(), upstream_transport=FakeRegistry().transport)
    async with app.running():
        before = app.upstream_client
        assert app.reconfigure(with_upstream(config, read_timeout=7.0, connect_timeout=3.0)) == []
        assert app.upstream_client is before
        timeout = before._client.timeout
        assert (timeout.read, timeout.connect) == (7.0, 3.0)
