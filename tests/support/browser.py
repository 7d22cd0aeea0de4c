"""Headless Chromium (Debian's ``chromium`` package) loading a page: a screenshot, or the DOM.

Each run has a new profile directory and HOME, runs in a client sandbox (a private /etc with
Docker Hub's names on loopback, like every client here) with the run's mark, and with every
background service Chromium has turned off. It is started in a process group of its own and
that group (Chromium and every process it started) is killed when the run ends, however it
ends: its leader is waited for without being reaped, so the group's ID cannot have been
reused by then.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.clients import client_env, client_sandbox
from tests.support.procs import PDEATHSIG

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1200,900")


def _exited(pid: int, timeout: float) -> bool:
    """Wait for ``pid`` to exit, leaving it unreaped (a zombie keeps its PID and group ID)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(0.1)
    return False


def chromium(url: str, parent: Path, *args: str, timeout: float = 90) -> str:
    """Run ``chromium --headless ... ARGS URL`` (e.g. ``--screenshot=FILE``, ``--dump-dom``) and
    return what it printed; fail with its messages if it fails or takes longer than ``timeout``."""
    work = Path(tempfile.mkdtemp(prefix="chromium-", dir=parent))
    home, profile = work / "home", work / "profile"
    home.mkdir()
    env = {**client_env(home), "XDG_CONFIG_HOME": str(home / ".config"), "XDG_CACHE_HOME": str(home / ".cache")}
    sandbox = client_sandbox(work)
    argv = [*PDEATHSIG, *sandbox.argv([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, url])]
    out, err = work / "stdout", work / "stderr"
    try:
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
            try:
                exited = _exited(proc.pid, timeout)
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)    # its helpers too (renderer, zygote, ...)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        messages = err.read_text(errors="replace")[-3000:]
        if not exited:
            raise AssertionError(f"chromium did not finish within {timeout}s:\n{messages}")
        if proc.returncode != 0:
            raise AssertionError(f"chromium exited {proc.returncode}:\n{messages}")
        return out.read_text(errors="replace")
    finally:
        sandbox.cleanup()
