"""The application object: builds the core from a Config and exposes it as ASGI.

:class:`DockerMirror` owns every piece of runtime state (cache, upstream client,
mirror policy); nothing else in the package keeps mutable state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
from starlette.applications import Starlette

from dockermirror.api.accesslog import AccessLog
from dockermirror.api.routes import routes
from dockermirror.cache import Cache, Limits
from dockermirror.config import CacheConfig, Config, UpstreamConfig
from dockermirror.mirror import Mirror, Upstream, registry_key
from dockermirror.upstream.client import UpstreamClient

log = logging.getLogger("dockermirror")


def _client(up: UpstreamConfig, transport: httpx.AsyncBaseTransport | None) -> UpstreamClient:
    return UpstreamClient(up.url, username=up.username, password=up.password, ca_bundle=up.ca_bundle,
                          connect_timeout=up.connect_timeout, read_timeout=up.read_timeout,
                          transfer_timeout=up.transfer_timeout, transport=transport)


def _limits(c: CacheConfig, upstream: Upstream) -> Limits:
    return Limits(max_size=c.max_size, min_free=c.min_free, blob_ttl=c.blob_ttl, manifest_ttl=c.manifest_ttl,
                  pins=tuple(upstream.repository(pattern) for pattern in c.pin), verify_rate=c.verify_rate)


class DockerMirror:
    """One running mirror: config, cache, upstream and the HTTP app around them."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time,
                 on_started: Callable[[], None] = lambda: None,
                 upstream_transport: httpx.AsyncBaseTransport | None = None) -> None:
        """``clock`` is wall-clock time for TTLs and expiry; ``upstream_transport`` replaces the
        network under the upstream client (the in-process tests fake the upstream with it)."""
        self.config = config
        self._transport = upstream_transport
        upstream = Upstream(registry_key(config.upstream.registry), _client(config.upstream, upstream_transport))
        self.cache = Cache(config.cache.dir, limits=_limits(config.cache, upstream), clock=clock)
        self.mirror = Mirror(upstream, self.cache, tag_ttl=config.cache.tag_ttl, clock=clock)
        self.started_at: float | None = None
        self._on_started = on_started
        # connections of upstream clients replaced by a reload, until nothing uses the client
        self._retired: dict[int, Callable[[], Awaitable[None]]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._retire_keys = itertools.count()
        starlette = Starlette(routes=routes(self.mirror), lifespan=lambda app: self.running())
        self.asgi = AccessLog(starlette, on_done=self.mirror.record)

    @property
    def upstream_client(self) -> UpstreamClient:
        return self.mirror.upstream.client

    def open(self) -> None:
        """Open the cache (lock, index, recovery) before the server starts listening."""
        if self.cache.index is None:
            self.cache.open()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Start the cache's background work; on exit, drain transfers and close everything.
        The ASGI lifespan runs this; code that drives ``asgi`` without a server enters it itself."""
        self.open()
        await self.cache.start()
        self.started_at = time.time()
        log.info("mirroring %s (%s) into %s", self.mirror.upstream.key, self.config.upstream.url,
                 self.config.cache.dir)
        self._on_started()
        try:
            yield
        finally:
            await self.cache.close()
            await self.upstream_client.aclose()
            for close in list(self._retired.values()):
                await close()
            self._retired.clear()
            if self._closing:
                await asyncio.wait(self._closing, timeout=5)

    def reconfigure(self, new: Config) -> list[str]:
        """Apply what a running mirror can change; return the settings that need a restart."""
        old, restart = self.config, []
        for name, before, after in (("cache.dir", old.cache.dir, new.cache.dir),
                                    ("upstream.registry", old.upstream.registry, new.upstream.registry)):
            if before != after:
                restart.append(name)
        if new.upstream != old.upstream and "upstream.registry" not in restart:
            self._swap_upstream(new.upstream)
        if new.cache != old.cache:
            self.cache.set_limits(_limits(new.cache, self.mirror.upstream))
            self.mirror.tag_ttl = new.cache.tag_ttl
        self.config = new
        return restart

    def _swap_upstream(self, config: UpstreamConfig) -> None:
        """New requests use a new client; the old one's connections are closed as soon as
        nothing uses it any more. Every request and transfer that started with a client holds
        a reference to it (through its ``Repo``), so the moment the last of them is done,
        the client is collected and its connections closed. Only new timeouts: the same
        client takes them, for requests from now on."""
        client = self.upstream_client
        timeouts = {"connect_timeout": 0, "read_timeout": 0, "transfer_timeout": 0}
        if dataclasses.replace(config, **timeouts) == dataclasses.replace(self.config.upstream, **timeouts):
            client.set_timeouts(config.connect_timeout, config.read_timeout, config.transfer_timeout)
            return
        self.mirror.upstream = Upstream(self.mirror.upstream.key, _client(config, self._transport))
        key, loop = next(self._retire_keys), asyncio.get_running_loop()
        self._retired[key] = client.closer()

        def collected() -> None:        # may run in any thread, or after the loop stopped
            try:
                loop.call_soon_threadsafe(self._close_retired, key)
            except RuntimeError:
                pass

        weakref.finalize(client, collected)

    def _close_retired(self, key: int) -> None:
        close = self._retired.pop(key, None)
        if close is not None:
            task = asyncio.get_running_loop().create_task(close(), name="close a retired upstream client")
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
