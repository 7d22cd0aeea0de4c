"""Files an operator names that are not small regular files (a FIFO, /dev/zero, a huge file), and
NUL or control characters in configured strings and paths: one line and exit status 2, or a
refused reload, never a hang, a MemoryError or a traceback."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from dockermirror import cli, config as configuration, smallfile
from dockermirror.access.htpasswd import HtpasswdError
from dockermirror.app import DockerMirror
from tests.unit.conftest import config_text

ALICE = bcrypt.hashpw(b"alice-pw", bcrypt.gensalt(4)).decode()


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO; should a reader still block on it after 3 s (the defect), a writer opens and closes
    it, so the reader sees an empty file and the test fails instead of hanging."""
    path = tmp_path / "fifo"
    os.mkfifo(path)
    done = threading.Event()

    def release() -> None:
        if done.wait(3):
            return
        while not done.is_set():
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as exc:
                if exc.errno != errno.ENXIO:    # ENXIO: no reader (yet)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    yield path
    done.set()
    thread.join()


def check_config(capsys: pytest.CaptureFixture, path: Path) -> tuple[int, str, str, float]:
    start = time.monotonic()
    code = cli.main(["check-config", "--config", str(path)])
    out, err = capsys.readouterr()
    return code, out, err, time.monotonic() - start


def test_the_helper_refuses_a_fifo_a_device_and_a_larger_file_and_reads_a_regular_one(tmp_path, fifo):
    with pytest.raises(smallfile.UnfitFile, match="not a regular file"):
        smallfile.read(fifo, 100)
    with pytest.raises(smallfile.UnfitFile, match="not a regular file"):
        smallfile.read("/dev/zero", 100)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 1025)
    with pytest.raises(smallfile.TooLarge, match=r"^\[Errno 22\] larger than 1 KiB"):
        smallfile.read(big, 1024)
    data, st = smallfile.read(big, 1025)
    assert data == b"x" * 1025 and st.st_size == 1025
    with pytest.raises(FileNotFoundError):
        smallfile.read(tmp_path / "missing", 100)
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(20):    # closed on every path
        with pytest.raises(OSError):
            smallfile.read(fifo, 100)
        with pytest.raises(OSError):
            smallfile.read(big, 10)
    assert len(os.listdir("/proc/self/fd")) == fds


def test_check_config_refuses_a_fifo_as_the_configuration_at_once(capsys, fifo):
    code, out, err, took = check_config(capsys, fifo)
    assert (code, out) == (2, "") and took < 2.5
    assert err == (f"docker-mirror: {fifo}: cannot read configuration: not a regular file; give a readable YAML "
                   "file (the packages install /etc/docker-mirror/config.yml)\n")


def test_check_config_refuses_a_fifo_as_the_htpasswd_file_at_once(tmp_path, capsys, fifo):
    path = tmp_path / "config.yml"
    path.write_text(config_text(tmp_path / "cache", f"auth:\n  htpasswd: {fifo}\n"))
    code, out, err, took = check_config(capsys, path)
    assert (code, out) == (2, "") and took < 2.5
    assert err == f"docker-mirror: auth.htpasswd: {fifo}: cannot read the htpasswd file: not a regular file\n"


def test_check_config_refuses_a_configuration_larger_than_1_mib(tmp_path, capsys):
    path = tmp_path / "config.yml"
    path.write_text(config_text(tmp_path / "cache") + "#" * (1 << 20) + "\n")
    code, out, err, _ = check_config(capsys, path)
    assert (code, out) == (2, "")
    assert err.startswith(f"docker-mirror: {path}: cannot read configuration: larger than 1 MiB;")
    assert err.count("\n") == 1


def test_an_htpasswd_file_larger_than_16_mib_is_refused(tmp_path, capsys):
    users = tmp_path / "htpasswd"
    with users.open("wb") as f:
        f.truncate((16 << 20) + 1)
    users.chmod(0o600)
    path = tmp_path / "config.yml"
    path.write_text(config_text(tmp_path / "cache", f"auth:\n  htpasswd: {users}\n"))
    code, out, err, _ = check_config(capsys, path)
    assert (code, out) == (2, "")
    assert err == f"docker-mirror: auth.htpasswd: {users}: cannot read the htpasswd file: larger than 16 MiB\n"


def _limit_memory() -> None:    # without the fix, /dev/zero is read until this runs out: no host at risk
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


@pytest.mark.parametrize("where", ["config", "htpasswd"])
def test_dev_zero_as_the_configuration_or_the_htpasswd_file_is_one_line(tmp_path, where):
    if where == "config":
        path, expected = Path("/dev/zero"), "docker-mirror: /dev/zero: cannot read configuration: not a regular file;"
    else:
        path = tmp_path / "config.yml"
        path.write_text(config_text(tmp_path / "cache", "auth:\n  htpasswd: /dev/zero\n"))
        expected = "docker-mirror: auth.htpasswd: /dev/zero: cannot read the htpasswd file: not a regular file\n"
    run = subprocess.run([sys.executable, "-m", "dockermirror", "check-config", "--config", str(path)],
                         capture_output=True, text=True, timeout=120, preexec_fn=_limit_memory)
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr.startswith(expected) and run.stderr.count("\n") == 1


def test_a_reload_naming_a_fifo_htpasswd_is_refused_at_once_and_keeps_the_users(tmp_path, fifo):
    users = tmp_path / "htpasswd"
    users.write_text(f"alice:{ALICE}\n")
    users.chmod(0o600)
    app = DockerMirror(configuration.loads(config_text(tmp_path / "cache", f"auth:\n  htpasswd: {users}\n")))
    first = app.htpasswd
    assert first is not None and first.users == ["alice"]
    start = time.monotonic()
    with pytest.raises(HtpasswdError) as refused:
        app.reconfigure(configuration.loads(config_text(tmp_path / "cache", f"auth:\n  htpasswd: {fifo}\n")))
    assert time.monotonic() - start < 2.5
    assert str(refused.value) == f"{fifo}: cannot read the htpasswd file: not a regular file"
    assert app.htpasswd is first


@pytest.mark.parametrize("setting, key, words", [
    ('cache:\n  dir: "/var/cache/x\\0y"', "cache.dir", "the value holds a NUL character (\\0); remove it"),
    ('auth:\n  htpasswd: "/etc/x\\0y"', "auth.htpasswd", "the value holds a NUL character (\\0); remove it"),
    ('tls:\n  certificate: "/etc/x\\0y"', "tls.certificate", "the value holds a NUL character (\\0); remove it"),
    ('tls:\n  key: "/etc/x\\ty"', "tls.key", "the path '/etc/x\\ty' holds a control character (#x0009); remove it"),
    ('hostname: "mirror\\0.example"', "hostname", "the value holds a NUL character (\\0); remove it"),
])
def test_a_nul_or_a_control_character_is_refused_with_its_line(tmp_path, capsys, setting, key, words):
    path = tmp_path / "config.yml"
    path.write_text(f"listen: 127.0.0.1:5000\n{setting}\n")
    code, out, err, _ = check_config(capsys, path)
    assert (code, out) == (2, "")
    assert err == f"docker-mirror: {path}:{setting.count(chr(10)) + 2}: {key}: {words}\n"


@pytest.mark.parametrize("value", ['"90"', "90", "'90 '"])
def test_a_duration_of_digits_is_seconds_quoted_or_not(value):
    text = f"cache:\n  tag_ttl: {value}\n"
    assert configuration.loads(text).cache.tag_ttl == 90.0


@pytest.mark.parametrize("text, line, key", [
    ("[a, b]: 1\n", 1, "(top)"),
    ("cache:\n  ? {a: 1}\n  : 2\n", 2, "cache"),
    ("access:\n  - ? [x]\n    : 1\n", 2, "access[0]"),
])
def test_a_key_that_is_not_a_string_is_said_in_words(tmp_path, capsys, text, line, key):
    path = tmp_path / "config.yml"
    path.write_text(text)
    code, out, err, _ = check_config(capsys, path)
    assert (code, out) == (2, "")
    assert err == (f"docker-mirror: {path}:{line}: {key}: a key that is not a string (a list or a mapping); "
                   "keys are names\n")


def test_a_directory_is_still_said_to_be_one(tmp_path):
    with pytest.raises(IsADirectoryError, match="Is a directory"):
        smallfile.read(tmp_path, 100)
