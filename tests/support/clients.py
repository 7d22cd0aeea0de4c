"""Real registry clients: skopeo, podman, dockerd + docker, containerd + ctr.

Daemons get their own state directories and sockets and are stopped by PID. Every client
runs in a :class:`~tests.support.sandbox.Sandbox`: a private /etc and /var/lib in which
Docker Hub's names are pinned to 127.0.0.1 (so a client's fallback to the real Docker Hub
fails at once instead of leaving loopback), the client's own configuration is the test's
(the host's registries.conf, policy.json, certs.d and daemon.json are hidden), and whatever
the client writes there stays there. The host's files are never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tests.support.hostguard import MARK
from tests.support.netns import NetNamespace
from tests.support.procs import Daemon, wait_until
from tests.support.sandbox import HUB_NAMES, LOOPBACK_HOSTS, Sandbox

# The containers-image configuration every sandboxed client sees instead of the host's.
CONTAINERS_ETC = {
    "containers/policy.json": json.dumps({"default": [{"type": "insecureAcceptAnything"}]}),
    "containers/registries.conf": 'unqualified-search-registries = ["docker.io"]\n',
}
HIDDEN_ETC = ("containers/registries.conf.d", "containers/registries.d", "containers/containers.conf",
              "containers/containers.conf.d", "containers/storage.conf", "containers/certs.d",
              "docker/certs.d", "docker/daemon.json", "containerd/certs.d")


def client_sandbox(parent: Path, etc: dict[str, str | bytes] | None = None, pin: Iterable[str] = ()) -> Sandbox:
    """``etc``: files for the client's /etc (relative paths); ``pin``: more host names pinned to
    127.0.0.1 with Docker Hub's (test registries' names, so a client's fallback to "the registry
    itself" fails at once on loopback)."""
    hosts = LOOPBACK_HOSTS + "".join(f"127.0.0.1\t{name}\n" for name in (*HUB_NAMES, *pin))
    return Sandbox(parent, etc={**CONTAINERS_ETC, **(etc or {})}, hide=HIDDEN_ETC, hosts=hosts)


def client_env(home: Path) -> dict[str, str]:
    """A client's whole environment: nothing of the host's (credentials, proxies, XDG dirs)."""
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home), "LC_ALL": "C.UTF-8",
            **({MARK: os.environ[MARK]} if MARK in os.environ else {})}


def run(argv: list[str], timeout: float = 300, env: dict | None = None,
        sandbox: Sandbox | None = None) -> subprocess.CompletedProcess:
    """Run a client command (in ``sandbox``, if given); fail with its output if it fails."""
    full = sandbox.argv(argv) if sandbox else argv
    result = subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def short_tmpdir(prefix: str) -> Path:
    """A short path: unix sockets must fit in 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# --- skopeo


def skopeo(*args: str, parent: Path, timeout: float = 300, etc: dict[str, str | bytes] | None = None,
           pin: Iterable[str] = ()) -> subprocess.CompletedProcess:
    """skopeo in a sandbox of its own under ``parent`` (it writes /var/lib/containers/cache);
    ``etc`` and ``pin`` as for :func:`client_sandbox`."""
    sandbox = client_sandbox(parent, etc, pin)
    try:
        return run(["skopeo", *args], timeout=timeout, env=client_env(sandbox.dir), sandbox=sandbox)
    finally:
        sandbox.cleanup()


def skopeo_push(layout: Path, tag: str, dest: str, *extra: str, all_images: bool = False) -> None:
    """Copy an OCI layout's ``tag`` to ``docker://dest`` (the test upstream, plain HTTP)."""
    skopeo("copy", "--quiet", *(["--all"] if all_images else []), "--dest-tls-verify=false", *extra,
           f"oci:{layout}:{tag}", f"docker://{dest}", parent=layout.parent)


def skopeo_copy(source: str, dest_dir: Path, *, all_images: bool = False, cert_dir: Path | None = None) -> Path:
    args = ["copy", "--quiet"]
    if all_images:
        args.append("--all")
    args += ["--src-cert-dir", str(cert_dir)] if cert_dir else ["--src-tls-verify=false"]
    skopeo(*args, f"docker://{source}", f"dir:{dest_dir}", parent=dest_dir.parent)
    return dest_dir


def dir_manifest_digest(directory: Path) -> str:
    """The digest of the top manifest skopeo wrote to a ``dir:`` destination (kept byte for byte)."""
    return "sha256:" + hashlib.sha256((directory / "manifest.json").read_bytes()).hexdigest()


# --- podman


class Podman:
    """podman with ``registries_conf`` as its /etc/containers/registries.conf, or the default one
    and ``etc``'s files (registries.conf.d/, certs.d/ ...); ``pin`` as for :func:`client_sandbox`."""

    def __init__(self, registries_conf: str | None = None, *, etc: dict[str, str | bytes] | None = None,
                 pin: Iterable[str] = ()) -> None:
        self.root = short_tmpdir("dm-podman-")  # podman refuses a runroot longer than 50 bytes
        files = {**({"containers/registries.conf": registries_conf} if registries_conf else {}), **(etc or {})}
        self.sandbox = client_sandbox(self.root, files, pin)

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return run(["podman", "--root", str(self.root / "storage"), "--runroot", str(self.root / "run"),
                    "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file",
                    *args], env=client_env(self.root), sandbox=self.sandbox)

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
    """dockerd with the mirror as its registry mirror; ``ca`` (with ``mirror_address``) is
    put where dockerd looks for a mirror's CA: /etc/docker/certs.d/HOST:PORT/ca.crt (in its
    sandbox, not on the host). Without ``mirror_url``, dockerd reads its sandbox's
    /etc/docker/daemon.json, which ``etc`` (files for its /etc) must bring. ``netns``: a
    :class:`~tests.support.netns.NetNamespace` (started) to run it in. ``storage_driver``: vfs
    (no mounts at all) or overlay2 (Docker's default; its mounts stay in the sandbox's namespace)."""

    def __init__(self, mirror_url: str | None, insecure: str | None = None, *, ca: Path | None = None,
                 mirror_address: str | None = None, etc: dict[str, str | bytes] | None = None,
                 netns: NetNamespace | None = None, storage_driver: str = "vfs") -> None:
        self.dir = short_tmpdir("dm-dockerd-")
        certs = {f"docker/certs.d/{mirror_address}/ca.crt": ca.read_bytes()} if ca and mirror_address else {}
        self.sandbox = client_sandbox(self.dir, {**certs, **(etc or {})})
        self.socket = self.dir / "docker.sock"
        config = self.dir / "daemon.json"
        config.write_text("{}")
        argv = ["dockerd", "--config-file", "/etc/docker/daemon.json" if mirror_url is None else str(config),
                "--iptables=false", "--ip6tables=false", "--bridge=none", f"--storage-driver={storage_driver}",
                *(["--registry-mirror", mirror_url] if mirror_url else []),
                "--data-root", str(self.dir / "data"), "--exec-root", str(self.dir / "exec"),
                "--pidfile", str(self.dir / "dockerd.pid"), "-H", f"unix://{self.socket}"]
        if insecure:
            argv += ["--insecure-registry", insecure]
        argv = self.sandbox.argv(argv)
        # nothing of the host's environment: a proxy there would reach past the sandbox's pinned names
        super().__init__(netns.argv(argv) if netns else argv, self.dir / "dockerd.log", env=client_env(self.dir))

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
    """containerd and ctr; ``etc`` and ``pin`` as for :func:`client_sandbox` (ctr reads
    ``--hosts-dir`` and the CA files hosts.toml names in the sandbox)."""

    def __init__(self, *, etc: dict[str, str | bytes] | None = None, pin: Iterable[str] = ()) -> None:
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
        self.sandbox = client_sandbox(self.dir, etc, pin)
        super().__init__(self.sandbox.argv(["containerd", "--config", str(config)]), self.dir / "containerd.log")

    def start(self) -> None:
        super().start()
        wait_until(lambda: not self.running() or (self.socket.exists() and subprocess.run(
            ["ctr", "-a", str(self.socket), "version"], capture_output=True).returncode == 0),
            60, interval=0.2, what="containerd")
        if not self.running():
            raise RuntimeError(f"containerd did not start:\n{self.log_text()[-3000:]}")

    def ctr(self, *args: str) -> subprocess.CompletedProcess:
        """ctr does the pulling itself (resolving, fetching): it runs in the sandbox too."""
        return run(["ctr", "-a", str(self.socket), *args], env=client_env(self.dir), sandbox=self.sandbox)

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
