"""Run a process with a private view of the host's system files, so tests never write them.

A client or daemon started through :class:`Sandbox` runs in a mount namespace of its own
(``unshare --mount``, which makes every mount in it private). Inside, ``/etc`` and
``/var/lib`` are overlays whose writable layer is a small tmpfs that exists only in that
namespace: what the process writes there (dockerd's ``/etc/docker/key.json``, skopeo's
``/var/lib/containers/cache``, ...) never reaches the host, and what the test puts there
(an ``/etc/hosts`` that pins Docker Hub's names to loopback, ``/etc/docker/certs.d/...``)
is seen by that process alone. Optionally the namespace has its own host name (UTS).

Nothing is ever written to the host's files, so there is nothing to undo: when the
process exits, or is killed at any moment, its namespace and everything in it are gone.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

# Docker Hub's names: pinned to loopback inside a sandbox, so a client that falls back from
# the mirror to "Docker Hub" fails at once instead of leaving the machine.
HUB_NAMES = ("registry-1.docker.io", "index.docker.io", "docker.io", "auth.docker.io",
             "production.cloudflare.docker.com", "production.cloudfront.docker.com", "registry.docker.io")
LOOPBACK_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"

# Overlaid in the namespace (each must exist on the host; /etc and /var/lib always do).
OVERLAID = ("/etc", "/var/lib")

_SETUP = r"""
set -eu
scratch=$1 stage=$2 name=$3 hide=$4; shift 4
mount -t tmpfs -o mode=0700,size=64m dm-sandbox "$scratch"
for dir in {overlaid}; do
    layer="$scratch/$(echo "$dir" | tr / _)"
    mkdir -p "$layer/upper" "$layer/work"
    mount -t overlay dm-sandbox -o "lowerdir=$dir,upperdir=$layer/upper,workdir=$layer/work" "$dir"
done
for path in $hide; do rm -rf "/etc/$path"; done
cp -a "$stage/." /etc/
if [ -n "$name" ]; then hostname "$name"; fi
exec "$@"
""".replace("{overlaid}", " ".join(OVERLAID))


class Sandbox:
    """A private /etc and /var/lib (and optionally host name) for the processes it starts.

    ``etc`` maps paths relative to /etc to their content (str or bytes); ``hide`` names
    paths under /etc that the process must not see (the host's configuration of the same
    client, say); ``hosts`` is the whole /etc/hosts the process sees (default: loopback
    names plus Docker Hub pinned to 127.0.0.1). The sandbox's own files live in a new
    directory under ``parent``.
    """

    def __init__(self, parent: Path, *, hosts: str | None = None, hostname: str | None = None,
                 etc: Mapping[str, str | bytes] | None = None, hide: tuple[str, ...] = ()) -> None:
        if any(not part or part.startswith("/") or ".." in part or " " in part for part in hide):
            raise ValueError(f"hide takes plain paths relative to /etc: {hide}")
        parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="sandbox-", dir=parent))
        self.scratch = self.dir / "scratch"     # a tmpfs inside the namespace; empty outside
        self.stage = self.dir / "etc"           # copied over the private /etc
        self.hostname = hostname or ""
        self.hide = " ".join(hide)
        self.scratch.mkdir()
        self.stage.mkdir()
        if hosts is None:
            hosts = LOOPBACK_HOSTS + "".join(f"127.0.0.1\t{name}\n" for name in HUB_NAMES)
        files: dict[str, str | bytes] = {"hosts": hosts, **(etc or {})}
        for relative, content in files.items():
            path = self.stage / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
            path.chmod(0o644)

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` wrapped so that it runs inside the sandbox (the PID stays the same: all exec)."""
        unshare = ["unshare", "--mount", "--propagation", "private"] + (["--uts"] if self.hostname else [])
        return [*unshare, "--", "sh", "-c", _SETUP, "dm-sandbox", str(self.scratch), str(self.stage),
                self.hostname, self.hide, *argv]

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv), **kwargs)

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
