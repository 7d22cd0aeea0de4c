"""The settings a reload cannot change, and which of them a reload would change.

A reload compares the file with what this process runs with (taken once, at the start), not
with the file read at the previous reload: a second reload still names a change that waits for
a restart, and a file changed back names nothing. These need a restart:

* ``listen`` (not with socket activation: systemd owns the address then),
* ``metrics.listen`` (its socket is bound at the start),
* ``cache.dir`` (the cache is locked and open),
* ``tls.enabled`` (whether the server speaks TLS at all; a new certificate, key, client CA or
  CRL is loaded on reload),
* ``log.journal_fields`` (how records reach the journal).
"""

from __future__ import annotations

from dockermirror.config import Config

KEYS = ("listen", "metrics.listen", "cache.dir", "tls.enabled", "log.journal_fields")


def settings(config: Config, *, tls: bool | None = None, socket_activated: bool = False) -> dict[str, str]:
    """The restart-only settings of ``config`` as shown in a log line; ``tls``: whether TLS is
    in use (the running server's), else whether ``config`` would use it."""
    values = {
        "listen": config.listen,
        "metrics.listen": config.metrics.listen or "(off)",
        "cache.dir": str(config.cache.dir),
        "tls.enabled": "on" if (config.tls.active if tls is None else tls) else "off",
        "log.journal_fields": "true" if config.log.journal_fields else "false",
    }
    if socket_activated:
        del values["listen"]
    return values


def pending(running: dict[str, str], configured: dict[str, str]) -> list[str]:
    """``listen (running 0.0.0.0:5000, configured 127.0.0.1:6000)`` for each setting that differs."""
    return [f"{key} (running {running[key]}, configured {configured[key]})"
            for key in KEYS if key in running and running[key] != configured.get(key, running[key])]
