"""Run the mirror under uvicorn."""

from __future__ import annotations

import logging
import sqlite3

import uvicorn

from dockermirror.app import DockerMirror
from dockermirror.cache import CacheBusy
from dockermirror.cache.index import ForeignDatabase
from dockermirror.config import Config
from dockermirror.service.tls import TLSError, server_context

log = logging.getLogger("dockermirror")


class StartupError(Exception):
    """The mirror cannot start; the message says why."""


def build(config: Config) -> tuple[DockerMirror, uvicorn.Server]:
    """Everything a server needs, checked before any socket is bound."""
    ssl_context = None
    if config.tls.enabled:
        try:
            ssl_context = server_context(config.tls.certificate, config.tls.key)
        except TLSError as exc:
            raise StartupError(str(exc)) from None
    app = DockerMirror(config)
    try:
        app.open()
    except CacheBusy as exc:
        raise StartupError(str(exc)) from None
    except (OSError, sqlite3.Error, ForeignDatabase) as exc:
        detail = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise StartupError(f"cannot open the cache in {config.cache.dir}: {detail}") from None
    host, port = config.listen_address
    uv_config = uvicorn.Config(
        app.asgi,
        host=host,
        port=port,
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=30,
    )
    uv_config.load()
    uv_config.ssl = ssl_context
    return app, uvicorn.Server(uv_config)


def serve(config: Config) -> int:
    _app, server = build(config)
    log.info("listening on %s (%s)", config.listen, "TLS" if config.tls.enabled else "plain HTTP")
    server.run()
    return 0 if server.started else 1
