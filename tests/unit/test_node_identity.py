"""Issue 14, one node of several: ``node:`` (the node's name in the request log, a response
header, /metrics and the journal) and ``server.trusted_proxies`` (X-Forwarded-For believed only
from a load balancer: api/forwarded.py)."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import httpx
import pytest

from dockermirror import config as configuration
from dockermirror.api.accesslog import RequestDone
from dockermirror.api.forwarded import Malformed, client_of
from dockermirror.app import DockerMirror
from dockermirror.service.journal import request_fields
from tests.unit.conftest import config_text
from tests.unit.fakes import FakeClock, FakeRegistry

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _app(tmp_path: Path, extra: str, registry: FakeRegistry | None = None) -> DockerMirror:
    return DockerMirror(configuration.loads(config_text(tmp_path / "cache", extra)), clock=FakeClock(),
                        upstream_transport=(registry or FakeRegistry()).transport)


def _client(app: DockerMirror, peer: str = "192.0.2.7") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app.asgi, client=(peer, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://mirror.test")


def _access(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dockermirror.access"]


# --- node:


@pytest.mark.parametrize("value, expected", [("web-1", "web-1"), ("mirror_2.dc-a", "mirror_2.dc-a"), ('""', ""),
                                             ("7", "7"), ("a" * 63, "a" * 63)])
def test_a_node_name_is_a_short_label(value, expected) -> None:
    assert configuration.loads(f"node: {value}\n").node == expected
    assert configuration.loads("listen: 127.0.0.1:5000\n").node == ""


@pytest.mark.parametrize("value", ['"web 1"', "a/b", '"x\\ny"', "a" * 64, "[a]", "true", '"név"'])
def test_a_bad_node_name_is_one_line_with_file_and_line(value) -> None:
    with pytest.raises(configuration.ConfigError) as raised:
        configuration.loads(f"listen: 127.0.0.1:5000\nnode: {value}\n", source="c.yml")
    assert "c.yml:2" in str(raised.value) and "node" in str(raised.value) and "\n" not in str(raised.value)


async def test_every_response_and_log_line_names_the_node(tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG, "dockermirror.access")     # /healthz is logged at debug
    registry = FakeRegistry()
    image = registry.push("library/hello", "latest")
    app = _app(tmp_path, "node: web-1\n", registry)
    done: list[RequestDone] = []
    app.request_observers.append(done.append)
    async with app.running(), _client(app) as client:
        ok = await client.get("/v2/library/hello/manifests/latest", headers={"Accept": image.media_type})
        missing = await client.get("/v2/library/nothing/manifests/latest")
        blob = await client.head(f"/v2/library/hello/blobs/{image.layer}")
        health = await client.get("/healthz")
    assert ok.status_code == 200 and missing.status_code == 404 and blob.status_code == 200
    for response in (ok, missing, blob, health):
        assert response.headers["docker-mirror-node"] == "web-1"
    lines = _access(caplog)
    assert len(lines) == 4 and all(line.endswith(" node=web-1") for line in lines), lines
    assert [d.node for d in done] == ["web-1"] * 4
    assert ("DOCKER_MIRROR_NODE", "web-1") in request_fields(done[0])


async def test_without_a_node_name_nothing_says_one(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, "dockermirror.access")
    app = _app(tmp_path, "")
    done: list[RequestDone] = []
    app.request_observers.append(done.append)
    async with app.running(), _client(app) as client:
        response = await client.get("/v2/")
    assert "docker-mirror-node" not in response.headers
    assert "node=" not in _access(caplog)[0]
    assert not any(name == "DOCKER_MIRROR_NODE" for name, _ in request_fields(done[0]))


async def test_a_reload_applies_a_new_node_name(tmp_path) -> None:
    app = _app(tmp_path, "node: web-1\n")
    async with app.running(), _client(app) as client:
        before = await client.get("/v2/")
        app.reconfigure(configuration.loads(config_text(tmp_path / "cache", "node: web-2\n")))
        after = await client.get("/v2/")
        app.reconfigure(configuration.loads(config_text(tmp_path / "cache")))
        none = await client.get("/v2/")
    assert before.headers["docker-mirror-node"] == "web-1"
    assert after.headers["docker-mirror-node"] == "web-2"
    assert "docker-mirror-node" not in none.headers


def test_metrics_have_the_node_name_as_node_info() -> None:
    from dockermirror.service.metrics import Metrics

    metrics = Metrics()
    assert b"docker_mirror_node_info{" not in metrics.exposition()
    metrics.set_node("web-1")
    assert b'docker_mirror_node_info{node="web-1"} 1.0' in metrics.exposition()
    metrics.set_node("web-2")        # a reload renamed the node: one series, the new name
    text = metrics.exposition()
    assert b'docker_mirror_node_info{node="web-2"} 1.0' in text and b'node="web-1"' not in text
    metrics.set_node("")
    assert b"docker_mirror_node_info" not in metrics.exposition()


def test_node_info_is_the_optional_series_the_monitoring_contract_names() -> None:
    """What /metrics adds with node: is what tests/support/monitoring.py lists as OPTIONAL (the
    shipped dashboard and alerts may use it; the defaults' /metrics, checked in test_metrics, lack it)."""
    from prometheus_client.parser import text_string_to_metric_families

    from dockermirror.service.metrics import Metrics
    from tests.support.monitoring import OPTIONAL

    metrics = Metrics()
    without = {f.name for f in text_string_to_metric_families(metrics.exposition().decode())}
    metrics.set_node("web-1")
    added = {f.name: (f.type, {k for s in f.samples for k in s.labels})
             for f in text_string_to_metric_families(metrics.exposition().decode()) if f.name not in without}
    assert added == {f"docker_mirror_{name}": (kind, set(labels)) for name, (kind, labels) in OPTIONAL.items()}


# --- server.trusted_proxies: the client's address


NETS = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "fd00::/64", "192.0.2.7/32")]


@pytest.mark.parametrize("peer, forwarded, client", [
    # from an untrusted peer the header means nothing
    ("198.51.100.1", ["203.0.113.9"], "198.51.100.1"),
    # a trusted proxy: the right-most address that is not a trusted proxy
    ("10.0.0.1", ["203.0.113.9"], "203.0.113.9"),
    ("10.0.0.1", ["203.0.113.9, 10.0.0.2"], "203.0.113.9"),
    ("10.0.0.1", ["203.0.113.9", "10.0.0.2"], "203.0.113.9"),      # two header lines: one list
    # what the client wrote itself (left of an untrusted address) is never reached
    ("10.0.0.1", ["10.9.9.9, 198.51.100.4, 10.0.0.2"], "198.51.100.4"),
    # every address a trusted proxy: the left-most
    ("10.0.0.1", ["10.0.0.3, 10.0.0.2"], "10.0.0.3"),
    # no header from a trusted proxy (a health check): the proxy
    ("10.0.0.1", [], "10.0.0.1"),
    # IPv6, bracketed and with ports, IPv4-mapped peers
    ("fd00::1", ["2001:db8::5"], "2001:db8::5"),
    ("fd00::1", ["[2001:db8::5]:4711, fd00::2"], "2001:db8::5"),
    ("::ffff:10.0.0.1", ["203.0.113.9:5000"], "203.0.113.9"),
    ("fd00:0:0:1::1", ["2001:db8::5"], "fd00:0:0:1::1"),           # outside the trusted /64
    # left of the first untrusted address nothing is parsed, however long
    ("10.0.0.1", ["x, unknown,, 203.0.113.9"], "203.0.113.9"),
    ("10.0.0.1", ["1.2.3.4,", "203.0.113.9, 10.0.0.2"], "203.0.113.9"),
    ("10.0.0.1", [", ".join(["x"] * 1000) + ", 203.0.113.9, " + ", ".join(["10.0.0.2"] * 63)], "203.0.113.9"),
])
def test_the_client_is_the_right_most_untrusted_address(peer, forwarded, client) -> None:
    assert client_of(peer, forwarded, NETS) == client


@pytest.mark.parametrize("forwarded", [["unknown"], ["203.0.113.9, "], ["203.0.113.9;evil"], ["host.example"],
                                       ["[2001:db8::5"], [", ".join(["10.0.0.2"] * 65)], ["1.2.3.4:x"]])
def test_a_malformed_header_from_a_trusted_proxy_is_refused(forwarded) -> None:
    with pytest.raises(Malformed):
        client_of("10.0.0.1", forwarded, NETS)
    assert client_of("198.51.100.1", forwarded, NETS) == "198.51.100.1"   # untrusted: not even read


def test_trusted_proxies_are_ip_networks_in_the_configuration() -> None:
    config = configuration.loads("server:\n  trusted_proxies: [10.0.0.5, 10.1.0.0/24, 'fd00::/64']\n")
    assert [str(n) for n in config.server.trusted_proxies] == ["10.0.0.5/32", "10.1.0.0/24", "fd00::/64"]
    assert configuration.loads(configuration.dump(config)).server == config.server
    assert configuration.loads("listen: 127.0.0.1:5000\n").server.trusted_proxies == ()
    with pytest.raises(configuration.ConfigError) as raised:
        configuration.loads("server:\n  trusted_proxies: [10.0.0.0/8, balancer.example]\n", source="c.yml")
    assert "c.yml:2" in str(raised.value) and "server.trusted_proxies" in str(raised.value)


ONLY_TEN = """access:
  - allow: [anonymous]
    from: [10.0.0.0/8]
"""


async def test_x_forwarded_for_from_an_untrusted_peer_cannot_pass_from_rules(tmp_path, caplog) -> None:
    """Without trusted_proxies (or from a peer outside them) a client that says it is 10.1.2.3 is
    still 198.51.100.1 for the access rules and the log."""
    caplog.set_level(logging.INFO, "dockermirror.access")
    for extra in ("", "server:\n  trusted_proxies: [192.0.2.0/24]\n"):
        caplog.clear()
        app = _app(tmp_path, extra + ONLY_TEN)
        async with app.running(), _client(app, "198.51.100.1") as client:
            response = await client.get("/v2/library/hello/manifests/latest", headers={"X-Forwarded-For": "10.1.2.3"})
        assert response.status_code == 403, extra
        assert _access(caplog)[0].startswith('198.51.100.1 "GET /v2/library/hello/manifests/latest" 403 ')


async def test_x_forwarded_for_from_a_trusted_proxy_is_the_client(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, "dockermirror")
    registry = FakeRegistry()
    image = registry.push("library/hello", "latest")
    app = _app(tmp_path, "server:\n  trusted_proxies: [192.0.2.7]\n" + ONLY_TEN, registry)
    async with app.running(), _client(app, "192.0.2.7") as client:
        inside = await client.get("/v2/library/hello/manifests/latest",
                                  headers={"X-Forwarded-For": "10.1.2.3", "Accept": image.media_type})
        # the client put 10.9.9.9 in front itself; the balancer appended its real address
        spoofed = await client.get("/v2/library/hello/manifests/latest",
                                   headers={"X-Forwarded-For": "10.9.9.9, 198.51.100.4"})
        bad = [await client.get("/v2/library/hello/manifests/latest", headers={"X-Forwarded-For": "garbage"})
               for _ in range(2)]
    assert inside.status_code == 200
    assert spoofed.status_code == 403
    assert [r.status_code for r in bad] == [403, 403]      # the proxy itself is not in 10.0.0.0/8
    lines = _access(caplog)
    assert lines[0].startswith('10.1.2.3 "GET ')
    assert lines[1].startswith('198.51.100.4 "GET ')
    assert lines[2].startswith('unknown "GET ') and lines[3].startswith('unknown "GET ')   # never the proxy
    said = [r for r in caplog.records if "X-Forwarded-For" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING]      # the second: at debug
    assert "192.0.2.7" in said[0].getMessage()


async def test_a_reload_applies_new_trusted_proxies(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, "dockermirror.access")
    app = _app(tmp_path, "")
    async with app.running(), _client(app, "192.0.2.7") as client:
        await client.get("/v2/", headers={"X-Forwarded-For": "203.0.113.9"})
        app.reconfigure(configuration.loads(config_text(tmp_path / "cache",
                                                        "server:\n  trusted_proxies: [192.0.2.0/24]\n")))
        await client.get("/v2/", headers={"X-Forwarded-For": "203.0.113.9"})
    lines = _access(caplog)
    assert lines[0].startswith("192.0.2.7 ") and lines[1].startswith("203.0.113.9 ")


# --- client-setup behind a balancer


@pytest.fixture
def _setup_env(tmp_path, monkeypatch):
    import socket

    from dockermirror.service import clienttargets

    os_release = tmp_path / "os-release"
    os_release.write_text("ID=arch\n")
    monkeypatch.setattr(clienttargets, "OS_RELEASE", os_release)
    monkeypatch.setattr(socket, "getfqdn", lambda *a: "host1.example.net")


def _client_setup(tmp_path, capsys, config: str, *argv: str) -> str:
    from dockermirror import cli

    path = tmp_path / "config.yml"
    path.write_text(config)
    assert cli.main(["client-setup", "--config", str(path), *argv]) == 0
    return capsys.readouterr().out


NODE_CONFIG = "node: web-1\nhostname: node1.example.com\nlisten: 0.0.0.0:5001\ntls: {enabled: false}\n"


@pytest.mark.usefixtures("_setup_env")
def test_client_setup_on_a_node_prints_the_balancers_name_given_with_host(tmp_path, capsys) -> None:
    out = _client_setup(tmp_path, capsys, NODE_CONFIG, "--host", "registry.example.com:5000")
    assert out.startswith("# docker-mirror at http://registry.example.com:5000,")
    assert '"registry-mirrors": ["http://registry.example.com:5000"]' in out
    assert "node1.example.com" not in out and "web-1" not in out and "host1.example.net" not in out


@pytest.mark.usefixtures("_setup_env")
def test_client_setup_on_a_node_without_host_says_to_give_the_balancer(tmp_path, capsys) -> None:
    out = _client_setup(tmp_path, capsys, NODE_CONFIG)
    assert out.startswith("# docker-mirror at http://node1.example.com:5001,")
    assert "# node: web-1 is set: if clients reach this mirror through a load balancer, run client-setup " \
           "--host BALANCER:PORT" in out
    assert "node: web-1" not in _client_setup(tmp_path, capsys, NODE_CONFIG.replace("node: web-1\n", ""))


# --- the real server (uvicorn with our protocol): its own refusals, and X-Forwarded-For


from tests.unit.test_mtls_live import config_text as live_text  # noqa: E402
from tests.unit.test_mtls_live import live, pki  # noqa: E402,F401  (pki: a fixture)


async def test_the_live_server_names_the_node_on_its_own_refusals_and_believes_its_proxy(pki, caplog) -> None:  # noqa: F811
    caplog.set_level(logging.INFO, "dockermirror")
    text = live_text(pki, client_auth="none", extra="node: web-1\nserver:\n  trusted_proxies: [127.0.0.1]\n")
    too_long = b"GET /v2/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"
    forwarded = b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 10.9.9.9, 203.0.113.9\r\n\r\n"
    async with live(pki, text) as mirror:
        refused = await (await mirror.connect()).send(too_long)     # answered by the protocol, not the app
        answered = await (await mirror.connect()).send(forwarded)
        await mirror.reload(text.replace("node: web-1", "node: web-2").replace("[127.0.0.1]", "[]"))
        renamed = await (await mirror.connect()).send(too_long)
        ignored = await (await mirror.connect()).send(forwarded)
    assert refused.status == 414 and refused.headers["docker-mirror-node"] == "web-1"
    assert answered.status == 200 and answered.headers["docker-mirror-node"] == "web-1"
    assert renamed.status == 414 and renamed.headers["docker-mirror-node"] == "web-2"
    assert ignored.headers["docker-mirror-node"] == "web-2"
    lines = [r.getMessage() for r in caplog.records if r.name == "dockermirror.access" and '"GET /v2/"' in r.getMessage()]
    assert lines[0].startswith("203.0.113.9 ") and lines[0].endswith(" node=web-1"), lines
    assert lines[1].startswith("127.0.0.1 ") and lines[1].endswith(" node=web-2"), lines
    refusals = [r.getMessage() for r in caplog.records if '"-" 414' in r.getMessage()]
    assert refusals[0].endswith(" node=web-1") and refusals[1].endswith(" node=web-2"), refusals


# --- the chain is walked from the right: what the client wrote on the left is never parsed


BEHIND = "server:\n  trusted_proxies: [10.0.0.5]\n" + ONLY_TEN


async def _pull_behind(tmp_path, caplog, *forwarded: str) -> tuple[int, str]:
    """A manifest GET from the balancer 10.0.0.5 with these X-Forwarded-For header lines: the
    status and the client the access line names."""
    caplog.clear()
    registry = FakeRegistry()
    image = registry.push("library/hello", "latest")
    app = _app(tmp_path, BEHIND, registry)
    headers = [("Accept", image.media_type), *(("X-Forwarded-For", value) for value in forwarded)]
    async with app.running(), _client(app, "10.0.0.5") as client:
        response = await client.get("/v2/library/hello/manifests/latest", headers=headers)
    line = _access(caplog)[-1]
    return response.status_code, line.split(" ", 1)[0]


@pytest.mark.parametrize("forwarded", [
    ["198.51.100.4"],
    ["x, 198.51.100.4"],                   # nginx: $proxy_add_x_forwarded_for after the client's "x"
    ["x", "198.51.100.4"],                 # HAProxy option forwardfor: the client's line, then its own
    ["unknown, 1.2.3.4,, 198.51.100.4"],
    [", ".join(["10.1.1.1"] * 100) + ", 198.51.100.4"],     # longer than the limit: only one entry walked
    ["10.1.1.1, " * 70 + "garbage", "198.51.100.4"],
])
async def test_what_a_client_wrote_left_of_its_balancer_entry_cannot_pass_from_rules(tmp_path, caplog,
                                                                                        forwarded) -> None:
    caplog.set_level(logging.INFO, "dockermirror")
    assert await _pull_behind(tmp_path, caplog, *forwarded) == (403, "198.51.100.4")


@pytest.mark.parametrize("forwarded", [["10.1.2.3"], ["x, 10.1.2.3"], [", ".join(["garbage"] * 100) + ", 10.1.2.3"]])
async def test_a_client_inside_the_from_networks_is_let_in_whatever_it_wrote_on_the_left(tmp_path, caplog,
                                                                                           forwarded) -> None:
    caplog.set_level(logging.INFO, "dockermirror")
    assert await _pull_behind(tmp_path, caplog, *forwarded) == (200, "10.1.2.3")


@pytest.mark.parametrize("forwarded", [["garbage"], ["198.51.100.4, x"], ["198.51.100.4", "unknown"],
                                       ["198.51.100.4, "], [", ".join(["10.0.0.5"] * 65)]])
async def test_garbage_from_the_trusted_proxy_itself_is_an_unknown_client_no_network_matches(tmp_path, caplog,
                                                                                               forwarded) -> None:
    """Reached before any untrusted address: the proxy itself sent it. Never the proxy's own
    address (inside the networks rules allow): a client no from: network matches, logged as unknown."""
    caplog.set_level(logging.INFO, "dockermirror")
    assert await _pull_behind(tmp_path, caplog, *forwarded) == (403, "unknown")


def test_the_unknown_client_matches_no_network_and_is_one_refusal_source() -> None:
    from dockermirror.access.rules import client_address
    from dockermirror.api.forwarded import UNKNOWN
    from dockermirror.api.refusals import RefusalLog, source

    assert client_address(UNKNOWN) is None          # so no from: rule matches it (access/rules.py _from)
    assert source(UNKNOWN) == (UNKNOWN, "this address")
    refusals = RefusalLog(clock=lambda: 0.0)
    assert [refusals.loud(UNKNOWN).loud for _ in range(3)] == [True, False, False]


def test_an_ipv4_mapped_trusted_proxy_is_its_ipv4_address(tmp_path) -> None:
    """Peers are mapped to IPv4 before they are compared: a mapped entry must be too, or it never matches."""
    config = configuration.loads("server:\n  trusted_proxies: ['::ffff:10.0.0.5', '::ffff:10.1.0.0/120', "
                                 "'fd00::/64']\n")
    assert [str(n) for n in config.server.trusted_proxies] == ["10.0.0.5/32", "10.1.0.0/24", "fd00::/64"]
    assert client_of("10.0.0.5", ["198.51.100.4"], config.server.trusted_proxies) == "198.51.100.4"
    assert client_of("::ffff:10.0.0.5", ["198.51.100.4"], config.server.trusted_proxies) == "198.51.100.4"


@pytest.mark.parametrize("entry", ["0.0.0.0/0", "'::/0'", "'::ffff:0:0/96'", "1.2.3.4/0"])
def test_trusting_every_address_is_refused_at_load(entry) -> None:
    """Every client could then choose its address: one line naming the key and what to do."""
    with pytest.raises(configuration.ConfigError) as raised:
        configuration.loads(f"server:\n  trusted_proxies: [10.0.0.5, {entry}]\n", source="c.yml")
    text = str(raised.value)
    assert "c.yml:2" in text and "server.trusted_proxies" in text and "\n" not in text
    assert "every client" in text and "balancer" in text


async def test_a_proxy_sending_garbage_is_said_once_per_ten_minutes_with_a_count(tmp_path, caplog) -> None:
    """Not once per process: a proxy misconfigured a week after the start is noticed too."""
    from dockermirror.lograte import RateLimited

    caplog.set_level(logging.DEBUG, "dockermirror")
    now = [0.0]
    app = _app(tmp_path, BEHIND)
    app.asgi.said = RateLimited(app.asgi.said.logger, clock=lambda: now[0], quiet=logging.DEBUG)
    async with app.running(), _client(app, "10.0.0.5") as client:
        for at in (0.0, 10.0, 20.0, 700.0, 710.0):
            now[0] = at
            await client.get("/v2/", headers={"X-Forwarded-For": "garbage"})
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "X-Forwarded-For from" in r.getMessage()]
    assert [level for level, _ in said] == [logging.WARNING, logging.DEBUG, logging.DEBUG, logging.WARNING,
                                            logging.DEBUG]
    assert "10.0.0.5" in said[0][1] and "unknown" in said[0][1]
    assert said[3][1].endswith("(2 more like it in the last 10 min, at debug)")
