"""What idle keep-alive connections cost a running mirror: RSS before and after N connections that
each made one request (GET /v2/) and are held open.

    flock /tmp/dm-bench.lock .venv/bin/python -m bench.idleconns [--connections 1000] [--keepalive 600s] [--tls]

Starts ``docker-mirror serve`` on 127.0.0.1 (tests/support/procs.py Mirror, upstream unreachable:
/v2/ is answered locally) with ``server.keepalive_timeout`` long enough to hold them, raises this
process's own open-file soft limit to the hard one, and reads /proc/PID/status VmRSS. With ``--tls``
the mirror serves TLS (a test PKI's certificate) and every connection makes its handshake first.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import ssl
import tempfile
import time
from pathlib import Path

from tests.support.certs import make_pki
from tests.support.procs import Mirror


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def request(sock: socket.socket) -> bytes:
    sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\nUser-Agent: idleconns\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head.split(b"\r\n")[0]


def settle(pid: int, seconds: float = 2.0) -> int:
    time.sleep(seconds)
    return rss_kib(pid)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--keepalive", default="600s")
    parser.add_argument("--tls", action="store_true", help="serve TLS; each connection makes a handshake")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="idleconns-") as work:
        config: dict = {"upstream": {"url": "http://127.0.0.1:9"}, "server": {"keepalive_timeout": args.keepalive}}
        context = None
        if args.tls:
            pki = make_pki(Path(work) / "pki")
            config["tls"] = {"enabled": True, "certificate": str(pki.certificate), "key": str(pki.key)}
            context = ssl.create_default_context(cafile=str(pki.ca))
        mirror = Mirror(Path(work), config)
        mirror.start()

        def connect() -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", mirror.port))
            return context.wrap_socket(sock, server_hostname="localhost") if context else sock

        held: list[socket.socket] = []
        try:
            # warm: the request path once (imports, caches), on a connection that then closes
            with connect() as warm:
                for _ in range(20):
                    request(warm)
            before, fds_before = settle(mirror.pid), fds(mirror.pid)
            start = time.monotonic()
            for _ in range(args.connections):
                sock = connect()
                status = request(sock)
                assert status.startswith(b"HTTP/1.1 200") or status.startswith(b"HTTP/1.1 401"), status
                held.append(sock)
            took = time.monotonic() - start
            after, fds_after = settle(mirror.pid), fds(mirror.pid)
            alive = sum(1 for s in held if _alive(s))
            growth = after - before
            print(f"{'TLS' if args.tls else 'plain'} connections {args.connections} (alive {alive}) opened in {took:.1f} s; "
                  f"RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB: +{growth / 1024:.1f} MiB, "
                  f"{growth * 1024 / max(1, args.connections):.0f} bytes per connection; "
                  f"fds {fds_before} -> {fds_after}")
            for s in held:
                s.close()
            held.clear()
            print(f"after closing them: RSS {settle(mirror.pid) / 1024:.1f} MiB")
        finally:
            for s in held:
                s.close()
            mirror.stop()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _alive(sock: socket.socket) -> bool:
    """Not closed by the server (peeked on a duplicate descriptor: works under TLS too)."""
    with socket.socket(fileno=os.dup(sock.fileno())) as raw:
        raw.setblocking(False)
        try:
            return raw.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False


if __name__ == "__main__":
    main()
