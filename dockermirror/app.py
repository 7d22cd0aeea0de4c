"""The application object: builds the core from a Config and exposes it as ASGI.

:class:`DockerMirror` owns every piece of runtime state (cache, upstream client,
mirror policy); nothing else in the package keeps mutable state.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette

from dockermirror.api.accesslog import AccessLog
from dockermirror.api.routes import routes
from dockermirror.cache import Cache, Limits
from dockermirror.config import Config
from dockermirror.mirror import Mirror, Upstream, registry_key
from dockermirror.upstream.client import UpstreamClient

log = logging.getLogger("dockermirror")


class DockerMirror:
    """One running mirror: config, cache, upstream and the HTTP app around them."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        up = config.upstream
        self.upstream_client = UpstreamClient(
            up.url, username=up.username, password=up.password, ca_bundle=up.ca_bundle,
            connect_timeout=up.connect_timeout, read_timeout=up.read_timeout,
        )
        upstream = Upstream(registry_key(config.upstream.registry), self.upstream_client)
        c = config.cache
        limits = Limits(max_size=c.max_size, min_free=c.min_free, blob_ttl=c.blob_ttl, manifest_ttl=c.manifest_ttl,
                        pins=tuple(upstream.repository(pattern) for pattern in c.pin))
        self.cache = Cache(c.dir, limits=limits, clock=clock)
        self.mirror = Mirror(upstream, self.cache, tag_ttl=config.cache.tag_ttl, clock=clock)
        self.started_at: float | None = None
        starlette = Starlette(routes=routes(self.mirror), lifespan=self._lifespan)
        self.asgi = AccessLog(starlette, on_done=self.mirror.record)

    def open(self) -> None:
        """Open the cache (index, directories) before the server starts listening."""
        if self.cache.index is None:
            self.cache.open()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.open()
        await self.cache.start()
        self.started_at = time.time()
        log.info("mirroring %s (%s) into %s", self.mirror.upstream.key, self.config.upstream.url,
                 self.config.cache.dir)
        try:
            yield
        finally:
            await self.cache.close()
            await self.upstream_client.aclose()
