"""The configurations of ``docker-mirror lb-config`` in the real engines: Debian's HAProxy 2.6 and
nginx 1.22, unpacked into the test cache (tests/support/balancers.py), never installed.

Every variant passes ``haproxy -c`` / ``nginx -t``; and a balancer in front of two stub HTTP
servers on 127.0.0.1 (each answers with its name and what it received) routes as promised:
a digest goes to one server whatever repository names it, a repository's manifests, tags and
referrers to one server, HEAD stays HEAD, Range and X-Forwarded-For arrive, the routing key does
not; a stopped server gives away only its own keys and gets them back when it returns. The same
check on a configuration that hashes the whole URI finds the broken routing.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import ssl
import threading
from pathlib import Path

import httpx
import pytest

from dockermirror.service import lbconfig
from tests.support.balancers import Balancer
from tests.support.certs import make_pki
from tests.support.procs import free_port, wait_until

ENGINES = ("haproxy", "nginx")
REPOS = ("library/alpine", "org/blobs/x", "a/manifests/b/c")
DIGESTS = [f"sha256:{hashlib.sha256(str(i).encode()).hexdigest()}" for i in range(16)] + [
    f"sha512:{hashlib.sha512(b'x').hexdigest()}"]


class Stub(http.server.ThreadingHTTPServer):
    """A node stand-in: answers every request with its name and what it saw (headers in the response
    too, so HEAD shows them); /healthz answers 200."""

    daemon_threads = True

    def __init__(self, name: str, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.name = name
        self.connections: set = set()
        super().__init__(("127.0.0.1", port), _Echo)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        """Stop listening and end the kept-alive connections too, as a stopped node would."""
        self.shutdown()
        self.server_close()
        for connection in list(self.connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        super().finish()

    def _answer(self, body: bool) -> None:
        seen = {"server": self.server.name, "method": self.command, "path": self.path,
                "headers": [[k, v] for k, v in self.headers.items()]}
        data = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Stub-Server", self.server.name)
        self.send_header("X-Stub-Method", self.command)
        self.send_header("X-Stub-Range", self.headers.get("Range", ""))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(False)


def generate(engine: str, **kwargs) -> str:
    kwargs.setdefault("nodes", ())
    return lbconfig.ENGINES[engine](lbconfig.Options(**kwargs))


def variants(pki, pem: str, port: int) -> dict[str, dict]:
    listen = f"127.0.0.1:{port}"
    nodes = (f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    return {
        "plain": dict(listen=listen, nodes=nodes),
        "tls": dict(listen=listen, nodes=nodes, tls_cert=pem),
        "tls-nodes-unchecked": dict(listen=listen, nodes=nodes, tls_cert=pem, node_tls=True),
        "tls-nodes-checked": dict(listen=listen, nodes=nodes, tls_cert=pem, node_tls=True, node_ca=str(pki.ca),
                                  node_tls_name="localhost"),
        "nodes-with-client-cert": dict(listen=listen, nodes=nodes, tls_cert=pem, node_tls=True, node_ca=str(pki.ca),
                                       node_tls_name="localhost", node_client_cert=pem),
        "nodes-checked-by-ca": dict(listen=listen, nodes=nodes, node_tls=True, node_ca=str(pki.ca),
                                    node_tls_name="localhost"),
        "passthrough": dict(listen=listen, nodes=nodes, passthrough=True),
        "passthrough-checked": dict(listen=listen, nodes=nodes, passthrough=True, node_ca=str(pki.ca)),
    }


@pytest.fixture
def pem(tmp_path: Path):
    pki = make_pki(tmp_path / "pki")
    combined = tmp_path / "pki" / "balancer.pem"
    combined.write_bytes(pki.certificate.read_bytes() + pki.key.read_bytes())
    return pki, str(combined)


@pytest.mark.parametrize("engine", ENGINES)
def test_every_variant_passes_the_engines_own_check(engine: str, tmp_path: Path, pem):
    pki, combined = pem
    for name, kwargs in variants(pki, combined, free_port()).items():
        balancer = Balancer(engine, generate(engine, **kwargs), tmp_path / name)
        result = balancer.check()
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{engine} {name}:\n{output}\n{balancer.config_text}"
        assert "[WARNING]" not in output and "[warn]" not in output, f"{engine} {name}:\n{output}"


def test_a_broken_configuration_fails_the_engines_own_check(tmp_path: Path, pem):
    """The check above can fail: a typo in a directive is refused by both engines."""
    pki, combined = pem
    for engine in ENGINES:
        text = generate(engine, listen=f"127.0.0.1:{free_port()}", nodes=("127.0.0.1:1",))
        broken = text.replace("hash-type consistent", "hash-type consistant").replace(
            "proxy_buffering off;", "proxy_bufering off;")
        assert Balancer(engine, broken, tmp_path / engine).check().returncode != 0


# --- live routing ---------------------------------------------------------------------------------------

def fetch(client: httpx.Client, path: str, method: str = "GET", **headers) -> dict:
    answer = client.request(method, path, headers=headers)
    assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
    if method == "HEAD":
        return {"server": answer.headers["X-Stub-Server"], "method": answer.headers["X-Stub-Method"],
                "range": answer.headers["X-Stub-Range"]}
    return answer.json()


def blob_servers(client: httpx.Client) -> dict[str, str]:
    """digest -> the server that got it; the test fails if two repository names of one digest part."""
    where: dict[str, str] = {}
    for digest in DIGESTS:
        seen = {repo: fetch(client, f"/v2/{repo}/blobs/{digest}")["server"] for repo in REPOS}
        seen["ns"] = fetch(client, f"/v2/{REPOS[0]}/blobs/{digest}?ns=docker.io")["server"]
        assert len(set(seen.values())) == 1, f"{digest} went to several servers: {seen}"
        where[digest] = seen["ns"]
    return where


def repo_servers(client: httpx.Client) -> dict[str, str]:
    where: dict[str, str] = {}
    for index in range(12):
        repo = f"team{index}/blobs/app" if index % 2 else f"library/app{index}"
        paths = [f"/v2/{repo}/manifests/latest?ns=docker.io", f"/v2/{repo}/manifests/{DIGESTS[index]}?ns=docker.io",
                 f"/v2/{repo}/tags/list?ns=docker.io", f"/v2/{repo}/referrers/{DIGESTS[index]}?ns=docker.io"]
        seen = {path: fetch(client, path)["server"] for path in paths}
        assert len(set(seen.values())) == 1, f"{repo} went to several servers: {seen}"
        where[repo] = seen[paths[0]]
    return where


def routing(client: httpx.Client) -> dict[str, str]:
    return {**blob_servers(client), **repo_servers(client)}


def settled(client: httpx.Client) -> dict[str, str] | None:
    """The routing, or None while a returning node is being taken back in (one key may then
    see both nodes within a round)."""
    try:
        return routing(client)
    except AssertionError:
        return None


@pytest.fixture
def stubs():
    started = [Stub("A"), Stub("B")]
    yield started
    for stub in started:
        stub.stop()


def start_balancer(engine: str, stubs, workdir: Path, text: str | None = None) -> Balancer:
    port = free_port()
    text = text or generate(engine, listen=f"127.0.0.1:{port}", nodes=tuple(s.address for s in stubs))
    balancer = Balancer(engine, text, workdir)
    balancer.start()
    return balancer


@pytest.mark.parametrize("engine", ENGINES)
def test_the_balancer_routes_by_content(engine: str, tmp_path: Path, stubs):
    balancer = start_balancer(engine, stubs, tmp_path)
    try:
        with httpx.Client(base_url=balancer.url, timeout=30) as client:
            if engine == "haproxy":       # the checks must find both stubs up first
                wait_until(lambda: {fetch(client, "/v2/")["server"] for _ in range(6)} == {"A", "B"}, 30,
                           what="haproxy sending to both stubs")
            blobs = blob_servers(client)
            assert set(blobs.values()) == {"A", "B"}          # digests are spread, not all on one node
            repos = repo_servers(client)
            assert set(repos.values()) == {"A", "B"}

            digest = DIGESTS[0]
            head = fetch(client, f"/v2/library/alpine/blobs/{digest}", "HEAD")
            assert head == {"server": blobs[digest], "method": "HEAD", "range": ""}
            ranged = fetch(client, f"/v2/library/alpine/blobs/{digest}", "GET", Range="bytes=100-199")
            headers = {k.lower(): v for k, v in ranged["headers"]}
            assert ranged["method"] == "GET" and headers["range"] == "bytes=100-199"
            assert "127.0.0.1" in headers["x-forwarded-for"]
            assert ranged["path"] == f"/v2/library/alpine/blobs/{digest}"
            # the key never reaches a node, and a client cannot choose it
            for name, value in ranged["headers"]:
                assert digest not in value, f"the node saw the key in {name}: {value}"
            other = next(d for d in DIGESTS if blobs[d] != blobs[digest])
            forged = fetch(client, f"/v2/library/alpine/blobs/{digest}", **{lbconfig.KEY_HEADER: other})
            assert forged["server"] == blobs[digest]
            # malformed digests have no key: they reach some node, which refuses them itself
            assert fetch(client, "/v2/library/alpine/blobs/SHA256:ABC")["server"] in {"A", "B"}
    finally:
        balancer.stop()


@pytest.fixture
def three_stubs():
    started = [Stub("A"), Stub("B"), Stub("C")]
    yield started
    for stub in started:
        stub.stop()


CLIENT_FORMS = ("/v2/library/{name}/manifests/latest",                   # dockerd registry-mirrors, podman
                "/v2/library/{name}/manifests/latest?ns=docker.io",      # containerd
                "/v2/docker.io/library/{name}/manifests/latest?ns=docker.io",   # containerd override_path
                "/v2/docker.io/library/{name}/manifests/latest",         # podman prefixed location
                "/v2/{name}/manifests/latest",                           # docker pull mirror/NAME
                "/v2/library/{name}/tags/list?ns=DOCKER.IO&ns=quay.io",
                "/v2/library/{name}/manifests/latest?ns=docker%2Eio")


@pytest.mark.parametrize("engine", ENGINES)
def test_every_clients_form_of_a_repository_reaches_one_node(engine: str, tmp_path: Path, three_stubs):
    """The node serves all these forms as one repository (dockermirror/routing.py): a mixed fleet
    must revalidate each tag on one node, not on three."""
    balancer = start_balancer(engine, three_stubs, tmp_path)
    try:
        with httpx.Client(base_url=balancer.url, timeout=30) as client:
            wait_until(lambda: len({fetch(client, f"/v2/{i}/x")["server"] for i in range(24)}) == 3, 30,
                       what="the balancer sending to all three stubs")
            where = {}
            for index in range(12):
                name = f"app{index}"
                seen = {form: fetch(client, form.format(name=name))["server"] for form in CLIENT_FORMS}
                assert len(set(seen.values())) == 1, f"{name} went to several servers: {seen}"
                where[name] = seen[CLIENT_FORMS[0]]
            assert len(set(where.values())) > 1       # repositories are still spread
            # a client's own routing header reaches no node
            answer = fetch(client, "/v2/library/app0/manifests/latest", **{lbconfig.KEY_HEADER: "library/app1"})
            assert answer["server"] == where["app0"]
            assert all(name.lower() != lbconfig.KEY_HEADER.lower() or value.startswith("node")
                       for name, value in answer["headers"]), answer["headers"]
    finally:
        balancer.stop()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_percent_encoded_digest_reaches_the_node_that_has_the_digest_or_none(engine: str, tmp_path: Path,
                                                                               three_stubs):
    """HAProxy keys the raw path: an encoded digest would go round-robin and every node would fetch
    and store the blob, so it is refused. nginx keys the decoded $uri, as the node decodes it."""
    balancer = start_balancer(engine, three_stubs, tmp_path)
    try:
        with httpx.Client(base_url=balancer.url, timeout=30) as client:
            wait_until(lambda: len({fetch(client, f"/v2/{i}/x")["server"] for i in range(24)}) == 3, 30,
                       what="the balancer sending to all three stubs")
            for digest in DIGESTS[:6]:
                home = fetch(client, f"/v2/library/alpine/blobs/{digest}")["server"]
                encoded = f"/v2/library/alpine/blobs/{digest.replace(':', '%3A')}"
                if engine == "haproxy":
                    answers = [client.get(encoded) for _ in range(6)]
                    assert {a.status_code for a in answers} == {403}
                    assert not any("X-Stub-Server" in a.headers for a in answers)
                else:
                    assert {fetch(client, encoded)["server"] for _ in range(6)} == {home}
    finally:
        balancer.stop()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_stopped_node_gives_away_only_its_keys_and_gets_them_back(engine: str, tmp_path: Path, three_stubs):
    """Three nodes, so that a hash that is not consistent (HAProxy's map-based default) would
    move keys between the two that stay up, and this test would see it."""
    stubs = three_stubs
    balancer = start_balancer(engine, stubs, tmp_path)
    try:
        with httpx.Client(base_url=balancer.url, timeout=30) as client:
            wait_until(lambda: len({fetch(client, f"/v2/{i}/x")["server"] for i in range(24)}) == 3, 30,
                       what="the balancer sending to all three stubs")
            before = routing(client)
            assert set(before.values()) == {"A", "B", "C"}
            port = stubs[0].server_address[1]
            stubs[0].stop()
            while_down = routing(client)
            assert set(while_down.values()) <= {"B", "C"}
            moved = {key for key in before if before[key] != while_down[key]}
            assert moved == {key for key in before if before[key] == "A"}, "keys of nodes that stayed up moved"
            stubs[0] = Stub("A", port)
            wait_until(lambda: settled(client) == before, 60, interval=0.5, what="A's keys back on A")
    finally:
        balancer.stop()


def haproxy_routing(stubs, workdir: Path, text: str, servers: int) -> dict:
    """Where HAProxy running ``text`` routes each key, once it sends to ``servers`` stubs."""
    balancer = start_balancer("haproxy", stubs, workdir, text)
    try:
        with httpx.Client(base_url=balancer.url, timeout=30) as client:
            wait_until(lambda: len({fetch(client, f"/v2/{i}/x")["server"] for i in range(24)}) == servers, 30,
                       what=f"haproxy sending to {servers} stubs")
            return routing(client)
    finally:
        balancer.stop()


def test_a_node_removed_from_the_haproxy_file_moves_only_its_own_keys(tmp_path: Path, three_stubs):
    """The ring follows server ids: with fixed ids, deleting node2's line leaves node3's keys on node3
    (auto-numbered, node3 would take node2's id and its keys, and give its own away)."""
    stubs = three_stubs
    text = generate("haproxy", listen=f"127.0.0.1:{free_port()}", nodes=tuple(s.address for s in stubs))
    before = haproxy_routing(stubs, tmp_path / "three", text, servers=3)
    assert set(before.values()) == {"A", "B", "C"}
    lines = [line for line in text.splitlines(keepends=True) if not line.lstrip().startswith("server node2 ")]
    assert len(lines) == len(text.splitlines()) - 1
    after = haproxy_routing(stubs, tmp_path / "two", "".join(lines), servers=2)
    moved = {key for key in before if before[key] != after[key]}
    assert moved == {key for key in before if before[key] == "B"}, "keys of nodes that stayed moved"


@pytest.mark.parametrize("engine", ENGINES)
def test_the_routing_check_notices_a_balancer_that_hashes_the_whole_uri(engine: str, tmp_path: Path, stubs):
    """The checks above fail on a plain URI hash: one digest under several names parts."""
    text = generate(engine, listen=f"127.0.0.1:{free_port()}", nodes=tuple(s.address for s in stubs))
    broken = (text.replace(f"balance hdr({lbconfig.KEY_HEADER})", "balance uri")
              .replace("hash $docker_mirror_key consistent;", "hash $request_uri consistent;"))
    assert broken != text
    balancer = start_balancer(engine, stubs, tmp_path, broken)
    try:
        with httpx.Client(base_url=balancer.url, timeout=30) as client:
            if engine == "haproxy":
                wait_until(lambda: len({fetch(client, f"/v2/{i}/x")["server"] for i in range(12)}) == 2, 30,
                           what="haproxy sending to both stubs")
            with pytest.raises(AssertionError, match="went to several servers"):
                blob_servers(client)
    finally:
        balancer.stop()


# --- TLS: terminated at the balancer (nodes over HTTPS, checked against the CA), and passed through ----------

@pytest.fixture
def tls_stubs(pem):
    pki, _ = pem
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.certificate, pki.key)
    started = [Stub("A", tls=context), Stub("B", tls=context)]
    yield started
    for stub in started:
        stub.stop()


def wait_for_both(client: httpx.Client) -> None:
    wait_until(lambda: len({fetch(client, f"/v2/{i}/x")["server"] for i in range(12)}) == 2, 30,
               what="the balancer sending to both stubs")


@pytest.mark.parametrize("engine", ENGINES)
def test_tls_ends_at_the_balancer_and_the_nodes_certificates_are_checked(engine: str, tmp_path: Path, pem,
                                                                          tls_stubs):
    pki, combined = pem
    port = free_port()
    text = generate(engine, listen=f"127.0.0.1:{port}", nodes=tuple(s.address for s in tls_stubs),
                    tls_cert=combined, node_tls=True, node_ca=str(pki.ca), node_tls_name="localhost")
    balancer = Balancer(engine, text, tmp_path / "lb")
    balancer.start()
    try:
        with httpx.Client(base_url=f"https://localhost:{port}", verify=ssl.create_default_context(cafile=pki.ca),
                          timeout=30) as client:
            wait_for_both(client)
            blobs = blob_servers(client)
            assert set(blobs.values()) == {"A", "B"}
            headers = {k.lower(): v for k, v in fetch(client, f"/v2/a/blobs/{DIGESTS[0]}")["headers"]}
            assert headers["x-forwarded-proto"] == "https"
    finally:
        balancer.stop()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_node_with_a_certificate_of_another_ca_gets_no_requests(engine: str, tmp_path: Path, pem, tls_stubs):
    """--node-ca is enforced: checked against an unrelated CA, no request reaches a node."""
    pki, combined = pem
    other = make_pki(tmp_path / "other")
    port = free_port()
    text = generate(engine, listen=f"127.0.0.1:{port}", nodes=tuple(s.address for s in tls_stubs),
                    tls_cert=combined, node_tls=True, node_ca=str(other.ca), node_tls_name="localhost")
    balancer = Balancer(engine, text, tmp_path / "lb")
    balancer.start()
    try:
        with httpx.Client(base_url=f"https://localhost:{port}", verify=ssl.create_default_context(cafile=pki.ca),
                          timeout=30) as client:
            answer = client.get(f"/v2/a/blobs/{DIGESTS[0]}")
            assert answer.status_code in (502, 503) and "X-Stub-Server" not in answer.headers
    finally:
        balancer.stop()


@pytest.mark.parametrize("engine", ENGINES)
def test_passthrough_carries_tls_to_the_nodes_and_keeps_a_client_on_one_node(engine: str, tmp_path: Path, pem,
                                                                             tls_stubs):
    pki, _ = pem
    port = free_port()
    text = generate(engine, listen=f"127.0.0.1:{port}", nodes=tuple(s.address for s in tls_stubs),
                    passthrough=True, node_ca=str(pki.ca))
    balancer = Balancer(engine, text, tmp_path / "lb")
    balancer.start()
    try:
        with httpx.Client(base_url=f"https://localhost:{port}", verify=ssl.create_default_context(cafile=pki.ca),
                          timeout=30) as client:
            # the node's own certificate reached the client (verified against the nodes' CA), and
            # every request of this client went to one node: by source address, not by content
            servers = {fetch(client, f"/v2/{repo}/blobs/{digest}", **{"Connection": "close"})["server"]
                       for digest in DIGESTS[:6] for repo in REPOS}
            assert len(servers) == 1
    finally:
        balancer.stop()
