"""Metrics as an operator's Prometheus sees them: a real mirror process with metrics.listen on
loopback, scraped every second by a real Prometheus server (Debian's package, started here),
after three pulls by skopeo; the counters Prometheus stored are what the clients received.
`promtool check metrics` passes on the text the mirror serves."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Upstream
from tests.support.clients import skopeo_copy
from tests.support.procs import free_port
from tests.support.prometheus import Prometheus, binary


@pytest.fixture
def prometheus_for(tmp_path: Path):
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        server = Prometheus(tmp_path / f"prometheus{len(started)}", [target])
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


def received(directory: Path) -> tuple[int, int]:
    """(files, bytes) a ``dir:`` copy holds: the manifest and every blob, as the client got them."""
    files = [p for p in directory.iterdir() if p.name != "version"]
    return len(files), sum(p.stat().st_size for p in files)


def value(prometheus: Prometheus, expression: str) -> float:
    result = prometheus.query(expression)
    assert len(result) == 1, (expression, result)
    return float(result[0]["value"][1])


def test_prometheus_stores_what_the_clients_received(make_mirror, prometheus_for, upstream: Upstream,
                                                     tmp_path: Path):
    metrics_port = free_port()
    mirror = make_mirror(metrics={"listen": f"127.0.0.1:{metrics_port}"})
    prometheus = prometheus_for(f"127.0.0.1:{metrics_port}")
    hello, tool = upstream.seeded["hello"], upstream.seeded["tool"]
    pulls = [("cold", hello), ("warm", hello), ("cold", tool)]
    copies = []
    for i, (_, image) in enumerate(pulls):
        copies.append(received(skopeo_copy(f"{mirror.address}/{image.repo}:{image.tag}", tmp_path / f"pull{i}")))
        if i == 0:      # the next pull reads what the first stored
            for path in (tmp_path / "pull0").iterdir():
                if len(path.name) == 64:
                    mirror.committed_blob(f"sha256:{path.name}")
    finished = time.time()
    prometheus.scraped_after(finished)

    manifests_and_blobs = 'docker_mirror_requests_total{kind=~"manifest|blob",method="GET",status_class="2xx"'
    # every manifest and blob the clients got is one request, by how it was served
    assert value(prometheus, f'sum({manifests_and_blobs},cache="miss"}})') == copies[0][0] + copies[2][0]
    assert value(prometheus, f'sum({manifests_and_blobs},cache="hit"}})') == copies[1][0]
    assert value(prometheus, f'sum({manifests_and_blobs}}})') == sum(files for files, _ in copies)
    # ... and the bytes sent by cache result are the bytes they hold
    assert value(prometheus, 'docker_mirror_sent_bytes_total{cache="miss"}') == copies[0][1] + copies[2][1]
    assert value(prometheus, 'docker_mirror_sent_bytes_total{cache="hit"}') == copies[1][1]
    assert value(prometheus, 'docker_mirror_saved_bytes_total{upstream="docker.io"}') == copies[1][1]
    assert value(prometheus, 'docker_mirror_pulls_saved_total{upstream="docker.io"}') == 1
    # the upstream sent the two cold pulls' bytes, once
    assert value(prometheus, 'docker_mirror_upstream_received_bytes_total{upstream="docker.io"}') == \
        copies[0][1] + copies[2][1]
    assert value(prometheus, 'docker_mirror_upstream_up{upstream="docker.io"}') == 1
    assert value(prometheus, "docker_mirror_cache_entries") == copies[0][0] + copies[2][0]
    # series that exist from start, at 0
    assert value(prometheus, 'docker_mirror_requests_total{kind="referrers",method="HEAD",status_class="5xx",'
                             'cache="stale"}') == 0
    assert value(prometheus, 'docker_mirror_verification_failures_total{where="download"}') == 0
    assert value(prometheus, 'docker_mirror_build_info') == 1

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    lint = subprocess.run([binary("promtool"), "check", "metrics"], input=text, capture_output=True, text=True,
                          timeout=60)
    assert lint.returncode == 0 and lint.stdout + lint.stderr == "", lint.stdout + lint.stderr
    # and never on the registry's port
    assert httpx.get(f"{mirror.url}/metrics", timeout=10).status_code == 404


def test_the_metrics_port_has_the_registry_port_s_limits_on_slow_clients(make_mirror):
    """The metrics listener may face a network: a client that does not finish its request head
    within server.header_timeout gets 408 and is closed, as on the registry's port; meanwhile
    a scrape is answered."""
    metrics_port = free_port()
    make_mirror(metrics={"listen": f"127.0.0.1:{metrics_port}"}, server={"header_timeout": "2s"})
    with socket.create_connection(("127.0.0.1", metrics_port)) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).status_code == 200
        slow.settimeout(30)
        answer = b""
        while chunk := slow.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer[:100]
