"""The fast tier: the application driven in-process through ``httpx.ASGITransport``, its
upstream faked with ``httpx.MockTransport`` (tests/unit/fakes.py), and the pure parts
unit-tested. No root, no network, no subprocess: the whole tier runs in seconds with
``.venv/bin/pytest -m 'not system'``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from dockermirror import config as configuration
from dockermirror.app import DockerMirror
from tests.unit.fakes import UPSTREAM, FakeClock, FakeRegistry


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@dataclass
class Harness:
    app: DockerMirror
    client: httpx.AsyncClient
    registry: FakeRegistry
    clock: FakeClock
    cache_dir: Path

    def blob_file(self, digest: str) -> Path:
        algorithm, hexdigest = digest.split(":")
        return self.cache_dir / "blobs" / algorithm / hexdigest[:2] / hexdigest

    def cached_files(self) -> list[Path]:
        return sorted(p for p in (self.cache_dir / "blobs").rglob("*") if p.is_file())


def config_text(cache_dir: Path, extra: str = "") -> str:
    return (f"listen: 127.0.0.1:5000\ntls:\n  enabled: false\nupstream:\n  url: {UPSTREAM}\n"
            f"cache:\n  dir: {cache_dir}\n  tag_ttl: 5m\n{extra}")


@pytest.fixture
async def mirror(tmp_path: Path, registry: FakeRegistry, clock: FakeClock) -> AsyncIterator[Harness]:
    cache_dir = tmp_path / "cache"
    app = DockerMirror(configuration.loads(config_text(cache_dir)), clock=clock,
                       upstream_transport=registry.transport)
    async with app.running():
        transport = httpx.ASGITransport(app=app.asgi, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://mirror.test") as client:
            yield Harness(app, client, registry, clock, cache_dir)
