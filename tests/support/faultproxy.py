"""A small real HTTP proxy in front of the upstream registry that breaks things on purpose.

Faults are switched per test: flip a byte in matching response bodies, answer a
status instead of forwarding, cut a body off after N bytes (every time, or the first
N times), or at the same offset of the blob every time (however it was asked for), ignore
Range, answer late, slow a body down, or hold bodies: answer any matching blob with a
length and trickle it a byte at a time until released (a hostile upstream that pins
connections without ever being silent for a read timeout), or announce a false length.
It can also act like Docker Hub: demand a bearer token (issued by its own ``/token``
endpoint, optionally only for Basic credentials) or Basic auth, and redirect blob
downloads to another host (a second proxy standing in for a CDN). A hostile one: its
challenge may name a realm anywhere (``realm``), its blob redirects may lead anywhere
(``redirect_blobs``: ``http://``, ``file://``), and it can speak HTTPS (``start(tls=...)``).
It can also answer the OCI 1.1 referrers API, which Debian's docker-registry (2.8) lacks:
``GET /v2/<name>/referrers/<digest>`` lists the registry's real manifests (every tag of the
repository) whose ``subject`` is that digest, filtered by ``artifactType`` (saying so with
``OCI-Filters-Applied``) unless told not to.
It records every request it receives (method, path, header lines).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, "application/vnd.oci.image.manifest.v1+json",
                             "application/vnd.docker.distribution.manifest.list.v2+json",
                             "application/vnd.docker.distribution.manifest.v2+json"])
_REFERRERS = re.compile(r"/v2/(?P<name>.+)/referrers/(?P<digest>[^/]+)")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    holding: int = 0                # bodies the proxy was holding when this request arrived

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class _CutNow(Exception):
    """The body is cut before its first byte."""


class FaultProxy:
    def __init__(self, target: str) -> None:
        self.target = target                              # host:port of the real upstream
        self.tamper: str | None = None                    # regex: flip one byte in these bodies
        self.status: tuple[str, int] | None = None        # (regex, status): answer this instead
        self.cut: tuple[str, int] | None = None           # (regex, bytes): cut the body off after N bytes
        self.cuts: int | None = None                      # with cut: cut only this many responses (None: all)
        self.ignore_range = False                         # drop Range from requests (answer 200, whole body)
        self.slow: tuple[str, float] | None = None        # (regex, seconds per 64 KiB chunk)
        self.token_auth = False                           # demand "Bearer <token from /token>"
        self.basic_auth = False                           # demand Basic credentials
        self.credentials: tuple[str, str] | None = None   # what /token or Basic auth accepts (None: anyone)
        self.redirect_blobs: str | None = None            # base URL to 307-redirect blob GETs to
        self.realm: str | None = None                     # the bearer challenge's realm (None: its own /token)
        self.scheme = "http"                              # "https" once started with tls
        self.hang: float = 0.0                            # accept, then say nothing for this long
        self.delay: tuple[str, float] | None = None       # (regex, seconds): wait this long, then answer
        self.chunked: str | None = None                   # regex: send these bodies without a length
        self.cut_at: tuple[str, int] | None = None        # (regex, offset): never send a byte at or past it
        self.hold: str | None = None                      # regex: hold these blob GETs (trickled, never done)
        self.trickle_headers: str | None = None           # regex: answer headers a byte at a time, never done
        self.hold_size = 1024 * 1024                      # the length a held body announces
        self.hold_interval = 0.5                          # seconds between the bytes of a held body
        self.released = threading.Event()                 # set: every held body is cut off
        self.holding = 0                                  # held bodies now being sent
        self._lock = threading.Lock()
        self.lie: tuple[str, int] | None = None           # (regex, length): announce it, send the real body, close
        self.tokens: dict[str, str] = {}                  # issued token -> scope
        self.referrers = False                            # answer the referrers API from the registry's tags
        self.referrers_filter = True                      # ... applying ?artifactType=
        self.seen: list[Seen] = []
        self._connections: set[socket.socket] = set()     # open client connections (closed by stop)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}"

    def requests(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        return [s for s in self.seen if (not method or s.method == method) and (not path or re.search(path, s.path))]

    def start(self, tls: tuple[Path, Path] | None = None) -> FaultProxy:
        """Listen (again); ``tls``: (certificate, key) to speak HTTPS with."""
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy._connections.add(self.connection)

            def finish(self) -> None:
                with proxy._lock:
                    proxy._connections.discard(self.connection)
                super().finish()

            def do_GET(self) -> None:
                proxy._forward(self)

            do_HEAD = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection: the upstream is gone (a later
        ``start()`` listens on the same port again)."""
        self.released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _answer(self, handler: BaseHTTPRequestHandler, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        handler.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)

    def _basic_ok(self, header: str | None) -> bool:
        if self.credentials is None:
            return True
        expected = base64.b64encode(":".join(self.credentials).encode()).decode()
        return header == f"Basic {expected}"

    def _auth_refusal(self, handler: BaseHTTPRequestHandler) -> tuple[dict, dict] | None:
        """None if the request may pass; else the 401 body and headers to send."""
        path, header = handler.path, handler.headers.get("Authorization")
        denied = {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}
        if self.basic_auth and not (header and self._basic_ok(header)):
            return denied, {"WWW-Authenticate": 'Basic realm="test registry"'}
        if self.token_auth:
            match = re.match(r"/v2/(.+)/(manifests|blobs|tags|referrers)/", path)
            scope = f"repository:{match.group(1)}:pull" if match else ""
            token = header.removeprefix("Bearer ") if header and header.startswith("Bearer ") else None
            if token is None or (scope and self.tokens.get(token) != scope):
                challenge = f'Bearer realm="{self.realm or self.url + "/token"}",service="test-registry"'
                return denied, {"WWW-Authenticate": challenge + (f',scope="{scope}"' if scope else "")}
        return None

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        method, path = handler.command, handler.path
        self.seen.append(Seen(method, path, list(handler.headers.items()), self.holding))
        if self.hang:
            time.sleep(self.hang)
            handler.close_connection = True
            return
        if path.startswith("/token"):
            if not self._basic_ok(handler.headers.get("Authorization")):
                self._answer(handler, 401, {"details": "bad credentials"})
                return
            scope = re.search(r"scope=([^&]+)", path)
            token = secrets.token_hex(8)
            self.tokens[token] = unquote(scope.group(1)) if scope else ""
            self._answer(handler, 200, {"token": token, "expires_in": 300})
            return
        refusal = self._auth_refusal(handler)
        if refusal is not None:
            self._answer(handler, 401, *refusal)
            return
        if self.trickle_headers and re.search(self.trickle_headers, path):
            self._trickle_headers(handler)
            return
        if self.hold and method == "GET" and re.search(self.hold, path):
            self._hold(handler)
            return
        if self.redirect_blobs and "/blobs/sha256:" in path and method == "GET":
            handler.send_response(307)
            handler.send_header("Location", f"{self.redirect_blobs}{path}?signature=abc")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if self.delay and re.search(self.delay[0], path):
            time.sleep(self.delay[1])
        if self.status and re.search(self.status[0], path):
            body = json.dumps({"errors": [{"code": "UNAVAILABLE", "message": "injected fault"}]}).encode()
            handler.send_response(self.status[1])
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            if method != "HEAD":
                handler.wfile.write(body)
            return
        if self.referrers and (match := _REFERRERS.fullmatch(urlsplit(path).path)):
            self._referrers(handler, match["name"], match["digest"], parse_qs(urlsplit(path).query))
            return
        conn = http.client.HTTPConnection(self.target, timeout=60)
        conn.putrequest(method, path.split("?signature=")[0], skip_host=True, skip_accept_encoding=True)
        for name, value in handler.headers.items():
            if name.lower() not in HOP_BY_HOP and name.lower() != "authorization" \
                    and not (self.ignore_range and name.lower() == "range"):
                conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        chunked = method == "GET" and self.chunked is not None and re.search(self.chunked, path)
        lie = self.lie[1] if method == "GET" and self.lie and re.search(self.lie[0], path) else None
        handler.send_response(response.status)
        for name, value in response.getheaders():
            replaced = (chunked or lie is not None) and name.lower() == "content-length"
            if name.lower() not in HOP_BY_HOP and not replaced:
                handler.send_header(name, value)
        if chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        if lie is not None:
            handler.send_header("Content-Length", str(lie))
            handler.close_connection = True
        handler.end_headers()
        if method == "HEAD":
            conn.close()
            return
        if chunked:
            try:
                while chunk := response.read(65536):
                    handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    if self.slow and re.search(self.slow[0], path):
                        time.sleep(self.slow[1])
                handler.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                handler.close_connection = True
            finally:
                conn.close()
            return
        tamper = self.tamper is not None and re.search(self.tamper, path)
        cut = self.cut[1] if self.cut and re.search(self.cut[0], path) and self.cuts != 0 else None
        if cut is not None and self.cuts is not None:
            self.cuts -= 1
        if self.cut_at and re.search(self.cut_at[0], path) and response.status in (200, 206):
            start = re.match(r"bytes (\d+)-", response.getheader("Content-Range") or "bytes 0-")
            cut = max(0, self.cut_at[1] - int(start.group(1)))
        slow = self.slow[1] if self.slow and re.search(self.slow[0], path) else 0.0
        sent = 0
        try:
            if cut == 0:
                raise _CutNow
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
        except _CutNow:
            handler.wfile.flush()
            handler.connection.shutdown(socket.SHUT_RDWR)
            handler.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True
        finally:
            conn.close()

    def _get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.target, timeout=60)
        try:
            conn.request("GET", path, headers={"Accept": MANIFEST_ACCEPT})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def _referrers(self, handler: BaseHTTPRequestHandler, name: str, subject: str, query: dict) -> None:
        """The image index of the registry's manifests (by tag) whose subject is ``subject``."""
        wanted = query.get("artifactType", [None])[0]
        applied = wanted is not None and self.referrers_filter
        status, body = self._get(f"/v2/{name}/tags/list")
        tags = (json.loads(body).get("tags") or []) if status == 200 else []
        found: dict[str, dict] = {}
        for tag in tags:
            status, manifest = self._get(f"/v2/{name}/manifests/{tag}")
            document = json.loads(manifest) if status == 200 else None
            if not isinstance(document, dict) or (document.get("subject") or {}).get("digest") != subject:
                continue
            artifact_type = document.get("artifactType") or (document.get("config") or {}).get("mediaType")
            if applied and artifact_type != wanted:
                continue
            digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
            found[digest] = {"mediaType": document.get("mediaType"), "digest": digest, "size": len(manifest),
                             "artifactType": artifact_type, **({"annotations": document["annotations"]}
                                                               if "annotations" in document else {})}
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [found[d] for d in sorted(found)]}
        self._answer(handler, 200, index, {"Content-Type": OCI_INDEX,
                                           **({"OCI-Filters-Applied": "artifactType"} if applied else {})})

    def _trickle_headers(self, handler: BaseHTTPRequestHandler) -> None:
        """A status line, then one header whose value grows a byte every hold_interval."""
        handler.close_connection = True
        head = b"HTTP/1.1 200 OK\r\nX-Padding: "
        try:
            handler.wfile.write(head)
            while not self.released.wait(self.hold_interval):
                handler.wfile.write(b"a")
                handler.wfile.flush()
        except OSError:
            return

    def _hold(self, handler: BaseHTTPRequestHandler) -> None:
        """A 200 (or 206 for ``Range: bytes=N-``) of hold_size bytes, one every hold_interval."""
        size = self.hold_size
        asked = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range", ""))
        start = int(asked.group(1)) if asked else 0
        handler.send_response(206 if asked else 200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(size - start))
        if asked:
            handler.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        handler.end_headers()
        handler.close_connection = True
        with self._lock:
            self.holding += 1
        try:
            # never the last byte: a held body never completes
            for _ in range(size - start - 1):
                if self.released.wait(self.hold_interval):
                    break
                handler.wfile.write(b"\0")
                handler.wfile.flush()
        except OSError:
            return
        finally:
            with self._lock:
                self.holding -= 1
        try:
            handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
