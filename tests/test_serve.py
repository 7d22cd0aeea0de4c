"""Starting the server: clear refusals, no tracebacks, nothing half-done."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import tempfile

import pytest

from tests.support.certs import make_pki
from tests.support.procs import free_port


def serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``serve`` with the given options; without ``--config``, a configuration of the test's own
    (plain HTTP), so that nothing in the host's /etc/docker-mirror or /etc/pki decides the outcome."""
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as config:
        config.write("tls:\n  enabled: false\n")
        config.flush()
        own = () if "--config" in args else ("--config", config.name)
        return subprocess.run([sys.executable, "-m", "dockermirror", "serve", "--upstream", "http://127.0.0.1:9",
                               *own, *args], capture_output=True, text=True, timeout=timeout)


def test_version():
    result = subprocess.run([sys.executable, "-m", "dockermirror", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("docker-mirror ")


@pytest.mark.parametrize("problem", ["missing certificate", "missing key", "key of another certificate",
                                     "not a certificate"])
def test_bad_tls_files_are_refused(tmp_path, problem):
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other")
    cert, key = pki.certificate, pki.key
    if problem == "missing certificate":
        cert = tmp_path / "nope.crt"
    elif problem == "missing key":
        key = tmp_path / "nope.key"
    elif problem == "key of another certificate":
        key = other.key
    else:
        cert = tmp_path / "garbage.crt"
        cert.write_text("hello\n")
    config = tmp_path / "config.yml"
    config.write_text(f"tls:\n  enabled: true\n  certificate: {cert}\n  key: {key}\n")
    result = serve("--config", str(config), "--cache-dir", str(tmp_path / "cache"),
                   "--listen", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    if problem.startswith("missing"):
        missing = cert if problem == "missing certificate" else key
        assert message == f"docker-mirror: cannot read TLS {problem.split()[1]} {missing}: No such file or directory"
    elif problem == "key of another certificate":
        assert message == f"docker-mirror: TLS key {key} does not belong to certificate {cert}"
    else:
        assert message == f"docker-mirror: {cert} is not a PEM certificate"
    assert not (tmp_path / "cache").exists()


def test_cache_dir_that_cannot_be_used(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = serve("--cache-dir", str(blocker / "cache"), "--listen", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2       # the user's mistake: one line naming the flag
    assert result.stderr == (f"docker-mirror: --cache-dir: cannot create {blocker / 'cache'}: {blocker} is a file, "
                             "not a directory; choose another directory\n")


def test_foreign_database_in_cache_dir(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    db = sqlite3.connect(cache / "index.sqlite")
    db.execute("CREATE TABLE customers (name TEXT)")
    db.commit()
    db.close()
    result = serve("--cache-dir", str(cache), "--listen", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "is an SQLite database of something else" in result.stderr
    tables = sqlite3.connect(cache / "index.sqlite").execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == [("customers",)]  # left as it was


def test_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = serve("--cache-dir", str(tmp_path / "cache"), "--listen", f"127.0.0.1:{port}")
    assert result.returncode != 0
    assert "address already in use" in result.stderr.lower()
    assert "Traceback" not in result.stderr
