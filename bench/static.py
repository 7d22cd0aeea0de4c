"""A trivial fast HTTP server for one file, to show what the load tool can drive.

    python -m bench.static FILE PORT

Python's own http.server (HTTP/1.1 keep-alive, a thread per connection) answering
every GET with FILE, the body sent by the kernel (sendfile). Listens on 127.0.0.1.
:func:`ceiling` runs it and puts the 32-client wrk load on it; the warm scenario downloads the
big blob from it with the same curl, each round, as the machine's ceiling for one stream.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench.clients import WrkResult, wrk
from tests.support.procs import Daemon, free_port, wait_until


def ceiling(path: Path, workdir: Path, connections: int, duration: int) -> WrkResult:
    """wrk against this server serving ``path``: what the load tool reaches on this machine."""
    with running(path, workdir) as url:
        return wrk(url, connections, duration)


@contextlib.contextmanager
def running(path: Path, workdir: Path) -> Iterator[str]:
    """This server serving ``path`` while the block runs: its URL (any path answers with the file)."""
    port = free_port()
    server = Daemon([sys.executable, "-m", "bench.static", str(path), str(port)], workdir / f"static-{port}.log")
    server.start()
    try:
        wait_until(lambda: not server.running() or _listening(port), 10, what="static server")
        if not server.running():
            raise RuntimeError(f"the static server did not start:\n{server.log_text()[-2000:]}")
        yield f"http://127.0.0.1:{port}/blob"
    finally:
        server.stop()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def serve(path: str, port: int) -> None:
    size = os.path.getsize(path)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            self.wfile.flush()
            with open(path, "rb") as f:
                offset = 0
                while offset < size:
                    offset += os.sendfile(self.connection.fileno(), f.fileno(), offset, size - offset)

        def log_message(self, *args: object) -> None:
            pass

        def handle(self) -> None:
            try:
                super().handle()
            except ConnectionError:
                pass  # the load tool hangs up mid-response when its time is up

    with ThreadingHTTPServer(("127.0.0.1", port), Handler) as server:
        server.daemon_threads = True
        server.serve_forever()


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
