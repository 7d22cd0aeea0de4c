"""The application object: builds the core from a Config and exposes it as ASGI.

:class:`DockerMirror` owns every piece of runtime state (cache, upstream client,
mirror policy); nothing else in the package keeps mutable state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
from starlette.applications import Starlette

from dockermirror import smallfile
from dockermirror.access.htpasswd import Htpasswd
from dockermirror.api.accesslog import AccessLog, RequestDone
from dockermirror.api.forwarded import ClientAddress
from dockermirror.api.gate import Gate
from dockermirror.api.loops import LoopCheck
from dockermirror.api.refusals import RefusalLog
from dockermirror.access.guard import Guard
from dockermirror.api.routes import RegistryAPI, api_routes
from dockermirror.cache import Cache, Limits
from dockermirror.config import AuthConfig, Config, UpstreamConfig
from dockermirror.meter import NULL_METER, Meter
from dockermirror.mirror import Mirror, Upstream, Upstreams
from dockermirror.routing import registry_key
from dockermirror.service.statuspage import StatusPage
from dockermirror.upstream.client import UpstreamClient
from dockermirror.via import new_pseudonym

log = logging.getLogger("dockermirror")


def _client(up: UpstreamConfig, transport: httpx.AsyncBaseTransport | None, meter: Meter,
            pseudonym: str) -> UpstreamClient:
    return UpstreamClient(up.url, username=up.username, password=up.password, ca_bundle=up.ca_bundle,
                          connect_timeout=up.connect_timeout, read_timeout=up.read_timeout,
                          transfer_timeout=up.transfer_timeout, token_realms=up.token_realms,
                          transport=transport, meter=meter, key=registry_key(up.registry),
                          namespace=registry_key(up.registry) if up.send_ns else None, pseudonym=pseudonym,
                          private_redirects=up.private_redirects)


def _ca_fingerprint(up: UpstreamConfig) -> str | None:
    """What the upstream's CA bundle holds now (a reload with new content makes a new client,
    as a new password_file does); None without a bundle or if it cannot be read."""
    if up.ca_bundle is None:
        return None
    try:
        return hashlib.sha256(smallfile.read(up.ca_bundle, smallfile.PEM_MAX)[0]).hexdigest()
    except OSError:
        return None


def _upstream(up: UpstreamConfig, client: UpstreamClient) -> Upstream:
    return Upstream(registry_key(up.registry), client, aliases=up.aliases, tag_ttl=up.tag_ttl,
                    private=bool(up.username or up.password))


def load_htpasswd(auth: AuthConfig) -> Htpasswd | None:
    """The users of ``auth.htpasswd`` (None when unset); HtpasswdError if the file is bad."""
    if auth.htpasswd is None:
        return None
    return Htpasswd.load(auth.htpasswd, cache_ttl=auth.cache_ttl)


def _limits(config: Config) -> Limits:
    """The cache's limits; pins as ``registry/repository`` patterns (see RegistryTable.pattern)."""
    c = config.cache
    table = config.registry_table()
    return Limits(max_size=c.max_size, min_free=c.min_free, blob_ttl=c.blob_ttl, manifest_ttl=c.manifest_ttl,
                  pins=tuple(table.pattern(pattern) for pattern in c.pin), verify_rate=c.verify_rate,
                  direct_writes=c.direct_writes)


class DockerMirror:
    """One running mirror: config, cache, upstreams and the HTTP app around them."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time,
                 on_started: Callable[[], None] = lambda: None,
                 upstream_transport: httpx.AsyncBaseTransport | None = None, meter: Meter = NULL_METER) -> None:
        """``clock`` is wall-clock time for TTLs and expiry; ``upstream_transport`` replaces the
        network under the upstream client (the in-process tests fake the upstream with it);
        ``meter`` hears of the core's events (metrics); it stays the same for the process's life,
        reloads included."""
        self.meter = meter
        # this process's name in the Via of its upstream requests, to find request loops (via.py)
        self.pseudonym = new_pseudonym()
        # the users of auth.htpasswd (None: no Basic authentication); HtpasswdError before anything else is made
        self.htpasswd: Htpasswd | None = load_htpasswd(config.auth)
        self.config = config
        self._transport = upstream_transport
        # the CA bundle each upstream client was built with
        self._ca_read: weakref.WeakKeyDictionary[UpstreamClient, str | None] = weakref.WeakKeyDictionary()
        upstreams = Upstreams((_upstream(up, self._client(up)) for up in config.registries),
                              dotted_namespaces=not config.upstreams)
        self.cache = Cache(config.cache.dir, limits=_limits(config), clock=clock, meter=meter)
        self.mirror = Mirror(upstreams, self.cache, tag_ttl=config.cache.tag_ttl, clock=clock, meter=meter)
        self.started_at: float | None = None
        self._on_started = on_started
        # connections of upstream clients replaced by a reload, until nothing uses the client
        self._retired: dict[int, Callable[[], Awaitable[None]]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._retire_keys = itertools.count()
        self.api = RegistryAPI(self.mirror, self._guard(config))
        # GET / and /healthz (service/statuspage.py); its tally hears of every request
        self.status_page = StatusPage(self)
        starlette = Starlette(routes=[*api_routes(self.api), *self.status_page.routes(self.api)],
                              lifespan=lambda app: self.running())
        # who hears of each finished request besides the cache's counters (metrics, the status page)
        self.request_observers: list[Callable[[RequestDone], None]] = []
        self._observer_failed_said = -60.0
        self.request_observers.append(self.status_page.stats)
        # which refusals get an info line (the gate's, and the HTTP protocol's for malformed requests)
        self.refusals = RefusalLog()
        # tls.client_auth: required: a request without a client certificate stops at the gate, as does
        # one whose connection's certificate was refused since (revoked, no longer trusted)
        # server.trusted_proxies: the client's address from X-Forwarded-For, before anything reads it;
        # node: this node's name on every response and log line (both as the configuration in force says)
        # a request that came round a loop of mirrors is answered 508 before anything else (api/loops.py)
        gate = Gate(starlette, lambda: self.api.guard, self.refusals)
        looped = LoopCheck(gate, self.pseudonym, lambda: ", ".join(up.url for up in self.config.registries))
        logged = AccessLog(looped, on_done=self._request_done, node=lambda: self.config.node)
        self.asgi = ClientAddress(logged, lambda: self.config.server.trusted_proxies)

    def _request_done(self, done: RequestDone) -> None:
        self.mirror.record(done.cache, done.sent, done.upstream)
        for observer in self.request_observers:
            try:
                observer(done)
            except Exception:       # a broken view never costs a request its log line or its answer
                now = time.monotonic()
                if now - self._observer_failed_said >= 60:     # a traceback a minute, not one a request
                    self._observer_failed_said = now
                    log.exception("a request observer failed (said at most once a minute)")

    def _client(self, up: UpstreamConfig) -> UpstreamClient:
        fingerprint = _ca_fingerprint(up)
        client = _client(up, self._transport, self.meter, self.pseudonym)
        self._ca_read[client] = fingerprint
        return client

    def _guard(self, config: Config) -> Guard:
        """Who may pull: the ``access:`` rules of ``config``, with the users of auth.htpasswd.
        Rules that name repositories also stop the mirror serving cached content across
        repositories unasked (a denied repository's layer through an allowed one, by digest)."""
        guard = Guard.of(config, self.htpasswd)
        self.mirror.share_public = not guard.rules.per_repository
        return guard

    @property
    def upstream_client(self) -> UpstreamClient:
        """The default upstream's client."""
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
        several = len(self.config.registries) > 1
        for up in self.config.registries:
            default = several and up is self.config.default_upstream
            log.info("mirroring %s (%s)%s into %s", registry_key(up.registry), up.url,
                     " as the default upstream" if default else "", self.config.cache.dir)
        log.info("this process is %s in the Via of its upstream requests (request loops are refused)", self.pseudonym)
        if self.htpasswd is not None:
            log.info("auth.htpasswd %s: %d user(s)", self.htpasswd.source, len(self.htpasswd))
            for warning in self.htpasswd.warnings:
                log.warning("auth.htpasswd: %s", warning)
        self._on_started()
        try:
            yield
        finally:
            await self.cache.close()
            for upstream in self.mirror.upstreams:
                await upstream.client.aclose()
            for close in list(self._retired.values()):
                await close()
            self._retired.clear()
            if self._closing:
                await asyncio.wait(self._closing, timeout=5)

    def reconfigure(self, new: Config) -> list[str]:
        """Apply what a running mirror can change; return the settings that need a restart.

        Upstreams are added, removed and changed in place: requests and transfers that started
        keep the client they started with (through their ``Repo``); a removed upstream's
        cached content stays until it expires or is evicted. Whatever can fail (the htpasswd file:
        HtpasswdError, the rules, a new upstream client) fails before anything is applied."""
        return self.apply(new, self.load_users(new))

    def apply(self, new: Config, htpasswd: Htpasswd | None) -> list[str]:
        """:meth:`reconfigure` with the users :meth:`load_users` gave for ``new`` (read once)."""
        old, restart = self.config, []
        if new.cache.dir != self.cache.root:     # the directory it runs with, not the previous file's
            restart.append("cache.dir")
        guard = Guard.of(new, htpasswd)
        if new.registries != old.registries or self._ca_bundle_changed():
            self._swap_upstreams(new)           # builds every new client first: fails with nothing applied
        # from here on nothing fails
        if new.cache != old.cache or new.registries != old.registries:
            self.cache.set_limits(_limits(new))
            self.mirror.tag_ttl = new.cache.tag_ttl
        self._use_users(htpasswd)
        self.mirror.share_public = not guard.rules.per_repository
        self.api.guard = guard                 # new requests use the new rules (and users)
        self.config = new
        return restart

    def load_users(self, new: Config) -> Htpasswd | None:
        """The users ``new`` names (``auth.htpasswd`` re-read: users added or removed since; the
        running ones if the file is unchanged, keeping their verified credentials).
        HtpasswdError if the file is refused: a reload must then change nothing, or adding a bad
        file to lock a mirror down would leave it open (as a start with that file is refused)."""
        loaded = load_htpasswd(new.auth)
        old = self.htpasswd
        if loaded is not None and old is not None and (loaded.source, loaded.digest, loaded.cache_ttl) == \
                (old.source, old.digest, old.cache_ttl):
            return old
        return loaded

    def _use_users(self, new: Htpasswd | None) -> None:
        old = self.htpasswd
        if new is old:
            return
        if new is None and old is not None:
            log.warning("auth.htpasswd removed: no Basic authentication from now on")
        elif new is not None:
            log.info("auth.htpasswd %s loaded: %d user(s)", new.source, len(new))
            for warning in new.warnings:
                log.warning("auth.htpasswd: %s", warning)
        self.htpasswd = new

    def _ca_bundle_changed(self) -> bool:
        """Whether a CA bundle now holds other certificates than its client was built with."""
        return any(self._ca_read.get(u.client) != _ca_fingerprint(up)
                   for up, u in zip(self.config.registries, self.mirror.upstreams, strict=True))

    def _swap_upstreams(self, new: Config) -> None:
        """A new routing table; each upstream keeps its client (and token cache, reachability)
        unless its connection settings changed (the CA bundle's content included). Only new
        timeouts: the same client takes them. Every new client is built before anything changes:
        if one cannot be (a CA bundle replaced by garbage since the configuration was read), the
        reload fails with nothing applied."""
        pairs = zip(self.config.registries, self.mirror.upstreams, strict=True)
        before = {registry_key(up.registry): (up, u) for up, u in pairs}
        timeouts = {"connect_timeout": 0, "read_timeout": 0, "transfer_timeout": 0, "tag_ttl": None, "aliases": ()}
        kept, built = [], []        # (config, client) kept with new timeouts; (key, config, client, replaced)
        for up in new.registries:
            key = registry_key(up.registry)
            old_up, old = before.pop(key, (None, None))
            if old is not None and dataclasses.replace(up, **timeouts) == dataclasses.replace(old_up, **timeouts) \
                    and self._ca_read.get(old.client) == _ca_fingerprint(up):
                kept.append((up, old.client))
                continue
            built.append((key, up, self._client(up), old))
        # from here on nothing fails
        upstreams = {id(up): _upstream(up, client) for up, client in kept}
        for up, client in kept:
            client.set_timeouts(up.connect_timeout, up.read_timeout, up.transfer_timeout)
        for key, up, client, old in built:
            upstreams[id(up)] = _upstream(up, client)
            if old is not None:
                self._retire(old.client)
                log.info("upstream %s changed (%s); new requests use the new settings", key, up.url)
            else:
                log.info("upstream %s (%s) added", key, up.url)
        for key, (_, old) in before.items():
            log.info("upstream %s removed; its cached content stays until it expires or is evicted", key)
            self._retire(old.client)
        self.mirror.upstreams = Upstreams((upstreams[id(up)] for up in new.registries),
                                          dotted_namespaces=not new.upstreams)

    def _retire(self, client: UpstreamClient) -> None:
        """Close a replaced client's connections as soon as nothing uses it any more. Every
        request and transfer that started with it holds a reference to it (through its
        ``Repo``), so the moment the last of them is done, it is collected."""
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
