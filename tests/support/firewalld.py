"""firewalld's own code, to check the service file the packages ship.

Debian's firewalld, python3-firewall and python3-nftables are unpacked by tests/run.sh into the
test cache (``tests/apt-ensure.sh --unpack``), never installed: the package would start firewalld
and load its rules on this machine. ``firewall-offline-cmd`` runs on a copy of firewalld's stock
configuration (its /usr/lib/firewalld) and an empty system configuration, both in a scratch
directory (``--default-config``, ``--system-config``): the host's /etc/firewalld is never read or
written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

UNPACKED = Path(os.environ.get("DM_TEST_CACHE", "/var/cache/docker-mirror-tests")) / "firewalld"
PACKAGES = ("firewalld", "python3-firewall", "python3-nftables")


class OfflineFirewalld:
    """firewall-offline-cmd on a private copy of firewalld's configuration under ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        missing = [p for p in PACKAGES if not (UNPACKED / p / ".version").is_file()]
        if missing:
            pytest.fail(f"firewalld's code is missing: tests/run.sh unpacks {', '.join(missing)} into {UNPACKED} "
                        f"(tests/apt-ensure.sh --unpack {UNPACKED}/PACKAGE PACKAGE)")
        self.default_config = workdir / "usr-lib-firewalld"      # what the packages ship into
        self.system_config = workdir / "etc-firewalld"            # the admin's side: starts empty
        shutil.copytree(UNPACKED / "firewalld/usr/lib/firewalld", self.default_config)
        self.system_config.mkdir()
        shutil.copy(UNPACKED / "firewalld/etc/firewalld/firewalld.conf", self.system_config)

    def add_service_file(self, name: str, content: bytes) -> None:
        """Put a service definition where a package puts it (/usr/lib/firewalld/services/NAME.xml)."""
        (self.default_config / "services" / f"{name}.xml").write_bytes(content)

    def run(self, *args: str) -> subprocess.CompletedProcess:
        path = os.pathsep.join(str(UNPACKED / p / "usr/lib/python3/dist-packages") for p in PACKAGES[1:])
        return subprocess.run(["/usr/bin/python3", str(UNPACKED / "firewalld/usr/bin/firewall-offline-cmd"),
                               f"--default-config={self.default_config}", f"--system-config={self.system_config}",
                               *args], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": path})

    def service_ports(self, name: str) -> list[str]:
        """``PORT/PROTOCOL`` of a service as firewalld reads it; the test fails if firewalld rejects it."""
        result = self.run(f"--info-service={name}")
        assert result.returncode == 0, f"firewalld rejects service {name}:\n{result.stdout}{result.stderr}"
        ports = next(line for line in result.stdout.splitlines() if line.strip().startswith("ports:"))
        return ports.split(":", 1)[1].split()
