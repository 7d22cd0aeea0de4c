"""A small real HTTP proxy in front of the upstream registry that breaks things on purpose.

Faults are switched per test: flip a byte in matching response bodies, answer a
status instead of forwarding, cut a body off after N bytes, slow a body down.
It records every request it forwards (method, path, header lines).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]] = field(default_factory=list)

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class FaultProxy:
    def __init__(self, target: str) -> None:
        self.target = target                              # host:port of the real upstream
        self.tamper: str | None = None                    # regex: flip one byte in these bodies
        self.status: tuple[str, int] | None = None        # (regex, status): answer this instead
        self.cut: tuple[str, int] | None = None           # (regex, bytes): cut the body off after N bytes
        self.slow: tuple[str, float] | None = None        # (regex, seconds per 64 KiB chunk)
        self.seen: list[Seen] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def requests(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        return [s for s in self.seen if (not method or s.method == method) and (not path or re.search(path, s.path))]

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                proxy._forward(self)

            do_HEAD = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        method, path = handler.command, handler.path
        self.seen.append(Seen(method, path, list(handler.headers.items())))
        if self.status and re.search(self.status[0], path):
            body = json.dumps({"errors": [{"code": "UNAVAILABLE", "message": "injected fault"}]}).encode()
            handler.send_response(self.status[1])
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            if method != "HEAD":
                handler.wfile.write(body)
            return
        conn = http.client.HTTPConnection(self.target, timeout=60)
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in handler.headers.items():
            if name.lower() not in HOP_BY_HOP:
                conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        handler.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP:
                handler.send_header(name, value)
        handler.end_headers()
        if method == "HEAD":
            conn.close()
            return
        tamper = self.tamper is not None and re.search(self.tamper, path)
        cut = self.cut[1] if self.cut and re.search(self.cut[0], path) else None
        slow = self.slow[1] if self.slow and re.search(self.slow[0], path) else 0.0
        sent = 0
        try:
            while chunk := response.read(65536):
                if tamper and sent == 0:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                if cut is not None and sent + len(chunk) >= cut:
                    handler.wfile.write(chunk[: cut - sent])
                    handler.wfile.flush()
                    handler.connection.shutdown(socket.SHUT_RDWR)
                    handler.close_connection = True
                    return
                handler.wfile.write(chunk)
                sent += len(chunk)
                if slow:
                    time.sleep(slow)
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True
        finally:
            conn.close()
