"""A real systemd, booted in a container with systemd-nspawn, driven from outside with nsenter.

The root filesystem (Debian 12, minimal, with systemd, python3-venv, procps) is built once
with debootstrap and kept outside the clone (DM_TEST_CACHE, default
/var/cache/docker-mirror-tests), so later runs reuse it. Each boot is volatile: changes
go to a tmpfs overlay and vanish when the container stops. The container shares the
host's network, so services inside listen on the host's loopback.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

from tests.support import progress
from tests.support.procs import PDEATHSIG, wait_until

CACHE = Path(os.environ.get("DM_TEST_CACHE", "/var/cache/docker-mirror-tests"))
PACKAGES = "systemd,systemd-sysv,dbus,procps,python3,python3-venv,ca-certificates,adduser,passwd,rpm"
PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def rootfs() -> Path:
    """The cached Debian 12 root filesystem, built on first use (about a minute)."""
    root = CACHE / f"rootfs-bookworm-{hashlib.sha256(PACKAGES.encode()).hexdigest()[:8]}"
    if (root / "usr/lib/systemd/systemd").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    for stale in CACHE.glob("rootfs-building-*"):       # left by a run that was killed
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            shutil.rmtree(stale, ignore_errors=True)
    building = CACHE / f"rootfs-building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    with progress.step(f"debootstrap: a Debian 12 root filesystem for the systemd containers into {root} "
                       "(once; about 100 MB downloaded, 1-3 minutes)"):
        result = subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm",
                                 str(building)], capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            shutil.rmtree(building, ignore_errors=True)
            raise RuntimeError(f"debootstrap failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                               f"{result.stderr[-3000:]}")
    (building / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    building.rename(root)
    return root


class Container:
    """One booted container; stop() powers it off (SIGTERM to systemd-nspawn)."""

    def __init__(self, name: str, workdir: Path, binds: dict[Path, str] | None = None) -> None:
        self.name = name
        self.workdir = workdir
        self.binds = binds or {}
        self.proc: subprocess.Popen | None = None
        self.leader = 0

    def boot(self) -> Container:
        """Start the container and wait until systemd inside is up; on failure, stop it again."""
        try:
            return self._boot()
        except BaseException:
            self.stop()
            raise

    def _boot(self) -> Container:
        argv = ["systemd-nspawn", "-D", str(rootfs()), "--volatile=overlay", "-b", "--register=no", "--keep-unit",
                f"--machine={self.name}", "--console=passive"]
        argv += [f"--bind-ro={host}:{guest}" for host, guest in self.binds.items()]
        self._console = open(self.workdir / f"{self.name}-console.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([*PDEATHSIG, *argv], stdout=self._console, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

        def leader() -> int:
            found = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-x", "systemd"], capture_output=True,
                                   text=True).stdout.split()
            return int(found[0]) if found else 0

        self.leader = wait_until(lambda: leader() or self.proc.poll() is not None, 60, what="container PID 1")
        if self.proc.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited: {(self.workdir / f'{self.name}-console.log').read_text()}")
        # Until PID 1 has set up its private socket, systemctl cannot reach it and prints "offline"
        # (or nothing); once it answers, --wait blocks until the boot has finished.
        def booted() -> str:
            state = self.run("systemctl", "is-system-running", "--wait", check=False).stdout.strip()
            return "" if state in ("", "offline") else state

        state = wait_until(booted, 60, interval=0.2, what="systemd in the container")
        if state not in ("running", "degraded"):
            raise RuntimeError(f"container did not boot: {state}")
        return self

    def run(self, *argv: str, check: bool = True, input: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """Run a command inside, with a clean environment (nothing of the host's leaks in)."""
        result = subprocess.run(["nsenter", "-t", str(self.leader), "-a", "env", "-i", PATH, "TERM=dumb", *argv],
                                capture_output=True, text=True, input=input, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def write(self, path: str, content: str, mode: str = "0644") -> None:
        self.run("sh", "-c", f'mkdir -p "$(dirname {path})" && cat > {path} && chmod {mode} {path}', input=content)

    def read(self, path: str) -> str:
        return self.run("cat", path).stdout

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_console", None):
            self._console.close()


def wheelhouse(project: Path, dest: Path) -> Path:
    """Wheels of the project and its dependencies, to install inside without a network."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [str(project / ".venv/bin/python"), "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
           "--use-pep517", "-c", str(project / "requirements.lock"), "-w", str(dest), str(project)]
    with progress.step("building wheels of docker-mirror and its dependencies for the containers"):
        subprocess.run(pip, check=True, capture_output=True, timeout=600)
    return dest
