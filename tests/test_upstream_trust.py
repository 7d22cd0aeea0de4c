"""Upstream trust against a hostile upstream (issue 16): a real docker-mirror process in front
of the FaultProxy (in front of Debian's docker-registry). A bearer challenge naming a realm on
another host gets nothing from the mirror (a listening canary there records every connection);
a realm on the same host and another port keeps working; redirects to http:// (from an HTTPS
upstream) and to file:// are not followed."""

from __future__ import annotations

import base64
import socket
import threading

import httpx
import pytest

from tests.conftest import ALL_MANIFESTS, Upstream
from tests.support.clients import skopeo_copy
from tests.support.faultproxy import FaultProxy

ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]
USER, PASSWORD = "mirror-bot", "Canary-pa55-9f3"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


class Canary:
    """A listening socket on another loopback address that records whatever reaches it."""

    def __init__(self, host: str = "127.0.0.2") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.host, self.port = self.sock.getsockname()
        self.connections = 0
        self.received = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            conn.settimeout(1.0)
            try:
                self.received += conn.recv(65536)
            except OSError:
                pass
            finally:
                conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def canary():
    trap = Canary()
    yield trap
    trap.stop()


@pytest.fixture
def token_service(upstream: Upstream):
    """A second FaultProxy on the same host (127.0.0.1), another port: a token service beside
    the registry."""
    proxy = FaultProxy(upstream.registry.address).start()
    yield proxy
    proxy.stop()


def test_a_realm_on_another_host_gets_nothing_and_the_pull_fails_clearly(make_mirror, fault_proxy: FaultProxy,
                                                                        canary: Canary, upstream: Upstream,
                                                                        tmp_path):
    fault_proxy.token_auth = True
    fault_proxy.credentials = (USER, PASSWORD)
    realm = f"http://{canary.host}:{canary.port}/token"
    fault_proxy.realm = realm
    mirror = make_mirror(fault_proxy.url, upstream={"username": USER, "password": PASSWORD})
    hello = upstream.seeded["hello"]
    with mirror.client() as client:
        for path in (f"/v2/library/hello/manifests/{hello.tag}", f"/v2/library/hello/manifests/{hello.digest}"):
            got = client.get(path, headers=ACCEPT)
            assert got.status_code == 403, got.text
            error = got.json()["errors"][0]
            assert error["code"] == "DENIED" and realm in error["message"] and "token_realms" in error["message"]
    with pytest.raises(AssertionError) as failed:          # a real client: the pull fails, saying why
        skopeo_copy(f"{mirror.address}/library/hello:{hello.tag}", tmp_path / "pulled")
    assert "token service was refused" in str(failed.value) and realm in str(failed.value)
    assert canary.connections == 0 and canary.received == b""
    assert fault_proxy.requests(path=r"^/token") == []
    log = mirror.log_text()
    assert f"refused token realm {realm}" in log
    assert PASSWORD not in log and BASIC not in log


def test_a_realm_on_the_same_host_and_another_port_keeps_working(make_mirror, fault_proxy: FaultProxy,
                                                                token_service: FaultProxy, upstream: Upstream):
    fault_proxy.token_auth = True
    fault_proxy.credentials = token_service.credentials = (USER, PASSWORD)
    token_service.tokens = fault_proxy.tokens                 # tokens it issues are the registry's
    fault_proxy.realm = f"{token_service.url}/token"
    assert token_service.port != fault_proxy.port
    mirror = make_mirror(fault_proxy.url, upstream={"username": USER, "password": PASSWORD})
    hello = upstream.seeded["hello"]
    with mirror.client() as client:
        got = client.get(f"/v2/library/hello/manifests/{hello.tag}", headers=ACCEPT)
        assert got.status_code == 200, got.text
        for digest in hello.image.layers["amd64"]:
            blob = client.get(f"/v2/library/hello/blobs/{digest}")
            assert blob.status_code == 200 and blob.content == upstream.blob(digest)
    tokens = token_service.requests(path=r"^/token")
    assert tokens and all(seen.header_values("Authorization") == [BASIC] for seen in tokens)
    assert fault_proxy.requests(path=r"^/token") == []


@pytest.mark.parametrize("target", ["http", "file"])
def test_redirects_to_plain_http_and_to_file_are_refused(make_mirror, upstream: Upstream, pki, target):
    """An HTTPS upstream whose blobs redirect to http:// (a CDN in clear) or to file://."""
    hostile = FaultProxy(upstream.registry.address).start(tls=(pki.certificate, pki.key))
    cdn = FaultProxy(upstream.registry.address).start()           # plain HTTP: it must see nothing
    try:
        hostile.redirect_blobs = cdn.url if target == "http" else "file:///etc/passwd#"
        mirror = make_mirror(hostile.url, upstream={"ca_bundle": str(pki.ca)})
        hello = upstream.seeded["hello"]
        layer = hello.image.layers["amd64"][0]
        with mirror.client() as client:
            assert client.get(f"/v2/library/hello/manifests/{hello.tag}", headers=ACCEPT).status_code == 200
            got = client.get(f"/v2/library/hello/blobs/{layer}")
        assert got.status_code == 502, got.text
        message = got.json()["errors"][0]["message"]
        assert ("plain HTTP" in message) if target == "http" else ("'file'" in message)
        assert hostile.requests("GET", r"/blobs/")                 # the upstream was asked, and redirected
        assert cdn.seen == []
        assert "redirect" in mirror.log_text() and "signature=abc" not in mirror.log_text()
        assert httpx.get(f"{mirror.url}/v2/", timeout=10).status_code == 200   # the mirror is fine
    finally:
        hostile.stop()
        cdn.stop()
