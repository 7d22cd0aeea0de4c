"""What the mirror is doing now, read from the running application in one call: the figures
the status page shows and the metrics' gauges report (counters come from the requests).

Reading is cheap and has no side effects (a few attribute reads, one statvfs, reads of the
index's one-row totals table, which triggers keep exact: nothing scales with the number of
entries), so a scrape or a page load never competes with pulls for anything but a moment of
the event loop. Everything an upstream sent (its rate-limit headers) is parsed
here into numbers or left out.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dockermirror.cache.space import filesystem, resolve

if TYPE_CHECKING:
    from dockermirror.app import DockerMirror

_ALLOWANCE = re.compile(r"\s*(\d{1,12})\s*(?:;.*)?")


@dataclass(frozen=True, slots=True)
class UpstreamReading:
    key: str                        # docker.io, ghcr.io, registry.example:5000
    url: str
    default: bool                   # where names without a registry go
    reachable: bool | None          # None: not contacted since start
    last_error: str                 # why the last attempt failed ("" if none)
    ratelimit_remaining: int | None  # Docker Hub's pulls left in its window, as last reported
    ratelimit_limit: int | None


@dataclass(frozen=True, slots=True)
class TransferReading:
    digest: str
    upstream: str | None
    repository: str | None
    received: int                   # bytes so far
    size: int | None                # None: the upstream did not say
    followers: int                  # clients reading it as it arrives


@dataclass(frozen=True, slots=True)
class CacheReading:
    used_bytes: int
    reserved_bytes: int             # held by transfers in flight
    max_bytes: int                  # cache.max_size resolved against the filesystem
    filesystem_bytes: int
    free_bytes: int                 # available on the cache's filesystem
    entries: int
    degraded: str | None            # why the cache stopped caching (read-only, index lost...), or None
    min_free_bytes: int = 0         # cache.min_free resolved: the filesystem keeps this much free
    pinned_entries: int = 0         # stored entries of pinned repositories (cache.pin)
    pinned_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Readings:
    taken: float                    # wall-clock time of the reading
    started: float | None           # when the server started serving
    cache: CacheReading | None      # None: the cache is not open (yet)
    upstreams: tuple[UpstreamReading, ...]
    transfers: tuple[TransferReading, ...]


def allowance(text: str | None) -> int | None:
    """``"97;w=21600"`` -> 97; anything else (absent, garbage, huge) -> None."""
    if not text:
        return None
    match = _ALLOWANCE.fullmatch(text)
    return int(match[1]) if match else None


def read(app: DockerMirror) -> Readings:
    cache = app.cache
    cache_reading = None
    if cache.index is not None:
        used, reserved, capacity = cache.usage()
        fs = filesystem(cache.root)
        entries, _ = cache.index.totals()
        pinned_entries, pinned_bytes = cache.index.pinned_totals()
        cache_reading = CacheReading(used_bytes=used, reserved_bytes=reserved, max_bytes=capacity,
                                     filesystem_bytes=fs.total, free_bytes=fs.available, entries=entries,
                                     degraded=cache.degraded,
                                     min_free_bytes=resolve(cache.limits.min_free, fs.total),
                                     pinned_entries=pinned_entries, pinned_bytes=pinned_bytes)
    default = app.mirror.upstreams.default
    upstreams = tuple(
        UpstreamReading(key=u.key, url=str(u.client.base), default=u is default, reachable=u.client.reachable,
                        last_error=u.client.last_error if u.client.reachable is False else "",
                        ratelimit_remaining=allowance(u.client.ratelimit_remaining),
                        ratelimit_limit=allowance(u.client.ratelimit_limit))
        for u in app.mirror.upstreams)
    transfers = tuple(
        TransferReading(digest=str(t.digest), upstream=t.origin[0] if t.origin else None,
                        repository=t.origin[1] if t.origin else None, received=t.received, size=t.size,
                        followers=t.followers)
        for t in cache.transfers.active())
    return Readings(taken=time.time(), started=app.started_at, cache=cache_reading, upstreams=upstreams,
                    transfers=transfers)
