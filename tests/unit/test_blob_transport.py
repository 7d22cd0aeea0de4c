"""The blob pool's thread-side reader (dockermirror.upstream.blobtransport) against real HTTP and
HTTPS servers on 127.0.0.1, run in threads of this process: bytes and digests, connection reuse,
chunked bodies, resumes, trickles, deadlines, bad headers, cancellation, a full pool, TLS trust
and proxies. The servers count connections and record requests; nothing of ours is mocked."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from dockermirror.errors import Unavailable
from dockermirror.upstream import blobtransport
from dockermirror.upstream import client as upstream_client
from dockermirror.upstream.blobtransport import ThreadTransport
from dockermirror.upstream.client import UpstreamClient, UpstreamUnreachable
from tests.support.certs import make_pki

pytestmark = pytest.mark.anyio
KiB, MiB = 1024, 1024 * 1024


class Request:
    def __init__(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.method, self.target, _ = lines[0].split(" ", 2)
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}


# handle(conn, request) writes an answer; returns True to keep the connection for another request
Handler = Callable[[socket.socket, Request], bool]


class Server:
    """A tiny HTTP/1.1 server in threads: one thread per connection, ``handle`` answers."""

    def __init__(self, handle: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handle = handle
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.requests: list[Request] = []
        self.closed_by_peer = threading.Event()    # a connection saw EOF or a reset from the client
        self._open: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                conn.settimeout(5)
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    conn.close()
                    return
                conn.settimeout(None)
            self._open.append(conn)
            buffered = b""
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buffered:
                    data = conn.recv(65536)
                    if not data:
                        self.closed_by_peer.set()
                        return
                    buffered += data
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                request = Request(head)
                self.requests.append(request)
                if not self.handle(conn, request):
                    return
        except OSError:
            self.closed_by_peer.set()
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)    # wakes the thread blocked in accept()
        except OSError:
            pass
        self.listener.close()
        for conn in self._open:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def serve():
    servers: list[Server] = []

    def start(handle: Handler, tls: ssl.SSLContext | None = None) -> Server:
        servers.append(Server(handle, tls))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


DATA = os.urandom(5 * MiB + 123)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
PATH = f"/v2/acme/tool/blobs/{DIGEST}"


def blob(conn: socket.socket, request: Request) -> bool:
    """The blob with a Content-Length (or its rest for a Range request), kept alive."""
    start = 0
    if "range" in request.headers:
        start = int(request.headers["range"].removeprefix("bytes=").rstrip("-"))
        conn.sendall(f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(DATA) - start}\r\n"
                     f"Content-Range: bytes {start}-{len(DATA) - 1}/{len(DATA)}\r\n\r\n".encode())
    else:
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(DATA)}\r\n\r\n".encode())
    conn.sendall(DATA[start:])
    return True


async def fetch(client: UpstreamClient, sizes: list[int] | None = None) -> bytes:
    stream = await client.open_blob("acme/tool", DIGEST)
    out = bytearray()
    try:
        async for chunk in stream.chunks():
            out += chunk
            if sizes is not None:
                sizes.append(len(chunk))
    finally:
        await stream.aclose()
    return bytes(out)


async def fetch_each(server: Server, times: int, sizes: list[int] | None = None, **options) -> None:
    """``times`` fetches of the blob by one client of ``server``; each must hash to DIGEST."""
    client = UpstreamClient(server.url, **options)
    try:
        for _ in range(times):
            assert digest(await fetch(client, sizes)) == DIGEST
    finally:
        await client.aclose()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_blobs_are_read_whole_in_big_chunks_over_one_kept_alive_connection(serve):
    server = serve(blob)
    sizes: list[int] = []
    await fetch_each(server, 3, sizes)
    assert server.connections == 1 and len(server.requests) == 3
    assert sizes[0] <= 16 * KiB          # the first bytes are not held back for a big read
    assert max(sizes) > 256 * KiB        # then chunks bigger than httpcore's reads
    # what the upstream was asked: our headers, the URL as it is
    assert server.requests[0].target == PATH
    assert server.requests[0].headers["accept-encoding"] == "identity"
    assert server.requests[0].headers["host"] == f"127.0.0.1:{server.port}"


async def test_a_chunked_body_is_read_whole(serve):
    def chunked(conn: socket.socket, request: Request) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for offset in range(0, len(DATA), 300 * KiB):
            piece = DATA[offset: offset + 300 * KiB]
            conn.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        conn.sendall(b"0\r\n\r\n")
        return True

    server = serve(chunked)
    await fetch_each(server, 2)
    assert server.connections == 1


@pytest.mark.parametrize("trailer", [b"X-Trailer: 1\r\n", b"X" * 70_000])
async def test_a_chunked_body_with_an_endless_trailer_ends_at_its_last_chunk(serve, trailer):
    """After the last chunk, trailer lines for ever (or one longer than a header line may be):
    the body ends there, whole, and that connection is closed, not reused (http.client itself
    would read the trailer for as long as it comes)."""
    def endless(conn: socket.socket, request: Request) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.sendall(f"{len(DATA):x}\r\n".encode() + DATA + b"\r\n0\r\n")
        try:
            for _ in range(100_000):
                conn.sendall(trailer)
                time.sleep(0.001)
        except OSError:
            pass
        return False

    server = serve(endless)
    await asyncio.wait_for(fetch_each(server, 2), 20)
    assert server.connections == 2


async def test_a_body_cut_short_is_resumed_with_range(serve, caplog):
    def cut(conn: socket.socket, request: Request) -> bool:
        if "range" in request.headers:
            return blob(conn, request)
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(DATA)}\r\n\r\n".encode())
        conn.sendall(DATA[: 2 * MiB])
        return False        # closed: the body is short

    server = serve(cut)
    client = UpstreamClient(server.url)
    caplog.set_level(logging.INFO, "dockermirror.upstream")
    try:
        assert digest(await fetch(client)) == DIGEST
    finally:
        await client.aclose()
    assert [r.headers.get("range") for r in server.requests] == [None, f"bytes={2 * MiB}-"]
    assert "RemoteProtocolError" in caplog.text and "resuming there" in caplog.text


def trickle_after(first: int, every: float) -> Handler:
    def trickling(conn: socket.socket, request: Request) -> bool:
        if "range" in request.headers:
            return blob(conn, request)
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(DATA)}\r\n\r\n".encode())
        conn.sendall(DATA[:first])
        for byte in range(first, len(DATA)):
            time.sleep(every)
            conn.sendall(DATA[byte: byte + 1])
        return True
    return trickling


async def test_a_trickling_body_is_stalled_and_resumed(serve, caplog):
    server = serve(trickle_after(100 * KiB, 0.02))
    client = UpstreamClient(server.url, read_timeout=0.5)
    caplog.set_level(logging.INFO, "dockermirror.upstream")
    try:
        assert digest(await fetch(client)) == DIGEST
    finally:
        await client.aclose()
    # a trickle (or, on a loaded machine, no byte at all for read_timeout): resumed either way
    assert ("UpstreamStalled" in caplog.text or "ReadTimeout" in caplog.text) and "resuming there" in caplog.text
    assert server.requests[1].headers["range"].startswith("bytes=")
    assert server.closed_by_peer.wait(5)    # the stalled connection was closed, not left to trickle


async def test_headers_that_trickle_hit_the_header_deadline(serve):
    def slow_headers(conn: socket.socket, request: Request) -> bool:
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10000:
            time.sleep(0.05)
            conn.sendall(bytes([byte]))
        return False

    server = serve(slow_headers)
    client = UpstreamClient(server.url, read_timeout=0.3)
    try:
        with pytest.raises(UpstreamUnreachable, match="headers were not complete"):
            await client.open_blob("acme/tool", DIGEST)
    finally:
        await client.aclose()
    assert server.closed_by_peer.wait(5)


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n",    # too many
    b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * (70 * KiB) + b"\r\n\r\n",                       # too long
    b"HTTP/9 banana\r\n\r\n",                                                                 # no status line
])
async def test_bad_headers_are_a_clean_error(serve, head):
    def bad(conn: socket.socket, request: Request) -> bool:
        conn.sendall(head)
        return False

    server = serve(bad)
    client = UpstreamClient(server.url)
    try:
        with pytest.raises(UpstreamUnreachable, match="RemoteProtocolError"):
            await client.open_blob("acme/tool", DIGEST)
    finally:
        await client.aclose()


def held(release: threading.Event, closed: threading.Event | None = None) -> Handler:
    """Headers and 64 KiB, then nothing until ``release`` or the client closes (then ``closed`` is set)."""
    def holding(conn: socket.socket, request: Request) -> bool:
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(DATA)}\r\n\r\n".encode() + DATA[:64 * KiB])
        if not watch(conn, release) and closed is not None:
            closed.set()
        return False
    return holding


def watch(conn: socket.socket, release: threading.Event) -> bool:
    """Send nothing more until ``release``; False as soon as the client closes its end."""
    conn.settimeout(0.1)
    while not release.is_set():
        try:
            if not conn.recv(1):
                return False
        except TimeoutError:
            continue
        except OSError:
            return False
    return True


def one_connection(monkeypatch) -> None:
    monkeypatch.setattr(upstream_client, "BLOB_POOL", httpx.Limits(max_connections=1, max_keepalive_connections=1))
    monkeypatch.setattr(upstream_client, "POOL_TIMEOUT", 1.0)


async def test_cancelling_a_read_blocked_in_its_thread_frees_the_thread_and_the_slot(serve, monkeypatch):
    one_connection(monkeypatch)
    release, closed = threading.Event(), threading.Event()
    stuck = serve(held(release, closed))
    good = serve(blob)
    client = UpstreamClient(stuck.url)
    try:
        got = asyncio.Event()

        async def read() -> None:
            stream = await client.open_blob("acme/tool", DIGEST)
            try:
                async for _ in stream.chunks():
                    got.set()
            finally:
                await stream.aclose()

        task = asyncio.ensure_future(read())
        await asyncio.wait_for(got.wait(), 10)
        await asyncio.sleep(0.2)            # the reader thread is now blocked in recv
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert closed.wait(5)     # its socket was shut down while the thread waited
        # the one slot and the one thread are free again: another blob comes through at once
        client.base = good.url
        assert digest(await fetch(client)) == DIGEST
    finally:
        release.set()
        await client.aclose()


async def test_a_full_pool_is_unavailable_with_retry_after(serve, monkeypatch):
    one_connection(monkeypatch)
    release = threading.Event()
    server = serve(held(release))
    client = UpstreamClient(server.url)
    try:
        first = await client.open_blob("acme/tool", DIGEST)
        with pytest.raises(Unavailable) as refused:
            await client.open_blob("acme/tool", DIGEST)
        assert refused.value.headers["Retry-After"] == upstream_client.RETRY_AFTER
        await first.aclose()
    finally:
        release.set()
        await client.aclose()
    assert server.connections == 1


async def test_a_response_not_read_to_its_end_closes_its_connection(serve):
    server = serve(blob)
    client = UpstreamClient(server.url)
    try:
        stream = await client.open_blob("acme/tool", DIGEST)
        async for _ in stream.chunks():
            break
        await stream.aclose()
        assert digest(await fetch(client)) == DIGEST
    finally:
        await client.aclose()
    assert server.connections == 2
    assert server.closed_by_peer.wait(5)


async def test_an_idle_connection_the_server_closed_is_not_reused(serve):
    def closing(conn: socket.socket, request: Request) -> bool:
        blob(conn, request)
        return False        # closes after the answer although it did not say so

    server = serve(closing)
    client = UpstreamClient(server.url)
    try:
        assert digest(await fetch(client)) == DIGEST
        await asyncio.sleep(0.2)
        assert digest(await fetch(client)) == DIGEST
    finally:
        await client.aclose()
    assert server.connections == 2 and len(server.requests) == 2


def tls_server_context(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    pki = make_pki(tmp_path / "pki")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.certificate, pki.key)
    return context, pki.ca


async def test_tls_with_the_configured_ca(serve, tmp_path):
    context, ca = tls_server_context(tmp_path)
    server = serve(blob, tls=context)
    await fetch_each(server, 2, ca_bundle=ca)
    assert server.connections == 1


async def test_tls_with_another_ca_is_refused(serve, tmp_path):
    context, _ = tls_server_context(tmp_path)
    other = make_pki(tmp_path / "other")
    server = serve(blob, tls=context)
    for ca in (other.ca, None):     # a CA of its own; the default trust
        client = UpstreamClient(server.url, ca_bundle=ca)
        try:
            with pytest.raises(UpstreamUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
                await client.open_blob("acme/tool", DIGEST)
        finally:
            await client.aclose()
    assert server.requests == []


@pytest.mark.parametrize("no_proxy, proxied", [("", True), ("127.0.0.1", False)])
async def test_a_proxy_from_the_environment_is_used_as_httpx_would(serve, monkeypatch, no_proxy, proxied):
    origin = serve(blob)

    def proxy(conn: socket.socket, request: Request) -> bool:
        return blob(conn, request)      # a forward proxy for plain HTTP answers absolute-form requests

    forward = serve(proxy)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
                 "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", forward.url)
    monkeypatch.setenv("NO_PROXY", no_proxy)
    client = UpstreamClient(origin.url)
    try:
        assert digest(await fetch(client)) == DIGEST
    finally:
        await client.aclose()
    if proxied:
        assert [r.target for r in forward.requests] == [origin.url + PATH] and origin.requests == []
    else:
        assert [r.target for r in origin.requests] == [PATH] and forward.requests == []


async def test_a_request_the_pool_cannot_write_is_refused_before_sending(serve):
    server = serve(blob)
    transport = ThreadTransport()
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            with pytest.raises(httpx.LocalProtocolError):
                await client.get(server.url + "/x", headers={"X-Bad": "a\rb"})
            assert (await client.get(server.url + PATH)).content == DATA
    finally:
        await transport.aclose()
    assert [r.target for r in server.requests] == [PATH]


def little(release: threading.Event, closed: threading.Event | None = None) -> Handler:
    """Headers and 100 bytes, then nothing until ``release`` or the client closes (then ``closed`` is set)."""
    def holding(conn: socket.socket, request: Request) -> bool:
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(DATA)}\r\n\r\n".encode() + DATA[:100])
        if not watch(conn, release) and closed is not None:
            closed.set()
        return False
    return holding


async def read_one_then_block(client: httpx.AsyncClient, url: str) -> tuple[httpx.Response, Any]:
    """A streamed response whose first bytes were read: its read-ahead is now blocked in its thread."""
    response = await client.send(client.build_request("GET", url + PATH), stream=True)
    chunks = response.aiter_raw()
    assert bytes(await anext(chunks)) == DATA[:100]
    await asyncio.sleep(0.2)
    return response, chunks


async def test_a_cancelled_read_leaves_no_unretrieved_exception(serve, caplog):
    release = threading.Event()
    server = serve(little(release))
    transport = ThreadTransport()
    caplog.set_level(logging.ERROR, "asyncio")
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            response, chunks = await read_one_then_block(client, server.url)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):    # what the stall watch does to a trickle
                    await anext(chunks)
            await response.aclose()
            await asyncio.sleep(0.2)                # the thread's ReadError reaches the loop
            del response, chunks                    # what held the read's future
            gc.collect()
            await asyncio.sleep(0.1)
    finally:
        release.set()
        await transport.aclose()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
    assert transport._slots is not None and transport._slots._value == transport._max


async def test_a_task_cancelled_while_closing_a_response_ends_cancelled(serve):
    release, closed = threading.Event(), threading.Event()
    server = serve(little(release, closed))
    transport = ThreadTransport()
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            response, _ = await read_one_then_block(client, server.url)
            entered = asyncio.Event()
            after: list[str] = []

            async def close() -> None:
                entered.set()
                await response.aclose()     # waits for the blocked read-ahead's thread
                after.append("went on")

            task = asyncio.ensure_future(close())
            await entered.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert task.cancelled() and after == []
            assert closed.wait(5)           # the connection was closed all the same
            for _ in range(50):             # and the slot comes back once the thread has returned
                if transport._slots is not None and transport._slots._value == transport._max:
                    break
                await asyncio.sleep(0.05)
            assert transport._slots is not None and transport._slots._value == transport._max
    finally:
        release.set()
        await transport.aclose()


BAD_NAMES = ["a" * 64 + ".example", "a..b"]     # a label over 63 characters; an empty label


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_a_host_name_that_cannot_be_encoded_is_a_connect_error(serve, name):
    transport = ThreadTransport()
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            with pytest.raises(httpx.ConnectError, match="bad host name"):
                await client.get(f"http://{name}/x")
    finally:
        await transport.aclose()
    assert transport._slots is not None and transport._slots._value == transport._max


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_a_redirect_to_a_host_name_that_cannot_be_encoded_is_unreachable(serve, name):
    def redirect(conn: socket.socket, request: Request) -> bool:
        conn.sendall(f"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{name}/blob\r\n"
                     f"Content-Length: 0\r\n\r\n".encode())
        return True

    server = serve(redirect)
    client = UpstreamClient(server.url)
    try:
        with pytest.raises(UpstreamUnreachable, match="ConnectError"):
            await client.open_blob("acme/tool", DIGEST)
    finally:
        await client.aclose()
    assert [r.target for r in server.requests] == [PATH]


async def test_an_international_host_name_is_looked_up_and_sent_as_sni_in_its_idna_form(serve, tmp_path, monkeypatch):
    """httpx writes straße.de in Host as xn--strae-oqa.de (IDNA 2008); the name looked up and sent
    as SNI is that one, not Python's IDNA 2003 form (strasse.de). The lookup is answered with
    127.0.0.1 for it (the resolver, not our code, is stood in for: no name service is asked)."""
    looked_up: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        looked_up.append(host)
        if host != "xn--strae-oqa.de":
            raise socket.gaierror(socket.EAI_NONAME, "not this one")
        return real("127.0.0.1", port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    server_names: list[str | None] = []
    context, _ = tls_server_context(tmp_path)
    context.sni_callback = lambda sock, name, ctx: server_names.append(name)
    plain, tls = serve(blob), serve(blob, tls=context)
    transport = ThreadTransport()
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            assert (await client.get(f"http://straße.de:{plain.port}{PATH}")).content == DATA
            with pytest.raises(httpx.ConnectError):     # its certificate is for 127.0.0.1
                await client.get(f"https://straße.de:{tls.port}{PATH}")
    finally:
        await transport.aclose()
    assert looked_up == ["xn--strae-oqa.de", "xn--strae-oqa.de"]
    assert plain.requests[0].headers["host"] == f"xn--strae-oqa.de:{plain.port}"
    assert server_names == ["xn--strae-oqa.de"]


def interim(*heads: bytes) -> Handler:
    """These interim answers (with their headers), then the blob."""
    def answering(conn: socket.socket, request: Request) -> bool:
        for head in heads:
            conn.sendall(head)
            time.sleep(0.05)        # apart from the final answer, as a real upstream sends them
        return blob(conn, request)
    return answering


EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"


async def test_interim_answers_are_skipped_and_the_blob_read(serve):
    server = serve(interim(EARLY_HINTS, b"HTTP/1.1 102 Processing\r\n\r\n", EARLY_HINTS))
    await fetch_each(server, 2)
    assert server.connections == 1 and len(server.requests) == 2


async def test_endless_interim_answers_or_a_101_are_a_protocol_error(serve):
    for heads in ([EARLY_HINTS] * 20, [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n"]):
        server = serve(interim(*heads))
        client = UpstreamClient(server.url)
        try:
            with pytest.raises(UpstreamUnreachable, match="RemoteProtocolError"):
                await client.open_blob("acme/tool", DIGEST)
        finally:
            await client.aclose()
        assert server.closed_by_peer.wait(5)    # that connection was closed, not pooled


@pytest.fixture
def many_files():
    """Over 1024 descriptors open in this process (the soft limit raised for it, and put back)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1200 + 64
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"the hard limit on open files is {hard}")
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else hard, hard))
    fds: list[int] = []
    try:
        fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(1200)]
        assert max(fds) >= 1024
        yield
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_connections_are_reused_when_descriptors_are_numbered_over_1024(serve, many_files):
    server = serve(blob)
    await fetch_each(server, 3)
    assert server.connections == 1 and len(server.requests) == 3


async def read_ahead(bodies: list, want: int) -> None:
    """Each body's thread reads ``want`` chunks ahead of a consumer that takes nothing, and stops there."""
    deadline = time.monotonic() + 10
    while any(len(body._ahead) < want for body in bodies) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)        # and no thread reads further
    assert [len(body._ahead) for body in bodies] == [want] * len(bodies)
    assert not any(body._reading for body in bodies)


async def test_the_body_is_read_ahead_of_its_consumer_at_most_ahead_chunks(serve):
    """The body's thread goes on reading while the consumer handles a chunk (it is not asked for
    each one: a hand-off through the event loop per chunk left it idle half the time), and stops
    AHEAD chunks ahead of a consumer that takes nothing: the memory a slow consumer costs is bounded."""
    server = serve(blob)
    transport = ThreadTransport()
    client = httpx.AsyncClient(transport=transport)
    try:
        response = await client.send(client.build_request("GET", server.url + PATH), stream=True)
        body = response.stream._stream      # our _Body, under httpx's wrapper
        chunks = response.aiter_raw()
        out = bytearray(await anext(chunks))
        await read_ahead([body], blobtransport.AHEAD)    # nothing asked for: the thread reads on its own
        assert all(len(chunk) == blobtransport.CHUNK for chunk in body._ahead)
        async for chunk in chunks:
            out += chunk
        assert digest(bytes(out)) == DIGEST
        await response.aclose()
    finally:
        await client.aclose()
    assert server.connections == 1


async def test_with_many_bodies_open_each_reads_one_chunk_ahead(serve):
    """More than FEW_BODIES bodies at once (many different cold blobs): each reads only one chunk
    ahead of its consumer, so many streams do not hold twice the memory; with few open again, a
    body reads AHEAD chunks ahead. Every body still arrives whole."""
    server = serve(blob)
    transport = ThreadTransport()
    client = httpx.AsyncClient(transport=transport)
    count = blobtransport.FEW_BODIES + 2

    try:
        responses = [await client.send(client.build_request("GET", server.url + PATH), stream=True)
                     for _ in range(count)]
        readers = [response.aiter_raw() for response in responses]
        outs = [bytearray(await anext(chunks)) for chunks in readers]
        await read_ahead([response.stream._stream for response in responses], 1)
        for response in responses[blobtransport.FEW_BODIES:]:
            await response.aclose()
        kept = responses[:blobtransport.FEW_BODIES]
        for out, chunks in zip(outs, readers[:len(kept)]):
            out += await anext(chunks)      # taken: room to read ahead again, AHEAD now
        await read_ahead([response.stream._stream for response in kept], blobtransport.AHEAD)
        for out, chunks, response in zip(outs, readers, kept):
            async for chunk in chunks:
                out += chunk
            assert digest(bytes(out)) == DIGEST
            await response.aclose()
    finally:
        await client.aclose()


async def test_an_error_after_chunks_read_ahead_comes_after_them(serve):
    """A body cut short while the consumer pauses: it gets every byte that came, in order, then the error."""
    def cut(conn: socket.socket, request: Request) -> bool:
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(DATA)}\r\n\r\n".encode() + DATA[:3 * MiB])
        return False    # closed: 2 MiB + 123 bytes short
    server = serve(cut)
    client = httpx.AsyncClient(transport=ThreadTransport())
    try:
        response = await client.send(client.build_request("GET", server.url + PATH), stream=True)
        chunks = response.aiter_raw()
        out = bytearray(await anext(chunks))
        await asyncio.sleep(0.3)            # the thread reads the rest, and the error, meanwhile
        with pytest.raises(httpx.RemoteProtocolError, match="closed the connection"):
            async for chunk in chunks:
                out += chunk
        assert bytes(out) == DATA[:3 * MiB]
        await response.aclose()
    finally:
        await client.aclose()


async def test_a_body_read_to_its_end_keeps_its_connection_while_its_thread_returns(serve, monkeypatch):
    """The consumer may see the end before the thread that read it has returned: closing the
    response then waits for it, and does not abort the connection (which was then not reused)."""
    returned = blobtransport._Body._read_ahead

    def slow_to_return(self) -> None:
        returned(self)
        time.sleep(0.05)

    monkeypatch.setattr(blobtransport._Body, "_read_ahead", slow_to_return)
    server = serve(blob)
    await fetch_each(server, 3)
    assert server.connections == 1 and len(server.requests) == 3


async def test_a_body_closed_by_another_task_ends_its_waiting_consumer(serve):
    """The consumer waits for the thread (blocked in recv: the upstream sends nothing more) and
    another task closes the response: the consumer gets StreamClosed at once, not a wait forever."""
    release = threading.Event()
    server = serve(held(release))
    client = httpx.AsyncClient(transport=ThreadTransport())
    try:
        response = await client.send(client.build_request("GET", server.url + PATH), stream=True)
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in response.aiter_raw():
                first.set()

        consumer = asyncio.ensure_future(consume())
        await asyncio.wait_for(first.wait(), 10)
        await asyncio.sleep(0.2)            # waiting for the thread, which waits for the upstream
        await response.aclose()
        with pytest.raises(httpx.StreamClosed):
            await asyncio.wait_for(consumer, 10)
    finally:
        release.set()
        await client.aclose()


async def test_a_read_queued_when_the_transport_closes_ends_its_consumer(serve):
    """Every thread of the pool busy, the body's next read waits in the queue, and the transport
    closes (which drops queued jobs): the consumer gets a ReadError, not a wait forever."""
    server = serve(blob)
    transport = ThreadTransport(max_connections=1)
    client = httpx.AsyncClient(transport=transport)
    gate = threading.Event()
    try:
        response = await client.send(client.build_request("GET", server.url + PATH), stream=True)
        transport._executor.submit(gate.wait, 10)      # the pool's one thread, busy
        consumer = asyncio.ensure_future(anext(response.aiter_raw()))
        await asyncio.sleep(0.2)            # its read job is queued behind the busy thread
        assert not consumer.done()
        await transport.aclose()
        with pytest.raises(httpx.ReadError, match="pool was closed"):
            await asyncio.wait_for(consumer, 10)
        await response.aclose()
    finally:
        gate.set()
        await client.aclose()


# --- the address each answer came from (what dockermirror.upstream.peers checks a redirect by)

@pytest.mark.parametrize("pool", ["blobs", "api"])
async def test_both_pools_say_which_address_an_answer_came_from(serve, pool):
    """The thread transport's own extension and httpcore's network_stream: if either stopped
    saying, the redirect check would quietly check nothing (peers.peer_address gives None)."""
    from dockermirror.upstream.peers import peer_address
    server = serve(blob)
    client = UpstreamClient(server.url)
    try:
        http = client._blobs if pool == "blobs" else client._client
        assert isinstance(http._transport, ThreadTransport) is (pool == "blobs")
        async with http.stream("GET", server.url + PATH) as response:
            assert peer_address(response) == "127.0.0.1"
            assert len(b"".join([c async for c in response.aiter_raw()])) == len(DATA)
    finally:
        await client.aclose()


# --- an answer whose body's end is ambiguous (RFC 9112 6.1, 6.3): refused, its connection closed

AMBIGUOUS = {
    "chunked and a length": [b"Transfer-Encoding: chunked", b"Content-Length: 5"],
    "a length and chunked": [b"Content-Length: 5", b"Transfer-Encoding: chunked"],
    "gzip, chunked": [b"Transfer-Encoding: gzip, chunked"],
    "identity": [b"Transfer-Encoding: identity"],
    "chunked, chunked": [b"Transfer-Encoding: chunked, chunked"],
    "two chunked headers": [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
    "two lengths that differ": [b"Content-Length: 5", b"Content-Length: 50"],
    "a length with a sign": [b"Content-Length: +5"],
}


def ambiguous(framing: list[bytes]) -> Handler:
    """A small body framed as ``framing`` says; ``.../good`` is answered ``{}``: a request that got
    it over the bad answer's connection would have read what that answer left behind."""
    def handle(conn: socket.socket, request: Request) -> bool:
        if request.target.endswith("/good"):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            return True
        conn.sendall(b"HTTP/1.1 200 OK\r\n" + b"".join(line + b"\r\n" for line in framing) + b"\r\n"
                     + b"5\r\nhello\r\n0\r\n\r\n")
        return True
    return handle


@pytest.mark.parametrize("framing", AMBIGUOUS.values(), ids=AMBIGUOUS.keys())
async def test_a_blob_answer_with_ambiguous_framing_is_a_protocol_error_and_its_connection_closed(serve, framing):
    server = serve(ambiguous(framing))
    transport = ThreadTransport(verify=False)
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            with pytest.raises(httpx.RemoteProtocolError, match="refused"):
                await client.get(f"{server.url}{PATH}")
            assert server.closed_by_peer.wait(5)    # closed at once, not kept for another request
            good = await client.get(f"{server.url}/good")
        assert good.status_code == 200 and good.content == b"{}"
    finally:
        await transport.aclose()
    assert server.connections == 2          # the refused answer's connection was not reused
    assert server.closed_by_peer.wait(5)


@pytest.mark.parametrize("framing", AMBIGUOUS.values(), ids=AMBIGUOUS.keys())
@pytest.mark.parametrize("path", ["blobs", "manifests"])
async def test_an_upstream_answer_with_ambiguous_framing_is_refused_on_both_pools(serve, framing, path):
    """The blob pool (the thread transport) and the API pool (httpx's h11) refuse alike: the one
    error edge makes it the usual upstream error, and no connection is reused after it."""
    server = serve(ambiguous(framing))
    client = UpstreamClient(server.url)
    try:
        with pytest.raises(UpstreamUnreachable, match="RemoteProtocolError"):
            if path == "blobs":
                await client.open_blob("acme/tool", DIGEST)
            else:
                await client.manifest("acme/tool", "1.0", [], head=False)
        assert server.connections == 1 and server.closed_by_peer.wait(5)
        good = await client.manifest("acme/tool", "good", [], head=False)
        assert good.status == 200 and good.body == b"{}"
    finally:
        await client.aclose()
    assert server.connections == 2
    assert server.closed_by_peer.wait(5)


async def test_a_head_answer_s_framing_headers_frame_nothing_and_are_not_refused(serve):
    """A HEAD answer has no body (RFC 9110 9.3.2): both headers on it are no ambiguity."""
    def head(conn: socket.socket, request: Request) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n")
        return True

    server = serve(head)
    transport = ThreadTransport(verify=False)
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            answer = await client.head(f"{server.url}{PATH}")
        assert answer.status_code == 200
    finally:
        await transport.aclose()


# --- a read's buffer that something else still holds a view of

@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_short_read_into_a_buffer_someone_holds_a_view_of_is_copied_not_failed(serve, monkeypatch, framing):
    """Every buffer the reads are made into is kept alive here (as a debugger walking
    gc.get_objects() does for a moment): cutting a short read to size cannot be done in place,
    and must not fail the download."""
    import http.client
    held: list = []
    # a body of known length is read from the socket; a chunked one through http.client
    cls, name = (socket.socket, "recv_into") if framing == "length" else (http.client.HTTPResponse, "readinto")
    real = getattr(cls, name)

    def keeping(self, buffer, *args):
        held.append(buffer)
        return real(self, buffer, *args)

    monkeypatch.setattr(cls, name, keeping)

    def pausing(conn: socket.socket, request: Request) -> bool:
        half = len(DATA) // 2
        if framing == "length":
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(DATA)}\r\n\r\n".encode() + DATA[:half])
            time.sleep(0.3)     # longer than FLUSH_AFTER: the chunk read so far is handed on, short
            conn.sendall(DATA[half:])
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + f"{half:x}\r\n".encode() + DATA[:half] + b"\r\n")
            time.sleep(0.3)
            rest = DATA[half:]
            conn.sendall(f"{len(rest):x}\r\n".encode() + rest + b"\r\n0\r\n\r\n")
        return True

    server = serve(pausing)
    await fetch_each(server, 1)
    assert held
