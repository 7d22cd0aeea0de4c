"""Clients that read slowly, send endless headers or say nothing: none of them may cost the
others their service, and each is answered with the status code HTTP clients expect."""

from __future__ import annotations

import hashlib
import socket
import threading
import time

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
        """Read the rest at full speed; the whole body."""
        self.sock.setblocking(True)
        self.sock.settimeout(timeout)
        while chunk := self.sock.recv(1 << 20):
            self.data += chunk
        return self.body()


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
    stop = threading.Event()

    def trickle() -> None:               # every reader takes ~1 KB a second
        while not stop.is_set():
            for reader in readers:
                reader.read(1024)
            stop.wait(1.0)

    reading = threading.Thread(target=trickle, daemon=True)
    reading.start()
    try:
        # every slow reader's response is under way (its headers are in)
        wait_until(lambda: all(b"\r\n\r\n" in r.data for r in readers), 120, interval=0.5,
                   what="every slow reader's response headers")
        # (20 s: far more than it takes, far less than the 60 s after which a client that takes
        # nothing is dropped, which would free whatever the slow readers hold)
        with httpx.Client(base_url=mirror.url, timeout=20) as client:
            response = client.get(f"/v2/library/hello/blobs/{small}")
            ranged = client.get(f"/v2/library/big/blobs/{big}", headers={"Range": "bytes=0-65535"})
        assert response.status_code == 200 and response.content == upstream.blob(small)
        assert ranged.status_code == 206 and ranged.content == expected[:65536]
        assert not any(r.closed for r in readers)                  # all still connected...
        assert all(len(r.body()) < len(expected) for r in readers)  # ...and still reading
    finally:
        stop.set()
        reading.join()
    try:
        for reader in readers[:3]:       # the bytes are right when a slow reader speeds up
            assert hashlib.sha256(reader.finish()).hexdigest() == big.split(":")[1]
        for reader in readers[3:]:       # and what the others received so far is the blob's start
            body = reader.body()
            assert body == expected[:len(body)]
    finally:
        for reader in readers:
            reader.sock.close()
