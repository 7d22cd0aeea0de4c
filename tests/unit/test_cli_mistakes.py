"""A user's mistake on the command line: exit status 2, one line on stderr that names the flag
or key (``docker-mirror: <flag or key>: <what is wrong>; <what to do>``), no traceback, and
nothing created on disk. The real CLI, in a subprocess, as a new user would run it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

def free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return "%s:%d" % sock.getsockname()


FREE = free_address()    # every case stops before the server would listen


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID")}
    return subprocess.run([sys.executable, "-m", "dockermirror", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=60, stdin=subprocess.DEVNULL)


def listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


CASES = {
    # id: (arguments, the flag or key the line names, words of the line); {d} is the test's directory
    "upstream-no-scheme": (["serve", "--upstream", "127.0.0.1:5000"], "--upstream", "write https://127.0.0.1:5000"),
    "upstream-ftp": (["serve", "--upstream", "ftp://x"], "--upstream", "invalid URL"),
    "cache-dir-empty": (["serve", "--cache-dir", ""], "--cache-dir", "non-empty"),
    "listen-garbage": (["serve", "--listen", "garbage"], "--listen", "use HOST:PORT"),
    "listen-port-range": (["serve", "--listen", "127.0.0.1:70000"], "--listen", "from 1 to 65535"),
    "listen-no-address": (["serve", "--listen", "192.0.2.1:5000"], "--listen", "no interface of this host"),
    "listen-unknown-name": (["serve", "--listen", "no-such-host.invalid:5000"], "--listen", "not an address"),
    "listen-in-use": (["serve", "--listen", "{busy}"], "--listen", "another process listens there"),
    "listen-missing-value": (["serve", "--listen"], "--listen", "expected one argument"),
    "config-missing": (["serve", "--config", "{d}/nonexistent.yml"], "{d}/nonexistent.yml", "No such file"),
    "config-directory": (["serve", "--config", "{d}"], "{d}", "Is a directory"),
    "config-broken-yaml": (["check-config", "--config", "{d}/broken.yml"], "{d}/broken.yml:3", "invalid YAML"),
    "config-bad-key": (["serve", "--config", "{d}/badkey.yml"], "{d}/badkey.yml:1: cache.tag_ttl", "duration"),
    "cache-dir-is-file": (["serve", "--cache-dir", "{d}/afile"], "--cache-dir", "is not a directory"),
    "cache-dir-parent-file": (["serve", "--cache-dir", "{d}/afile/cache"], "--cache-dir",
                              "{d}/afile is a file, not a directory"),
    "cache-dir-key-parent-file": (["serve", "--config", "{d}/filecache.yml"], "{d}/filecache.yml: cache.dir",
                                  "{d}/afile is a file"),
    "cache-stats-missing": (["cache", "stats", "--cache-dir", "{d}/nocache"], "--cache-dir", "no cache at"),
    "cache-verify-missing": (["cache", "verify", "--cache-dir", "{d}/nocache"], "--cache-dir", "no cache at"),
    "cache-prune-missing-key": (["cache", "prune", "--config", "{d}/nocache.yml"], "{d}/nocache.yml: cache.dir",
                                "no cache at"),
    "cache-prune-bad-duration": (["cache", "prune", "--older-than", "5x"], "--older-than", "invalid duration"),
    "client-setup-for": (["client-setup", "--for", "windows"], "--for", "choose one of el7"),
    "client-setup-host-url": (["client-setup", "--host", "https://mirror:5000"], "--host", "no https://"),
    "client-setup-host-port": (["client-setup", "--host", "mirror:99999"], "--host", "is not HOST:PORT"),
    "client-setup-unknown-flag": (["client-setup", "--bogus"], "unrecognized arguments", "--help"),
    "no-command": ([], "the following arguments are required", "--help"),
    "access-identity": (["access", "check", "root", "busybox"], "IDENTITY", "user:NAME"),
    "access-from": (["access", "check", "anonymous", "busybox", "--from", "10.0.0.300"], "--from", "invalid address"),
    "access-registry": (["access", "check", "anonymous", "quay.io/x/y"], "REPOSITORY", "quay.io"),
    "config-empty": (["check-config", "--config", ""], "--config", "expected a file name, got an empty one"),
    "cache-stats-file": (["cache", "stats", "--cache-dir", "{d}/afile"], "--cache-dir",
                         "no cache at {d}/afile: it is a file, not a directory"),
    "user-add-empty-password": (["user", "add", "bob", "--file", "{d}/users"], "password", "the password is empty"),
    "user-list-no-file": (["user", "list", "--config", "{d}/nocache.yml"], "{d}/nocache.yml: auth.htpasswd",
                          "no htpasswd file is set"),
    "user-add-bad-name": (["user", "add", "bo b", "--file", "{d}/users"], "NAME", "cannot hold ':', spaces"),
}


@pytest.mark.parametrize("args, names, words", CASES.values(), ids=CASES.keys())
def test_a_mistake_is_one_line_naming_the_flag_exit_2_and_creates_nothing(tmp_path: Path, args, names, words):
    (tmp_path / "broken.yml").write_text("cache:\n  dir: [\n")
    (tmp_path / "badkey.yml").write_text("cache: {tag_ttl: 5x}\n")
    (tmp_path / "afile").write_text("")
    (tmp_path / "filecache.yml").write_text(f"listen: {FREE}\ncache:\n  dir: {tmp_path}/afile/cache\n")
    (tmp_path / "nocache.yml").write_text(f"cache:\n  dir: {tmp_path}/nocache\n")
    before = sorted(tmp_path.rglob("*"))
    with listening() as busy:
        values = {"d": str(tmp_path), "busy": "%s:%d" % busy.getsockname()}
        argv = [a.format(**values) for a in args]
        if argv[:1] == ["serve"] and "--listen" not in argv and "--config" not in argv:
            argv += ["--listen", FREE]
        if argv[:1] == ["serve"] and "--cache-dir" not in argv and "--config" not in argv:
            argv += ["--cache-dir", str(tmp_path / "cache")]
        result = run(*argv, cwd=tmp_path)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"docker-mirror: {names.format(**values)}"), lines[0]
    assert words.format(**values) in lines[0]
    said = lines[0].partition(names.format(**values))[2]
    assert "; " in said or "(use " in said, f"says what is wrong but not what to do: {lines[0]}"
    assert sorted(tmp_path.rglob("*")) == before      # nothing made: no cache directory, lock or index
    what, _, hint = said.partition("; ")
    hint = hint.partition(" ")[2]       # "give X" after "expected X": said twice
    assert not hint or hint not in what, f"says its hint twice: {lines[0]}"


def test_a_bug_shows_its_traceback_and_says_it_is_one(tmp_path: Path):
    """Not a user's mistake: the whole traceback, then one line that says it is a bug; exit 70."""
    code = ("import sys, dockermirror.cli as cli\n"
            "def broken(args): raise RuntimeError('boom')\n"
            "cli.cmd_check_config.__code__ = broken.__code__\n"
            "sys.exit(cli.main(['check-config']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 70
    assert "Traceback" in result.stderr and "RuntimeError: boom" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("docker-mirror: bug: RuntimeError in check-config: boom;")


def test_under_systemd_the_line_carries_its_priority(tmp_path: Path):
    """stderr is the journal (the service): the line is at priority err, so that
    `journalctl -p warning` shows why the service does not start."""
    stderr = tmp_path / "stderr"
    with open(stderr, "wb") as f:
        st = os.fstat(f.fileno())
        env = {**{k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID")},
               "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        code = subprocess.run([sys.executable, "-m", "dockermirror", "serve", "--listen", "garbage"], stderr=f,
                              stdout=subprocess.DEVNULL, env=env, cwd=tmp_path, timeout=60).returncode
    assert code == 2
    assert stderr.read_text().splitlines() == [
        "<3>docker-mirror: --listen: invalid listen address 'garbage'; use HOST:PORT with a port from 1 to 65535, "
        "e.g. 0.0.0.0:5000 or [::]:5000"]


def test_a_reader_that_stops_early_is_not_a_bug(tmp_path: Path):
    """`docker-mirror client-setup | head -1`: the reader closed the pipe; nothing on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "dockermirror", "client-setup", "--for", "el7"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(60) == 141 and err == b""
