"""Debian's HAProxy and nginx for the tests, unpacked, never installed, never run as a service.

tests/run.sh unpacks ``haproxy`` (2.6, with the libraries it links that a Debian host without it
lacks: liblua5.3-0, libopentracing-c-wrapper0, libopentracing1) and ``nginx`` (1.22: the binary of
nginx-core; plus libnginx-mod-stream for TLS passthrough) into the test cache with
``tests/apt-ensure.sh --unpack``: installing either would start a server listening on every address
of the machine. Nothing here reads or writes /etc/haproxy or /etc/nginx: nginx gets ``-p``, ``-c``
and ``-e`` with a complete configuration of its own in the test's directory.

``Balancer(kind, config_text, workdir)`` runs one engine in the foreground with the given
configuration (for nginx: the file ``docker-mirror lb-config nginx`` prints — http context, or a
``stream {}`` block for passthrough — included from a main configuration written here), waits for
its listening port and is stopped by its PID.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.procs import Daemon, wait_until

CACHE = Path(os.environ.get("DM_TEST_CACHE", "/var/cache/docker-mirror-tests"))
HAPROXY_DIR = CACHE / "haproxy"
HAPROXY_PACKAGES = ("haproxy", "liblua5.3-0", "libopentracing-c-wrapper0", "libopentracing1")
NGINX_DIR = CACHE / "nginx"
NGINX_PACKAGES = ("nginx", "libnginx-mod-stream")


def _missing(directory: Path, packages: tuple[str, ...], binary: str) -> None:
    missing = [p for p in packages if not (directory / p / ".version").is_file()]
    if missing or not (directory / packages[0] / binary).is_file():
        pytest.fail(f"{packages[0]} is not unpacked: tests/run.sh unpacks {', '.join(missing or packages)} into "
                    f"{directory} (tests/apt-ensure.sh --unpack {directory}/PACKAGE PACKAGE)")


def haproxy_binary() -> str:
    """The unpacked /usr/sbin/haproxy (run it with ``haproxy_env()``); the test fails, saying how to unpack it, if it is missing."""
    _missing(HAPROXY_DIR, HAPROXY_PACKAGES, "usr/sbin/haproxy")
    return str(HAPROXY_DIR / "haproxy/usr/sbin/haproxy")


def haproxy_env() -> dict[str, str]:
    """The environment for the unpacked haproxy: LD_LIBRARY_PATH names the unpacked libraries."""
    libs = [str(HAPROXY_DIR / p / "usr/lib/x86_64-linux-gnu") for p in HAPROXY_PACKAGES[1:]]
    old = os.environ.get("LD_LIBRARY_PATH")
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(libs + ([old] if old else []))}


def nginx_binary() -> str:
    """The unpacked /usr/sbin/nginx; the test fails, saying how to unpack it, if it is missing."""
    _missing(NGINX_DIR, NGINX_PACKAGES, "usr/sbin/nginx")
    return str(NGINX_DIR / "nginx/usr/sbin/nginx")


def nginx_stream_module() -> str:
    """ngx_stream_module.so (Debian builds the stream module as a dynamic module)."""
    nginx_binary()
    return str(NGINX_DIR / "libnginx-mod-stream/usr/lib/nginx/modules/ngx_stream_module.so")


def is_stream_config(config_text: str) -> bool:
    """An nginx file for the main context (a ``stream {}`` block: passthrough), not for ``http {}``."""
    return re.search(r"^stream\s*\{", config_text, re.MULTILINE) is not None


def listen_port(config_text: str) -> int:
    """The port of the first ``bind``/``listen`` line of a configuration."""
    found = re.search(r"(?:^|[\s{;])(?:bind|listen)\s+\S*?:(\d+)\b", config_text)
    if found is None:
        raise ValueError("no bind/listen HOST:PORT line in the configuration")
    return int(found.group(1))


class Balancer(Daemon):
    """HAProxy (``kind="haproxy"``) or nginx (``kind="nginx"``) started by a test in ``workdir``
    with ``config_text``; ``port`` is the first ``bind``/``listen`` port of the text unless given.
    ``check()`` runs ``haproxy -c`` / ``nginx -t`` on the same files without starting anything."""

    def __init__(self, kind: str, config_text: str, workdir: Path, port: int | None = None) -> None:
        if kind not in ("haproxy", "nginx"):
            raise ValueError(f"unknown balancer {kind!r}")
        self.kind = kind
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else listen_port(config_text)
        self.config_text = config_text
        if kind == "haproxy":
            self.config_path = self.workdir / "haproxy.cfg"
            self.config_path.write_text(config_text)
            argv = [haproxy_binary(), "-db", "-f", str(self.config_path)]
            env = haproxy_env()
        else:
            self.config_path = self.workdir / "docker-mirror.conf"
            self.config_path.write_text(config_text)
            self.main_config = self.workdir / "nginx.conf"
            self.main_config.write_text(self._nginx_main())
            argv = [nginx_binary(), *self._nginx_args(), "-g", "daemon off;"]
            env = dict(os.environ)
        super().__init__(argv, self.workdir / f"{kind}.log", env=env)

    def _nginx_args(self) -> list[str]:
        return ["-p", f"{self.workdir}/", "-c", str(self.main_config), "-e", str(self.workdir / "error.log")]

    def _nginx_main(self) -> str:
        w = self.workdir
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (w / "temp" / sub).mkdir(parents=True, exist_ok=True)
        lines = [f"pid {w}/nginx.pid;", f"error_log {w}/error.log info;", "worker_processes 1;"]
        if is_stream_config(self.config_text):
            lines += [f"load_module {nginx_stream_module()};", "events { worker_connections 512; }",
                      f"include {self.config_path};"]
        else:
            lines += ["events { worker_connections 512; }", "http {",
                      *(f"    {kind}_temp_path {w}/temp/{sub};" for kind, sub in
                        (("client_body", "body"), ("proxy", "proxy"), ("fastcgi", "fastcgi"),
                         ("uwsgi", "uwsgi"), ("scgi", "scgi"))),
                      f"    access_log {w}/access.log;", f"    include {self.config_path};", "}"]
        return "\n".join(lines) + "\n"

    def check(self) -> subprocess.CompletedProcess:
        """``haproxy -c -f CFG`` or ``nginx -t`` on this configuration (output in stdout+stderr)."""
        if self.kind == "haproxy":
            argv = [haproxy_binary(), "-c", "-f", str(self.config_path)]
        else:
            argv = [nginx_binary(), *self._nginx_args(), "-t"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=self.env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listening(self) -> bool:
        if not self.running():
            return True   # reported below
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def start(self) -> None:
        super().start()
        wait_until(self._listening, 30, interval=0.05, what=f"{self.kind} listening on 127.0.0.1:{self.port}")
        if not self.running():
            raise RuntimeError(f"{self.kind} did not start:\n{self.log_text()[-3000:]}{self.error_log()[-3000:]}")

    def error_log(self) -> str:
        path = self.workdir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> Balancer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["Balancer", "haproxy_binary", "haproxy_env", "nginx_binary", "nginx_stream_module",
           "is_stream_config", "listen_port"]
