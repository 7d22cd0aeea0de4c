"""The HTTP protocol the daemon serves with: uvicorn's httptools protocol, plus

* the ASGI "Zero Copy Send" extension on plain TCP. A response that offers a file range
  (``{"type": "http.response.zerocopysend", "file": ..., "offset": ..., "count": ...}``)
  is sent with ``os.sendfile``: the kernel copies from the page cache to the socket and no
  byte passes through Python;
* limits on what a client may send and how slowly (request line and header size, header
  count, time to send the headers, request body size), answered 414/431/408/413 like
  nginx or Go's net/http would, and a deadline on a client that stops taking the response.

Zero-copy without a thread per client: the socket is non-blocking, so a ``sendfile`` call
takes only what fits in the socket buffer and never waits for the client. The calls run
in a small pool of threads (a file not in the page cache is read from disk inside
``sendfile``: that must not stall the event loop), at most BURST bytes per call; waiting
for the client to take more happens on the event loop, on a duplicate of the socket's
descriptor (uvloop refuses ``add_writer`` on a descriptor its transport owns, and the
duplicate stays this connection even if the transport closes meanwhile). So a slow
client costs one watched descriptor, not a thread, and cannot delay anyone else.
uvicorn writes nothing else on the connection while the range is sent; afterwards its
own byte accounting is told how much went out, so Content-Length is still enforced.
TLS connections do not get the extension (the bytes must be encrypted in user space).

On TLS, a client certificate the handshake verified is put in every request's scope as
``scope["client_certificate"]``, once the trust in force for that request (the last reload's
client CAs and CRL) agreed (see service/clientcert.py).

A malformed request (uvicorn's "Invalid HTTP request received.", which uvicorn logs as a
warning: a TLS ClientHello on a plain-HTTP port is one) and an upgrade request (WebSocket) get
an info line through the same limiter as the gate's refusals (api/refusals.py): a client
cannot flood the log with them, nor put anything at warning. On a connection without a
certificate where one is required, our 400/408/413/414/431 lines go through it too.

This reaches into uvicorn's internals (the protocol's attributes, its RequestResponseCycle and
flow control, STATUS_LINE: listed in service/internals.py), measured on uvicorn 0.54 and httptools
0.9. The service probes them at start-up (service/internals.py): if they changed, zero-copy is
turned off (``zero_copy = False``: no extension in the scope, uvicorn's own send) or the protocol is
not used at all, with one warning.

A response may carry its own reason phrase: ``"reason"`` in its ``http.response.start``
message (an extension of ours; printable ASCII, else the standard phrase is sent). Some
clients show nothing else of an error: containerd answers a failed HEAD with its status line.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import http
import logging
import os
import re
import socket
import struct
import termios
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from dockermirror.api.refusals import RefusalLog
from dockermirror.service import clientcert

log = logging.getLogger("dockermirror.access")

EXTENSION = "http.response.zerocopysend"
# ours, offered with it: {"type": BUFFERS, "buffers": [bytes-like, ...], "count": N} is written
# to the socket with writev, on the same terms (a download's bytes kept in memory)
BUFFERS = "dockermirror.response.buffers"
CORK_FROM = 256 * 1024      # ranges at least this large are sent corked
BURST = 4 * 1024 * 1024     # most bytes one sendfile call sends before its thread is handed back
SENDFILE_THREADS = 8        # threads only ever copy (never wait for a client): a few are plenty
LINGER = 5.0                # seconds a refused request's remaining input is read and dropped
PROGRESS_CHECK = 1.0        # seconds between looks at a waiting client's progress
WRITE_PIECE = 64 * 1024     # larger bodies are handed to uvicorn in pieces of this size
IOV_MAX = 1024              # most buffers one writev takes (Linux's UIO_MAXIOV)
_threads = ThreadPoolExecutor(max_workers=SENDFILE_THREADS, thread_name_prefix="sendfile")


@dataclass(frozen=True)
class ClientLimits:
    """What one client connection may do (the ``server:`` section of the configuration)."""

    max_header_size: int = 64 * 1024    # request line and headers, bytes
    max_headers: int = 100
    max_url: int = 8 * 1024             # request target, bytes
    max_body: int = 1024 * 1024         # a registry mirror takes no uploads
    header_timeout: float = 10.0        # to send the request line and headers
    send_timeout: float = 60.0          # a client that takes no byte of the response for this long is dropped
    node: str = ""                      # this node's name (node:): a header and ``node=`` on refusals too


# --- sendfile on a non-blocking socket, never waiting in the thread

DONE, BLOCKED, FAILED = "done", "blocked", "failed"


def sendfile_some(out: int, fd: int, offset: int, count: int) -> tuple[int, str]:
    """Send up to ``count`` bytes of ``fd`` from ``offset`` to the non-blocking socket ``out``:
    as much as the socket buffer takes. Returns the bytes sent and DONE (all of them),
    BLOCKED (the buffer is full) or FAILED (the peer went away, or the file ended early)."""
    sent = 0
    while sent < count:
        try:
            n = os.sendfile(out, fd, offset + sent, count - sent)
        except BlockingIOError:
            return sent, BLOCKED
        except OSError:
            return sent, FAILED
        if n == 0:
            return sent, FAILED
        sent += n
    return sent, DONE


def _unsent(fd: int) -> int:
    """Bytes in the socket's send queue not yet acknowledged by the peer."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return -1


def _set_cork(fd: int, value: int) -> None:
    sock = socket.socket(fileno=fd)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, value)
    except OSError:
        pass
    finally:
        sock.detach()


@contextlib.contextmanager
def _corked(fd: int, count: int) -> Iterator[None]:
    """``count`` bytes are sent within: corked if that is CORK_FROM or more (full segments only,
    flushed when it ends)."""
    cork = count >= CORK_FROM
    if cork:
        _set_cork(fd, 1)
    try:
        yield
    finally:
        if cork:
            _set_cork(fd, 0)


async def _writable(loop: asyncio.AbstractEventLoop, fd: int, timeout: float) -> bool:
    """Whether ``fd`` became writable (or failed) within ``timeout`` seconds."""
    ready = loop.create_future()
    loop.add_writer(fd, lambda: ready.done() or ready.set_result(None))
    try:
        async with asyncio.timeout(timeout):
            await ready
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_writer(fd)


async def sendfile(out: int, fd: int, offset: int, count: int, stall: float,
                   progress: dict[str, Any] | None = None) -> int:
    """Send ``count`` bytes of ``fd`` from ``offset`` on the non-blocking socket ``out``;
    returns the bytes sent: fewer if the peer went away or took nothing for ``stall``
    seconds (``progress["sent"]``, if given, is kept current: it holds what went out even
    if this is cancelled). Progress is what the peer acknowledges (the send queue shrinking), so a slow
    reader is never mistaken for a stalled one. A large range is sent corked (full
    segments only, flushed at the end): 15-20% faster on loopback, measured."""
    loop = asyncio.get_running_loop()
    sent = 0
    with _corked(out, count):
        while sent < count:
            n, state = await _in_thread(out, fd, offset + sent, min(count - sent, BURST))
            sent += n
            if progress is not None:
                progress["sent"] = sent
            if state == FAILED:
                break
            if state == BLOCKED and not await _wait_progress(loop, out, stall):
                break
    return sent


async def send_buffers(out: int, buffers: list[bytes | bytearray | memoryview], stall: float,
                       progress: dict[str, Any] | None = None) -> int:
    """Send ``buffers`` on the non-blocking socket ``out`` with ``writev``, from the event loop
    (a copy into the socket buffer never waits: it takes what fits); returns the bytes sent,
    fewer if the peer went away or took nothing for ``stall`` seconds. Like :func:`sendfile`:
    corked when large, ``progress["sent"]`` kept current, the waits on the event loop."""
    loop = asyncio.get_running_loop()
    views = [memoryview(buffer).cast("B") for buffer in buffers if len(buffer)]
    sent = 0
    try:
        with _corked(out, sum(len(view) for view in views)):
            while views:
                try:
                    n = os.writev(out, views[:IOV_MAX])
                except BlockingIOError:
                    n = 0
                except OSError:
                    break
                sent += n
                if progress is not None:
                    progress["sent"] = sent
                while n:                # drop what went out
                    if n >= len(views[0]):
                        n -= len(views.pop(0))
                    else:
                        views[0], n = views[0][n:], 0
                if views and not await _wait_progress(loop, out, stall):
                    break
    finally:
        for view in views:
            view.release()
    return sent


async def _in_thread(out: int, fd: int, offset: int, count: int) -> tuple[int, str]:
    """``sendfile_some`` in a sendfile thread. If the caller is cancelled meanwhile, the call
    is let finish first (it is short: it never waits for the client): its descriptors must
    not be closed, and their numbers reused, while it still uses them."""
    call = asyncio.wrap_future(_threads.submit(sendfile_some, out, fd, offset, count))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        await asyncio.wait([call])
        raise


async def _wait_progress(loop: asyncio.AbstractEventLoop, fd: int, stall: float) -> bool:
    """Wait until the socket takes more; False if the peer acknowledged nothing for ``stall`` s."""
    unsent = _unsent(fd)
    waited = 0.0
    while waited < stall:
        step = min(PROGRESS_CHECK, stall - waited)
        if await _writable(loop, fd, step):
            return True
        now = _unsent(fd)
        if now < unsent:            # the peer is reading, just slowly
            unsent, waited = now, 0.0
        else:
            waited += step
    return False


# --- the response side: zero-copy, and a deadline on a client that takes nothing


class _Send:
    """Wraps one request's ``send``: zero-copy messages become sendfile calls (plain TCP), and
    a client that takes no byte of the response for ``send_timeout`` is dropped."""

    def __init__(self, cycle: RequestResponseCycle, limits: ClientLimits, zero_copy: bool) -> None:
        self.cycle = cycle
        self.send = cycle.send
        self.limits = limits
        self.zero_copy = zero_copy

    async def __call__(self, message: Any) -> None:
        if self.cycle.transport.is_closing():
            # closed under this response (a pipelined request after a parse error, which uvicorn
            # answers 400 at once; it marks only the newest request disconnected): what is left
            # of the response goes nowhere, as for any client that went away
            self.cycle.disconnected = True
        if message["type"] in (EXTENSION, BUFFERS) and self.zero_copy:
            await self._send_file(message)
            return
        body = message.get("body", b"")
        if message["type"] == "http.response.body" and len(body) > WRITE_PIECE:
            # in pieces, each once the last has (nearly) gone: a slow client's bytes wait in
            # the caller's buffer, not in a copy in uvicorn's and another in the TLS layer's
            view = memoryview(body)
            went = 0
            for start in range(0, len(body), WRITE_PIECE):
                piece = view[start:start + WRITE_PIECE]
                last = start + WRITE_PIECE >= len(body)
                await self._send_body(piece, message.get("more_body", False) if last else True)
                if not self.cycle.disconnected:
                    went += len(piece)
            message["sent"] = went
            return
        if not await self._drained():
            self.cycle.disconnected = True   # what is left of the response goes nowhere (as uvicorn does)
        if message["type"] == "http.response.start" and message.get("reason"):
            await self._start_with_reason(message)
            return
        await self.send(message)
        if self.cycle.disconnected and body:
            message["sent"] = 0     # uvicorn dropped it (the client had gone): for the access log

    async def _start_with_reason(self, message: Any) -> None:
        """uvicorn writes the status line and the headers in one piece: that one write gets the
        status line with the message's own reason phrase."""
        reason = message["reason"]
        standard = STATUS_LINE.get(message["status"])
        if standard is None or not isinstance(reason, str) or not _REASON.fullmatch(reason):
            await self.send(message)
            return
        cycle, transport = self.cycle, self.cycle.transport
        cycle.transport = _StatusLine(transport, standard,  # type: ignore[assignment]
                                      b"HTTP/1.1 %d %s\r\n" % (message["status"], reason.encode("ascii")))
        try:
            await self.send(message)
        finally:
            cycle.transport = transport

    async def _send_body(self, body: bytes | memoryview, more_body: bool) -> None:
        if not await self._drained():
            self.cycle.disconnected = True
        await self.send({"type": "http.response.body", "body": body, "more_body": more_body})

    async def _drained(self, *, empty: bool = False) -> bool:
        """Wait while uvicorn's write buffer is over its limit (with ``empty``: not empty), as long
        as the client takes bytes. False if the client went away, or took nothing for
        ``send_timeout`` seconds (then the connection is dropped)."""
        cycle, transport = self.cycle, self.cycle.transport
        last = transport.get_write_buffer_size()
        waited, delay = 0.0, 0.001
        while (transport.get_write_buffer_size() if empty else cycle.flow.write_paused) and not cycle.disconnected:
            if empty:
                await asyncio.sleep(delay)
                step, delay = delay, min(delay * 2, PROGRESS_CHECK)
            else:
                step = PROGRESS_CHECK
                try:
                    async with asyncio.timeout(step):
                        await cycle.flow.drain()
                    continue
                except TimeoutError:
                    pass
            size = transport.get_write_buffer_size()
            if size < last:
                last, waited = size, 0.0
                continue
            waited += step
            if waited >= self.limits.send_timeout:
                log.info("dropping %s: it took nothing for %g s", _client(cycle), self.limits.send_timeout)
                cycle.keep_alive = False
                transport.abort()
                return False
        return not cycle.disconnected

    async def _send_file(self, message: Any) -> None:
        cycle = self.cycle
        if cycle.disconnected:
            raise ConnectionError("the client went away")
        if not cycle.response_started or cycle.chunked_encoding or cycle.scope["method"] == "HEAD":
            raise RuntimeError("zero-copy send needs a started response with a Content-Length")
        buffers = message["buffers"] if message["type"] == BUFFERS else None
        count = message["count"]
        if count > cycle.expected_content_length:
            raise RuntimeError("Response content longer than Content-Length")
        if not await self._drained(empty=True):     # what uvicorn buffered (the headers) goes first
            raise ConnectionError("the client went away or stopped reading")
        transport = cycle.transport
        # our own descriptor of the connection: it stays this connection even if the transport closes
        sock = transport.get_extra_info("socket")
        fileno = sock.fileno() if sock is not None and not transport.is_closing() else -1
        if fileno < 0:      # closed since (the client went away): nothing to duplicate
            raise ConnectionError("the client went away")
        out = os.dup(fileno)
        try:
            # message["sent"]: what went out, for the access log, however this ends
            if buffers is not None:
                sent = await send_buffers(out, buffers, self.limits.send_timeout, progress=message)
            else:
                sent = await sendfile(out, message["file"].fileno(), message.get("offset", 0), count,
                                      self.limits.send_timeout, progress=message)
        finally:
            os.close(out)
        cycle.expected_content_length -= sent
        if sent < count:
            cycle.keep_alive = False
            transport.abort()
            raise ConnectionError(f"the client went away or stopped reading after {sent} of {count} bytes")
        if not message.get("more_body", False):
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})


# a reason phrase: visible ASCII and spaces (RFC 9112), not too long
_REASON = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,299}", re.ASCII)


class _StatusLine:
    """A transport whose first write, if it begins with ``standard``, begins with ``own`` instead."""

    def __init__(self, transport: asyncio.Transport, standard: bytes, own: bytes) -> None:
        self._transport, self._standard, self._own = transport, standard, own

    def write(self, data: bytes) -> None:
        if self._own and data.startswith(self._standard):
            data = self._own + data[len(self._standard):]
        self._own = b""
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _client(cycle: RequestResponseCycle) -> str:
    client = cycle.scope.get("client") or ("-", 0)
    return f'{client[0]} "{cycle.scope["method"]} {cycle.scope["path"]}"'


# --- the request side: limits on what a client sends, and how slowly


class _Refused(Exception):
    pass


class ZeroCopyHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with client limits, and the zero-copy extension on plain TCP.

    Request bytes are counted before they reach the parser (httptools gathers a header line
    in memory, by repeated concatenation, until it ends): the request line and headers may
    take ``max_header_size`` bytes, a request body ``max_body``. A request over a limit is
    answered (431, 414 or 413, ``Connection: close``), the rest of its input is read and
    dropped for up to LINGER seconds so that the client sees the answer, and the connection
    closes. A client that has not sent its whole request head ``header_timeout`` seconds
    after its first byte (or after connecting) gets 408 and is closed; an idle keep-alive
    connection is closed by uvicorn after ``timeout_keep_alive``.
    """

    limits = ClientLimits()          # the Service replaces it on start and reload (new connections)
    # False when the start-up self-check (service/internals.py) found uvicorn's response internals
    # changed: no zero-copy extension in the scope, uvicorn's own send (plain bytes, still correct)
    zero_copy = True
    refusals = RefusalLog()          # the Service shares the gate's (one limit on refusal lines)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # verified in the handshake, which is over by now; every request's scope names it once
        # the trust in force then agrees
        self._certificate = clientcert.ConnectionCertificate(transport)
        # no certificate where one is required: what its malformed requests log is rate-limited
        self._unidentified = self._certificate.owed and self._certificate.presented is None
        self._limits = type(self).limits
        self._head_pending = True
        self._budget = self._limits.max_header_size
        self._header_count = 0
        self._head_bytes = self._body_bytes = 0
        self._earlier: object = None
        self._refusal: tuple[int, str] | None = None
        self._refused = False
        self._pending_refusal: tuple[int, str] | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return                                  # a refused request's remaining input: dropped
        self._unset_keepalive_if_required()
        if self._head_pending and self._header_timer is None:
            self._arm_header_timer()
        while True:
            if len(data) <= self._budget:
                self._budget -= len(data)
                self._feed(data)
                return
            if self._budget <= 0:
                if self._head_pending:
                    self._refuse(431, f"request line and headers over {self._limits.max_header_size} bytes")
                else:
                    self._refuse(413, f"request body over {self._limits.max_body} bytes")
                return
            head, data = data[:self._budget], data[self._budget:]
            self._budget = 0
            if not self._feed(head):
                return

    def _feed(self, data: bytes) -> bool:
        """Parse ``data``; False once the connection is done with (refused, bad, closing)."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # what a client sent is never a warning (uvicorn's are): an info line, rate-limited
            self._log_refusal(logging.INFO, '%s "-" 0 0 note="unsupported upgrade request"', self._address())
            return False
        except httptools.HttpParserError:
            if self._refusal is not None:
                self._refuse(*self._refusal)
            else:
                # e.g. a TLS ClientHello on a plain-HTTP port, a scanner's garbage
                self._log_refusal(logging.INFO, '%s "-" 400 0 note="invalid HTTP request"', self._address())
                cycle = self.cycle
                if not self._head_pending and cycle is not None and not cycle.response_complete:
                    # the request being read is the bad one (its body's framing): never answered
                    if not (self.pipeline and self.pipeline[0][0] is cycle):
                        self.send_400_response("Invalid HTTP request received.")   # it runs: cut it
                        return False
                    self.pipeline.popleft()     # it waits behind others: they go first, then the 400
                    self.cycle = self._earlier
                self._refuse(400, "invalid HTTP request", logged=True)
            return False
        return not self.transport.is_closing()

    # parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_count = 0
        # counted per request as it is parsed: a request that follows another in one read was
        # not charged to the budget (data_received's), which was the previous request's
        self._head_bytes = self._body_bytes = 0
        self._certificate.attach(self.scope)

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > self._limits.max_url:
            self._refusal = (414, f"request target over {self._limits.max_url} bytes")
            raise _Refused
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self._limits.max_headers:
            self._refusal = (431, f"more than {self._limits.max_headers} header fields")
            raise _Refused
        self._count_head(len(name) + len(value) + 4)     # ": " and CRLF
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self._limits.max_header_size:
            self._refusal = (431, f"request line and headers over {self._limits.max_header_size} bytes")
            raise _Refused

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body:
            self._refusal = (413, f"request body over {self._limits.max_body} bytes")
            raise _Refused
        super().on_body(body)

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        self._head_pending = False
        self._budget = self._limits.max_body
        self._earlier = self.cycle      # (the request before this one, if its answer is still going out)
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is None or cycle.scope is not self.scope or not self.zero_copy:
            return
        plain = self.transport.get_extra_info("sslcontext") is None
        if plain:
            extensions = cycle.scope.setdefault("extensions", {})
            extensions[EXTENSION] = extensions[BUFFERS] = {}
        cycle.send = _Send(cycle, self._limits, zero_copy=plain)  # type: ignore[method-assign]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_pending = True
        self._budget = self._limits.max_header_size

    # refusals and the header deadline

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self._limits.header_timeout, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self._head_pending or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_header_timer()       # a response is still going out: the next request waits its turn
            return
        if self._budget < self._limits.max_header_size:    # part of a request came: say why it ends
            self._refuse(408, f"request head not complete within {self._limits.header_timeout:g} s")
        else:
            self.transport.close()

    def _refuse(self, status: int, why: str, *, logged: bool = False) -> None:
        """Answer ``status`` and close; the rest of the client's input is dropped meanwhile."""
        self._refused = True
        self._cancel_header_timer()
        self._unset_keepalive_if_required()
        client = self._address()
        node = f" node={self._limits.node}" if self._limits.node else ""
        if not logged:      # (the caller's line said it already)
            if self._unidentified:
                self._log_refusal(logging.INFO, '%s "-" %d 0 note="%s"%s', client, status, why, node)
            else:
                log.info('%s "-" %d 0 note="%s"%s', client, status, why, node)
        if self._busy():
            # the requests before it (a response going out, pipelined ones) are answered first
            self._pending_refusal = (status, why)
            return
        self._answer_refusal(status, why)

    def _address(self) -> str:
        return str(self.client[0]) if self.client else "-"

    def _log_refusal(self, level: int, message: str, *args: object) -> None:
        """A line about a malformed request from a client without a certificate: at ``level`` if
        the refusal limiter lets it (with how many it stands for), else at debug."""
        verdict = type(self).refusals.loud(self._address())
        if not verdict.loud:
            log.debug(message, *args)
            return
        note = verdict.note()
        log.log(level, message + (" (%s)" if note else ""), *args, *((note,) if note else ()))

    def _busy(self) -> bool:
        return (self.cycle is not None and not self.cycle.response_complete) or bool(self.pipeline)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._pending_refusal is not None and not self._busy() and not self.transport.is_closing():
            status, why = self._pending_refusal
            self._pending_refusal = None
            self._answer_refusal(status, why)

    def _answer_refusal(self, status: int, why: str) -> None:
        phrase = http.HTTPStatus(status).phrase
        body = f"{status} {phrase}: {why}\n".encode()
        node = b"docker-mirror-node: %s\r\n" % self._limits.node.encode("ascii") if self._limits.node else b""
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n%s"
            b"connection: close\r\n\r\n%s" % (status, phrase.encode(), len(body), node, body))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER, self.transport.close)
