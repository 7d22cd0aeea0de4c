"""Where the tests find Debian's prometheus and promtool: unpacked by tests/run.sh into the test
cache (``tests/apt-ensure.sh --unpack``; installing the package would start a prometheus.service
listening on every address of the machine), else on PATH."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.procs import Daemon, free_port, wait_until

UNPACKED = Path(os.environ.get("DM_TEST_CACHE", "/var/cache/docker-mirror-tests")) / "prometheus" / "usr" / "bin"


def binary(name: str) -> str:
    """The path of ``prometheus`` or ``promtool``; the test fails, saying how to get it, if neither place has it."""
    found = shutil.which(name, path=f"{UNPACKED}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail(f"{name} is missing: tests/run.sh unpacks Debian's prometheus package into {UNPACKED.parent} "
                    f"(tests/apt-ensure.sh --unpack {UNPACKED.parent.parent} prometheus)")
    return found


class Prometheus(Daemon):
    """A Prometheus server started by a test: the binary (never the package's systemd service),
    with a configuration, a storage directory and a loopback port of its own; it scrapes
    ``targets`` (``host:port``, path /metrics) every ``interval`` as job ``mirror``. Stopped by
    its PID like every daemon the tests start (tests/support/procs.py)."""

    def __init__(self, workdir: Path, targets: list[str], interval: str = "1s") -> None:
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump({
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": "1m"},
            "scrape_configs": [{"job_name": "mirror", "static_configs": [{"targets": targets}]}],
        }))
        (workdir / "data").mkdir(exist_ok=True)
        super().__init__([binary("prometheus"), f"--config.file={self.config_path}",
                          f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                          "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                         workdir / "prometheus.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        super().start()

        def ready() -> bool:
            try:
                return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return not self.running()

        wait_until(ready, 60, what="prometheus ready")
        if not self.running():
            raise RuntimeError(f"prometheus did not start:\n{self.log_text()[-3000:]}")

    def query(self, expression: str) -> list[dict]:
        """The instant vector of ``expression`` (``/api/v1/query``): [{"metric": {...}, "value": [t, "v"]}]."""
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expression}, timeout=10).json()
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def scraped_after(self, moment: float, timeout: float = 30) -> None:
        """Wait until every target was scraped successfully after ``moment`` (wall-clock seconds)."""

        def done() -> bool:
            result = self.query('timestamp(up{job="mirror"}) and up{job="mirror"} == 1')
            return bool(result) and all(float(r["value"][1]) > moment for r in result)

        wait_until(done, timeout, interval=0.2, what="a scrape after the pulls")
