"""Log records to journald through its native protocol, with structured fields per request.

Why no library: systemd-python (``systemd.journal``) builds against libsystemd's headers and
has no wheels; cysystemd's wheels for Python 3.11 need glibc 2.28 (1.5.x) or 2.34 (2.x),
above EL7's 2.17, and bundle 3.6 MB of libsystemd, libgcrypt and compressors to send a
datagram. The protocol is small and documented (https://systemd.io/JOURNAL_NATIVE_PROTOCOL/):
one datagram to ``/run/systemd/journal/socket`` holding ``NAME=value\\n`` per field, or, for a
value that holds a newline, ``NAME\\n`` + its length as a little-endian 64-bit integer +
the value (any bytes) + ``\\n``. Every value with a newline goes in that binary form, so
nothing a client put in a path or an upstream in a note can end a field or add one.

Entries are capped (:data:`VALUE_MAX` a field, :data:`MESSAGE_MAX` the message): one request
cannot make a datagram bigger than the kernel takes, so the protocol's other path for large
entries (a sealed memfd passed over the socket) is never needed.

The socket is non-blocking: nothing is raised into the request, and neither the event loop
nor a logging thread ever waits for journald. When journald falls behind (its socket's queue
is full: ``net.unix.max_dgram_qlen`` datagrams, 512 on systemd hosts), entries wait, in order,
in a bounded queue of their own (:data:`QUEUE_MAX` entries, :data:`QUEUE_BYTES` bytes) that is
sent on at the next record and by a thread every :data:`RETRY` seconds until it is empty. Only
an entry that finds that queue full is written as the plain stderr line instead (stderr is the
journal's stream too, without the fields), and how many were is said at most once every
:data:`SAY_EVERY` seconds. When journald is gone (or refuses an entry), that record is the
stderr line, and this is said once.
"""

from __future__ import annotations

import collections
import errno
import logging
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from dockermirror.api.accesslog import RequestDone

SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "docker-mirror"
VALUE_MAX = 4096
MESSAGE_MAX = 48 * 1024     # journald's LineMax for stream lines
_SUFFIX = "…[truncated]"
QUEUE_MAX = 4096            # entries waiting for room in journald's queue
QUEUE_BYTES = 4 * 1024 * 1024
RETRY = 0.02                # seconds between tries to send what waits
SAY_EVERY = 60.0            # seconds: entries that went to stderr are counted and said at most this often
_FULL = (errno.EAGAIN, errno.ENOBUFS)


def truncated(text: str, limit: int) -> bytes:
    """``text`` as UTF-8 in at most ``limit`` bytes, cut on a character boundary and marked."""
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= limit:
        return data
    suffix = _SUFFIX.encode()
    return data[:limit - len(suffix)].decode("utf-8", "ignore").encode() + suffix


def encode(fields: list[tuple[str, bytes]]) -> bytes:
    """One native-protocol datagram (field names are ours: upper case, digits, ``_``)."""
    out = bytearray()
    for name, value in fields:
        if b"\n" not in value:
            out += name.encode() + b"=" + value + b"\n"
        else:
            out += name.encode() + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"
    return bytes(out)


def request_fields(done: RequestDone) -> list[tuple[str, str]]:
    """The ``DOCKER_MIRROR_*`` fields of a :class:`~dockermirror.api.accesslog.RequestDone`;
    fields it does not know are left out (so ``DOCKER_MIRROR_CACHE=MISS`` matches only what it says)."""
    reference = done.reference
    digest = done.digest or (reference if reference and ":" in reference else None)
    fields = [
        ("METHOD", done.method), ("KIND", done.kind), ("STATUS", str(done.status)), ("BYTES", str(done.sent)),
        ("DURATION_MS", f"{done.seconds * 1000:.1f}"), ("CLIENT", done.client), ("CACHE", done.cache),
        ("UPSTREAM", done.upstream),
        ("UPSTREAM_STATUS", str(done.upstream_status) if done.upstream_status is not None else None),
        ("REPOSITORY", done.repository), ("REFERENCE", reference), ("DIGEST", digest),
        ("IDENTITY", done.identity), ("CERTIFICATE", done.certificate), ("NOTE", done.note),
        ("COMPLETE", "1" if done.complete else "0"), ("NODE", done.node),
    ]
    return [(f"DOCKER_MIRROR_{name}", value) for name, value in fields if value is not None]


class JournalHandler(logging.Handler):
    """Sends each record as one journal entry: MESSAGE (the line as the stream carried it, without
    the priority prefix), PRIORITY, SYSLOG_IDENTIFIER and SYSLOG_FACILITY (as journald gave the
    stream's lines), DOCKER_MIRROR_COMPONENT, and a request's fields. ``fallback`` formats and
    writes a record that could not be sent.

    State is guarded by the handler's lock (``logging`` holds it around :meth:`emit`; the
    retry thread takes it to send, never to wait)."""

    def __init__(self, message: logging.Formatter, fallback: logging.Handler, path: str = SOCKET,
                 identifier: str = IDENTIFIER, warn: IO[str] | None = None, *, queue_max: int = QUEUE_MAX,
                 queue_bytes: int = QUEUE_BYTES, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.message = message
        self.fallback = fallback
        self.path = path
        self.identifier = identifier
        self.warn = warn
        self.failed_once = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.queue_max = queue_max
        self.queue_bytes = queue_bytes
        self.clock = clock
        self.waiting: collections.deque[tuple[bytes, logging.LogRecord]] = collections.deque()
        self.waiting_bytes = 0
        self.lost = 0                   # records that went to stderr because the queue was full, not yet said
        self.lost_total = 0
        self._said_at: float | None = None
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle = False      # the thread waits for work (not for a time)
        self._closed = False

    def fields(self, record: logging.LogRecord) -> list[tuple[str, bytes]]:
        text = self.message.format(record)      # sets record.priority and record.component
        out = [("MESSAGE", truncated(text, MESSAGE_MAX)), ("PRIORITY", str(record.priority).encode()),
               ("SYSLOG_IDENTIFIER", self.identifier.encode()), ("SYSLOG_FACILITY", b"3"),   # daemon, as stderr had
               ("DOCKER_MIRROR_COMPONENT", truncated(record.component, VALUE_MAX))]
        done = getattr(record, "request", None)
        if done is not None:
            out += [(name, truncated(value, VALUE_MAX)) for name, value in request_fields(done)]
        return out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            datagram = encode(self.fields(record))
        except Exception:
            self.handleError(record)
            return
        if self.waiting and not self._flush():
            self._wait(datagram, record)        # after those already waiting: the journal keeps the order
            return
        try:
            self.sock.sendto(datagram, self.path)
            return
        except OSError as exc:      # no journald, queue full (EAGAIN), too big for the socket
            if exc.errno in _FULL:
                self._wait(datagram, record)
                return
            self._said_once(exc)
        self.fallback.handle(record)

    def _wait(self, datagram: bytes, record: logging.LogRecord) -> None:
        """Queue an entry journald had no room for; the stderr line if the queue is full."""
        if len(self.waiting) >= self.queue_max or self.waiting_bytes + len(datagram) > self.queue_bytes:
            self.lost += 1
            self.lost_total += 1
            self.fallback.handle(record)
            self._say_lost(first=True)
        else:
            self.waiting.append((datagram, record))
            self.waiting_bytes += len(datagram)
        if self._thread is None:
            self._thread = threading.Thread(target=self._retry, name="journal-retry", daemon=True)
            self._thread.start()
        elif self._idle:
            self._idle = False
            self._wake.set()

    def _flush(self) -> bool:
        """Send what waits, in order, as far as journald takes it; True once nothing waits.
        Called with the handler's lock held."""
        while self.waiting:
            datagram, record = self.waiting[0]
            try:
                self.sock.sendto(datagram, self.path)
            except OSError as exc:
                if exc.errno in _FULL:
                    return False
                self._said_once(exc)            # journald went away: these are stderr lines now
                self.fallback.handle(record)
            self.waiting.popleft()
            self.waiting_bytes -= len(datagram)
        return True

    def _retry(self) -> None:
        """Sends what waits while no record comes to do it, and says the count of lost entries
        when it is due."""
        while True:
            with self.lock:     # type: ignore[union-attr]
                if self._closed:
                    return
                empty = self._flush()
                self._say_lost()
                if not empty:
                    timeout: float | None = RETRY
                elif self.lost and self._said_at is not None:
                    timeout = max(RETRY, SAY_EVERY - (self.clock() - self._said_at))
                else:
                    timeout = None
                self._idle = timeout is None
                self._wake.clear()
            self._wake.wait(timeout)

    def _say_lost(self, first: bool = False) -> None:
        """Say how many entries went to stderr, at most once every SAY_EVERY seconds (the first
        at once). Called with the handler's lock held."""
        if not self.lost:
            return
        now = self.clock()
        if self._said_at is None and not first:
            return
        if self._said_at is not None and now - self._said_at < SAY_EVERY:
            return
        lost, self.lost, self._said_at = self.lost, 0, now
        entries = "log entry" if lost == 1 else "log entries"
        self._warn(f"<4>journal: {lost} {entries} went to stderr without their fields in the last minute: "
                   f"journald's queue was full\n")

    def _said_once(self, exc: OSError) -> None:
        if self.failed_once:
            return
        self.failed_once = True
        self._warn(f"<4>journal: cannot send to {self.path} ({exc.strerror or exc}); such records "
                   "go to stderr as plain lines, without their fields (said once)\n")

    def _warn(self, line: str) -> None:
        stream = self.warn or sys.stderr
        try:
            stream.write(line)
            stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """What still waits gets one last try; what journald has no room for goes to stderr."""
        with self.lock:     # type: ignore[union-attr]
            self._closed = True
            self._wake.set()
            if not self._flush():
                for _, record in self.waiting:
                    self.lost += 1
                    self.lost_total += 1
                    self.fallback.handle(record)
                self.waiting.clear()
                self.waiting_bytes = 0
            if self.lost:
                self._said_at = None
                self._say_lost(first=True)
        self.sock.close()
        self.fallback.close()
        super().close()
