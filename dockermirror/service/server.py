"""The daemon: the mirror under uvicorn, with TLS, systemd notifications and reloads.

* it listens on the sockets systemd passed (socket activation), else binds ``listen``;
* READY=1 once the listening socket is bound and the cache index is open;
* WATCHDOG=1 from a task on the event loop; STATUS= kept current;
* SIGHUP: RELOADING=1, re-read the configuration (a bad one is refused and the old one
  kept), reload the TLS certificate for new connections, READY=1. A SIGHUP that arrives
  while the server is starting is remembered and applied once it is ready (``cli`` takes
  the signal over before anything else is loaded);
* SIGTERM/SIGINT: STOPPING=1, stop accepting, let requests in flight finish (up to
  GRACE seconds), close the cache cleanly;
* with ``metrics.listen``: its socket is bound before anything else (an address in use stops
  the start), GET /metrics is served by a second uvicorn server on the same loop from just
  before READY=1 until the shutdown (:mod:`.metrics`); the meter lives as long as the process,
  reloads included (a new ``metrics.listen`` needs a restart, and the reload says so).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from dockermirror.access.htpasswd import HtpasswdError
from dockermirror.app import DockerMirror
from dockermirror.cache import CacheBusy
from dockermirror.cache.index import ForeignDatabase
from dockermirror.cacheresults import CACHE_RESULTS, hit_ratio
from dockermirror.config import Config, ConfigError, ServerConfig, listen_overlap, upstream_loops
from dockermirror.humanize import printable, size
from dockermirror.meter import NULL_METER
from dockermirror.service import fdlimit, internals, logs, preflight, restart
from dockermirror.service.memory import Trimmer
from dockermirror.service.systemd import SocketError, Systemd, describe, listen_sockets
from dockermirror.service.zerocopy import ClientLimits, ZeroCopyHttpToolsProtocol
from dockermirror.upstream import readsize

if TYPE_CHECKING:
    from dockermirror.service.metrics import Metrics, MetricsListener
    from dockermirror.service.tls import ClientAuth, ServerTLS

log = logging.getLogger("dockermirror")

GRACE = 20.0            # seconds requests in flight get at shutdown (the unit allows 30)
STATUS_INTERVAL = 10.0  # seconds between STATUS= updates
WORKER_THREADS = 32


class StartupError(Exception):
    """The mirror cannot start; the message says why. ``key``: the configuration key at fault
    (the command line names its flag instead, if one gave the value): a user's mistake."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


def public_hostname(config: Config) -> str:
    """The mirror's name as cert init and client-setup pick it ("" if this host has none clients can use)."""
    from dockermirror.service.certs import mirror_name

    return mirror_name(config).name


class Service:
    """One daemon process: the application, its TLS context, and systemd."""

    def __init__(self, config: Config, reload_config: Callable[[], Config],
                 reload_requested: Callable[[], bool] = lambda: False, check_listen: bool = False) -> None:
        """``reload_requested``: whether a SIGHUP came before the server could handle it;
        ``check_listen``: refuse, before anything is created, an address that cannot be bound."""
        self.config = config
        self.reload_config = reload_config
        self._reload_requested = reload_requested
        self._ready = False
        self._reload_pending = False
        # the HTTP protocol of this server; its limits change on reload (for new connections)
        self.protocol = type("MirrorHttpProtocol", (ZeroCopyHttpToolsProtocol,),
                             {"limits": client_limits(config.server, config.node)})
        self._self_check()
        self._uv_config: uvicorn.Config | None = None
        self.systemd = Systemd()
        try:
            self.sockets = listen_sockets()
        except SocketError as exc:
            raise StartupError(str(exc)) from None
        if self.sockets:
            log.info("listening on the socket(s) systemd passed (%s); listen: %s is not used", self.address,
                     config.listen)
        elif check_listen and (problem := preflight.listen_problem(*config.listen_address)) is not None:
            raise StartupError(problem, key="listen")
        if (problem := preflight.cache_dir_problem(config.cache.dir)) is not None:
            raise StartupError(problem, key="cache.dir")
        self.tls: ServerTLS | None = server_tls(config)
        if self.tls is not None:
            for warning in self.tls.checked.warnings:
                log.warning("%s", warning)
            if config.tls.client_auth != "none":
                log.info("%s", self.tls.client_summary)
                if self.tls.revoked is None and config.tls.crl_where:
                    log.warning("%s: tls.crl %s does not exist: no client certificate is revoked until "
                                "docker-mirror cert revoke writes it", config.tls.crl_where, config.tls.crl)
        elif config.tls.enabled == "auto":
            log.info("no TLS certificate at %s: serving plain HTTP (tls.enabled: auto)", config.tls.certificate)
        # metrics.listen: the registry of metrics (the core's meter) and its own listening socket
        self.metrics: Metrics | None = None
        self.metrics_listener: MetricsListener | None = None
        if config.metrics.listen_address is not None:
            from dockermirror.service.metrics import Metrics, MetricsListener, bind

            if not self.sockets and (problem := listen_overlap(config.listen, config.metrics.listen)):
                raise StartupError(problem, key="metrics.listen")    # (--listen gave the same port)
            if check_listen and (problem := preflight.listen_problem(*config.metrics.listen_address)):
                raise StartupError(problem, key="metrics.listen")

            try:
                sock = bind(config.metrics.listen_address)
            except OSError as exc:
                raise StartupError(f"metrics.listen: cannot listen on {config.metrics.listen}: "
                                   f"{exc.strerror or exc}") from None
            self.metrics = Metrics()
            self.metrics_listener = MetricsListener(self.metrics, sock, http=self.protocol)
        try:
            self.app = DockerMirror(config, on_started=self._lifespan_started,
                                    meter=self.metrics if self.metrics is not None else NULL_METER)
        except HtpasswdError as exc:
            raise StartupError(f"auth.htpasswd: {exc}") from None
        # refused requests and malformed ones from clients without a certificate: one limit on their log lines
        self.protocol.refusals = self.app.refusals
        try:
            self.app.open()
        except CacheBusy as exc:
            raise StartupError(str(exc)) from None
        except (OSError, sqlite3.Error, ForeignDatabase) as exc:
            detail = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise StartupError(f"cannot open the cache in {config.cache.dir}: {detail}") from None
        if self.metrics is not None:
            self.metrics.attach(self.app)
        self._tasks: set[asyncio.Task[None]] = set()
        self.trimmer = Trimmer()    # freed memory given back after each burst of downloads
        # what this process runs with of the settings only a restart changes (:mod:`.restart`)
        self.running = restart.settings(config, tls=self.tls is not None, socket_activated=bool(self.sockets))
        self.restart_pending: list[str] = []

    def _self_check(self) -> None:
        """The library internals the protocol and the upstream client reach into: what is not what
        they were built against is turned off, with one warning each (:mod:`.internals`)."""
        verdict = internals.check(self.protocol)
        if verdict.problem:
            log.warning("%s", verdict.line())
        if not verdict.limits:
            from uvicorn.protocols.http.h11_impl import H11Protocol

            self.protocol = type("MirrorHttpProtocol", (H11Protocol,), {"limits": self.protocol.limits})
        elif not verdict.zero_copy:
            self.protocol.zero_copy = False
        if problem := readsize.check():
            log.warning("%s", problem)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def address(self) -> str:
        """Where it listens: the sockets systemd passed, else ``listen``."""
        return ", ".join(map(describe, self.sockets)) if self.sockets else self.config.listen

    def server(self) -> MirrorServer:
        host, port = self.config.listen_address
        uv_config = uvicorn.Config(
            self.app.asgi, host=host, port=port, lifespan="on", log_config=None, access_log=False,
            server_header=False, timeout_graceful_shutdown=GRACE, http=self.protocol, ws="none",
            # the client address is the TCP peer's; X-Forwarded-For only from server.trusted_proxies,
            # in one place: dockermirror/api/forwarded.py (never uvicorn's proxy_headers)
            proxy_headers=False,
        )
        _apply_server(uv_config, self.config.server)
        uv_config.load()
        uv_config.ssl = self.tls.context if self.tls else None
        self._uv_config = uv_config
        return MirrorServer(uv_config, self)

    # --- lifecycle hooks

    def _lifespan_started(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        # file reads, hashing and index writes of many transfers at once: more than the
        # default min(32, cores + 4) threads (they mostly wait on I/O or run without the GIL)
        loop.set_default_executor(ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="worker"))

    def listening(self) -> None:
        """The socket is bound and the cache is open: tell systemd."""
        log.info("serving %s://%s", self.scheme, self.address)
        self.systemd.ready(self.status())
        self.systemd.start_watchdog()
        self._spawn(self._keep_status())
        self._ready = True
        if self._reload_pending or self._reload_requested():
            log.info("a reload was asked for while starting; reloading now")
            self._spawn(self.reload())

    def _sighup(self) -> None:
        if self._ready:
            self._spawn(self.reload())
        else:
            self._reload_pending = True     # applied once the server is ready (after READY=1)

    def stopping(self) -> None:
        self.systemd.stopping("stopping: finishing requests in flight")

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            self.systemd.status(self.status())
            if self.trimmer.due(busy=len(self.app.cache.transfers) > 0):
                try:    # after a burst of downloads (see .memory); a failure must not end the status
                    await asyncio.to_thread(self.trimmer.trim)
                except Exception as exc:    # (no thread to be had: RuntimeError; the C call: OSError)
                    log.warning("giving freed memory back after downloads failed: %s: %s",
                                type(exc).__name__, exc)

    # --- reload

    async def reload(self) -> None:
        self.systemd.reloading()
        try:
            new = self.reload_config()
        except ConfigError as exc:
            log.error("reload refused, still running with the previous configuration: %s", exc)
            self.systemd.ready(self.status())
            return
        if (problem := new.tls.client_auth_error()) is not None:
            log.error("reload refused, still running with the previous configuration: %s", problem)
            self.systemd.ready(self.status())
            return
        try:        # before the TLS step below changes anything
            users = self.app.load_users(new)
        except Exception as exc:   # HtpasswdError names the file and line; anything else, too
            log.error("reload refused, still running with the previous configuration (and users): "
                      "auth.htpasswd: %s", printable(str(exc), quote=False))
            self.systemd.ready(self.status())
            return
        if self.tls is not None and new.tls.active:
            from dockermirror.service.tls import TLSError, TrustLost

            try:
                checked = self.tls.reload(new.tls.certificate, new.tls.key, public_hostname(new), client_auth(new))
                for warning in checked.warnings:
                    log.warning("%s", warning)
                log.info("TLS certificate %s loaded (serial %x); new connections use it",
                         new.tls.certificate, checked.certificate.serial_number)
                if new.tls.client_auth != "none" or self.config.tls.client_auth != "none":
                    log.info("%s", self.tls.client_summary)
            except TrustLost as exc:     # e.g. the CRL in force is gone: nothing of this reload applies
                log.error("reload refused, still running with the previous configuration: %s", exc)
                self.systemd.ready(self.status())
                return
            except TLSError as exc:
                log.error("reload kept the previous TLS certificate, client CA and CRL: %s", exc)
                new = _keep_tls(new, self.config)
        try:
            self.app.apply(new, users)    # its own list of what needs a restart is in :mod:`.restart`'s
        except Exception as exc:    # e.g. a CA bundle replaced by garbage after the configuration was read
            log.error("reload refused, still running with the previous upstreams, cache settings and users: %s",
                      printable(str(exc), quote=False))
            self.systemd.ready(self.status())
            return
        if self.metrics is not None:
            self.metrics.add_upstreams(u.key for u in self.app.mirror.upstreams)
            self.metrics.set_node(new.node)
        if new.server != self.config.server or new.node != self.config.node:
            self.protocol.limits = client_limits(new.server, new.node)
            if self._uv_config is not None:
                _apply_server(self._uv_config, new.server)
        logs.set_level(new.log.level)
        self.config = new
        notes = restart.pending(self.running, restart.settings(new))
        if notes:
            log.warning("reloaded %s; restart to apply: %s", new.source, ", ".join(notes))
        elif self.restart_pending:
            log.info("reloaded %s; no restart needed any more: the file is back to what the server runs with", new.source)
        else:
            log.info("reloaded %s", new.source)
        self.restart_pending = notes
        self.systemd.ready(self.status())

    # --- status

    def status(self) -> str:
        """One line for `systemctl status`: address, TLS, cache, hits, upstream."""
        cache = self.app.cache
        parts = [f"{self.scheme}://{self.address}"]
        if cache.index is not None:
            used, _, capacity = cache.usage()
            parts.append(f"cache {size(used)} of {size(capacity)} ({used / capacity * 100 if capacity else 0:.0f}%)")
            counters = cache.index.counters()
            answers = {result: counters.get(f"requests_{result.lower()}", 0) for result in CACHE_RESULTS}
            ratio = hit_ratio(answers)
            if ratio is not None:
                parts.append(f"hit ratio {ratio * 100:.0f}% of {sum(answers.values())} requests")
        if cache.degraded is not None:
            parts.append(f"cache DEGRADED ({cache.degraded}): serving what is cached, not caching")
        parts += upstream_status(list(self.app.mirror.upstreams))
        if self.restart_pending:
            parts.append(f"restart to apply: {', '.join(note.split(' ')[0] for note in self.restart_pending)}")
        return " | ".join(parts)


def upstream_status(upstreams: list) -> list[str]:
    """``upstream docker.io reachable`` for one; ``upstreams 1 of 3 reachable (ghcr.io UNREACHABLE;
    quay.io not contacted yet)`` for several (only an upstream that answered counts as reachable);
    and Docker Hub's pull allowance where an upstream reports one."""
    states = {None: "not contacted yet", True: "reachable", False: "UNREACHABLE"}
    parts = []
    if len(upstreams) == 1:
        parts.append(f"upstream {upstreams[0].key} {states[upstreams[0].client.reachable]}")
    else:
        up = [u.key for u in upstreams if u.client.reachable is True]
        notes = [f"{', '.join(keys)} {states[state]}" for state in (False, None)
                 if (keys := [u.key for u in upstreams if u.client.reachable is state])]
        text = f"upstreams {len(up)} of {len(upstreams)} reachable"
        parts.append(text + (f" ({'; '.join(notes)})" if notes else ""))
    for upstream in upstreams:
        remaining = upstream.client.ratelimit_remaining
        if remaining:
            label = "pulls left" if len(upstreams) == 1 else f"{upstream.key} pulls left"
            parts.append(f"{label} {remaining.split(';')[0]}")
    return parts


def server_tls(config: Config) -> ServerTLS | None:
    """The TLS of this configuration (None: plain HTTP), checked as serve needs it: StartupError
    for what stops it (check-config runs this too)."""
    if (problem := config.tls.client_auth_error()) is not None:
        raise StartupError(problem)
    if not config.tls.active:
        return None
    # imported only for TLS: cryptography costs about 14 MB of memory
    from dockermirror.service.tls import ServerTLS, TLSError

    try:
        return ServerTLS(config.tls.certificate, config.tls.key, public_hostname(config), client_auth(config))
    except TLSError as exc:
        raise StartupError(str(exc)) from None


def client_auth(config: Config) -> ClientAuth:
    from dockermirror.service.tls import ClientAuth

    tls = config.tls
    return ClientAuth(tls.client_auth, tls.client_ca_path, tls.crl)


def client_limits(server: ServerConfig, node: str = "") -> ClientLimits:
    """The protocol's limits; ``node`` names this node on the refusals it answers itself."""
    return ClientLimits(max_header_size=server.max_header_size, header_timeout=server.header_timeout,
                        send_timeout=server.send_timeout, node=node)


def _apply_server(uv_config: uvicorn.Config, server: ServerConfig) -> None:
    """uvicorn's own settings; each connection reads them when it is made."""
    uv_config.timeout_keep_alive = server.keepalive_timeout  # type: ignore[assignment]
    uv_config.limit_concurrency = server.max_connections or None
    uv_config.h11_max_incomplete_event_size = server.max_header_size   # (the self-check's fallback protocol)


def _keep_tls(new: Config, old: Config) -> Config:
    return dataclasses.replace(new, tls=old.tls)


class MirrorServer(uvicorn.Server):
    """uvicorn's server, telling the service when it is listening and when it is told to stop."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        except SystemExit:
            # uvicorn exits 3 when it cannot bind (it logged why): someone took the port after
            # the preflight check; said as that check says it (exit 2), not as an undocumented 3
            if self.lifespan.should_exit or sockets:
                raise
            host, port = self.config.host, self.config.port
            problem = preflight.listen_problem(host, port) or f"cannot listen on {host}:{port}; choose another port"
            raise StartupError(problem, key="listen") from None
        if self.started and not self.should_exit:
            if self.service.metrics_listener is not None:
                await self.service.metrics_listener.start()
            self.service.listening()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.service.metrics_listener is not None:
            await self.service.metrics_listener.stop()
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            self.service.stopping()
        super().handle_exit(sig, frame)


def serve(config: Config, reload_config: Callable[[], Config],
          reload_requested: Callable[[], bool] = lambda: False) -> int:
    service = Service(config, reload_config, reload_requested, check_listen=True)
    # many connections: the soft open-file limit raised to the hard one (:mod:`.fdlimit`); once the
    # configuration passed the checks (a mistake is one line, nothing else)
    if problem := fdlimit.raise_soft_limit(config.server.max_connections):
        log.warning("%s", problem)
    for loop in upstream_loops(config):
        log.warning("%s", loop)
    server = service.server()
    try:
        server.run(sockets=service.sockets or None)
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)   # the loop is gone: a late SIGHUP must not kill the exit
    return 0 if server.started else 1
