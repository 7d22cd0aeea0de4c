"""The client systems ``client-setup --for`` knows, and telling which one this machine is.

Each target names the client versions it ships, because those decide what the steps must
write: CentOS 7's podman 1.6.4 (containers/image v5.0.0) reads no ``registries.conf.d``
drop-ins, its docker 1.13 package reads ``/etc/sysconfig/docker``, EL trusts CAs with
``update-ca-trust`` and Debian with ``update-ca-certificates``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Target:
    name: str
    label: str
    clients: str                    # the client versions the steps are for, as said in their header
    el: bool                        # update-ca-trust, /etc/pki/ca-trust; else update-ca-certificates
    registries_dropins: bool        # containers/image reads /etc/containers/registries.conf.d/
    docker_sysconfig: bool          # the distribution's docker package reads /etc/sysconfig/docker


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("el7", "CentOS 7 / RHEL 7", "docker 1.13 (extras) or docker-ce, containerd.io 1.6, podman 1.6.4, "
           "skopeo 0.1.40", el=True, registries_dropins=False, docker_sysconfig=True),
    Target("el8", "EL 8 (RHEL, CentOS Stream, Rocky, Alma, Oracle Linux)", "docker-ce, containerd.io, podman 4.x",
           el=True, registries_dropins=True, docker_sysconfig=False),
    Target("el9", "EL 9 (RHEL, CentOS Stream, Rocky, Alma, Oracle Linux)", "docker-ce, containerd.io, podman 4.x/5.x",
           el=True, registries_dropins=True, docker_sysconfig=False),
    Target("debian", "Debian / Ubuntu", "docker.io or docker-ce, containerd, podman 4.x",
           el=False, registries_dropins=True, docker_sysconfig=False),
)}
DEFAULT = TARGETS["debian"]

# ID (or an ID_LIKE word) of the EL rebuilds whose VERSION_ID's major number is the EL release
_EL_IDS = ("rhel", "centos", "rocky", "almalinux", "alma", "ol")
_DEBIAN_IDS = ("debian", "ubuntu")
OS_RELEASE = Path("/etc/os-release")


def parse_os_release(text: str) -> dict[str, str]:
    """KEY=value lines (values optionally quoted), as os-release(5) writes them."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            fields[key] = value
    return fields


def detect(fields: Mapping[str, str]) -> Target | None:
    """The target of a system by its os-release fields; None when it is none of them."""
    ids = [fields.get("ID", "").lower(), *fields.get("ID_LIKE", "").lower().split()]
    major = fields.get("VERSION_ID", "").split(".")[0]
    if ids[0] in _EL_IDS or (ids[0] != "fedora" and any(i in ("rhel", "centos") for i in ids[1:])):
        return TARGETS.get(f"el{major}") if major in ("7", "8", "9") else None
    if any(i in _DEBIAN_IDS for i in ids):
        return TARGETS["debian"]
    return None


def describe(fields: Mapping[str, str]) -> str:
    """How os-release names the system, for the line that says what was picked."""
    return " ".join(f"{key}={fields[key]}" for key in ("ID", "VERSION_ID") if key in fields) or "nothing"
