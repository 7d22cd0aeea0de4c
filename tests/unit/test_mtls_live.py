"""Client certificates against the real server, in process: ``Service`` (uvicorn with our HTTP
protocol and ``ServerTLS``) listening on a loopback socket with real TLS, python ``ssl`` clients
holding keep-alive connections, reloads as SIGHUP runs them (``Service.reload``).

What a reload changes reaches connections already open: every request re-checks its
connection's certificate against the trust in force now (revoked, another client CA), and a
request the gate refuses closes its connection. Clients without a certificate cannot flood the
log, from one address, from many IPv6 addresses, or with malformed requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dockermirror import config as configuration
from dockermirror.service import certs, clientcerts
from dockermirror.service.server import Service

pytestmark = pytest.mark.anyio

REVOKED = "the client certificate was revoked"
UNTRUSTED = "the client certificate is no longer trusted"


@dataclass
class PKI:
    paths: certs.Paths
    crl: Path
    dir: Path

    def client(self, name: str, paths: certs.Paths | None = None) -> Path:
        out = self.dir / "clients" / name
        if not out.exists():
            clientcerts.issue_client(paths or self.paths, name, out)
        return out


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    paths = certs.Paths(tmp_path / "server.crt", tmp_path / "server.key", tmp_path / "ca" / "ca.crt")
    certs.init(paths, ["localhost"], ["127.0.0.1"])
    return PKI(paths, tmp_path / "ca" / "crl.pem", tmp_path)


def config_text(pki: PKI, client_auth: str = "required", client_ca: Path | None = None, extra: str = "") -> str:
    return (f"listen: 127.0.0.1:5000\n"
            f"tls:\n  enabled: true\n  certificate: {pki.paths.certificate}\n  key: {pki.paths.key}\n"
            f"  ca: {pki.paths.ca}\n  client_auth: {client_auth}\n  crl: {pki.crl}\n"
            + (f"  client_ca: {client_ca}\n" if client_ca else "")
            + f"upstream:\n  url: http://127.0.0.1:9\ncache:\n  dir: {pki.dir / 'cache'}\n"
            + "log:\n  level: debug\n" + extra)


class Live:
    """A running Service; ``reload()`` rewrites its configuration file (if asked) and reloads."""

    def __init__(self, service: Service, server, port: int, config: Path, pki: PKI) -> None:
        self.service, self.server, self.port, self.config, self.pki = service, server, port, config, pki

    async def reload(self, text: str | None = None) -> None:
        if text is not None:
            self.config.write_text(text)
        await self.service.reload()

    async def connect(self, client: Path | None = None) -> Connection:
        return await asyncio.to_thread(Connection.open, self.port, self.pki.paths.ca, client)


@contextlib.asynccontextmanager
async def live(pki: PKI, text: str) -> AsyncIterator[Live]:
    path = pki.dir / "mirror.yml"
    path.write_text(text)
    levels = {name: logging.getLogger(name).level for name in ("", "httpx", "httpcore")}   # a reload sets them
    service = Service(configuration.load(path), lambda: configuration.load(path))
    server = service.server()
    sock = socket.create_server(("127.0.0.1", 0))
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(3000):
            if service._ready or task.done():
                break
            await asyncio.sleep(0.01)
        assert service._ready, "the server did not start"
        yield Live(service, server, sock.getsockname()[1], path, pki)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 60)
        sock.close()
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def message(self) -> str:
        return json.loads(self.body)["errors"][0]["message"]


class Connection:
    """A blocking TLS client connection (used from a thread), kept alive between requests."""

    def __init__(self, sock: ssl.SSLSocket | socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(30)
        self.buffer = b""

    @classmethod
    def open(cls, port: int, ca: Path, client: Path | None, raw: socket.socket | None = None) -> Connection:
        context = ssl.create_default_context(cafile=str(ca))
        if client is not None:
            context.load_cert_chain(client / "client.cert", client / "client.key")
        raw = raw or socket.create_connection(("127.0.0.1", port))
        return cls(context.wrap_socket(raw, server_hostname="localhost"))

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            return b""

    def ask_sync(self, path: str = "/v2/", method: str = "GET") -> Answer:
        self.sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        return self.answer_sync(method)

    def answer_sync(self, method: str = "GET") -> Answer:
        while b"\r\n\r\n" not in self.buffer:
            data = self._recv()
            if not data:
                raise ConnectionError(f"closed before an answer ({self.buffer[:100]!r})")
            self.buffer += data
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        length = 0 if method == "HEAD" else int(headers.get("content-length", "0"))
        while len(rest) < length:
            data = self._recv()
            if not data:
                raise ConnectionError("closed in the body")
            rest += data
        self.buffer = rest[length:]
        return Answer(int(lines[0].split()[1]), headers, rest[:length])

    def closed_sync(self) -> bool:
        """Whether the server closes the connection (reads what is left until the end)."""
        while True:
            data = self._recv()
            if not data:
                return True
            self.buffer += data

    def send_sync(self, data: bytes) -> Answer:
        """Send raw bytes; the answer."""
        self.sock.sendall(data)
        return self.answer_sync()

    async def ask(self, path: str = "/v2/", method: str = "GET") -> Answer:
        return await asyncio.to_thread(self.ask_sync, path, method)

    async def closed(self) -> bool:
        return await asyncio.to_thread(self.closed_sync)

    async def send(self, data: bytes) -> Answer:
        return await asyncio.to_thread(self.send_sync, data)

    def close(self) -> None:
        self.sock.close()


async def refused(mirror: Live, client: Path) -> None:
    """A new connection with this certificate fails (in the handshake: TLS 1.3 tells the client
    on its first read)."""
    connection = None
    try:
        connection = await mirror.connect(client)
        await connection.ask()
    except (ssl.SSLError, ConnectionError, OSError):
        return
    finally:
        if connection is not None:
            connection.close()
    raise AssertionError(f"{client.name}: a new connection was not refused")


def access_lines(caplog, pattern: str, level: int | None = None) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dockermirror.access"
            and re.search(pattern, r.getMessage()) and (level is None or r.levelno == level)]


# --- revocation and CA changes reach open connections


@pytest.mark.parametrize("mode", ["required", "optional"])
async def test_a_certificate_revoked_while_its_connection_is_open_is_refused_on_it(pki, caplog, mode):
    """Under optional too: a revoked certificate does not fall back to anonymous (a new connection
    with it fails its handshake)."""
    caplog.set_level(logging.DEBUG)
    carol, bob = pki.client("carol"), pki.client("bob")
    async with live(pki, config_text(pki, mode)) as mirror:
        held, other = await mirror.connect(carol), await mirror.connect(bob)
        try:
            assert (await held.ask()).status == 200
            assert (await other.ask()).status == 200
            clientcerts.revoke(pki.paths, "carol", pki.crl)
            await mirror.reload()
            answer = await held.ask()
            assert answer.status == 401 and REVOKED in answer.message
            assert answer.headers.get("connection") == "close"
            assert await held.closed()
            assert (await other.ask()).status == 200          # bob's certificate is not revoked
            await refused(mirror, carol)                # a new connection: refused in the handshake
        finally:
            held.close()
            other.close()
    lines = access_lines(caplog, r'"GET /v2/" 401 .*refused=certificate-revoked')
    assert len(lines) == 1 and 'CN=carol' in lines[0]


async def test_a_client_ca_replaced_by_reload_no_longer_admits_the_open_connections_of_the_old_one(pki, tmp_path):
    other = certs.Paths(tmp_path / "o.crt", tmp_path / "o.key", tmp_path / "other" / "ca.crt")
    certs.init(other, ["localhost"], [])
    alice = pki.client("alice")
    async with live(pki, config_text(pki)) as mirror:
        held = await mirror.connect(alice)
        try:
            assert (await held.ask()).status == 200
            await mirror.reload(config_text(pki, client_ca=other.ca))
            answer = await held.ask("/v2/library/busybox/manifests/1")
            assert answer.status == 401 and UNTRUSTED in answer.message
            assert answer.headers.get("connection") == "close"
        finally:
            held.close()


async def test_a_reload_to_client_auth_none_makes_an_open_connection_anonymous(pki, caplog):
    """As a new connection would be: certificates are no longer asked for, nor used."""
    caplog.set_level(logging.INFO)
    rules = "access:\n  - allow: [cert:alice]\n"
    alice = pki.client("alice")
    async with live(pki, config_text(pki, "optional", extra=rules)) as mirror:
        held = await mirror.connect(alice)
        try:
            assert (await held.ask()).status == 200
            await mirror.reload(config_text(pki, "none", extra=rules))
            assert (await held.ask()).status == 200
        finally:
            held.close()
    lines = access_lines(caplog, r'"GET /v2/" 200 ')
    assert len(lines) == 2
    assert "identity=cert:alice" in lines[0] and 'cert="CN=alice"' in lines[0]
    assert "identity=anonymous" in lines[1] and "cert=" not in lines[1]


async def test_a_revoked_certificate_whose_handshake_began_before_the_first_crl_is_refused(pki):
    """OpenSSL copies the CRL check flag into a connection when it is accepted: a connection
    accepted while no CRL was in force and whose ClientHello comes after the first CRL was
    loaded is verified without the CRL. Its requests are refused all the same."""
    carol = pki.client("carol")
    async with live(pki, config_text(pki)) as mirror:
        listening = mirror.server.servers[0]
        accepted = listening._active_count      # transports the asyncio server made (private, but plain)
        raw = socket.create_connection(("127.0.0.1", mirror.port))
        for _ in range(3000):
            if listening._active_count > accepted:
                break
            await asyncio.sleep(0.01)
        assert listening._active_count > accepted     # accepted: the handshake waits for the ClientHello
        clientcerts.revoke(pki.paths, "carol", pki.crl)
        await mirror.reload()
        held = None
        try:
            held = await asyncio.to_thread(Connection.open, mirror.port, pki.paths.ca, carol, raw)
            answer = await held.ask()
        except (ssl.SSLError, ConnectionError, OSError):
            return                                  # refused in the handshake: as good
        finally:
            (held or raw).close()
        assert answer.status == 401 and REVOKED in answer.message


# --- the CRL file disappearing


async def test_a_reload_whose_crl_is_gone_is_refused_once_a_crl_was_in_force(pki, caplog):
    caplog.set_level(logging.INFO)
    carol = pki.client("carol")
    pki.client("bob")
    clientcerts.revoke(pki.paths, "bob", pki.crl)
    async with live(pki, config_text(pki)) as mirror:
        held = await mirror.connect(carol)
        try:
            assert (await held.ask()).status == 200
            clientcerts.revoke(pki.paths, "carol", pki.crl)
            pki.crl.rename(pki.dir / "moved.pem")        # revoked carol, then the file went away
            # the whole reload is refused: nor is the log level (or anything else) changed
            level = logging.getLogger().level
            await mirror.reload(config_text(pki).replace("level: debug", "level: error"))
            assert logging.getLogger().level == level != logging.ERROR
            errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert errors and errors[-1].startswith("reload refused, still running with the previous configuration")
            assert str(pki.crl) in errors[-1]
            # bob is still refused (the CRL in force is kept); carol's revocation is not applied yet
            await refused(mirror, pki.client("bob"))
            assert (await held.ask()).status == 200
            (pki.dir / "moved.pem").rename(pki.crl)
            await mirror.reload()
            assert (await held.ask()).status == 401
        finally:
            held.close()


async def test_a_crl_set_in_the_configuration_and_missing_at_start_is_a_warning_with_its_line(pki, caplog):
    """Normal before the first cert revoke (which writes it); a typo in the path would look the same."""
    caplog.set_level(logging.INFO)
    async with live(pki, config_text(pki)) as mirror:
        alice = await mirror.connect(pki.client("alice"))
        try:
            assert (await alice.ask()).status == 200
        finally:
            alice.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{mirror.config}:8: tls.crl {pki.crl} does not exist: no client certificate is revoked until " \
           "docker-mirror cert revoke writes it" in warnings


# --- clients without a certificate: the log, and connection slots


async def test_the_gate_closes_the_connection_of_a_client_without_a_certificate(pki):
    async with live(pki, config_text(pki)) as mirror:
        anonymous = await mirror.connect()
        try:
            answer = await anonymous.ask()
            assert answer.status == 401 and answer.message.startswith("a client certificate is required")
            assert answer.headers.get("connection") == "close"
            assert await anonymous.closed()
        finally:
            anonymous.close()


async def test_malformed_requests_without_a_certificate_are_logged_once_a_minute(pki, caplog):
    caplog.set_level(logging.DEBUG)
    requests = [b"GET /v2/ HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",            # 400 (the parser)
                b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",          # 414
                b"GET /v2/ HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n"]   # 431
    async with live(pki, config_text(pki)) as mirror:
        for _ in range(4):
            for request in requests:
                anonymous = await mirror.connect()
                try:
                    assert 400 <= (await anonymous.send(request)).status < 500
                finally:
                    anonymous.close()
        # with a certificate, from the same address: the same limit (a client's doing is never a warning)
        alice = await mirror.connect(pki.client("alice"))
        try:
            assert (await alice.send(requests[0])).status == 400
        finally:
            alice.close()
    info = [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith(("uvicorn", "dockermirror"))
            and ("Invalid HTTP request" in r.getMessage() or re.search(r'"-" 4\d\d ', r.getMessage()))]
    # one line for the address (the first), the rest at debug, alice's too
    assert len(info) == 1 and info[0].levelno == logging.INFO, [r.getMessage() for r in info]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "Invalid HTTP" in r.getMessage()]
    quiet = [r for r in caplog.records if r.levelno == logging.DEBUG and r.name == "dockermirror.access"
             and re.search(r'"-" 4\d\d ', r.getMessage())]
    assert len(quiet) == 12
