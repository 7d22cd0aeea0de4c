"""What an unverified upstream body may cost the cache, and who shares a pass-through.

A length is a claim, not bytes: a transfer reserves (and so evicts) room only a bounded
step ahead of what it has received. A cache full of blobs meets an upstream that lies
about a length, sends more than it announced, or streams wrong bytes without a length:
the other blobs stay cached and are served with no upstream call.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from dockermirror import config as configuration
from dockermirror.app import DockerMirror
from dockermirror.cache.inflight import LATE_FETCHES
from dockermirror.errors import Unavailable
from dockermirror.oci import Digest
from tests.unit.conftest import Harness, config_text
from tests.unit.fakes import Body, FakeRegistry, Seen, digest_of, piece_bytes

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024
BLOB = 4 * MiB
FILLERS = 14                 # 56 MiB in a 64 MiB cache


class Counted(Body):
    """A body that counts the bytes the mirror took from it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.taken = 0

    async def __aiter__(self):
        async for chunk in super().__aiter__():
            self.taken += len(chunk)
            yield chunk


@pytest.fixture
async def full_cache(tmp_path: Path, registry: FakeRegistry, clock) -> AsyncIterator[tuple[Harness, list[str]]]:
    """A 64 MiB cache holding 14 blobs of 4 MiB; a test's own upstream answers go in ``lies``."""
    cache_dir = tmp_path / "cache"
    lies: dict[str, httpx.Response] = {}

    def handle(request: httpx.Request) -> httpx.Response:
        digest = request.url.path.rsplit("/", 1)[-1]
        if digest in lies:
            registry.seen.append(Seen(request.method, request.url, request.headers))
            return lies[digest]
        return registry.handle(request)

    text = config_text(cache_dir, "  max_size: 64MiB\n  min_free: 0\n")
    app = DockerMirror(configuration.loads(text), clock=clock, upstream_transport=httpx.MockTransport(handle))
    async with app.running():
        transport = httpx.ASGITransport(app=app.asgi, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://mirror.test") as client:
            harness = Harness(app, client, registry, clock, cache_dir)
            harness.lies = lies
            digests = []
            for i in range(FILLERS):
                data = os.urandom(BLOB)
                registry.blobs[digest_of(data)] = data
                response = await client.get(f"/v2/acme/fill/blobs/{digest_of(data)}")
                assert response.status_code == 200 and response.content == data
                digests.append(digest_of(data))
            await app.cache.transfers.wait_all(5)
            assert all(app.cache.entry(d) is not None for d in digests)
            yield harness, digests


async def still_served_from_cache(harness: Harness, digests: list[str]) -> int:
    """How many of ``digests`` are still cached; each is served as it was, with no upstream call."""
    gets_before = len(harness.registry.requests("GET"))
    cached = [d for d in digests if harness.app.cache.entry(d) is not None]
    for digest in cached:
        response = await harness.client.get(f"/v2/acme/fill/blobs/{digest}")
        assert response.status_code == 200 and response.content == harness.registry.blobs[digest]
    assert len(harness.registry.requests("GET")) == gets_before
    return len(cached)


async def fails(harness: Harness, digest: str) -> None:
    """The client never gets a complete answer for ``digest``, and nothing of it is stored."""
    try:
        response = await harness.client.get(f"/v2/acme/liar/blobs/{digest}")
    except Exception:  # noqa: BLE001 - cut off: whatever the client library raises (ASGITransport: an assert)
        pass
    else:
        assert response.status_code != 200 or digest_of(response.content) != digest
    await harness.app.cache.transfers.wait_all(5)
    assert harness.app.cache.entry(digest) is None
    assert list((harness.cache_dir / "tmp").iterdir()) == []
    assert harness.app.cache.reserved == 0


async def test_a_lying_length_does_not_empty_the_cache(full_cache):
    harness, digests = full_cache
    wanted = digest_of(b"the blob the client asked for")
    # "63 MiB are coming": 1 MiB of wrong bytes come, then the body ends
    harness.lies[wanted] = httpx.Response(200, headers={"Content-Length": str(63 * MiB)},
                                          stream=Body(os.urandom(MiB)))
    await fails(harness, wanted)
    # it may have cost one step (64 MiB / 8) plus the low watermark's slack: two blobs at most
    assert await still_served_from_cache(harness, digests) >= FILLERS - 2


async def test_a_body_longer_than_its_length_fails_at_the_first_extra_byte(full_cache):
    harness, digests = full_cache
    data = b"exactly these bytes\n" * 1000
    endless = Counted(data + os.urandom(40 * MiB))
    harness.lies[digest_of(data)] = httpx.Response(200, headers={"Content-Length": str(len(data))}, stream=endless)
    await fails(harness, digest_of(data))
    assert endless.taken <= len(data) + 64 * 1024       # not one chunk more than the one that overflowed
    assert await still_served_from_cache(harness, digests) == FILLERS


async def test_wrong_bytes_without_a_length_evict_only_as_they_arrive(full_cache):
    harness, digests = full_cache
    wanted = digest_of(b"the blob the client asked for")
    harness.lies[wanted] = httpx.Response(200, stream=Body(os.urandom(2 * MiB)))   # chunked: no length
    await fails(harness, wanted)
    assert await still_served_from_cache(harness, digests) >= FILLERS - 2


class Gated(httpx.AsyncByteStream):
    """A body that sends one MiB per permit put in its queue."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.permits: asyncio.Queue[None] = asyncio.Queue()

    async def __aiter__(self):
        for offset in range(0, len(self.data), MiB):
            await self.permits.get()
            for chunk in range(offset, min(offset + MiB, len(self.data)), 64 * 1024):
                yield self.data[chunk:chunk + 64 * 1024]


async def test_late_readers_of_a_pass_through_in_memory_get_a_bounded_number_of_fetches(tmp_path: Path, clock):
    """No room for the content anywhere on disk: it passes through memory, and a reader that
    comes after its start was dropped needs a fetch of its own. Those are bounded; past the
    bound a client is told to come back (503 with Retry-After), not given another 64 MiB tail."""
    data = os.urandom(8 * MiB)
    digest = digest_of(data)
    bodies: list[Gated] = []

    def handle(request: httpx.Request) -> httpx.Response:
        bodies.append(Gated(data))
        return httpx.Response(200, headers={"Content-Length": str(len(data))}, stream=bodies[-1])

    # a 1 MiB cache, and min_free the whole filesystem: nothing may be written, not even outside the cache
    text = config_text(tmp_path / "cache", "  max_size: 1MiB\n  min_free: 100%\n")
    app = DockerMirror(configuration.loads(text), clock=clock, upstream_transport=httpx.MockTransport(handle))
    async with app.running():
        repo = app.mirror.resolve("acme/big")
        first = await app.mirror.blob(repo, Digest.parse(digest), head=False)
        assert first.cache == "PASS"
        reader = first.body.read()
        read = 0
        for mib in range(1, 4):   # the first reader moves on, and the start of the content is dropped
            bodies[0].permits.put_nowait(None)
            while read < mib * MiB - 1:
                read += len(piece_bytes(await asyncio.wait_for(anext(reader), 10)))
        transfer = app.cache.transfer(Digest.parse(digest))
        assert transfer is not None and transfer.follow() is None      # byte 0 is gone
        late = [await app.mirror.blob(repo, Digest.parse(digest), head=False) for _ in range(LATE_FETCHES)]
        assert [b.cache for b in late] == ["PASS"] * LATE_FETCHES
        with pytest.raises(Unavailable) as refused:
            await app.mirror.blob(repo, Digest.parse(digest), head=False)
        assert refused.value.headers["Retry-After"] == "10"
        assert len(bodies) == 1 + LATE_FETCHES                          # the refused one cost no fetch
        for blob in late:
            blob.body.close()
        await reader.aclose()
        for body in bodies:
            for _ in range(8):
                body.permits.put_nowait(None)
        await app.cache.transfers.wait_all(5)
        assert app.cache.transfers.late_fetches_left == LATE_FETCHES


async def _read_all(blob) -> bytes:
    out = bytearray()
    async for piece in blob.body.read():
        out += piece_bytes(piece)
    return bytes(out)


async def test_a_reader_that_comes_after_a_pass_through_ended_shares_its_file(tmp_path: Path, registry, clock):
    """Too big for the cache: the content passes through a file outside it. A reader that comes
    after the download ended, while an earlier reader still reads, follows that file: one fetch.
    The file goes with the last reader."""
    data = os.urandom(3 * MiB)
    digest = Digest.parse(digest_of(data))
    registry.blobs[str(digest)] = data
    text = config_text(tmp_path / "cache", "  max_size: 1MiB\n  min_free: 0\n")
    app = DockerMirror(configuration.loads(text), clock=clock, upstream_transport=registry.transport)
    async with app.running():
        repo = app.mirror.resolve("acme/big")
        first = await app.mirror.blob(repo, digest, head=False)
        assert first.cache == "PASS"
        transfer = app.cache.transfer(digest)
        await transfer.finished.wait()                  # the download is over; the first reader has read nothing
        late = await app.mirror.blob(repo, digest, head=False)
        assert late.cache == "COALESCED"
        assert await _read_all(late) == data
        assert await _read_all(first) == data
        assert len(registry.requests("GET", "/blobs/")) == 1
        await app.cache.transfers.wait_all(5)
        assert app.cache.transfer(digest) is None and app.cache.entry(str(digest)) is None
        assert list((tmp_path / "cache" / "tmp").iterdir()) == []
        assert app.cache.usage()[:2] == (0, 0)


async def test_no_room_is_one_warning_per_period_then_info(full_cache, monkeypatch, caplog):
    """A full disk fails the eviction for every request: one warning a period (with the count), not one each."""
    import errno
    import logging

    import dockermirror.cache as cache_module
    from dockermirror.lograte import RateLimited

    harness, _ = full_cache
    now = [0.0]
    monkeypatch.setattr(cache_module, "room_log", RateLimited(cache_module.log, clock=lambda: now[0]))

    async def failing(need, why):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(harness.app.cache, "_evict", failing)
    caplog.set_level(logging.INFO, logger="dockermirror.cache")
    for _ in range(3):
        assert await harness.app.cache.reserve(64 * 1024 * 1024) is False
    now[0] = 600.0
    assert await harness.app.cache.reserve(64 * 1024 * 1024) is False
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "could not make room" in r.getMessage()]
    assert [level for level, _ in said] == ["WARNING", "INFO", "INFO", "WARNING"]
    assert said[-1][1].endswith("(2 more like it in the last 10 min, at info)")
