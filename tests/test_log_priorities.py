"""`journalctl -p warning` shows only what needs attention: nothing a client can cause is logged
at warning or above. A real server on a plain-HTTP port gets TLS handshakes, malformed and
oversized requests, upgrade requests, unknown paths and names, more connections than it takes,
and a client that goes away in the middle of a blob; its log has no line at WARNING or above
(but one, once: clients were refused past server.max_connections)."""

from __future__ import annotations

import socket
import ssl
import time

import httpx

from tests.conftest import ALL_MANIFESTS, Upstream
from tests.support.procs import wait_until

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def exchange(address: tuple[str, int], data: bytes) -> bytes:
    """Send ``data`` on a new connection; what the server answers before it closes (or 2 s)."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(data)
        sock.settimeout(2)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return answer


def tls_probe(address: tuple[str, int]) -> None:
    """A TLS ClientHello (what `curl https://` or a monitoring probe sends) on the plain-HTTP port."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(address, timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="mirror.example"):
                raise AssertionError("a TLS handshake succeeded on the plain-HTTP port")
        except (ssl.SSLError, ConnectionResetError, OSError):
            pass


def levels(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split(" ", 3)
        if len(fields) > 2 and fields[2] in LEVELS:
            found.setdefault(fields[2], []).append(line)
    return found


def test_nothing_a_client_does_is_logged_at_warning_or_above(make_mirror, upstream: Upstream):
    mirror = make_mirror(upstream.url, server={"max_connections": 4, "max_header_size": "4KiB"})
    address = ("127.0.0.1", mirror.port)
    for _ in range(3):
        tls_probe(address)
    assert exchange(address, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64)).startswith(b"HTTP/1.1 400")
    answers = [exchange(address, request) for request in (
        b"GARBAGE\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",                                           # an HTTP/2 preface
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",                       # 414 / 431
        b"GET /v2/ HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(400)) + b"\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n",                                            # head never ends
    )]
    assert not [a[:40] for a in answers if a.startswith(b"HTTP/1.1 5")]        # answered, or closed
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        accept = {"Accept": ", ".join(ALL_MANIFESTS)}
        for path in ("/", "/nothing", "/v2/../../etc/passwd", "/v2/UPPER/case/manifests/x", "/v2/a/blobs/sha256:zz",
                     "/v2/library/nope/manifests/latest", "/v2/library/hello/manifests/no-such-tag",
                     "/v2/library/hello/blobs/sha256:" + "0" * 64, "/v2/quay.io/x/manifests/1",
                     "/v2/library/hello/tags/list?n=-1", "/v2/_catalog"):
            assert client.get(path, headers=accept).status_code < 500, path
        assert client.get("/v2/", headers={"Authorization": "Basic !!!"}).status_code in (200, 400, 401)
        assert client.request("DELETE", "/v2/library/hello/manifests/latest").status_code in (401, 404, 405)
        assert client.put("/v2/library/hello/manifests/latest", content=b"{}").status_code in (401, 404, 405)
    # a client that goes away in the middle of a blob
    big = upstream.big_layer
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(f"GET /v2/library/big/blobs/{big} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    # more connections than server.max_connections, each asking
    crowd = [socket.create_connection(address, timeout=5) for _ in range(10)]
    try:
        for sock in crowd:
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        for sock in crowd:
            sock.recv(4096)
    finally:
        for sock in crowd:
            sock.close()
    time.sleep(1)                   # the lines of what was just closed
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        assert client.get("/v2/").status_code == 200        # still serving
    wait_until(lambda: "invalid http request" in mirror.log_text().lower(), 10, what="the malformed requests' line")
    found = levels(mirror.log_text())
    loud = [line for level in ("WARNING", "ERROR", "CRITICAL") for line in found.get(level, [])]
    # but one: clients were answered 503 past server.max_connections, which the admin must see,
    # once (at most once per 10 minutes), however many connections the crowd opened
    crowded = [line for line in loud if "Exceeded concurrency limit." in line]
    assert len(crowded) == 1 and "raise it" in crowded[0], loud
    loud = [line for line in loud if line not in crowded]
    assert loud == [], "\n".join(loud)
    assert any('"-" 400 0 note="invalid HTTP request"' in line for line in found["INFO"])
    assert "Traceback" not in mirror.log_text()


def test_failed_logins_are_not_warnings(make_mirror, upstream: Upstream, tmp_path):
    import subprocess
    import sys

    users = tmp_path / "htpasswd"
    subprocess.run([sys.executable, "-m", "dockermirror", "user", "add", "alice", "--file", str(users),
                    "--password-stdin", "--cost", "10"], input="secret\n", text=True, check=True, capture_output=True)
    mirror = make_mirror(upstream.url, auth={"htpasswd": str(users)})
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        for auth in (("alice", "wrong"), ("mallory", "x"), ("", ""), ("alice", "secret" * 100)):
            assert client.get("/v2/library/hello/manifests/latest", auth=auth).status_code == 401
        for header in ("Basic !!!", "Bearer x", "Basic " + "A" * 5000, "Digest x"):
            assert client.get("/v2/library/hello/manifests/latest", headers={"Authorization": header}).status_code in (
                400, 401, 431)
        assert client.get("/v2/", auth=("alice", "secret")).status_code == 200
    time.sleep(0.5)
    found = levels(mirror.log_text())
    loud = [line for level in ("WARNING", "ERROR", "CRITICAL") for line in found.get(level, [])]
    assert loud == [], "\n".join(loud)
    assert sum(" 401 " in line for line in found["INFO"]) >= 1
