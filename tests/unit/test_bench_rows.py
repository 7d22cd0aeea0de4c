"""bench's rows of issue 15 without running the benchmark: the targets with an absolute bound
(share of the ceiling, RSS growth, wrk with/without), the pairs of servers the new scenarios run
on and how they are configured, and the idle connections it holds (against an in-process
HTTP/1.1 server on loopback)."""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from bench import report
from bench.__main__ import LONG_KEEPALIVE, make_pair
from bench.clients import BenchError
from bench.harness import Rounds
from bench.idle import Held, raise_nofile
from bench.monitor import Usage
from bench.scenarios import IDLE, SCENARIOS, Sample
from tests.support import certs
from tests.support.procs import Registry


def rounds(*metrics: dict[str, float]) -> Rounds:
    r = Rounds()
    for m in metrics:
        r.samples.append(Sample(m, 1000))
        r.usage.append(Usage(peak_rss=1 << 20, cpu=0.1))
    return r


def row(table: str, title: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {title}"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_share_of_the_ceiling_is_docker_mirrors_own_value_not_a_ratio_to_the_reference():
    results = {"warm": {
        report.MIRROR: rounds({"MB/s": 2700, "ceiling MB/s": 3000, "of ceiling": 0.9},
                              {"MB/s": 2400, "ceiling MB/s": 3000, "of ceiling": 0.8},
                              {"MB/s": 2850, "ceiling MB/s": 3000, "of ceiling": 0.95}),
        report.REFERENCE: rounds(*[{"MB/s": 3000, "ceiling MB/s": 3000, "of ceiling": 1.0}] * 3)}}
    cells = row(report.targets_table(results, 300), "warm GET, share of the ceiling")
    assert cells[1:] == ["0.9", "1", "0.90", ">= 0.9 (reference: 1)", "PASS"]     # median 0.9, ratio 0.9 < 1
    results["warm"][report.MIRROR] = rounds({"MB/s": 2600, "ceiling MB/s": 3000, "of ceiling": 0.87})
    assert row(report.targets_table(results, 300), "warm GET, share of the ceiling")[-1] == "MISS"


def idle_results(growth: float, held: float, still_open: int) -> report.Results:
    def metrics(growth: float, held: float, still_open: int) -> dict[str, float]:
        return {"RSS growth MiB": growth, "req/s without": 1000, "req/s held": 1000 * held,
                "held / without": held, "held still open": still_open}
    return {"idle": {report.MIRROR: rounds(metrics(growth, held, still_open)),
                     report.REFERENCE: rounds(metrics(20, 1.0, IDLE))}}


def test_idle_rows_bound_rss_growth_keep_the_wrk_row_and_check_every_connection_stayed_open():
    table = report.targets_table(idle_results(12.5, 0.97, IDLE), 300)
    assert row(table, "1,000 idle keep-alive connections, RSS growth, MiB")[1:] == [
        "12.5", "20", "0.62", "<= 50 (reference: 20)", "PASS"]
    assert row(table, "32 clients while 1,000 idle connections are held")[-2:] == [">= 0.9 (reference: 1)", "PASS"]
    assert row(table, "idle connections still open")[-2:] == ["= 1000 (reference: 1,000)", "PASS"]
    table = report.targets_table(idle_results(51, 0.8, IDLE - 1), 300)
    assert [row(table, title)[-1] for title in ("1,000 idle", "32 clients while", "idle connections still")] == [
        "MISS"] * 3


def test_new_scenarios_run_on_their_own_pairs_of_servers():
    assert SCENARIOS["cold-tls"].pair == "http-tls-upstream" and SCENARIOS["cold-tls"].cold
    assert SCENARIOS["idle"].pair == "http-long-keepalive" and SCENARIOS["idle"].fresh and not SCENARIOS["idle"].cold
    assert SCENARIOS["many"].pair == "http" and SCENARIOS["many"].cold
    assert SCENARIOS["warm"].pair == "http" and SCENARIOS["warm-tls"].pair == "tls"


def test_pairs_trust_the_tls_upstream_through_the_ca_and_keep_idle_connections(tmp_path: Path):
    pki = certs.TestPKI(tmp_path / "ca.crt", tmp_path / "server.crt", tmp_path / "server.key", tmp_path / "certs.d")
    upstream = Registry(tmp_path / "up")
    upstream_tls = Registry(tmp_path / "up-tls", storage=upstream.storage, tls=(pki.certificate, pki.key))

    mirror, reference = make_pair("http-tls-upstream", tmp_path, tmp_path / "src", upstream, upstream_tls, pki)
    assert mirror.config["upstream"] == {"url": upstream_tls.url, "ca_bundle": str(pki.ca)}
    assert upstream_tls.url.startswith("https://") and "server" not in mirror.config
    assert reference.env["SSL_CERT_FILE"] == str(pki.ca)
    assert yaml.safe_load(Path(reference.argv[-1]).read_text())["proxy"] == {"remoteurl": upstream_tls.url}

    mirror, reference = make_pair("http-long-keepalive", tmp_path, tmp_path / "src", upstream, None, pki)
    assert mirror.config["server"] == {"keepalive_timeout": LONG_KEEPALIVE}
    assert mirror.config["upstream"] == {"url": upstream.url} and reference.env is None
    assert not mirror.url.startswith("https")


class Small(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[tuple[ThreadingHTTPServer, int]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def keepalive_server() -> Iterator[tuple[ThreadingHTTPServer, int]]:
    yield from serving(Small)


class ClosesWhenIdle(Small):
    timeout = 0.2     # the handler's socket timeout: an idle connection is closed after it


@pytest.fixture
def impatient_server() -> Iterator[tuple[ThreadingHTTPServer, int]]:
    yield from serving(ClosesWhenIdle)


def test_held_connections_answer_at_the_end_on_the_same_sockets(keepalive_server):
    server, port = keepalive_server
    with Held("127.0.0.1", port, "/v2/", 20) as held:
        sockets = [conn.sock for conn in held.conns]
        assert held.answering() == 20
        assert [conn.sock for conn in held.conns] == sockets      # no reconnect behind our back
    assert held.conns == []


def test_connections_the_server_closed_while_idle_are_not_counted(impatient_server):
    server, port = impatient_server
    with Held("127.0.0.1", port, "/v2/", 5) as held:
        time.sleep(0.6)
        assert held.answering() == 0


def test_a_server_that_will_not_keep_the_connection_fails_the_row():
    class OneShot(Small):
        protocol_version = "HTTP/1.0"
    gen = serving(OneShot)
    _, port = next(gen)
    try:
        with pytest.raises(BenchError, match="closes the connection"):
            Held("127.0.0.1", port, "/v2/", 3)
    finally:
        gen.close()


def test_the_bench_raises_its_open_files_limit_to_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if soft == hard and soft > 64:
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        assert raise_nofile() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_warm_compares_each_download_with_the_ceiling_download_right_after_it(monkeypatch, tmp_path: Path):
    from bench import scenarios
    from bench.clients import Download
    from bench.seed import Blob, Content

    big = Blob("library/big", "sha256:" + "a" * 64, 3000, tmp_path / "big")
    # (server MB/s, ceiling MB/s) per pair: ratios 0.5, 1, 0.9, 2, 0.8, 1.2, 1.14 -> median 1.0
    # (the ratio of the medians, 2850 / 2500, would be 1.14); every other pair the ceiling goes first
    speeds = iter([1000, 2000, 3000, 3000, 2700, 3000, 2000, 4000, 2400, 3000, 2500, 3000, 2850, 2500])
    urls = []

    def fake_curl(url: str, size: int, cacert: Path | None = None) -> Download:
        urls.append(url)
        return Download(size / (next(speeds) * 1e6), size)

    monkeypatch.setattr(scenarios, "curl", fake_curl)
    setup = scenarios.Setup(None, Content(big, big, "library/layered:latest", {}), None, tmp_path, 1,
                            ceiling="http://127.0.0.1:9/blob")

    class Plain:
        url = "http://127.0.0.1:8"

    sample = scenarios.warm_ceiling(setup, Plain())
    mine, top = Plain.url + big.path(), setup.ceiling
    assert urls == [mine, top, top, mine, mine, top, top, mine, mine, top, top, mine, mine, top]
    assert sample.metrics == {"MB/s": pytest.approx(2850), "ceiling MB/s": pytest.approx(2500),
                              "of ceiling": pytest.approx(1.0)}
    assert sample.served == 3000 * scenarios.TRIES


def test_a_fresh_scenario_gets_a_new_process_each_round_with_its_cache_kept(tmp_path: Path):
    import os

    from bench import harness
    from bench.monitor import Monitor
    from bench.scenarios import Scenario

    class FakeServer:
        def __init__(self, label: str) -> None:
            self.label, self.pid, self.calls = label, os.getpid(), []

        def stop(self) -> None:
            self.calls.append("stop")

        def wipe(self) -> None:
            self.calls.append("wipe")

        def start(self) -> None:
            self.calls.append("start")

    def measure(setup, server) -> Sample:
        server.calls.append("measure")
        return Sample({"x": 1.0}, 1)

    for flags, expected in (({"fresh": True}, ["stop", "start", "measure"] * 2),
                            ({"cold": True}, ["stop", "wipe", "start", "measure"] * 2),
                            ({}, ["measure"] * 2)):
        servers = [FakeServer(report.MIRROR), FakeServer(report.REFERENCE)]
        with Monitor() as monitor:
            results = harness.run(Scenario("s", "t", measure, **flags), servers, None, 2, monitor)
        assert [s.calls for s in servers] == [expected, expected]
        assert len(results[report.MIRROR].samples) == 2
