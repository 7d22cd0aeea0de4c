"""serve as a service user that cannot write the cache directory (as root, permission bits do not
stop anything: the server runs as ``nobody`` here): one line naming the flag or key, exit 2,
nothing created."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.unit.test_cli_mistakes import free_address

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def serve_as_nobody(args: list[str]) -> list[str]:
    """``docker-mirror serve ARGS`` as nobody, outside systemd: it must refuse (exit 2) in one line
    and no traceback; that line."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID")}
    result = subprocess.run([*NOBODY, sys.executable, "-m", "dockermirror", "serve", *args], capture_output=True,
                            text=True, cwd="/", env=env, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, lines
    return lines


@pytest.fixture
def root_owned():
    """A directory owned by root, mode 0755: nobody can enter it, not write in it."""
    path = Path(tempfile.mkdtemp(prefix="dm-unwritable-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.parametrize("where", ["new", "existing"])
@pytest.mark.parametrize("how", ["flag", "key"])
def test_serve_as_a_user_who_cannot_write_the_cache_dir(root_owned: Path, where, how):
    cache = root_owned / "cache"
    if where == "existing":
        cache.mkdir(mode=0o755)
    config = root_owned / "config.yml"
    config.write_text(f"listen: {free_address()}\ncache:\n  dir: {cache}\n")
    config.chmod(0o644)
    args = ["--config", str(config)] + (["--cache-dir", str(cache)] if how == "flag" else [])
    before = sorted(root_owned.rglob("*"))
    lines = serve_as_nobody(args)
    named = "--cache-dir" if how == "flag" else f"{config}: cache.dir"
    assert lines[0].startswith(f"docker-mirror: {named}: "), lines[0]
    assert "is not writable for this user (nobody)" in lines[0], lines[0]
    assert ("chown -R nobody: " if where == "existing" else "chown nobody ") in lines[0], lines[0]
    assert sorted(root_owned.rglob("*")) == before


def test_serve_with_the_cache_dir_on_a_read_only_mount(root_owned: Path):
    """As root too: a new cache directory on a read-only filesystem is refused in one line."""
    mount = root_owned / "ro"
    mount.mkdir()
    subprocess.run(["mount", "--bind", str(mount), str(mount)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], check=True)
        result = subprocess.run([sys.executable, "-m", "dockermirror", "serve", "--listen", free_address(),
                                 "--cache-dir", str(mount / "cache")], capture_output=True, text=True, cwd="/",
                                timeout=60, stdin=subprocess.DEVNULL)
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    assert result.returncode == 2, result
    assert result.stderr.splitlines() == [
        f"docker-mirror: --cache-dir: cannot create {mount / 'cache'}: {mount} is on a read-only filesystem; "
        "choose a directory on a writable one"]
    assert list(mount.iterdir()) == []


@pytest.mark.parametrize("how", ["flag", "key"])
def test_serve_as_a_user_who_cannot_write_an_existing_cache(root_owned: Path, how):
    """A cache root made (and owns), the service user may enter but not write: one line naming
    the flag or key, with the chown -R that fixes it; not 'cannot open the cache: Permission denied'."""
    from dockermirror.cache import Cache

    cache = root_owned / "cache"
    made = Cache(cache)
    made.open()
    made.index.close()
    made._release_lock()
    for path in [cache, *cache.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    config = root_owned / "config.yml"
    config.write_text(f"listen: {free_address()}\ncache:\n  dir: {cache}\n")
    config.chmod(0o644)
    args = ["--config", str(config)] + (["--cache-dir", str(cache)] if how == "flag" else [])
    before = {p: p.stat().st_mtime_ns for p in root_owned.rglob("*")}
    lines = serve_as_nobody(args)
    named = "--cache-dir" if how == "flag" else f"{config}: cache.dir"
    assert lines[0].startswith(f"docker-mirror: {named}: the cache in {cache} is not writable for this user "
                               f"(nobody)"), lines[0]
    assert f"chown -R nobody: {cache})" in lines[0], lines[0]
    assert {p: p.stat().st_mtime_ns for p in root_owned.rglob("*")} == before
