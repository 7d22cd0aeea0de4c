"""The firewalld service definition (etc/firewalld/docker-mirror.xml; the .deb and both RPMs ship it as
/usr/lib/firewalld/services/docker-mirror.xml, tests/test_packages.py checks the packaged copies),
read by firewalld's own code: ``firewall-offline-cmd`` on a scratch configuration
(tests/support/firewalld.py), never the host's /etc/firewalld."""

from __future__ import annotations

import re
from pathlib import Path

from dockermirror.config import Config, load
from tests.support.firewalld import OfflineFirewalld

REPO = Path(__file__).resolve().parent.parent
SERVICE = REPO / "etc/firewalld/docker-mirror.xml"


def default_ports() -> set[int]:
    """The registry port a fresh install listens on: the built-in default, the shipped config.yml
    and the socket unit's ListenStream= all name it."""
    socket_unit = (REPO / "systemd/docker-mirror.socket").read_text()
    return {Config().listen_address[1], load(REPO / "etc/docker-mirror/config.yml").listen_address[1],
            *(int(p) for p in re.findall(r"^ListenStream=(\d+)$", socket_unit, re.M))}


def test_firewalld_reads_the_service_and_opens_the_default_listen_port(tmp_path: Path):
    assert Config().metrics.listen == ""                      # metrics: off by default, not in the service
    ports = default_ports()
    assert len(ports) == 1
    firewalld = OfflineFirewalld(tmp_path)
    firewalld.add_service_file("docker-mirror", SERVICE.read_bytes())
    assert firewalld.service_ports("docker-mirror") == [f"{ports.pop()}/tcp"]
    # what the README tells the admin to run, offline: the default zone then lists the service
    added = firewalld.run("--add-service=docker-mirror")
    assert added.returncode == 0, added.stderr
    assert "docker-mirror" in firewalld.run("--list-services").stdout.split()
    assert "docker-mirror" in (firewalld.system_config / "zones/public.xml").read_text()
    checked = firewalld.run("--check-config")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_firewalld_check_rejects_a_broken_service(tmp_path: Path):
    """The check above means something: firewalld refuses a service whose port is not a port."""
    firewalld = OfflineFirewalld(tmp_path)
    firewalld.add_service_file("docker-mirror", SERVICE.read_bytes().replace(b'port="', b'port="x'))
    result = firewalld.run("--info-service=docker-mirror")
    assert result.returncode != 0
    assert "INVALID_PORT" in result.stdout + result.stderr
