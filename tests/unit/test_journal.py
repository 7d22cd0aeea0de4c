"""Records to journald through its native protocol (dockermirror/service/journal.py): the
datagrams a real socket in a temporary directory receives, parsed by the protocol's rules
(https://systemd.io/JOURNAL_NATIVE_PROTOCOL/) written out here, not by the module's code."""

from __future__ import annotations

import io
import re
import logging
import socket
import struct
import threading
from pathlib import Path

import pytest

from dockermirror.api.accesslog import RequestDone
from dockermirror.service import journal, logs
from dockermirror.service.journal import JournalHandler
from tests.unit.fakes import ALL_MANIFESTS

ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]


def parse(datagram: bytes) -> dict[str, bytes]:
    """A native journal entry: ``NAME=value\\n``, or ``NAME\\n`` + 64-bit LE length + value + ``\\n``."""
    fields: dict[str, bytes] = {}
    i = 0
    while i < len(datagram):
        end = datagram.index(b"\n", i)
        line = datagram[i:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            i = end + 1
        else:
            name = line
            (size,) = struct.unpack("<Q", datagram[end + 1:end + 9])
            value = datagram[end + 9:end + 9 + size]
            assert datagram[end + 9 + size:end + 10 + size] == b"\n"
            i = end + 10 + size
        assert re.fullmatch(rb"[A-Z0-9_]+", name), name
        assert name.decode() not in fields, f"{name} twice"
        fields[name.decode()] = value
    return fields


class Journald:
    """A datagram socket standing in for /run/systemd/journal/socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    def entries(self) -> list[dict[str, bytes]]:
        out = []
        while True:
            try:
                out.append(parse(self.sock.recv(1 << 20)))
            except BlockingIOError:
                return out


@pytest.fixture
def journald(tmp_path: Path):
    server = Journald(tmp_path / "socket")
    yield server
    server.sock.close()


def done(**changes) -> RequestDone:
    fields = dict(client="192.0.2.7", method="GET", path="/v2/library/hello/manifests/latest", status=200,
                  sent=1234, seconds=0.0123, complete=True, kind="manifest", cache="MISS", upstream="docker.io",
                  upstream_status=200, repository="library/hello", reference="latest", identity="anonymous",
                  certificate=None, note=None, digest="sha256:" + "ab" * 32)
    return RequestDone(**{**fields, **changes})


def handler_for(path: Path, fallback_stream: io.StringIO | None = None, warn: io.StringIO | None = None):
    fallback = logging.StreamHandler(fallback_stream or io.StringIO())
    fallback.setFormatter(logs.JournalFormatter())
    return JournalHandler(logs.OneLineFormatter("%(component)s: %(message)s"), fallback, path=str(path), warn=warn)


def record(message: str, *args, name: str = "dockermirror.access", level: int = logging.INFO,
           request: RequestDone | None = None) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, message, args, None)
    if request is not None:
        rec.request = request
    return rec


def test_a_request_entry_carries_its_fields_and_the_same_message(journald):
    handler = handler_for(journald.path)
    handler.handle(record('192.0.2.7 "GET /v2/library/hello/manifests/latest" 200', request=done()))
    [entry] = journald.entries()
    assert entry == {
        "MESSAGE": b'access: 192.0.2.7 "GET /v2/library/hello/manifests/latest" 200', "PRIORITY": b"6",
        "SYSLOG_IDENTIFIER": b"docker-mirror", "SYSLOG_FACILITY": b"3", "DOCKER_MIRROR_COMPONENT": b"access",
        "DOCKER_MIRROR_METHOD": b"GET", "DOCKER_MIRROR_KIND": b"manifest", "DOCKER_MIRROR_STATUS": b"200",
        "DOCKER_MIRROR_BYTES": b"1234", "DOCKER_MIRROR_DURATION_MS": b"12.3", "DOCKER_MIRROR_CLIENT": b"192.0.2.7",
        "DOCKER_MIRROR_CACHE": b"MISS", "DOCKER_MIRROR_UPSTREAM": b"docker.io", "DOCKER_MIRROR_UPSTREAM_STATUS": b"200",
        "DOCKER_MIRROR_REPOSITORY": b"library/hello", "DOCKER_MIRROR_REFERENCE": b"latest",
        "DOCKER_MIRROR_DIGEST": b"sha256:" + b"ab" * 32, "DOCKER_MIRROR_IDENTITY": b"anonymous",
        "DOCKER_MIRROR_COMPLETE": b"1",
    }


def test_other_records_keep_their_priority_and_component(journald):
    handler = handler_for(journald.path)
    handler.handle(record("upstream failed for %s", "x", name="dockermirror.mirror", level=logging.WARNING))
    handler.handle(record("boom", name="uvicorn.error", level=logging.ERROR))
    warning, error = journald.entries()
    assert warning == {"MESSAGE": b"mirror: upstream failed for x", "PRIORITY": b"4",
                       "SYSLOG_IDENTIFIER": b"docker-mirror", "SYSLOG_FACILITY": b"3",
                       "DOCKER_MIRROR_COMPONENT": b"mirror"}
    assert error["PRIORITY"] == b"3" and error["DOCKER_MIRROR_COMPONENT"] == b"uvicorn.error"


def test_newlines_and_binary_in_values_cannot_add_fields(journald):
    hostile = "library/x\nDOCKER_MIRROR_CACHE=HIT\nPRIORITY=0\n\x00\x1b[2J\udcff"
    handler = handler_for(journald.path)
    handler.handle(record("x", request=done(repository=hostile, reference="a\nb", note="upstream said\r\nhi",
                                            cache=None, digest=None)))
    [entry] = journald.entries()
    assert entry["DOCKER_MIRROR_REPOSITORY"] == hostile.encode("utf-8", "backslashreplace")
    assert entry["DOCKER_MIRROR_REFERENCE"] == b"a\nb"
    assert entry["DOCKER_MIRROR_NOTE"] == b"upstream said\r\nhi"
    assert "DOCKER_MIRROR_CACHE" not in entry and "DOCKER_MIRROR_DIGEST" not in entry   # unknown: left out
    assert entry["PRIORITY"] == b"6"


def test_huge_values_are_cut_so_one_request_cannot_make_a_huge_datagram(journald):
    handler = handler_for(journald.path)
    huge = "é" * 100_000 + "\n"
    handler.handle(record("%s", "m" * 200_000, request=done(repository=huge, note=huge, reference=huge)))
    [entry] = journald.entries()
    assert len(entry["MESSAGE"]) <= journal.MESSAGE_MAX and entry["MESSAGE"].endswith("…[truncated]".encode())
    for name in ("DOCKER_MIRROR_REPOSITORY", "DOCKER_MIRROR_NOTE", "DOCKER_MIRROR_REFERENCE"):
        value = entry[name]
        assert len(value) <= journal.VALUE_MAX and value.endswith("…[truncated]".encode())
        assert value.decode("utf-8").startswith("éé")          # cut between characters


def test_without_the_socket_records_go_to_stderr_said_once(tmp_path: Path):
    stderr, warn = io.StringIO(), io.StringIO()
    handler = handler_for(tmp_path / "no-such-socket", stderr, warn)
    for n in range(3):
        handler.handle(record("line %d", n, request=done()))
    assert stderr.getvalue().splitlines() == ["<6>access: line 0", "<6>access: line 1", "<6>access: line 2"]
    [said] = warn.getvalue().splitlines()
    assert said.startswith("<4>journal: cannot send to ") and "said once" in said


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def small_queues(journald, handler) -> None:
    """journald's socket holds a few entries at most, whatever net.unix.max_dgram_qlen says."""
    journald.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    handler.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


def capacity(journald) -> int:
    """How many request-sized datagrams journald's socket takes from a sender like the handler's."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    probe.setblocking(False)
    n = 0
    try:
        while n < 10_000:
            probe.sendto(b"MESSAGE=" + b"x" * 600 + b"\n", str(journald.path))
            n += 1
    except BlockingIOError:
        pass
    finally:
        probe.close()
    journald.entries()
    return n


def in_threads(handler, count: int, threads: int = 4, start: int = 0) -> None:
    """``count`` records from each of ``threads`` threads at once; none of them may wait on journald."""
    def burst(t: int) -> None:
        for n in range(count):
            handler.handle(record("line %d", start + t * count + n, request=done()))

    workers = [threading.Thread(target=burst, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not any(w.is_alive() for w in workers), "a logging call waited for journald"


def read_all(journald, count: int) -> list[dict[str, bytes]]:
    """Entries as a slow journald would take them: a few at a time, until ``count`` came."""
    got: list[dict[str, bytes]] = []
    journald.sock.settimeout(30)
    try:
        while len(got) < count:
            got.append(parse(journald.sock.recv(1 << 20)))
    except TimeoutError:
        pass
    finally:
        journald.sock.setblocking(False)
    return got + journald.entries()


def test_a_burst_larger_than_journalds_queue_loses_no_fields(journald):
    """Nobody reads the socket during the burst: the entries wait, and reach journald, each with
    its fields, once it reads again (no record after the burst is needed to send them on)."""
    stderr, warn = io.StringIO(), io.StringIO()
    handler = handler_for(journald.path, stderr, warn)
    small_queues(journald, handler)
    assert capacity(journald) < 200
    in_threads(handler, 50)
    entries = read_all(journald, 200)
    assert stderr.getvalue() == "" and warn.getvalue() == ""
    assert sorted(e["MESSAGE"] for e in entries) == sorted(f"access: line {n}".encode() for n in range(200))
    assert all(e["DOCKER_MIRROR_BYTES"] == b"1234" and e["DOCKER_MIRROR_CACHE"] == b"MISS" for e in entries)
    handler.close()


def test_entries_keep_their_order_while_some_wait(journald):
    stderr = io.StringIO()
    handler = handler_for(journald.path, stderr)
    small_queues(journald, handler)
    assert capacity(journald) < 100
    for n in range(100):
        handler.handle(record("line %d", n, request=done()))
    entries = read_all(journald, 100)
    assert [e["MESSAGE"] for e in entries] == [f"access: line {n}".encode() for n in range(100)]
    handler.close()


def test_beyond_the_bound_records_go_to_stderr_counted_and_said_every_minute(journald):
    stderr, warn, clock = io.StringIO(), io.StringIO(), Clock()
    fallback = logging.StreamHandler(stderr)
    fallback.setFormatter(logs.JournalFormatter())
    handler = JournalHandler(logs.OneLineFormatter("%(component)s: %(message)s"), fallback, path=str(journald.path),
                             warn=warn, queue_max=20, clock=clock)
    small_queues(journald, handler)
    assert capacity(journald) < 80
    in_threads(handler, 25)
    lost = stderr.getvalue().splitlines()
    assert lost and len(handler.waiting) == 20
    said = warn.getvalue().splitlines()
    assert said == ["<4>journal: 1 log entry went to stderr without their fields in the last minute: "
                    "journald's queue was full"]
    in_threads(handler, 10, start=100)      # within the minute: counted, not said
    assert warn.getvalue().splitlines() == said
    clock.now += journal.SAY_EVERY
    handler.handle(record("line %d", 1000, request=done()))
    lost = stderr.getvalue().splitlines()
    said = warn.getvalue().splitlines()
    assert len(said) == 2 and said[1].startswith("<4>journal: ") and said[1].endswith(
        " log entries went to stderr without their fields in the last minute: journald's queue was full")
    handler.close()         # what still waited, and could not be sent, is a stderr line too; the rest said
    lost = stderr.getvalue().splitlines()
    said = warn.getvalue().splitlines()
    assert sum(int(line.split()[1]) for line in said) == len(lost) == handler.lost_total
    entries = journald.entries()
    assert len(entries) + len(lost) == 141
    assert all(e["DOCKER_MIRROR_BYTES"] == b"1234" for e in entries)
    assert all(re.fullmatch(r"<6>access: line \d+", line) for line in lost)


def test_setup_sends_natively_only_under_the_journal_and_when_on(monkeypatch):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        monkeypatch.setattr(logs, "stderr_is_journal", lambda: True)
        logs.setup("info")
        assert isinstance(root.handlers[0], JournalHandler)
        logs.setup("info", journal_fields=False)
        assert type(root.handlers[0]) is logging.StreamHandler
        assert isinstance(root.handlers[0].formatter, logs.JournalFormatter)
        monkeypatch.setattr(logs, "stderr_is_journal", lambda: False)
        logs.setup("info")
        assert type(root.handlers[0]) is logging.StreamHandler
    finally:
        for handler in root.handlers:
            if handler not in saved[0]:
                handler.close()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


@pytest.mark.anyio
async def test_a_pull_through_the_app_names_the_served_digest(mirror, journald):
    """A tag's entry names the digest the tag resolved to (the response's Docker-Content-Digest)."""
    image = mirror.registry.push("library/hello", "latest")
    access = logging.getLogger("dockermirror.access")
    handler = handler_for(journald.path)
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        for _ in range(2):
            assert (await mirror.client.get("/v2/hello/manifests/latest", headers=ACCEPT)).status_code == 200
        layer = image.layer
        assert (await mirror.client.get(f"/v2/library/hello/blobs/{layer}")).status_code == 200
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    cold, warm, blob = journald.entries()
    for entry, cache in ((cold, b"MISS"), (warm, b"HIT")):
        assert entry["DOCKER_MIRROR_CACHE"] == cache
        assert entry["DOCKER_MIRROR_REFERENCE"] == b"latest" and entry["DOCKER_MIRROR_KIND"] == b"manifest"
        assert entry["DOCKER_MIRROR_DIGEST"] == image.digest.encode()
        assert entry["DOCKER_MIRROR_BYTES"] == str(len(image.manifest)).encode()
        assert entry["DOCKER_MIRROR_REPOSITORY"] == b"library/hello"
        assert entry["DOCKER_MIRROR_CLIENT"] == b"192.0.2.7"
    assert blob["DOCKER_MIRROR_KIND"] == b"blob" and blob["DOCKER_MIRROR_DIGEST"] == layer.encode()
    assert blob["DOCKER_MIRROR_BYTES"] == str(len(image.blobs[layer])).encode()
