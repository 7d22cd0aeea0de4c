"""``GET /metrics`` in the Prometheus text format, on its own listener (``metrics.listen``).

:class:`Metrics` is the core's :class:`~dockermirror.meter.Meter` made of prometheus_client
objects in a registry of its own (never the library's global one), plus an observer of
finished requests (``DockerMirror.request_observers``) and a collector that turns
:func:`dockermirror.service.readings.read` into gauges at scrape time (nothing polls in
the background). The names are a contract with the dashboards and alert rules shipped
in the packages: README.md's table lists them.

Label values are bounded: kinds, methods (GET, HEAD, other), status classes, cache
results and reasons are fixed words; ``upstream`` is a configured upstream's key. No
repository, tag, client address, user or URL ever becomes a label (and so no credential).

Every counter series that can be known at start exists from start at 0 (every configured
upstream; a reload that adds upstreams adds theirs), so that ``rate()`` and ``increase()``
see the first event after a restart.

:class:`MetricsListener` serves it: a small ASGI app under a second uvicorn server on
the same event loop, on its own socket, so a scrape never queues behind pulls and is
never reachable on the registry's port.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import socket
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import prometheus_client
import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dockermirror import __version__
from dockermirror.api.accesslog import KINDS, RequestDone
from dockermirror.cacheresults import CACHE_RESULTS, FROM_CACHE
from dockermirror.cache.maintenance import MANUAL_EVICTED_BYTES, MANUAL_EVICTIONS
from dockermirror.meter import EVICTION_REASONS, REVALIDATION_RESULTS, UPSTREAM_KINDS, VERIFICATION_PLACES, Meter
from dockermirror.service import readings

if TYPE_CHECKING:
    from dockermirror.app import DockerMirror

log = logging.getLogger("dockermirror.metrics")

# no <name>_created series beside each counter and histogram: they would double the series
# for a figure (process start) that process_start_time_seconds already gives
prometheus_client.disable_created_metrics()

PREFIX = "docker_mirror_"
# the classic text format every Prometheus version reads (prometheus_client's own
# CONTENT_TYPE_LATEST says version=1.0.0, which Prometheus before 3.0 does not know)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METHODS = ("GET", "HEAD")
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")
# how a request was answered, as the access log says it (None: not by the cache)
LABELLED_RESULTS = (*CACHE_RESULTS, None)     # None: not a cache answer (label "none")
# answered from the cache: the upstream did not send these bytes (again)
SAVED = frozenset(FROM_CACHE)

REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
FIRST_BYTE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TRANSFER_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


def status_class(status: int | None) -> str:
    """``2xx``..``5xx``; ``error`` for no HTTP answer (None), ``none`` for no response started (0)."""
    if status is None:
        return "error"
    if 100 <= status < 600:
        return f"{status // 100}xx"
    return "none"


class UpstreamSeries(NamedTuple):
    """One upstream's series (of the metrics labelled by upstream alone), made once."""
    pulls_saved: Any
    saved_bytes: Any
    received_bytes: Any
    first_byte: Any
    transfer_seconds: Any
    resumes: Any
    pass_throughs: Any


class Metrics(Meter):
    """The registry, fed by the core (as its meter), by finished requests and by readings."""

    def __init__(self, upstreams: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(PREFIX + "requests", "Finished requests", ["kind", "method", "status_class", "cache"],
                                registry=r)
        self.sent_bytes = Counter(PREFIX + "sent_bytes", "Response body bytes sent", ["cache"], registry=r)
        self.request_seconds = Histogram(PREFIX + "request_duration_seconds",
                                         "Whole requests, first byte in to last byte out", ["kind"],
                                         buckets=REQUEST_BUCKETS, registry=r)
        self.pulls_saved = Counter(PREFIX + "pulls_saved",
                                   "Manifest GETs answered without a GET upstream (Docker Hub counts a pull "
                                   "per manifest GET)", ["upstream"], registry=r)
        self.saved_bytes = Counter(PREFIX + "saved_bytes", "Bytes sent from the cache (hit, stale, coalesced) "
                                   "that the upstream did not send again", ["upstream"], registry=r)
        self.upstream_requests = Counter(PREFIX + "upstream_requests", "Requests sent upstream (error: no answer)",
                                         ["upstream", "kind", "status_class"], registry=r)
        self.received_bytes = Counter(PREFIX + "upstream_received_bytes", "Body bytes received from the upstream",
                                      ["upstream"], registry=r)
        self.first_byte = Histogram(PREFIX + "upstream_first_byte_seconds",
                                    "Request sent upstream to response headers received", ["upstream"],
                                    buckets=FIRST_BYTE_BUCKETS, registry=r)
        self.transfer_seconds = Histogram(PREFIX + "upstream_transfer_seconds",
                                          "Whole blob downloads, start to verified end", ["upstream"],
                                          buckets=TRANSFER_BUCKETS, registry=r)
        self.resumes = Counter(PREFIX + "upstream_resumed", "Interrupted blob downloads resumed with a Range "
                               "request", ["upstream"], registry=r)
        self.verification_failures = Counter(PREFIX + "verification_failures", "Digests that did not match: an "
                                             "upstream's bytes (download) or a stored file (disk)", ["where"],
                                             registry=r)
        self.revalidations = Counter(PREFIX + "tag_revalidations", "Cached tags past their TTL asked again",
                                     ["upstream", "result"], registry=r)
        self.evictions = Counter(PREFIX + "evictions", "Entries removed from the cache", ["reason"], registry=r)
        self.evicted_bytes = Counter(PREFIX + "evicted_bytes", "Bytes removed from the cache", ["reason"],
                                     registry=r)
        self.pass_throughs = Counter(PREFIX + "pass_throughs", "Blobs streamed without being stored (too big, "
                                     "no room)", ["upstream"], registry=r)
        build = Gauge(PREFIX + "build_info", "The running version", ["version", "python"], registry=r)
        build.labels(__version__, platform.python_version()).set(1)
        # node: this node's name; registered only while the node has one (no family at all without)
        self.node_info = Gauge(PREFIX + "node_info", "This node's name (node: of the configuration)", ["node"],
                               registry=None)
        self._node = ""
        ProcessMetrics(registry=r)
        prometheus_client.PlatformCollector(registry=r)
        self._requests: dict[tuple[str, str, int, str | None], tuple] = {}
        self._upstreams: dict[str, UpstreamSeries] = {}
        self._manual_seen: tuple[int, int] | None = None
        self._app: DockerMirror | None = None
        for kind in KINDS:
            self.request_seconds.labels(kind)
            for method in METHODS:
                for status in (200, 300, 400, 500):
                    for cache in LABELLED_RESULTS:
                        self._request_series(kind, method, status, cache)
        for where in VERIFICATION_PLACES:
            self.verification_failures.labels(where)
        for reason in EVICTION_REASONS:
            self.evictions.labels(reason)
            self.evicted_bytes.labels(reason)
        self.add_upstreams(upstreams)

    # --- wiring

    def attach(self, app: DockerMirror) -> None:
        """Hear of ``app``'s finished requests; report its readings at each scrape."""
        self._app = app
        self.set_node(app.config.node)
        self.add_upstreams(u.key for u in app.mirror.upstreams)
        app.request_observers.append(self.observe)
        self.registry.register(ReadingsCollector(app))
        self._manual_seen = self._manual_counters()

    def set_node(self, node: str) -> None:
        """``docker_mirror_node_info{node="NAME"} 1`` for this node's name ('' : no series); a reload
        that renames the node replaces the series."""
        if node == self._node:
            return
        if self._node:
            self.node_info.remove(self._node)
        else:
            self.registry.register(self.node_info)
        if node:
            self.node_info.labels(node).set(1)
        else:
            self.registry.unregister(self.node_info)
        self._node = node

    def add_upstreams(self, keys: Iterable[str]) -> None:
        """Zero series for upstreams not seen yet (at start, and for those a reload adds)."""
        for key in keys:
            self._upstream_series(key)

    def exposition(self) -> bytes:
        """The text format of everything, as of now."""
        self._sync_manual_evictions()
        return prometheus_client.generate_latest(self.registry)

    # --- finished requests (on the event loop, for every request: a few dict lookups)

    def observe(self, done: RequestDone) -> None:
        key = (done.kind, done.method, done.status // 100, done.cache)
        series = self._requests.get(key) or self._request_series(*key[:2], done.status, done.cache)
        requests, sent, seconds = series
        requests.inc()
        sent.inc(done.sent)
        seconds.observe(done.seconds)
        if done.cache in SAVED and done.upstream is not None:
            upstream = self._series(done.upstream)
            upstream.saved_bytes.inc(done.sent)
            if done.pull:
                upstream.pulls_saved.inc()

    def _request_series(self, kind: str, method: str, status: int, cache: str | None) -> tuple:
        """The series of one (kind, method, status class, cache result), made once; values a client
        chose (the method) or that are not in the fixed sets are folded into ``other``/``none``."""
        series = (
            self.requests.labels(kind if kind in KINDS else "other", method if method in METHODS else "other",
                                 status_class(status), cache.lower() if cache else "none"),
            self.sent_bytes.labels(cache.lower() if cache else "none"),
            self.request_seconds.labels(kind if kind in KINDS else "other"),
        )
        if len(self._requests) < 4096:      # (bounded anyway: the key's parts are)
            self._requests[(kind, method, status // 100, cache)] = series
        return series

    def _upstream_series(self, key: str) -> UpstreamSeries:
        series = self._upstreams.get(key)
        if series is None:
            for kind in UPSTREAM_KINDS:
                for cls in (*STATUS_CLASSES, "error"):
                    self.upstream_requests.labels(key, kind, cls)
            for result in REVALIDATION_RESULTS:
                self.revalidations.labels(key, result)
            series = self._upstreams[key] = UpstreamSeries(
                self.pulls_saved.labels(key), self.saved_bytes.labels(key), self.received_bytes.labels(key),
                self.first_byte.labels(key), self.transfer_seconds.labels(key), self.resumes.labels(key),
                self.pass_throughs.labels(key))
        return series

    # --- the core's events (Meter)

    def upstream_request(self, upstream: str, kind: str, status: int | None, first_byte_seconds: float) -> None:
        self.upstream_requests.labels(upstream, kind, status_class(status)).inc()
        if status is not None:
            self._series(upstream).first_byte.observe(first_byte_seconds)

    def upstream_received(self, upstream: str, nbytes: int) -> None:
        if nbytes:
            self._series(upstream).received_bytes.inc(nbytes)

    def transfer_done(self, upstream: str | None, seconds: float, ok: bool) -> None:
        if ok and upstream is not None:
            self._series(upstream).transfer_seconds.observe(seconds)

    def resumed(self, upstream: str) -> None:
        self._series(upstream).resumes.inc()

    def verification_failed(self, where: str) -> None:
        self.verification_failures.labels(where).inc()

    def tag_revalidated(self, upstream: str, result: str) -> None:
        self.revalidations.labels(upstream, result).inc()

    def evicted(self, reason: str, entries: int, nbytes: int) -> None:
        self.evictions.labels(reason).inc(entries)
        self.evicted_bytes.labels(reason).inc(nbytes)

    def pass_through(self, upstream: str | None) -> None:
        if upstream is not None:
            self._series(upstream).pass_throughs.inc()

    def _series(self, upstream: str) -> UpstreamSeries:
        return self._upstreams.get(upstream) or self._upstream_series(upstream)

    # --- evictions by `docker-mirror cache prune | rm` (another process, through the index)

    def _manual_counters(self) -> tuple[int, int] | None:
        index = self._app.cache.index if self._app is not None else None
        if index is None:
            return None
        try:
            counters = index.counters()
        except Exception:       # an index that cannot be read now (lost, locked): next time
            return None
        return counters.get(MANUAL_EVICTIONS, 0), counters.get(MANUAL_EVICTED_BYTES, 0)

    def _sync_manual_evictions(self) -> None:
        """Add what the index's lifetime counters of manual evictions gained since the last look
        (the first look, at start, is the baseline: counters start at 0 with the process)."""
        now = self._manual_counters()
        if now is None:
            return
        if self._manual_seen is not None:
            entries, nbytes = (max(0, a - b) for a, b in zip(now, self._manual_seen, strict=True))
            if entries or nbytes:
                self.evicted("manual", entries, nbytes)
        self._manual_seen = now


class ProcessMetrics(prometheus_client.ProcessCollector):
    """prometheus_client's process collector (CPU, RSS, fds, start time), also where /proc/stat
    cannot be read: the unit's ProcSubset=pid leaves only /proc/<pid>, and the library then
    reports nothing at all, for want of the boot time that its start time is counted from.
    The process's start in /proc/self/stat is in ticks since boot (CLOCK_BOOTTIME), so the
    boot time is now less the time since boot."""

    def _boot_time(self) -> float:
        try:
            btime = super()._boot_time()
        except OSError:
            btime = None
        return btime or time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


class ReadingsCollector(Collector):
    """Gauges from :func:`readings.read`, taken when Prometheus scrapes."""

    def __init__(self, app: DockerMirror) -> None:
        self.app = app
        self._failing = False       # the last reading failed (said once, until one works again)

    def describe(self) -> list:
        return []       # known only when read: never read at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            now = readings.read(self.app)
        except Exception:       # the counters are still worth a scrape: these gauges are left out
            if not self._failing:
                log.exception("metrics: the cache and upstream gauges could not be read; left out until they can")
            self._failing = True
            return
        if self._failing:
            log.info("metrics: the cache and upstream gauges can be read again")
            self._failing = False
        yield GaugeMetricFamily(PREFIX + "transfers_in_flight", "Shared blob downloads running now",
                                value=len(now.transfers))
        yield GaugeMetricFamily(PREFIX + "transfer_followers", "Clients reading those downloads as they arrive",
                                value=sum(t.followers for t in now.transfers))
        cache = now.cache
        if cache is not None:
            for name, text, value in (
                    ("cache_used_bytes", "Stored content", cache.used_bytes),
                    ("cache_max_bytes", "cache.max_size resolved", cache.max_bytes),
                    ("cache_filesystem_free_bytes", "Available on the cache's filesystem", cache.free_bytes),
                    ("cache_entries", "Stored blobs and manifests", cache.entries),
                    ("cache_degraded", "1 while the cache serves but cannot store", int(cache.degraded is not None)),
                    ("cache_pinned_entries", "Stored entries of pinned repositories (cache.pin)", cache.pinned_entries),
                    ("cache_pinned_bytes", "Bytes of those", cache.pinned_bytes)):
                yield GaugeMetricFamily(PREFIX + name, text, value=value)
        up = GaugeMetricFamily(PREFIX + "upstream_up", "1 if the last upstream request got an HTTP answer "
                               "(absent until contacted)", labels=["upstream"])
        remaining = GaugeMetricFamily(PREFIX + "upstream_ratelimit_remaining", "Docker Hub pulls left "
                                      "(absent until reported)", labels=["upstream"])
        limit = GaugeMetricFamily(PREFIX + "upstream_ratelimit_limit", "Docker Hub pulls per window "
                                  "(absent until reported)", labels=["upstream"])
        for u in now.upstreams:
            if u.reachable is not None:
                up.add_metric([u.key], int(u.reachable))
            if u.ratelimit_remaining is not None:
                remaining.add_metric([u.key], u.ratelimit_remaining)
            if u.ratelimit_limit is not None:
                limit.add_metric([u.key], u.ratelimit_limit)
        yield from (up, remaining, limit)


# --- the listener


def metrics_app(metrics: Metrics):
    """The ASGI app of the metrics listener: GET /metrics, GET /healthz; nothing else."""

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        headers = [(b"cache-control", b"no-store")]
        if path not in ("/metrics", "/healthz"):
            status, body, content_type = 404, b"not found: GET /metrics\n", b"text/plain; charset=utf-8"
        elif method not in ("GET", "HEAD"):
            status, body, content_type = 405, b"method not allowed\n", b"text/plain; charset=utf-8"
            headers.append((b"allow", b"GET, HEAD"))
        elif path == "/healthz":
            status, body, content_type = 200, b"ok\n", b"text/plain; charset=utf-8"
        else:
            try:
                status, body, content_type = 200, metrics.exposition(), CONTENT_TYPE.encode()
            except Exception:
                log.exception("metrics could not be collected")
                status, body, content_type = 500, b"metrics could not be collected (see the log)\n", \
                    b"text/plain; charset=utf-8"
        headers += [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

    return app


def bind(address: tuple[str, int]) -> socket.socket:
    """The listening socket of ``metrics.listen``; OSError if it cannot be had."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(64)
        sock.setblocking(False)
        sock.set_inheritable(False)
    except OSError:
        sock.close()
        raise
    return sock


class MetricsListener:
    """A second uvicorn server, on the same event loop, serving :func:`metrics_app` on ``sock``;
    ``http`` is the HTTP protocol (the service passes the registry's, with its limits on what a
    client may send and how slowly: this port may face a network too)."""

    def __init__(self, metrics: Metrics, sock: socket.socket, http: type[asyncio.Protocol] | str = "auto") -> None:
        self.sock = sock
        config = uvicorn.Config(metrics_app(metrics), lifespan="off", log_config=None, access_log=False,
                                server_header=False, proxy_headers=False, timeout_keep_alive=30,
                                limit_concurrency=64, timeout_graceful_shutdown=2, http=http)
        config.load()
        self.server = uvicorn.Server(config)
        self.server.lifespan = config.lifespan_class(config)
        self._ticking: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def start(self) -> None:
        await self.server.startup(sockets=[self.sock])
        # uvicorn's once-a-second housekeeping (the Date header), until stop()
        self._ticking = asyncio.get_running_loop().create_task(self.server.main_loop(), name="metrics listener")
        log.info("serving metrics on http://%s/metrics", self.address)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._ticking is not None:
            await self._ticking
        if self.server.started:
            await self.server.shutdown(sockets=[self.sock])
