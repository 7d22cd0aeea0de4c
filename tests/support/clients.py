"""Real registry clients: skopeo, podman, dockerd + docker, containerd + ctr.

Daemons get their own state directories and sockets and are stopped by PID.
While they run, Docker Hub's names are pinned to 127.0.0.1 (see :func:`hosts_pinned`)
so a client's fallback to the real Docker Hub fails at once instead of leaving loopback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support.procs import Daemon, wait_until

HUB_NAMES = ("registry-1.docker.io", "index.docker.io", "docker.io", "auth.docker.io",
             "production.cloudflare.docker.com", "production.cloudfront.docker.com", "registry.docker.io")
PIN_BEGIN = "# >>> docker-mirror tests: pin Docker Hub to loopback >>>"
PIN_END = "# <<< docker-mirror tests <<<"


def run(argv: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a client command; fail with its output if it fails."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def _unpin(text: str) -> str:
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.strip() == PIN_BEGIN:
            skipping = True
        elif line.strip() == PIN_END:
            skipping = False
        elif not skipping:
            out.append(line)
    return "".join(out)


@contextlib.contextmanager
def hosts_pinned(hosts: Path = Path("/etc/hosts")) -> Iterator[None]:
    """Map Docker Hub's names to 127.0.0.1 while the block runs (written in place: keep the inode)."""
    original = _unpin(hosts.read_text())
    block = "".join(f"127.0.0.1 {name}\n" for name in HUB_NAMES)
    with open(hosts, "w") as f:
        f.write(original + ("" if original.endswith("\n") else "\n") + f"{PIN_BEGIN}\n{block}{PIN_END}\n")
    try:
        yield
    finally:
        with open(hosts, "w") as f:
            f.write(_unpin(hosts.read_text()))


def short_tmpdir(prefix: str) -> Path:
    """A short path: unix sockets must fit in 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# --- skopeo


def skopeo_copy(source: str, dest_dir: Path, *, all_images: bool = False, cert_dir: Path | None = None) -> Path:
    args = ["skopeo", "copy", "--quiet"]
    if all_images:
        args.append("--all")
    args += ["--src-cert-dir", str(cert_dir)] if cert_dir else ["--src-tls-verify=false"]
    run([*args, f"docker://{source}", f"dir:{dest_dir}"])
    return dest_dir


def dir_manifest_digest(directory: Path) -> str:
    """The digest of the top manifest skopeo wrote to a ``dir:`` destination (kept byte for byte)."""
    return "sha256:" + hashlib.sha256((directory / "manifest.json").read_bytes()).hexdigest()


# --- podman


class Podman:
    def __init__(self, registries_conf: str) -> None:
        self.root = short_tmpdir("dm-podman-")  # podman refuses a runroot longer than 50 bytes
        self.conf = self.root / "registries.conf"
        self.conf.write_text(registries_conf)

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return run(["podman", "--root", str(self.root / "storage"), "--runroot", str(self.root / "run"),
                    "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file",
                    *args], env={"CONTAINERS_REGISTRIES_CONF": str(self.conf), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                 "HOME": str(self.root)})

    def repo_digests(self, image: str) -> list[str]:
        out = self("image", "inspect", "--format", "{{json .RepoDigests}}", image).stdout
        return json.loads(out)

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self("rmi", "-a", "-f")
        shutil.rmtree(self.root, ignore_errors=True)


# --- dockerd


DOCKER_CLI = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"


class Dockerd(Daemon):
    def __init__(self, mirror_url: str, insecure: str | None = None) -> None:
        self.dir = short_tmpdir("dm-dockerd-")
        self.socket = self.dir / "docker.sock"
        config = self.dir / "daemon.json"
        config.write_text("{}")
        argv = ["dockerd", "--config-file", str(config), "--iptables=false", "--ip6tables=false",
                "--bridge=none", "--storage-driver=vfs", "--registry-mirror", mirror_url,
                "--data-root", str(self.dir / "data"), "--exec-root", str(self.dir / "exec"),
                "--pidfile", str(self.dir / "dockerd.pid"), "-H", f"unix://{self.socket}"]
        if insecure:
            argv += ["--insecure-registry", insecure]
        super().__init__(argv, self.dir / "dockerd.log")

    def start(self) -> None:
        super().start()
        wait_until(lambda: not self.running() or subprocess.run(
            [DOCKER_CLI, "-H", f"unix://{self.socket}", "version"], capture_output=True).returncode == 0,
            60, interval=0.2, what="dockerd")
        if not self.running():
            raise RuntimeError(f"dockerd did not start:\n{self.log_text()[-3000:]}")

    def docker(self, *args: str) -> subprocess.CompletedProcess:
        return run([DOCKER_CLI, "-H", f"unix://{self.socket}", *args])

    def stop(self) -> int | None:
        code = super().stop()
        # dockerd's own containerd shim tree lives under exec-root; it exits with dockerd
        shutil.rmtree(self.dir, ignore_errors=True)
        return code


# --- containerd


class Containerd(Daemon):
    def __init__(self) -> None:
        self.dir = short_tmpdir("dm-ctrd-")
        self.socket = self.dir / "containerd.sock"
        config = self.dir / "config.toml"
        config.write_text(f"""version = 2
root = "{self.dir}/root"
state = "{self.dir}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = "{self.dir}/debug.sock"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.dir}/opt"
""")
        super().__init__(["containerd", "--config", str(config)], self.dir / "containerd.log")

    def start(self) -> None:
        super().start()
        wait_until(lambda: not self.running() or (self.socket.exists() and subprocess.run(
            ["ctr", "-a", str(self.socket), "version"], capture_output=True).returncode == 0),
            60, interval=0.2, what="containerd")
        if not self.running():
            raise RuntimeError(f"containerd did not start:\n{self.log_text()[-3000:]}")

    def ctr(self, *args: str) -> subprocess.CompletedProcess:
        return run(["ctr", "-a", str(self.socket), *args])

    def hosts_dir(self, mirror: str, ca: Path | None = None) -> Path:
        """A --hosts-dir that sends docker.io pulls to the mirror (the hosts.toml recipe)."""
        hosts = self.dir / ("hosts-tls" if ca else "hosts")
        (hosts / "docker.io").mkdir(parents=True, exist_ok=True)
        ca_line = f'  ca = "{ca}"\n' if ca else ""
        (hosts / "docker.io" / "hosts.toml").write_text(
            f'server = "https://registry-1.docker.io"\n\n[host."{mirror}"]\n'
            f'  capabilities = ["pull", "resolve"]\n{ca_line}')
        return hosts

    def image_digest(self, ref: str) -> str:
        for line in self.ctr("images", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == ref:
                return fields[2]
        raise AssertionError(f"{ref} not in ctr images ls")

    def stop(self) -> int | None:
        code = super().stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        return code
