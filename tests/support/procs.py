"""Processes the tests start: the upstream registry, the mirror, client daemons.

Each is stopped by the PID we recorded, SIGTERM first, SIGKILL if it lingers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


# Each daemon gets SIGTERM when the test process dies, however it dies (even kill -9).
PDEATHSIG = ["setpriv", "--pdeathsig", "TERM", "--"]


class Daemon:
    """A background process with its output in a log file.

    It runs in a session of its own (a Ctrl-C at the terminal goes to pytest, whose clean-up
    stops it by PID) and is sent SIGTERM if pytest itself dies first.
    """

    def __init__(self, argv: list[str], log_path: Path, env: dict | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([*PDEATHSIG, *self.argv], stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        code = stop_process(self.proc) if self.proc is not None else None
        if getattr(self, "_log", None):
            self._log.close()
        return code

    def kill(self) -> None:
        if self.running():
            self.proc.kill()
            self.proc.wait(5)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Registry(Daemon):
    """CNCF Distribution (Debian's docker-registry) on a loopback port."""

    def __init__(self, workdir: Path, storage: Path | None = None, port: int | None = None,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.storage = storage or workdir / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        config = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": f"127.0.0.1:{self.port}"},
            "health": {"storagedriver": {"enabled": False}},
        }
        if tls:
            config["http"]["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
        self.scheme = "https" if tls else "http"
        config_path = workdir / f"registry-{self.port}.yml"
        config_path.write_text(yaml.safe_dump(config))
        super().__init__([REGISTRY_BIN, "serve", str(config_path)], workdir / f"registry-{self.port}.log")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}"

    def start(self) -> None:
        super().start()
        wait_until(lambda: _answers(f"{self.url}/v2/", verify=False) or not self.running(), 60,
                   what=f"registry on {self.address}")
        if not self.running():
            raise RuntimeError(f"registry did not start:\n{self.log_text()[-2000:]}")

    def mark(self) -> int:
        """A position in the access log; count requests after it."""
        return len(self.log_text().splitlines())

    def requests(self, since: int = 0, method: str | None = None, path: str | None = None) -> list[str]:
        """Access-log request lines ``METHOD PATH`` after ``since``; ``path`` is a regex."""
        found = []
        for line in self.log_text().splitlines()[since:]:
            m = re.search(r'"(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d+)', line)
            if not m or (method and m.group(1) != method) or (path and not re.search(path, m.group(2))):
                continue
            found.append(f"{m.group(1)} {m.group(2)}")
        return found


def _answers(url: str, verify=True) -> bool:
    try:
        httpx.get(url, timeout=1, verify=verify)
        return True
    except httpx.HTTPError:
        return False


class Mirror(Daemon):
    """docker-mirror started as a real server process from a config file."""

    def __init__(self, workdir: Path, config: dict, name: str = "mirror") -> None:
        self.port = free_port()
        self.workdir = workdir
        config = {"listen": f"127.0.0.1:{self.port}", "tls": {"enabled": False}, **config}
        config.setdefault("cache", {}).setdefault("dir", str(workdir / f"{name}-cache"))
        self.config = config
        self.cache_dir = Path(config["cache"]["dir"])
        self.config_path = workdir / f"{name}.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.tls = bool(config.get("tls", {}).get("certificate"))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        super().__init__([sys.executable, "-m", "dockermirror", "serve", "--config", str(self.config_path)],
                         workdir / f"{name}.log", env=env)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}"

    def start(self, wait: bool = True) -> None:
        offset = len(self.log_text())
        super().start()
        if wait:
            # "serving" is logged once the socket listens (uvicorn's "Application startup complete"
            # comes before it binds: a connection then could be refused)
            wait_until(lambda: " dockermirror: serving " in self.log_text()[offset:] or not self.running(),
                       60, what="mirror startup")
            if not self.running():
                raise RuntimeError(f"mirror did not start:\n{self.log_text()[-3000:]}")

    def restart(self) -> None:
        self.stop()
        self.start()

    def access_lines(self, pattern: str = "", at_least: int = 1) -> list[str]:
        """Request-log lines matching ``pattern``; waits a moment for ``at_least`` of them
        (a request's line is written just after its response)."""

        def lines() -> list[str]:
            return [line for line in self.log_text().splitlines() if " access: " in line and re.search(pattern, line)]

        try:
            return wait_until(lambda: len(lines()) >= at_least and lines(), 5, what=f"{at_least} log lines")
        except TimeoutError:
            return lines()

    def blob_file(self, digest: str) -> Path:
        algorithm, hexdigest = digest.split(":")
        return self.cache_dir / "blobs" / algorithm / hexdigest[:2] / hexdigest

    def committed_blob(self, digest: str, timeout: float = 30) -> bytes:
        """The cached file's bytes, once the transfer has committed it (a response ends when the
        client has its bytes; the fsync and rename into blobs/ follow a moment later)."""
        path = self.blob_file(digest)
        wait_until(path.exists, timeout, what=f"{digest} committed to {path.parent}")
        return path.read_bytes()

    def client(self, ca: Path | None = None, **kwargs) -> httpx.Client:
        verify = ssl.create_default_context(cafile=ca) if ca else True
        return httpx.Client(base_url=self.url, verify=verify, timeout=60, **kwargs)


def background_download(url: str, timeout: float = 120) -> tuple[threading.Thread, dict[str, object]]:
    """GET ``url`` in a thread (started), hashing the body as it comes: once the thread ends, the
    dict holds the response's ``status`` and the body's ``digest`` (sha256:...)."""
    result: dict[str, object] = {}

    def download() -> None:
        digest = hashlib.sha256()
        with httpx.stream("GET", url, timeout=timeout) as response:
            result["status"] = response.status_code
            for chunk in response.iter_bytes():
                digest.update(chunk)
        result["digest"] = "sha256:" + digest.hexdigest()

    thread = threading.Thread(target=download, daemon=True)
    thread.start()
    return thread, result


@contextlib.contextmanager
def running(daemon: Daemon) -> Iterator[Daemon]:
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
