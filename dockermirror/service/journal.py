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
entries (a sealed memfd passed over the socket) is never needed. The socket is
non-blocking: when journald is gone or its queue is full, that record is written as the
plain stderr line instead (stderr is the journal's stream too), and this is said once;
nothing is raised into the request, and the event loop never waits.
"""

from __future__ import annotations

import logging
import socket
import struct
import sys
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from dockermirror.api.accesslog import RequestDone

SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "docker-mirror"
VALUE_MAX = 4096
MESSAGE_MAX = 48 * 1024     # journald's LineMax for stream lines
_SUFFIX = "…[truncated]"


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
        ("COMPLETE", "1" if done.complete else "0"),
    ]
    return [(f"DOCKER_MIRROR_{name}", value) for name, value in fields if value is not None]


class JournalHandler(logging.Handler):
    """Sends each record as one journal entry: MESSAGE (the line as the stream carried it, without
    the priority prefix), PRIORITY, SYSLOG_IDENTIFIER and SYSLOG_FACILITY (as journald gave the
    stream's lines), DOCKER_MIRROR_COMPONENT, and a request's fields. ``fallback`` formats and
    writes a record that could not be sent."""

    def __init__(self, message: logging.Formatter, fallback: logging.Handler, path: str = SOCKET,
                 identifier: str = IDENTIFIER, warn: IO[str] | None = None) -> None:
        super().__init__()
        self.message = message
        self.fallback = fallback
        self.path = path
        self.identifier = identifier
        self.warn = warn
        self.failed_once = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)

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
        try:
            self.sock.sendto(datagram, self.path)
            return
        except OSError as exc:      # no journald, queue full (EAGAIN), too big for the socket
            self._said_once(exc)
        self.fallback.handle(record)

    def _said_once(self, exc: OSError) -> None:
        if self.failed_once:
            return
        self.failed_once = True
        stream = self.warn or sys.stderr
        try:
            stream.write(f"<4>journal: cannot send to {self.path} ({exc.strerror or exc}); such records "
                         "go to stderr as plain lines, without their fields (said once)\n")
            stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self.sock.close()
        self.fallback.close()
        super().close()
