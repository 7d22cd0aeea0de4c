"""The two mirrors under test, each a real process with its own cache directory.

Both are built on the test suite's process wrappers (started and stopped by PID).
A server knows where a cached blob lands on its disk, so the benchmark can tell
when a download has settled, and can be restarted with an empty cache.
docker-mirror runs from a snapshot of its source taken at the start, so every
restart runs the same code even if the working tree changes during the run.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import yaml

from tests.support.certs import TestPKI
from tests.support.procs import Mirror, Registry


class Reference(Registry):
    """CNCF Distribution (Debian's docker-registry) as a pull-through cache of ``upstream``."""

    label = "reference"

    def __init__(self, workdir: Path, upstream: str, pki: TestPKI | None = None,
                 upstream_ca: Path | None = None) -> None:
        """``upstream_ca``: a CA file the upstream's certificate is checked against (Go reads
        SSL_CERT_FILE instead of the system's CAs)."""
        super().__init__(workdir, tls=(pki.certificate, pki.key) if pki else None)
        config_path = Path(self.argv[-1])
        config = yaml.safe_load(config_path.read_text())
        config["proxy"] = {"remoteurl": upstream}
        config_path.write_text(yaml.safe_dump(config))
        if upstream_ca:
            self.env = {**os.environ, "SSL_CERT_FILE": str(upstream_ca)}

    def blob_file(self, digest: str) -> Path:
        algorithm, hexdigest = digest.split(":")
        return self.storage / "docker/registry/v2/blobs" / algorithm / hexdigest[:2] / hexdigest / "data"

    def wipe(self) -> None:
        shutil.rmtree(self.storage)
        self.storage.mkdir()


def snapshot(package: Path, dest: Path) -> Path:
    """Copy the ``package`` directory into ``dest``; return ``dest`` (a PYTHONPATH entry)."""
    shutil.copytree(package, dest / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


class DockerMirror(Mirror):
    """docker-mirror, ``python -m dockermirror serve --config FILE``, caching without limits,
    its code imported from ``source`` (a :func:`snapshot`). ``upstreams`` (sections of the
    ``upstreams:`` list, the default first) replaces the one ``upstream`` URL; ``upstream_ca``
    is that upstream's ``ca_bundle``; ``server`` is the ``server:`` section."""

    label = "docker-mirror"

    def __init__(self, workdir: Path, upstream: str, source: Path, pki: TestPKI | None = None,
                 upstreams: list[dict] | None = None, upstream_ca: Path | None = None,
                 server: dict | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        section = {"url": upstream, **({"ca_bundle": str(upstream_ca)} if upstream_ca else {})}
        config: dict = {**({"upstreams": upstreams} if upstreams else {"upstream": section}),
                        "cache": {"dir": str(workdir / "cache"), "max_size": "100%", "min_free": 0}}
        if pki:
            config["tls"] = {"certificate": str(pki.certificate), "key": str(pki.key)}
        if server:
            config["server"] = server
        super().__init__(workdir, config, name="docker-mirror")
        # -P: no working directory on sys.path, so PYTHONPATH's copy wins over the clone's
        self.argv = [sys.executable, "-P", *self.argv[1:]]
        self.env = {**(self.env or {}), "PYTHONPATH": str(source)}

    def wipe(self) -> None:
        shutil.rmtree(self.cache_dir, ignore_errors=True)


Server = Reference | DockerMirror


def restart_empty(server: Server) -> None:
    """A cold start: stop the process, delete its cache, start it again."""
    server.stop()
    server.wipe()
    server.start()
