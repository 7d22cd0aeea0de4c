"""Blob bodies read in threads: an httpx transport on the standard library's ``http.client``.

On the event loop, httpx/httpcore parse a body in pure Python (h11) and copy every chunk two
or three times while holding the loop; for a multi-hundred-MiB layer that, not the network,
limited a cold download (see the README's performance notes). This transport does the
request, and reads the body, in threads of its own pool: the thread does the blocking socket
work (and the TLS decryption) without the GIL and hands the loop one large chunk at a time
(up to CHUNK bytes, the first one small so that the first byte is not held back, and whatever
has come once FLUSH_AFTER has passed, so that a slow upstream's bytes are not held). The thread
reads on without being asked, up to AHEAD chunks ahead of the consumer: waiting to be asked for
each chunk (a hand-off through a busy event loop) left it idle for as long as it read. With more
than FEW_BODIES bodies open at once, each reads only one chunk ahead: a single stream gains from
the second, many streams only hold more memory. A
plain-HTTP body of known length is read, once ``http.client``'s buffer is empty, straight from
the socket with ``recv(MSG_WAITALL)``: one system call per chunk.

It keeps httpx's API for :mod:`.client`: the same exception classes (so its one error edge is
unchanged), the request's ``timeout`` extension, the ``trace`` event that arms the header
deadline in :func:`.bodies.send`, and a pool: at most ``max_connections`` requests at once
(waiting longer than the pool timeout for one is ``httpx.PoolTimeout``), idle keep-alive
connections kept per origin (at most ``max_keepalive``, for KEEPALIVE_EXPIRY seconds). A
response not read to its end closes its connection. Cancelling a request or closing its
response while its thread is blocked shuts its socket down, which frees the thread and the
slot at once. Header limits are ``http.client``'s own (lines of 64 KiB, 100 headers).

Only the blob pool uses it, and only for URLs that go straight to the upstream: a URL httpx
would send through a proxy (``HTTP(S)_PROXY``, ``ALL_PROXY``, ``NO_PROXY``) keeps going through
httpx's own proxy transport (see :func:`proxy_mounts`).
"""

from __future__ import annotations

import asyncio
import collections
import http.client
import io
import logging
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx

from dockermirror.upstream.bodies import framing_problem

CHUNK = 1024 * 1024        # most bytes handed to the loop at once
FIRST_CHUNK = 16 * 1024    # the first read of a body: small, so its first byte is not held back
AHEAD = 2                  # chunks a body's thread reads before its consumer takes them ...
FEW_BODIES = 4             # ... while at most this many bodies are open (1 chunk ahead with more)
STEP = 16 * 1024           # a chunk is filled this much at a time (a blocking read: a quarter of MIN_PROGRESS) ...
FLUSH_AFTER = 0.05         # ... and handed on once it has taken this long (a slow upstream's bytes are not held)
DIRECT = True              # plain-HTTP bodies of known length read with recv(MSG_WAITALL)
_TIMEVAL = struct.pack("ll", 0, int(FLUSH_AFTER * 1_000_000))
_NO_TIMEVAL = struct.pack("ll", 0, 0)
KEEPALIVE_EXPIRY = 5.0     # seconds an idle connection is kept for reuse (httpcore's default)

Origin = tuple[str, str, int]


class _Connection:
    """One ``http.client`` connection; :meth:`abort` (from any thread) unblocks the thread using it,
    even in its connect or TLS handshake: a duplicate of its socket is kept to shut it down."""

    def __init__(self, origin: Origin, conn: http.client.HTTPConnection) -> None:
        self.origin = origin
        self.conn = conn
        self.idle_since = 0.0
        self.aborted = False
        self._lock = threading.Lock()
        self._handle: socket.socket | None = None     # a dup of the socket, for shutdown()
        self.peer: tuple | None = None      # the address connected to (see .peers)
        conn._create_connection = self._create      # type: ignore[attr-defined]

    def _create(self, address: tuple[str, int], timeout: float | None = None,
                source_address: Any = None) -> socket.socket:
        """``socket.create_connection``, with the socket made known before it connects."""
        host, port = address
        error: OSError | None = None
        for family, kind, proto, _, where in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            with self._lock:
                if self.aborted:
                    sock.close()
                    raise OSError("the request was cancelled")
                if self._handle is not None:
                    self._handle.close()
                self._handle = sock.dup()
            try:
                sock.settimeout(timeout)
                sock.connect(where)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.peer = where
                return sock
            except OSError as exc:
                error = exc
                sock.close()
                if self.aborted:
                    break
        raise error or OSError(f"no address for {host}")

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            handle = self._handle
        if handle is not None:
            try:
                handle.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def sock(self) -> socket.socket | None:
        return self.conn.sock

    def close(self) -> None:
        self.conn.close()
        with self._lock:
            handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()

    def usable(self) -> bool:
        """An idle connection the server has not closed (nothing to read on it: no EOF, no junk)."""
        sock = self.sock
        if sock is None or self.aborted:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():    # bytes already decrypted: junk
            return False
        try:    # poll, not select: a busy mirror's sockets have numbers over FD_SETSIZE (1024)
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLPRI)
            events = poller.poll(0)
        except (OSError, ValueError):
            return False
        return not events   # readable (EOF or bytes), hung up or in error: not to be reused


class _Call:
    """The connection a request's thread is using, so that cancelling the request can abort it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.conn: _Connection | None = None
        self.cancelled = False

    def attach(self, conn: _Connection) -> None:
        with self._lock:
            self.conn = conn
            cancelled = self.cancelled
        if cancelled:
            conn.abort()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            conn = self.conn
        if conn is not None:
            conn.abort()


class ThreadTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over ``http.client``, each blocking step in a thread of a bounded pool."""

    def __init__(self, *, verify: ssl.SSLContext | bool = True, max_connections: int = 64,
                 max_keepalive: int = 32, keepalive_expiry: float = KEEPALIVE_EXPIRY) -> None:
        self._ssl = httpx.create_ssl_context(verify=verify) if not isinstance(verify, ssl.SSLContext) else verify
        self._max = max_connections
        self._max_idle = max_keepalive
        self._expiry = keepalive_expiry
        self._executor = ThreadPoolExecutor(max_workers=max_connections, thread_name_prefix="upstream-body")
        self._idle: list[_Connection] = []      # oldest first
        self._lock = threading.Lock()
        self._slots: asyncio.Semaphore | None = None
        self._closed = False
        self._bodies = 0        # bodies open (changed under _lock; read without it by _ahead_limit)

    def _opened(self, n: int) -> None:
        with self._lock:
            self._bodies += n

    def _ahead_limit(self) -> int:
        """Chunks a body may read before its consumer takes them."""
        return AHEAD if self._bodies <= FEW_BODIES else 1

    # --- the pool

    def _semaphore(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max)
        return self._slots

    async def _acquire(self, timeout: float | None) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._semaphore().acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no free upstream connection in time") from None

    def _release(self, loop: asyncio.AbstractEventLoop) -> None:
        """Give the slot back (from the loop's thread or a worker's)."""
        slots = self._slots
        if slots is None:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            slots.release()
            return
        try:
            loop.call_soon_threadsafe(slots.release)
        except RuntimeError:    # the loop is closed: nothing waits for the slot any more
            pass

    def _idle_for(self, origin: Origin) -> _Connection | None:
        now = time.monotonic()
        found = None
        with self._lock:
            keep = []
            for conn in self._idle:
                if now - conn.idle_since > self._expiry:
                    conn.close()
                elif found is None and conn.origin == origin:
                    found = conn
                else:
                    keep.append(conn)
            self._idle = keep
        return found

    def _put_back(self, conn: _Connection) -> None:
        with self._lock:
            if self._closed:
                conn.close()
                return
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
            while len(self._idle) > self._max_idle:
                self._idle.pop(0).close()

    async def aclose(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- a request

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed")
        scheme = request.url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}", request=request)
        timeouts = request.extensions.get("timeout", {})
        trace = request.extensions.get("trace")
        body = b""
        if request.method not in ("GET", "HEAD") or "content-length" in request.headers \
                or "transfer-encoding" in request.headers:
            body = await request.aread()
        loop = asyncio.get_running_loop()
        await self._acquire(timeouts.get("pool"))
        call = _Call()
        future: Future[tuple[_Connection, http.client.HTTPResponse]] | None = None
        try:
            if trace is not None:   # bodies.send arms the header deadline on it
                await trace("http11.send_request_headers.started", {"request": request})
            future = self._executor.submit(self._exchange, request, body, timeouts, call)
            conn, response = await asyncio.wrap_future(future, loop=loop)
        except asyncio.CancelledError:
            call.cancel()           # the thread returns at once; it holds the slot until then
            if future is None:
                self._release(loop)
            else:
                future.add_done_callback(lambda f: self._abandon(f, loop))
            raise
        except BaseException:
            self._release(loop)
            raise
        stream = _Body(self, loop, conn, response, request, timeouts.get("read"))
        return httpx.Response(response.status, headers=_headers(response.getheaders()), stream=stream,
                              request=request,
                              extensions={"http_version": b"HTTP/1.1",
                                          "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
                                          "server_addr": conn.peer})

    def _abandon(self, future: Future, loop: asyncio.AbstractEventLoop) -> None:
        """A request was cancelled while its thread worked: close what the thread got, free the slot."""
        try:
            if not future.cancelled() and future.exception() is None:
                conn, response = future.result()
                response.close()
                conn.close()
        finally:
            self._release(loop)

    # --- in the thread

    def _exchange(self, request: httpx.Request, body: bytes, timeouts: dict,
                  call: _Call) -> tuple[_Connection, http.client.HTTPResponse]:
        url = request.url
        try:    # the name as httpx writes it in Host (IDNA-encoded): connected to, and sent as SNI
            host = url.raw_host.decode("ascii")
        except UnicodeError:
            raise httpx.ConnectError(f"bad host name {url.raw_host!r}", request=request) from None
        origin = (url.scheme, host, url.port or (443 if url.scheme == "https" else 80))
        # a reused connection the server closed meanwhile: once more on a new one (GET and HEAD only)
        for attempt in (0, 1):
            conn = self._idle_for(origin) if attempt == 0 else None
            reused = conn is not None
            if conn is not None and not conn.usable():
                conn.close()
                conn, reused = None, False
            if conn is None:
                conn = self._connect(origin, timeouts, call, request)
            else:
                call.attach(conn)
            try:
                return conn, self._send(conn, request, body, timeouts)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                conn.close()
                if reused and request.method in ("GET", "HEAD") and not conn.aborted:
                    continue
                raise _read_error(exc, request) from None
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    def _connect(self, origin: Origin, timeouts: dict, call: _Call, request: httpx.Request) -> _Connection:
        scheme, host, port = origin
        connect_timeout = timeouts.get("connect")
        if scheme == "https":
            raw: http.client.HTTPConnection = http.client.HTTPSConnection(host, port, timeout=connect_timeout,
                                                                          context=self._ssl)
        else:
            raw = http.client.HTTPConnection(host, port, timeout=connect_timeout)
        raw.response_class = _Response
        conn = _Connection(origin, raw)
        call.attach(conn)
        try:
            conn.conn.connect()
            if conn.aborted:
                raise OSError("the request was cancelled")
        except (TimeoutError, socket.timeout) as exc:
            conn.close()
            raise httpx.ConnectTimeout(str(exc) or "timed out connecting", request=request) from None
        except ssl.SSLError as exc:
            conn.close()
            raise httpx.ConnectError(f"TLS: {exc}", request=request) from None
        except OSError as exc:
            conn.close()
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from None
        except ValueError as exc:   # a name getaddrinfo or SNI cannot encode (an empty label, one over 63)
            conn.close()
            raise httpx.ConnectError(f"bad host name {host!r}: {exc}", request=request) from None
        return conn

    def _send(self, conn: _Connection, request: httpx.Request, body: bytes,
              timeouts: dict) -> http.client.HTTPResponse:
        sock = conn.sock
        if sock is not None:
            sock.settimeout(timeouts.get("write"))
        raw = conn.conn
        try:
            raw.putrequest(request.method, request.url.raw_path.decode("ascii"),
                           skip_host=True, skip_accept_encoding=True)
            for name, value in request.headers.raw:
                raw.putheader(name.decode("latin-1"), value)
            if body and "content-length" not in request.headers:
                raw.putheader("Content-Length", str(len(body)))
        except (ValueError, http.client.InvalidURL, UnicodeError) as exc:
            raise httpx.LocalProtocolError(str(exc)) from None
        try:
            raw.endheaders(body or None)
        except (TimeoutError, socket.timeout) as exc:
            raise httpx.WriteTimeout(str(exc) or "timed out writing the request") from None
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            raise
        except OSError as exc:
            raise httpx.WriteError(str(exc) or type(exc).__name__) from None
        if sock is not None:
            sock.settimeout(timeouts.get("read"))
        try:
            return raw.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            raise
        except (TimeoutError, socket.timeout) as exc:
            raise httpx.ReadTimeout(str(exc) or "timed out reading the answer") from None
        except (http.client.HTTPException, ValueError) as exc:     # a bad status line, too many headers, ...
            raise httpx.RemoteProtocolError(_protocol(exc)) from None
        except OSError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from None


MAX_INTERIM = 10           # interim (1xx) answers skipped before the final one, at most
_MAX_LINE, _MAX_HEADERS = 65536, 100    # http.client's own limits


class _Response(http.client.HTTPResponse):
    """``http.client``'s response, which skips only ``100 Continue``: here every interim answer
    (``103 Early Hints``, ``102 Processing``, ...) is skipped with its headers, as httpx does, and
    ``101 Switching Protocols`` (never asked for) is a protocol error, its connection not reused."""

    def begin(self) -> None:
        """The status line and headers; an answer whose body's end is ambiguous (see
        :func:`.bodies.framing_problem`: both Transfer-Encoding and Content-Length, any coding but
        ``chunked``, a Content-Length that is no plain number) is a protocol error, and its connection
        is closed. (``http.client`` would read such a body as chunked, or until the connection closes,
        or to the first of two Content-Lengths, leaving the rest to be read as the next answer.)"""
        super().begin()
        if self._method == "HEAD" or self.status in (204, 304):     # no body to frame
            return
        problem = framing_problem(_headers(self.getheaders()))
        if problem is not None:
            self.will_close = True
            raise http.client.HTTPException(f"the upstream's answer was refused: {problem}")

    def _read_status(self) -> tuple[str, int, str]:
        for _ in range(MAX_INTERIM + 1):
            version, status, reason = super()._read_status()    # type: ignore[misc]
            if status == 101:
                raise http.client.HTTPException("101 Switching Protocols, which was not asked for")
            if not 100 < status < 200:      # 100: http.client skips it (and its headers) itself
                return version, status, reason
            self._skip_headers()
        raise http.client.HTTPException(f"more than {MAX_INTERIM} interim (1xx) answers")

    def _read_and_discard_trailer(self) -> None:
        """After a chunked body's last chunk (every byte of the body has arrived): its trailer,
        skipped, but at most _MAX_HEADERS lines of at most _MAX_LINE bytes. An upstream that sends
        more (an endless trailer, which http.client would read for as long as it comes) ends its
        body here, and its connection is not reused."""
        for _ in range(_MAX_HEADERS + 1):
            line = self.fp.readline(_MAX_LINE + 1)
            if len(line) > _MAX_LINE:
                break
            if line in (b"\r\n", b"\n", b""):
                return
        self.will_close = True

    def _skip_headers(self) -> None:
        for _ in range(_MAX_HEADERS + 1):
            line = self.fp.readline(_MAX_LINE + 1)
            if len(line) > _MAX_LINE:
                raise http.client.LineTooLong("header line")
            if line in (b"\r\n", b"\n", b""):
                return
        raise http.client.HTTPException(f"more than {_MAX_HEADERS} headers in an interim answer")


class _Body(httpx.AsyncByteStream):
    """A response body read in the transport's threads, up to AHEAD chunks ahead of the consumer
    (one with more than FEW_BODIES bodies open)."""

    def __init__(self, transport: ThreadTransport, loop: asyncio.AbstractEventLoop, conn: _Connection,
                 response: http.client.HTTPResponse, request: httpx.Request, read_timeout: float | None) -> None:
        self._transport = transport
        self._loop = loop
        self._conn = conn
        self._response = response
        self._request = request
        self._done = False          # the body was read to its end
        self._closed = False
        self._next: Future[None] | None = None      # the thread reading ahead (the last one started)
        # what the thread read that the consumer has not taken yet: chunks, then b"" at the end or
        # the error that ended the reads; guarded by _lock, like _reading, _ended and _waiter
        self._lock = threading.RLock()     # (a job's done callback may run where it is held)
        self._ahead: collections.deque[bytearray | BaseException] = collections.deque()
        self._reading = False       # a thread is reading ahead (or about to)
        self._ended = False         # the thread read the end, or an error: it reads no more
        self._waiter: asyncio.Future[None] | None = None    # the consumer, waiting for a chunk
        self._want = FIRST_CHUNK
        self._error: httpx.TransportError | None = None    # to raise at the next read
        self._read_timeout = read_timeout
        # A plain-HTTP body of known length is read straight from the socket once http.client's
        # buffer is empty (after the first read): recv(MSG_WAITALL) fills a whole chunk in one call
        # (one system call and one GIL hand-off per CHUNK, not one per few KiB).
        self._left: int | None = None       # bytes of the body still to come, in that mode
        self._direct = (DIRECT and not response.chunked and response.length is not None
                        and not isinstance(conn.sock, ssl.SSLSocket) and conn.sock is not None)
        transport._opened(1)    # until _finish

    def _read(self, want: int) -> bytearray:
        """Up to ``want`` bytes (fewer once FLUSH_AFTER has passed, or at the end); empty at the end.
        The bytes that came before an error are handed on first; the error with the next read."""
        if self._error is not None:
            raise self._error
        if self._left is not None:
            return self._read_direct(want)
        if self._direct:        # empties http.client's buffer: from here on the socket is read directly
            first = self._readinto_first(want)
            self._left = self._response.length or 0
            if not self._left:
                self._response.close()  # at its end: the connection may take the next request
            return first
        buf = bytearray(want)
        view = memoryview(buf)
        filled = 0
        began = time.monotonic()
        try:
            while filled < want:
                n = self._readinto(view[filled: filled + min(STEP, want - filled)])
                if not n:
                    break
                filled += n
                if time.monotonic() - began > FLUSH_AFTER:
                    break
        except httpx.TransportError as exc:
            if not filled:
                raise
            self._error = exc
            return buf[:filled]     # a copy: the error's traceback may still hold a view of buf
        finally:
            view.release()
        return _cut(buf, filled)

    def _readinto_first(self, want: int) -> bytearray:
        """What http.client has buffered after the headers (or one read): read1 takes it all."""
        try:
            data = self._response.read1(max(want, io.DEFAULT_BUFFER_SIZE))   # all http.client buffered
        except (TimeoutError, socket.timeout) as exc:
            raise httpx.ReadTimeout(str(exc) or "timed out reading the body", request=self._request) from None
        except (http.client.HTTPException, ValueError) as exc:
            raise httpx.RemoteProtocolError(_protocol(exc), request=self._request) from None
        except OSError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=self._request) from None
        if not data and self._response.length:
            raise httpx.RemoteProtocolError(f"the peer closed the connection {self._response.length} bytes "
                                            f"before the end of the body", request=self._request)
        return bytearray(data)

    def _read_direct(self, want: int) -> bytearray:
        """Up to ``want`` bytes of the rest of the body from the socket: a whole chunk, or what came
        within FLUSH_AFTER (a slow upstream's bytes are not held); empty at the end."""
        left = self._left or 0
        if not left:
            return bytearray()
        sock = self._conn.sock
        assert sock is not None
        want = min(want, left)
        buf = bytearray(want)
        view = memoryview(buf)
        filled = 0
        waited = 0.0
        sock.settimeout(None)       # blocking, the wait bounded by SO_RCVTIMEO (no poll per read)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL)
        try:
            while filled < want:
                try:
                    n = sock.recv_into(view[filled:], want - filled, socket.MSG_WAITALL)
                except BlockingIOError:         # SO_RCVTIMEO passed without a byte
                    if filled:
                        break
                    waited += FLUSH_AFTER
                    if self._read_timeout is not None and waited >= self._read_timeout:
                        raise httpx.ReadTimeout("timed out reading the body", request=self._request) from None
                    continue
                except OSError as exc:
                    raise httpx.ReadError(str(exc) or type(exc).__name__, request=self._request) from None
                if not n:
                    if self._conn.aborted:
                        raise httpx.ReadError("the read was cancelled", request=self._request)
                    raise httpx.RemoteProtocolError(f"the peer closed the connection {left - filled} bytes "
                                                    f"before the end of the body", request=self._request)
                filled += n
                if filled < want:   # MSG_WAITALL came back early: SO_RCVTIMEO passed with bytes in hand
                    break
        except httpx.TransportError as exc:
            if not filled:
                raise
            self._error = exc
            self._left = left - filled
            return buf[:filled]     # a copy: the error's traceback may still hold a view of buf
        finally:
            view.release()
        buf = _cut(buf, filled)
        self._left = left - filled
        if not self._left:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _NO_TIMEVAL)
            self._response.close()  # read to its end: http.client lets the connection send again
        return buf

    def _readinto(self, view: memoryview) -> int:
        """http.client's readinto, its failures as httpx's exceptions."""
        response = self._response
        try:
            n = response.readinto(view)
        except http.client.IncompleteRead as exc:
            raise httpx.RemoteProtocolError(f"the peer closed the connection before the end of the body "
                                            f"({exc})", request=self._request) from None
        except (TimeoutError, socket.timeout) as exc:
            raise httpx.ReadTimeout(str(exc) or "timed out reading the body", request=self._request) from None
        except (http.client.HTTPException, ValueError) as exc:
            if self._conn.aborted:
                raise httpx.ReadError("the read was cancelled", request=self._request) from None
            raise httpx.RemoteProtocolError(_protocol(exc), request=self._request) from None
        except OSError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=self._request) from None
        # http.client ends a body cut short quietly: less than its Content-Length is an error
        if not n and getattr(response, "length", None) and not self._conn.aborted:
            raise httpx.RemoteProtocolError(f"the peer closed the connection {response.length} bytes before "
                                            f"the end of the body", request=self._request)
        return n

    def _read_ahead(self) -> None:
        """In a pool thread: read chunks until the transport's limit of them (``_ahead_limit``) wait
        for the consumer, the body ends, a read fails, or the body is closed. The consumer is woken
        only if it waits: one that keeps up finds the next chunk read already, and the thread goes
        on without waiting to be asked."""
        while True:
            item: bytearray | BaseException
            try:
                item = self._read(self._want)
            except BaseException as exc:    # (httpx's errors, from _read) handed to the consumer
                item = exc
            self._want = CHUNK
            with self._lock:
                if not self._closed:    # (closed meanwhile: its error is the abort's, nobody's to see)
                    self._ahead.append(item)
                self._ended = isinstance(item, BaseException) or not item
                stop = self._ended or self._closed or len(self._ahead) >= self._transport._ahead_limit()
                if stop:
                    self._reading = False
                waiter, self._waiter = self._waiter, None
            self._wake_from_thread(waiter)
            if stop:
                return

    def _wake_from_thread(self, waiter: asyncio.Future[None] | None) -> None:
        """Wake the consumer waiting on ``waiter`` (if any) from a thread other than the loop's."""
        if waiter is not None:
            try:
                self._loop.call_soon_threadsafe(_wake, waiter)
            except RuntimeError:    # the loop is closed: nobody waits any more
                pass

    def _restart(self) -> None:
        """(Under _lock, on the loop) start a thread reading ahead if none is and there is room."""
        if self._reading or self._ended or self._closed or len(self._ahead) >= self._transport._ahead_limit():
            return
        try:
            job = self._transport._executor.submit(self._read_ahead)
        except RuntimeError:        # the transport is closed
            self._pool_closed()
            return
        self._reading = True
        self._next = job
        job.add_done_callback(self._not_run)

    def _not_run(self, job: Future[None]) -> None:
        """A read job cancelled before it ran (the transport closed): the consumer must not wait for it."""
        if job.cancelled():
            with self._lock:
                self._reading = False
                self._pool_closed()
                waiter, self._waiter = self._waiter, None
            self._wake_from_thread(waiter)

    def _pool_closed(self) -> None:
        """(Under _lock) no more reads: the consumer gets a ReadError after what was read."""
        self._ended = True
        self._ahead.append(httpx.ReadError("the upstream connection pool was closed", request=self._request))

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._done or self._closed:
            return
        while True:
            with self._lock:
                item = self._ahead.popleft() if self._ahead else None
                waiter = None
                if item is None:
                    if self._closed or self._ended:     # closed by another task; read again after its end
                        raise httpx.StreamClosed()
                    waiter = self._waiter = self._loop.create_future()
                self._restart()
            if waiter is not None:
                try:
                    await waiter
                except asyncio.CancelledError:
                    self._conn.abort()      # the thread returns; aclose() waits for it
                    raise
                continue
            if isinstance(item, BaseException):
                raise item
            if not item:
                self._done = True
                return
            yield item     # type: ignore[misc]  # a bytearray: the consumers only need a buffer

    async def aclose(self) -> None:
        if self._closed:
            return
        with self._lock:        # the thread reads no more after this read
            self._closed = True
            self._ahead.clear()
            conn, pending, reading = self._conn, self._next, self._reading
            consumer, self._waiter = self._waiter, None
        if consumer is not None:    # a consumer in another task, waiting: it finds the body closed
            _wake(consumer)
        reusable = self._done and self._response.isclosed() and not self._response.will_close
        # a thread still reading is stopped, and waited for; one that stopped reading is only
        # returning (it uses the connection no more)
        if pending is not None and reading and not pending.done():
            conn.abort()
            waiter = asyncio.wrap_future(pending, loop=self._loop)
            try:
                await asyncio.shield(waiter)
            except asyncio.CancelledError:
                # cancelled while the thread returns: it cleans up when it has, and the task stays cancelled
                waiter.add_done_callback(_retrieve)
                pending.add_done_callback(lambda _: self._finish(False))
                raise
            except Exception:   # the read's own error: the response is being closed anyway
                pass
        elif pending is not None and pending.done() and not pending.cancelled():
            pending.exception()     # mark retrieved
        self._finish(reusable)

    def _finish(self, reusable: bool) -> None:
        """The connection back to the pool (or closed) and the slot freed: from the loop or a worker."""
        conn = self._conn
        try:
            if reusable and not conn.aborted:
                self._transport._put_back(conn)
            else:
                self._response.close()
                conn.close()
        finally:
            self._transport._opened(-1)
            self._transport._release(self._loop)


def _cut(buf: bytearray, size: int) -> bytearray:
    """``buf`` cut to its first ``size`` bytes: in place, or a copy if something else still
    holds a view of it (anything that keeps every object alive a moment, such as a debugger
    walking ``gc.get_objects()``, may hold the view a read was made into; resizing would raise
    BufferError and fail the download)."""
    if size < len(buf):
        try:
            del buf[size:]
        except BufferError:
            return buf[:size]
    return buf


def _headers(items: list[tuple[str, str]]) -> httpx.Headers:
    """``http.client``'s headers (decoded as Latin-1, folded lines joined) as httpx's."""
    return httpx.Headers([(k.encode("latin-1"), " ".join(v.split("\r\n")).encode("latin-1")) for k, v in items])


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _retrieve(future: asyncio.Future | Future) -> None:
    """Mark a future's outcome as seen (no "exception was never retrieved" for a read we gave up on)."""
    if not future.cancelled():
        future.exception()


def _read_error(exc: BaseException, request: httpx.Request) -> httpx.TransportError:
    if isinstance(exc, http.client.RemoteDisconnected):
        return httpx.RemoteProtocolError("the server closed the connection without answering", request=request)
    return httpx.ReadError(str(exc) or type(exc).__name__, request=request)


def _protocol(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def proxy_mounts(verify: ssl.SSLContext | bool, limits: httpx.Limits) -> dict[str, httpx.AsyncBaseTransport | None] | None:
    """The mounts that keep httpx's own proxy transport for the URLs it would send through a
    proxy (and this transport, ``None``, for the others); None when httpx's rule cannot be
    read here while proxies are set: then the thread transport must not be used at all."""
    import urllib.request
    try:
        from httpx._utils import get_environment_proxies     # the rule httpx itself applies
        rule = get_environment_proxies()
        if not all(isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in rule.items()):
            raise TypeError(f"unexpected mounts {rule!r}")
    except Exception as exc:       # httpx's internals moved (its version is bounded in pyproject.toml)
        if not urllib.request.getproxies():
            return {}
        _log_drift_once(exc)
        return None
    return {pattern: None if url is None else httpx.AsyncHTTPTransport(verify=verify, limits=limits,
                                                                        proxy=httpx.Proxy(url=url))
            for pattern, url in rule.items()}


_drift_logged = False


def _log_drift_once(exc: Exception) -> None:
    """One warning per process: proxies are set and httpx's rule for them cannot be read here."""
    global _drift_logged
    if not _drift_logged:
        _drift_logged = True
        logging.getLogger("dockermirror.upstream").warning(
            "self-check: httpx %s internals are not what docker-mirror was built against (its proxy rule: "
            "%s: %s); with proxies set, blob bodies are read by httpx itself (correct, slower cold downloads)",
            httpx.__version__, type(exc).__name__, exc)
