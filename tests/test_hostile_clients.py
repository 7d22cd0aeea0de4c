"""Clients that read slowly, send endless headers or say nothing: none of them may cost the
others their service, and each is answered with the status code HTTP clients expect."""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import httpx

from tests.conftest import Upstream
from tests.support.procs import Mirror, wait_until

SLOW_READERS = 130          # more than the 128 sendfile threads the mirror once had


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class SlowReader:
    """A raw HTTP/1.1 client with a tiny receive buffer that reads ``rate`` bytes a tick."""

    def __init__(self, mirror: Mirror, path: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        self.sock.connect(("127.0.0.1", mirror.port))
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {mirror.address}\r\n\r\n".encode())
        self.sock.setblocking(False)
        self.data = bytearray()
        self.closed = False

    def read(self, limit: int) -> None:
        try:
            chunk = self.sock.recv(limit)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.closed = True
        self.data += chunk

    def body(self) -> bytes:
        return bytes(self.data.partition(b"\r\n\r\n")[2])

    def finish(self, timeout: float = 120) -> bytes:
        """Read the rest at full speed, up to the end of the body (its Content-Length, or the
        connection's end: a kept-alive connection stays open after the body); the whole body."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.setblocking(True)
        self.sock.settimeout(timeout)
        head = bytes(self.data.partition(b"\r\n\r\n")[0]).lower()
        length = re.search(rb"\r\ncontent-length: *(\d+)", head)
        while length is None or len(self.body()) < int(length[1]):
            if not (chunk := self.sock.recv(1 << 20)):
                break
            self.data += chunk
        return self.body()


@contextlib.contextmanager
def trickling(readers: list) -> Iterator[None]:
    """Every reader takes ~1 KB a second (from a thread) while the block runs; the block starts
    once every reader's response is under way (its headers are in)."""
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            for reader in readers:
                reader.read(1024)
            stop.wait(1.0)

    reading = threading.Thread(target=trickle, daemon=True)
    reading.start()
    try:
        wait_until(lambda: all(b"\r\n\r\n" in r.data for r in readers), 120, interval=0.5,
                   what="every slow reader's response headers")
        yield
    finally:
        stop.set()
        reading.join()


def test_slow_readers_do_not_starve_other_clients(make_mirror, upstream: Upstream):
    """130 clients reading a cached 100 MiB blob at ~1 KB/s each: another client still gets a
    small blob (and a manifest) at once, while they are all still connected and reading; and
    each slow reader, once it speeds up, receives exactly the blob's bytes."""
    mirror = make_mirror()
    big = upstream.big_layer
    small = upstream.seeded["hello"].image.layers["amd64"][0]
    with mirror.client() as client:      # both blobs cached first
        assert client.get(f"/v2/library/big/blobs/{big}").status_code == 200
        assert client.get(f"/v2/library/hello/blobs/{small}").status_code == 200
    mirror.committed_blob(big)
    expected = upstream.blob(big)

    readers = [SlowReader(mirror, f"/v2/library/big/blobs/{big}") for _ in range(SLOW_READERS)]
    with trickling(readers):
        # (20 s: far more than it takes, far less than the 60 s after which a client that takes
        # nothing is dropped, which would free whatever the slow readers hold)
        with httpx.Client(base_url=mirror.url, timeout=20) as client:
            response = client.get(f"/v2/library/hello/blobs/{small}")
            ranged = client.get(f"/v2/library/big/blobs/{big}", headers={"Range": "bytes=0-65535"})
        assert response.status_code == 200 and response.content == upstream.blob(small)
        assert ranged.status_code == 206 and ranged.content == expected[:65536]
        assert not any(r.closed for r in readers)                  # all still connected...
        assert all(len(r.body()) < len(expected) for r in readers)  # ...and still reading
    try:
        for reader in readers[:3]:       # the bytes are right when a slow reader speeds up
            assert hashlib.sha256(reader.finish()).hexdigest() == big.split(":")[1]
        for reader in readers[3:]:       # and what the others received so far is the blob's start
            body = reader.body()
            assert body == expected[:len(body)]
    finally:
        for reader in readers:
            reader.sock.close()


def raw_request(mirror: Mirror, head: bytes, then=None, timeout: float = 30) -> bytes:
    """Send ``head`` (and whatever ``then(sock)`` sends, from a thread); everything the
    mirror answers until it closes the connection."""
    sock = socket.create_connection(("127.0.0.1", mirror.port))
    sender = None
    try:
        sock.sendall(head)
        if then is not None:
            sender = threading.Thread(target=then, args=(sock,), daemon=True)
            sender.start()
        sock.settimeout(timeout)
        answer = bytearray()
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
        return bytes(answer)
    finally:
        sock.close()
        if sender is not None:
            sender.join(30)


def test_oversized_request_heads_are_refused_without_buffering(make_mirror):
    """A 64 MiB header is answered 431 after the first 64 KiB, and never held in memory;
    1000 header fields get 431, an 9000-byte path 414; the mirror serves on."""
    mirror = make_mirror()
    hwm_before = rss_kib(mirror.pid, "VmHWM")

    def endless_header(sock: socket.socket) -> None:
        chunk = b"a" * (1 << 20)
        try:
            for _ in range(64):
                sock.sendall(chunk)
        except OSError:
            pass                                 # the mirror may close once it has answered

    answers = [raw_request(mirror, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: ", then=endless_header)
               for _ in range(4)]
    fields = raw_request(mirror, b"GET /v2/ HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(1000))
                         + b"\r\n")
    target = raw_request(mirror, b"GET /v2/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    for answer in (*answers, fields):
        assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer[:100]
        assert b"\r\nconnection: close\r\n" in answer
    assert target.startswith(b"HTTP/1.1 414 "), target[:100]
    assert rss_kib(mirror.pid, "VmHWM") - hwm_before < 50 * 1024     # peak memory: not 4 x 64 MiB
    with mirror.client() as client:
        assert client.get("/v2/").status_code == 200
    lines = mirror.access_lines('"-" 431', at_least=5)
    assert len(lines) == 5 and 'note="request line and headers over 65536 bytes"' in lines[0]
    assert "Traceback" not in mirror.log_text()


def test_a_refused_request_after_others_on_its_connection_is_answered_after_them(make_mirror, upstream: Upstream):
    """Pipelined (or sent as soon as the previous answer arrived): the requests before a refused
    one are answered whole, then the refusal; the refusal used to abort the response still
    going out (the fuzzer's 'only 1 of 2 requests answered')."""
    mirror = make_mirror()
    hello = upstream.seeded["hello"]
    layer = hello.image.layers["amd64"][-1]
    with mirror.client() as client:
        assert client.get(f"/v2/{hello.repo}/blobs/{layer}").status_code == 200     # cached
    size = len(upstream.blob(layer))
    blob = f"GET /v2/{hello.repo}/blobs/{layer} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    ranged = f"GET /v2/{hello.repo}/blobs/{layer} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-0\r\n\r\n".encode()
    refused = b"HEAD /v2/ HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n"
    for _ in range(20):
        answer = raw_request(mirror, blob + ranged + refused)
        first, rest = answer.split(b"\r\n\r\n", 1)
        assert first.startswith(b"HTTP/1.1 200 ") and b"content-length: %d" % size in first.lower(), answer[:300]
        assert rest[:size] == upstream.blob(layer)
        second, rest = rest[size:].split(b"\r\n\r\n", 1)
        assert second.startswith(b"HTTP/1.1 206 ") and rest[:1] == upstream.blob(layer)[:1], answer[:300]
        assert rest[1:].startswith(b"HTTP/1.1 431 "), rest[:200]
    # the same for a request that cannot be parsed at all (a scanner's garbage, a request both
    # chunked and with a length): the GET before it used to get no answer, only the 400
    # (the last: its head is whole, its body's framing is not; that request itself is never answered)
    for bad in (b"GARBAGE\r\n\r\n", b"GET /v2/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"GET /v2/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 5000 + b"\r\n"):
        for _ in range(10):
            answer = raw_request(mirror, blob + bad)
            first, rest = answer.split(b"\r\n\r\n", 1)
            assert first.startswith(b"HTTP/1.1 200 ") and rest[:size] == upstream.blob(layer), answer[:300]
            assert rest[size:].startswith(b"HTTP/1.1 400 "), rest[size:size + 200]
    # a head over the limit in the same read as the request before it: it was not charged to the
    # limit (the budget was the previous request's), and got through up to twice the limit
    big_head = b"GET /v2/ HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    answer = raw_request(mirror, blob + big_head)
    first, rest = answer.split(b"\r\n\r\n", 1)
    assert first.startswith(b"HTTP/1.1 200 ") and rest[:size] == upstream.blob(layer), answer[:300]
    assert rest[size:].startswith(b"HTTP/1.1 431 "), rest[size:size + 200]
    assert "went away" not in mirror.log_text() and "cut off" not in mirror.log_text()


def test_slow_and_idle_clients_are_closed_after_the_header_timeout(make_mirror, upstream: Upstream):
    """Slowloris: a client sending one header byte a second gets 408 and is closed after
    header_timeout, one that sends nothing is closed; meanwhile another client is served."""
    mirror = make_mirror(server={"header_timeout": "2s"})
    idle = socket.create_connection(("127.0.0.1", mirror.port))
    slow = socket.create_connection(("127.0.0.1", mirror.port))
    slow.sendall(b"GET /v2/ HTTP/1.1\r\n")
    answer = bytearray()
    closed = threading.Event()

    def drip() -> None:                 # one byte a second, reading whatever comes back
        slow.settimeout(1.0)
        for byte in b"X-Slow: " + b"a" * 60:
            try:
                slow.sendall(bytes([byte]))
                chunk = slow.recv(65536)
                if not chunk:
                    break
                answer.extend(chunk)
            except TimeoutError:
                continue
            except OSError:
                break
        closed.set()

    dripping = threading.Thread(target=drip, daemon=True)
    dripping.start()
    try:
        layer = upstream.seeded["hello"].image.layers["amd64"][0]
        with mirror.client() as client:
            assert client.get(f"/v2/library/hello/blobs/{layer}").content == upstream.blob(layer)
        assert closed.wait(30), "the slow client was never closed"
        assert bytes(answer).startswith(b"HTTP/1.1 408 Request Timeout\r\n"), bytes(answer[:100])
        idle.settimeout(30)
        assert idle.recv(100) == b""    # closed without a word: it never asked anything
    finally:
        dripping.join(30)
        idle.close()
        slow.close()
    assert mirror.access_lines('"-" 408')


def open_fds(pid: int) -> int:
    import os

    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_client_that_stops_reading_is_dropped_after_send_timeout(make_mirror, upstream: Upstream):
    """A client that takes no byte of a large response for send_timeout is dropped, and the
    cache file and connection it held are released; one that reads slowly but steadily is
    not dropped, however long it takes, and gets every byte right."""
    mirror = make_mirror(server={"send_timeout": "2s"})
    big = upstream.big_layer
    path = f"/v2/library/big/blobs/{big}"
    with mirror.client() as client:
        assert client.get(path).status_code == 200
    mirror.committed_blob(big)
    before = open_fds(mirror.pid)
    steady = SlowReader(mirror, path)
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", mirror.port))
    try:
        stuck.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        wait_until(lambda: len(mirror.access_lines(f'"GET {path}"', at_least=2)) >= 2, 60,
                   what="the stuck client's request line")
        line = mirror.access_lines(f'"GET {path}"', at_least=2)[-1]
        assert 'note="client went away"' in line
        deadline = time.monotonic() + 8        # four times send_timeout, at ~2 KB a second
        while time.monotonic() < deadline:
            steady.read(1024)
            time.sleep(0.5)
        assert not steady.closed and len(steady.body()) < 1024 * 1024
        assert hashlib.sha256(steady.finish()).hexdigest() == big.split(":")[1]
        steady.sock.close()
        wait_until(lambda: open_fds(mirror.pid) <= before, 30, what="descriptors released")
    finally:
        stuck.close()
        steady.sock.close()
    assert "Traceback" not in mirror.log_text()


class SlowTLSReader(SlowReader):
    def __init__(self, mirror: Mirror, path: str, context: ssl.SSLContext) -> None:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        raw.connect(("127.0.0.1", mirror.port))
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {mirror.address}\r\n\r\n".encode())
        self.sock.setblocking(False)
        self.data = bytearray()
        self.closed = False

    def read(self, limit: int) -> None:
        try:
            chunk = self.sock.recv(limit)
        except (ssl.SSLWantReadError, BlockingIOError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.closed = True
        self.data += chunk


def test_slow_tls_readers_neither_starve_others_nor_hold_much_memory(make_mirror, upstream: Upstream, pki):
    """Over TLS (no zero-copy): 130 slow readers of a cached blob leave another client served,
    and each holds a bounded amount of the mirror's memory (not several MiB of the blob)."""
    mirror = make_mirror(tls={"enabled": True, "certificate": str(pki.certificate), "key": str(pki.key)})
    big = upstream.big_layer
    small = upstream.seeded["hello"].image.layers["amd64"][0]
    context = ssl.create_default_context(cafile=str(pki.ca))
    with httpx.Client(base_url=mirror.url, verify=context, timeout=120) as client:
        assert client.get(f"/v2/library/big/blobs/{big}").status_code == 200
        assert client.get(f"/v2/library/hello/blobs/{small}").status_code == 200
    mirror.committed_blob(big)
    rss_before = rss_kib(mirror.pid)
    readers = [SlowTLSReader(mirror, f"/v2/library/big/blobs/{big}", context) for _ in range(SLOW_READERS)]
    try:
        with trickling(readers):
            time.sleep(2)                   # what each response holds settles
            with httpx.Client(base_url=mirror.url, verify=context, timeout=20) as client:
                response = client.get(f"/v2/library/hello/blobs/{small}")
            assert response.status_code == 200 and response.content == upstream.blob(small)
            growth = rss_kib(mirror.pid) - rss_before
            assert growth < SLOW_READERS * 2 * 1024, f"{growth // SLOW_READERS} KiB per slow TLS reader"
            assert not any(r.closed for r in readers)
    finally:
        for reader in readers:
            reader.sock.close()
