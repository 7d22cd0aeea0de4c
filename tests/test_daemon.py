"""The daemon's side of systemd, against a real AF_UNIX datagram socket as NOTIFY_SOCKET:
READY after bind, WATCHDOG pings, RELOADING/READY on SIGHUP (config and certificate), STOPPING.
And journald's priority prefixes when stderr is the journal."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ALL_MANIFESTS
from tests.support.procs import Mirror, free_port, wait_until

ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]


class NotifySocket:
    """Collects the datagrams a service sends to systemd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.on_ready = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536).decode()
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data))
            if "READY=1" in data and self.on_ready is not None:
                self.on_ready(data)

    def states(self) -> list[str]:
        return [field for _, message in self.messages for field in message.split("\n")
                if not field.startswith(("STATUS=", "MAINPID=", "MONOTONIC_USEC="))]

    def wait_for(self, field: str, count: int = 1, timeout: float = 15) -> None:
        wait_until(lambda: self.states().count(field) >= count, timeout, what=f"{count} x {field}")

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify(tmp_path_factory):
    directory = Path(subprocess.run(["mktemp", "-d", "/tmp/dm-notify-XXXXXX"], capture_output=True, text=True,
                                    check=True).stdout.strip())
    sock = NotifySocket(directory / "notify.sock")
    yield sock
    sock.close()
    subprocess.run(["rm", "-rf", str(directory)], check=False)


def daemon(tmp_path: Path, notify: NotifySocket, config: dict, upstream_url: str, **env) -> Mirror:
    mirror = Mirror(tmp_path, {"upstream": {"url": upstream_url}, **config})
    mirror.env = {**mirror.env, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000", **env}
    return mirror


def serial_of(address: str, ca: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as raw, context.wrap_socket(raw, server_hostname=host) as tls:
        from cryptography import x509

        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def test_ready_after_bind_then_watchdog_and_stopping(tmp_path, notify, upstream):
    mirror = daemon(tmp_path, notify, {}, upstream.url)
    seen_at_ready = {}

    def on_ready(message: str) -> None:
        if "listening" in seen_at_ready:
            return
        try:
            socket.create_connection(("127.0.0.1", mirror.port), timeout=1).close()
            seen_at_ready["listening"] = True
        except OSError:
            seen_at_ready["listening"] = False
        seen_at_ready["index"] = (mirror.cache_dir / "index.sqlite").exists()
        seen_at_ready["status"] = message

    notify.on_ready = on_ready
    mirror.start()
    try:
        notify.wait_for("READY=1")
        assert seen_at_ready["listening"] and seen_at_ready["index"]
        assert f"STATUS=http://127.0.0.1:{mirror.port} | cache " in seen_at_ready["status"]
        assert "upstream docker.io not contacted yet" in seen_at_ready["status"]
        notify.wait_for("WATCHDOG=1", count=4, timeout=30)     # every WATCHDOG_USEC/2 = 0.2 s
        assert httpx.get(f"{mirror.url}/v2/library/hello/manifests/latest", headers=ACCEPT).status_code == 200
    finally:
        mirror.stop()
    notify.wait_for("STOPPING=1")
    assert mirror.proc.returncode in (0, -signal.SIGTERM)
    db = sqlite3.connect(mirror.cache_dir / "index.sqlite")
    assert db.execute("SELECT value FROM meta WHERE key = 'running'").fetchone() == ("0",)  # a clean stop


def test_sighup_reloads_config_and_certificate(tmp_path, notify, upstream, pki):
    from dockermirror.service.certs import Paths, init

    paths = Paths(tmp_path / "tls" / "server.crt", tmp_path / "tls" / "server.key", tmp_path / "tls" / "ca.crt")
    init(paths, ["localhost"], ["127.0.0.1"])
    tls = {"enabled": True, "certificate": str(paths.certificate), "key": str(paths.key), "ca": str(paths.ca)}
    mirror = daemon(tmp_path, notify, {"tls": tls, "cache": {"tag_ttl": "1h"}}, upstream.url)
    mirror.start()
    try:
        notify.wait_for("READY=1")
        before = serial_of(mirror.address, paths.ca)
        with httpx.Client(base_url=mirror.url, verify=ssl.create_default_context(cafile=paths.ca)) as kept:
            assert kept.get("/v2/").status_code == 200       # a connection made before the reload...

            init(paths, ["localhost"], ["127.0.0.1"])          # a renewed certificate
            mirror.proc.send_signal(signal.SIGHUP)
            notify.wait_for("READY=1", count=2)
            states = [state for state in notify.states() if state != "WATCHDOG=1"]
            assert states == ["READY=1", "RELOADING=1", "READY=1"]
            after = serial_of(mirror.address, paths.ca)
            assert after != before
            assert kept.get("/v2/").status_code == 200       # ...keeps working
        assert "TLS certificate" in mirror.log_text() and f"(serial {after:x})" in mirror.log_text()

        # a broken configuration is refused, and the old one stays in force
        good = mirror.config_path.read_text()
        mirror.config_path.write_text(good + "cache:\n  tag_ttl: soon\n")
        mirror.proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1", count=3)
        assert "reload refused, still running with the previous configuration" in mirror.log_text()
        assert f"{mirror.config_path}:" in mirror.log_text()
        assert httpx.get(f"{mirror.url}/v2/", verify=ssl.create_default_context(cafile=paths.ca)).status_code == 200

        # a change that needs a restart is named
        changed = yaml.safe_load(good)
        changed["listen"] = "127.0.0.1:1"
        mirror.config_path.write_text(yaml.safe_dump(changed))
        mirror.proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1", count=4)
        assert "restart to apply: listen" in mirror.log_text()
        assert notify.states().count("RELOADING=1") == 3
    finally:
        mirror.stop()


def test_journal_priorities(tmp_path, upstream):
    """stderr is the journal: every line carries its priority; errors and warnings say so."""
    log = tmp_path / "journal.log"
    config = tmp_path / "c.yml"
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{probe.getsockname()[1]}"
    probe.close()
    settings = {"listen": address, "upstream": {"url": upstream.url}, "cache": {"dir": str(tmp_path / "c")},
                "tls": {"enabled": False}}
    config.write_text(yaml.safe_dump(settings))
    with open(log, "wb") as f:
        st = os.fstat(f.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        proc = subprocess.Popen([sys.executable, "-m", "dockermirror", "serve", "--config", str(config)],
                                stdout=f, stderr=f, env=env)
        try:
            wait_until(lambda: b"serving http://" in log.read_bytes(), 20, what="startup")
            httpx.get(f"http://{address}/v2/library/hello/manifests/latest", headers=ACCEPT)
            config.write_text("cache: [broken\n")                       # an error...
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: b"<3>" in log.read_bytes(), 10, what="error line")
            config.write_text(yaml.safe_dump({**settings, "listen": "127.0.0.1:1"}))  # ...and a warning
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: b"<4>" in log.read_bytes(), 10, what="warning line")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
    lines = log.read_text().splitlines()
    assert lines and all(line.startswith(("<3>", "<4>", "<6>", "<7>")) for line in lines), lines
    assert any(line.startswith('<6>access: 127.0.0.1 "GET /v2/library/hello/manifests/latest" 200') for line in lines)
    assert any(line.startswith("<3>dockermirror: reload refused") for line in lines)
    assert any(line.startswith("<4>dockermirror: reloaded") and "restart to apply: listen" in line for line in lines)
    assert not any(line[3:7].isdigit() for line in lines)  # no timestamps: journald adds them


def socket_activated(mirror: Mirror, notify: NotifySocket, *options: str) -> int:
    """Start ``mirror`` under systemd-socket-activate on a free port (returned), once it listens.
    The tool drops NOTIFY_SOCKET from the environment it passes on, unless given with -E."""
    port = free_port()
    mirror.argv = ["systemd-socket-activate", *options, "-l", f"127.0.0.1:{port}",
                   "-E", f"NOTIFY_SOCKET={notify.path}", *mirror.argv]
    mirror.start(wait=False)
    wait_until(lambda: f"Listening on 127.0.0.1:{port} as 3." in mirror.log_text(), 10, what="the socket bound")
    return port


def test_socket_activation_serves_on_the_socket_systemd_passes(tmp_path, notify, upstream):
    """systemd-socket-activate, systemd's own tool, binds the port and passes it as descriptor 3
    with LISTEN_FDS/LISTEN_PID, exactly as docker-mirror.socket does. The mirror serves there,
    never binds its configured address, and does not apply `listen` on reload."""
    mirror = daemon(tmp_path, notify, {}, upstream.url)
    taken = socket.create_server(("127.0.0.1", mirror.port))   # binding `listen` would fail
    try:
        passed = socket_activated(mirror, notify)
        layer = upstream.seeded["hello"].image.layers["amd64"][0]
        # the first connection starts the mirror; it waits in the socket's backlog meanwhile
        with httpx.Client(base_url=f"http://127.0.0.1:{passed}", timeout=30) as client:
            assert client.get("/v2/").status_code == 200
            blob = client.get(f"/v2/library/hello/blobs/{layer}")
        assert blob.status_code == 200 and blob.content == upstream.blob(layer)
        notify.wait_for("READY=1")
        assert any(m.startswith(f"READY=1\nSTATUS=http://127.0.0.1:{passed} | cache ") for _, m in notify.messages)
        log = mirror.log_text()
        assert (f"listening on the socket(s) systemd passed (127.0.0.1:{passed}); "
                f"listen: 127.0.0.1:{mirror.port} is not used") in log
        assert f"serving http://127.0.0.1:{passed}" in log

        changed = yaml.safe_load(mirror.config_path.read_text())
        changed["listen"] = "127.0.0.1:1"
        mirror.config_path.write_text(yaml.safe_dump(changed))
        mirror.proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1", count=2)
        assert "restart to apply" not in mirror.log_text()
    finally:
        mirror.stop()
        taken.close()
    assert mirror.proc.returncode in (0, -signal.SIGTERM)


def test_socket_activation_refuses_a_datagram_socket(tmp_path, notify, upstream):
    mirror = daemon(tmp_path, notify, {}, upstream.url)
    try:
        passed = socket_activated(mirror, notify, "--datagram")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:   # a datagram starts it
            udp.sendto(b"x", ("127.0.0.1", passed))
        assert mirror.proc.wait(30) != 0
    finally:
        mirror.stop()
    assert "systemd passed descriptor 3, which is not a TCP socket (use ListenStream=PORT" in mirror.log_text()
    assert "Traceback" not in mirror.log_text()
    assert not (mirror.cache_dir / "index.sqlite").exists()   # refused before touching the cache
