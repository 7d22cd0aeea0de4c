"""The packages, built with the README's commands and installed under a real systemd.

* .deb: `apt install ./docker-mirror_*.deb` in a booted Debian 12 container; the service
  runs with TLS from a certificate the package made, a real client pulls through it,
  reload works, an upgrade keeps config and cache and restarts it, remove stops it.
* EL8/EL9 RPM: content and scriptlet checks, and `rpm -i --nodeps` in the same kind of
  container creating the user, the certificate and the enabled, running service.
* EL7 RPM (with a stand-in interpreter built from Debian's python3.11 source): layout,
  the glibc 2.17 floor of the wheelhouse, gzip payload, no hardening drop-in, and
  `--version` from an `rpm --root` install.
* All three ship the Grafana dashboard and the Prometheus alert rules in /usr/share/docker-mirror.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import Upstream
from tests.support.clients import skopeo_copy
from tests.support.nspawn import Container
# the packages themselves: the session's `packages` fixture (tests/support/packaging.py)
from tests.support.packaging import DIST, REPO, STANDIN, UPGRADE, VERSION, make  # noqa: F401
from tests.support.procs import free_port

# the Grafana dashboard and the alert rules: /usr/share/docker-mirror/X is docs/monitoring/X
MONITORING = {f"/usr/share/docker-mirror/{path}": REPO / "docs/monitoring" / path
              for path in ("grafana/docker-mirror.json", "prometheus/docker-mirror-alerts.yml")}


def rpm_query(path: Path, *args: str) -> str:
    return subprocess.run(["rpm", "-qp", *args, str(path)], capture_output=True, text=True, check=True).stdout


def packaged_file(package: Path, path: str) -> tuple[bytes, int]:
    """A regular file's bytes and permission bits as the package would install it."""
    if package.suffix == ".deb":
        tree = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(package)], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(tree)) as tar:
            assert f".{path}" in tar.getnames(), f"{package.name} has no {path}"
            member = tar.getmember(f".{path}")
            assert member.isfile(), path
            return tar.extractfile(member).read(), member.mode & 0o7777
    listing = dict(line.rsplit(" ", 1) for line in rpm_query(package, "--qf", "[%{FILENAMES} %{FILEMODES}\n]")
                   .splitlines())
    assert path in listing, f"{package.name} has no {path}"
    mode = int(listing[path])
    assert mode & 0o170000 == 0o100000, path                                   # a regular file
    rpm2cpio = subprocess.Popen(["rpm2cpio", str(package)], stdout=subprocess.PIPE)
    content = subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", f".{path}"], stdin=rpm2cpio.stdout,
                             capture_output=True, check=True).stdout
    rpm2cpio.stdout.close()
    assert rpm2cpio.wait() == 0
    return content, mode & 0o7777


def preseed(container: Container, upstream: Upstream) -> str:
    """A configuration in place before the package arrives: loopback, the test upstream."""
    address = f"127.0.0.1:{free_port()}"
    container.write("/etc/docker-mirror/config.yml",
                    f"# preseeded by the test\nlisten: {address}\nhostname: localhost\n"
                    f"upstream:\n  url: {upstream.url}\n")
    return address


@contextlib.contextmanager
def install_host(name: str, workdir: Path, upstream: Upstream) -> Iterator[tuple[Container, str]]:
    """A booted container that sees dist/ as /dist, with a preseeded configuration."""
    container = Container(name, workdir, binds={DIST: "/dist"})
    container.boot()
    try:
        yield container, preseed(container, upstream)
    finally:
        container.stop()


def active(container: Container) -> str:
    return container.run("systemctl", "is-active", "docker-mirror", check=False).stdout.strip()


def test_deb_install_reload_upgrade_remove(packages, upstream: Upstream, tmp_path: Path):
    with install_host("dm-deb", tmp_path, upstream) as (c, address):
        config_before = c.read("/etc/docker-mirror/config.yml")
        installed = c.run("apt-get", "install", "-y", "-q", "-o", "Dpkg::Options::=--force-confold",
                          f"/dist/{packages['deb'].name}", timeout=600).stdout
        assert active(c) == "active"                          # Debian starts what it installs
        # the certificate step says what it made (the preseeded hostname: localhost) and what next
        for said in ("docker-mirror: created a private CA: /etc/pki/docker-mirror/ca.crt (its key "
                     "/etc/pki/docker-mirror/private/ca.key, mode 0600)",
                     "docker-mirror: issued /etc/pki/tls/certs/docker-mirror.crt for localhost, 127.0.0.1, ::1 ",
                     "docker-mirror: name: localhost (hostname: in /etc/docker-mirror/config.yml)",
                     "docker-mirror: clients trust the CA /etc/pki/docker-mirror/ca.crt",
                     "docker-mirror: next: for the names clients use, docker-mirror cert init --hostname NAME"):
            assert said in installed, said
        assert c.run("systemctl", "is-enabled", "docker-mirror").stdout.strip() == "enabled"
        assert c.run("stat", "-c", "%U:%G %a", "/etc/pki/tls/private/docker-mirror.key").stdout.strip() == \
            "root:docker-mirror 640"
        assert c.run("test", "-f", "/lib/systemd/system/docker-mirror.service.d/50-hardening.conf").returncode == 0
        # shipped for ports below 1024, but neither enabled nor started by the package
        assert c.run("systemctl", "is-enabled", "docker-mirror.socket", check=False).stdout.strip() == "disabled"
        assert c.run("systemctl", "is-active", "docker-mirror.socket", check=False).stdout.strip() == "inactive"
        cert_dir = tmp_path / "certs.d"
        cert_dir.mkdir()
        (cert_dir / "ca.crt").write_text(c.read("/etc/pki/docker-mirror/ca.crt"))   # trust only its CA
        skopeo_copy(f"{address}/library/busybox:latest", tmp_path / "busybox", cert_dir=cert_dir)
        lines = c.run("journalctl", "-u", "docker-mirror", "-o", "cat", "--no-pager").stdout
        assert 'access: 127.0.0.1 "GET /v2/library/busybox/manifests/latest" 200' in lines
        c.run("systemctl", "reload", "docker-mirror")
        assert active(c) == "active"
        assert "reloaded" in c.run("journalctl", "-u", "docker-mirror", "-o", "cat", "--no-pager").stdout

        blobs_before = c.run("find", "/var/cache/docker-mirror/blobs", "-type", "f").stdout.split()
        assert blobs_before
        pid = c.show("docker-mirror", "MainPID")
        upgraded = c.run("apt-get", "install", "-y", "-q", f"/dist/{packages['upgrade'].name}", timeout=600).stdout
        assert ("docker-mirror: TLS certificate /etc/pki/tls/certs/docker-mirror.crt exists already (names: "
                "localhost, 127.0.0.1, ::1; valid until ") in upgraded
        assert UPGRADE in c.run("dpkg-query", "-W", "-f", "${Version}", "docker-mirror").stdout
        assert c.read("/etc/docker-mirror/config.yml") == config_before      # the admin's config stays
        assert c.run("find", "/var/cache/docker-mirror/blobs", "-type", "f").stdout.split() == blobs_before
        assert active(c) == "active" and c.show("docker-mirror", "MainPID") != pid   # restarted

        c.run("apt-get", "remove", "-y", "-q", "docker-mirror", timeout=600)
        assert active(c) == "inactive"
        assert c.run("test", "-d", "/var/cache/docker-mirror/blobs").returncode == 0     # kept...
        assert c.run("test", "-f", "/etc/pki/docker-mirror/ca.crt").returncode == 0
        c.run("apt-get", "purge", "-y", "-q", "docker-mirror", timeout=600)
        assert c.run("test", "-e", "/var/cache/docker-mirror", check=False).returncode == 1   # ...until purge
        assert c.run("test", "-e", "/etc/pki/docker-mirror", check=False).returncode == 1


def test_rpm_contents_and_scriptlets(packages):
    rpm = packages["rpm"]
    files = rpm_query(rpm, "-l").split()
    for path in ("/opt/docker-mirror/bin/docker-mirror", "/usr/bin/docker-mirror",
                 "/usr/lib/systemd/system/docker-mirror.service", "/usr/lib/systemd/system/docker-mirror.socket",
                 "/usr/lib/systemd/system/docker-mirror.service.d/50-hardening.conf",
                 "/var/cache/docker-mirror", "/var/lib/docker-mirror", "/usr/share/doc/docker-mirror/README.md"):
        assert path in files, path
    assert rpm_query(rpm, "-c").split() == ["/etc/docker-mirror/config.yml"]          # %config(noreplace)
    owners = dict(line.split(" ", 1) for line in rpm_query(
        rpm, "--qf", "[%{FILENAMES} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILEMODES:perms}\n]").splitlines())
    assert owners["/var/cache/docker-mirror"] == "docker-mirror:docker-mirror drwxr-x---"
    scripts = rpm_query(rpm, "--scripts")
    for needle in ("groupadd -r docker-mirror", "useradd -r -g docker-mirror", "systemctl preset docker-mirror",
                   "docker-mirror cert ensure", "systemctl try-restart docker-mirror",
                   "systemctl stop docker-mirror.service docker-mirror.socket"):
        assert needle in scripts, needle
    requires = rpm_query(rpm, "--requires").splitlines()
    assert "python3.11" in requires and not any(r.startswith("(") for r in requires)   # no rich dependencies
    assert rpm_query(rpm, "--qf", "%{PAYLOADCOMPRESSOR}") == "gzip"


def test_rpm_install_creates_user_certificate_and_enabled_service(packages, upstream: Upstream, tmp_path: Path):
    with install_host("dm-rpm", tmp_path, upstream) as (c, address):
        out = c.run("rpm", "-i", "--nodeps", "--force-debian", f"/dist/{packages['rpm'].name}", timeout=600)
        assert "error" not in out.stderr.lower(), out.stderr
        assert "docker-mirror: issued /etc/pki/tls/certs/docker-mirror.crt for localhost, 127.0.0.1, ::1 " in out.stdout
        assert "docker-mirror: clients trust the CA /etc/pki/docker-mirror/ca.crt" in out.stdout
        assert c.run("getent", "passwd", "docker-mirror").stdout.split(":")[6].strip() == "/sbin/nologin"
        assert c.run("test", "-f", "/etc/pki/tls/certs/docker-mirror.crt").returncode == 0
        assert c.run("test", "-f", "/etc/docker-mirror/config.yml.rpmnew").returncode == 0   # ours kept
        assert c.run("systemctl", "is-enabled", "docker-mirror").stdout.strip() == "enabled"
        assert c.run("systemctl", "is-enabled", "docker-mirror.socket", check=False).stdout.strip() == "disabled"
        c.run("systemctl", "start", "docker-mirror")
        assert active(c) == "active"
        status = c.show("docker-mirror", "StatusText")
        assert status.startswith(f"https://{address} | cache ")


def test_el7_rpm(packages, tmp_path: Path):
    rpm = packages["rpm-el7"]
    files = rpm_query(rpm, "-l").split()
    assert "/opt/docker-mirror/python/bin/python3.11" in files
    assert "/opt/docker-mirror/python/lib/python3.11/site-packages/dockermirror/__init__.py" in files
    assert not any("docker-mirror.service.d" in f for f in files)                # never the drop-in on EL7
    assert {f"/usr/lib/systemd/system/docker-mirror.{unit}" for unit in ("service", "socket")} <= set(files)
    assert rpm_query(rpm, "--qf", "%{PAYLOADCOMPRESSOR}") == "gzip"             # EL7's rpm reads no zstd
    requires = rpm_query(rpm, "--requires").splitlines()
    assert not any(r.startswith("(") for r in requires) and not any("python3" in r for r in requires)
    floor = subprocess.run(["python3", str(REPO / "rpm/glibc-floor.py"), "--max", "2.17",
                            str(REPO / "build/wheelhouse-py3.11")], capture_output=True, text=True)
    assert floor.returncode == 0, floor.stdout
    assert "(floor 2.17): ok" in floor.stdout
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["rpm", "--root", str(root), "-i", "--nodeps", "--noscripts", str(rpm)], check=True,
                   capture_output=True)
    version = subprocess.run([str(root / "opt/docker-mirror/bin/docker-mirror"), "--version"], capture_output=True,
                             text=True, env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert version.returncode == 0 and version.stdout.strip() == f"docker-mirror {VERSION}"


def test_packages_ship_the_dashboard_and_the_alert_rules(packages):
    for flavour in ("deb", "rpm", "rpm-el7"):
        for path, source in MONITORING.items():
            content, mode = packaged_file(packages[flavour], path)
            assert content == source.read_bytes(), f"{packages[flavour].name}: {path}"
            assert mode == 0o644, f"{packages[flavour].name}: {path} {mode:o}"


# --- issue 13: the pinned EL7 interpreter, the firewalld service, the SELinux relabelling ---------

import hashlib  # noqa: E402  (this section is appended; its imports stay with it)

from tests.support.firewalld import OfflineFirewalld  # noqa: E402

FIREWALLD_SERVICE = "/usr/lib/firewalld/services/docker-mirror.xml"


def test_rpm_el7_takes_the_pinned_download_by_checksum(packages, tmp_path: Path):
    """`make python-tarball` with the stand-in as the download (file://) and its real checksum keeps
    it; `make rpm-el7` with a wrong checksum stops before building: no RPM, no file left."""
    digest = hashlib.sha256(STANDIN.read_bytes()).hexdigest()
    layout = [f"BUILD={tmp_path / 'build'}", f"DIST={tmp_path / 'dist'}", f"PYTHON_URL=file://{STANDIN}"]
    kept = subprocess.run(["make", "-C", str(REPO), "python-tarball", *layout, f"PYTHON_SHA256={digest}"],
                          capture_output=True, text=True, timeout=600)
    assert kept.returncode == 0, kept.stderr
    assert (tmp_path / "build/python" / STANDIN.name).read_bytes() == STANDIN.read_bytes()
    (tmp_path / "build/python" / STANDIN.name).unlink()
    wrong = digest[::-1]
    refused = subprocess.run(["make", "-C", str(REPO), "rpm-el7", *layout, f"PYTHON_SHA256={wrong}",
                              "ALLOW_NEWER_GLIBC_PYTHON=1"], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2
    assert f"SHA-256 is {digest}, expected {wrong} (PYTHON_SHA256); refusing the download" in refused.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]               # no RPM, no partial download


def test_packages_ship_the_firewalld_service(packages, tmp_path: Path):
    source = REPO / "etc/firewalld/docker-mirror.xml"
    for flavour in ("deb", "rpm", "rpm-el7"):
        content, mode = packaged_file(packages[flavour], FIREWALLD_SERVICE)
        assert content == source.read_bytes(), f"{packages[flavour].name}: {FIREWALLD_SERVICE}"
        assert mode == 0o644, f"{packages[flavour].name}: {FIREWALLD_SERVICE} {mode:o}"
    for flavour in ("rpm", "rpm-el7"):                                        # who owns the directory
        assert "firewalld-filesystem" in rpm_query(packages[flavour], "--requires").splitlines()
    # firewalld reads the packaged file: the default listen port (tests/test_firewalld.py: and more)
    firewalld = OfflineFirewalld(tmp_path)
    firewalld.add_service_file("docker-mirror", packaged_file(packages["deb"], FIREWALLD_SERVICE)[0])
    assert firewalld.service_ports("docker-mirror") == ["5000/tcp"]


def selinux_block(package: Path) -> str:
    """The SELinux part of the RPM's %post, as rpm -qp --scripts shows it (the rest starts services
    and writes certificates: not run here)."""
    scripts = rpm_query(package, "--scripts")
    post = scripts.split("postinstall scriptlet (using /bin/sh):\n", 1)[1].split(" scriptlet (using", 1)[0]
    post = post.rsplit("\n", 1)[0]                                            # the next scriptlet's name
    check = subprocess.run(["sh", "-n"], input=post, capture_output=True, text=True)
    assert check.returncode == 0, f"{package.name} %post: {check.stderr}"
    lines = post.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("if command -v selinuxenabled"))
    end = next(i for i in range(start, len(lines)) if lines[i] == "fi")
    return "\n".join(lines[start:end + 1]) + "\n"


def test_rpm_post_restores_selinux_labels_only_where_selinux_is_on(packages, tmp_path: Path):
    """The guarded restorecon of %post, run with stand-ins for selinuxenabled and restorecon:
    what it relabels on an install and an upgrade, and that it does nothing (and never fails)
    where SELinux is off, the tools are missing, or restorecon fails."""
    tools = tmp_path / "bin"
    tools.mkdir()
    calls = tmp_path / "restorecon.calls"
    (tools / "selinuxenabled").write_text('#!/bin/sh\nexit "$SELINUX"\n')
    (tools / "restorecon").write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexit "$RESTORECON"\n')
    for tool in tools.iterdir():
        tool.chmod(0o755)
    everything = ("-R -i /etc/docker-mirror /etc/pki/docker-mirror /etc/pki/tls/certs/docker-mirror.crt "
                  "/etc/pki/tls/private/docker-mirror.key /var/lib/docker-mirror")
    cache = "-R -i /var/cache/docker-mirror"
    for flavour in ("rpm", "rpm-el7"):
        block = selinux_block(packages[flavour])

        def post(argument: int, selinux: int = 0, restorecon: int = 0, path: Path = tools) -> list[str]:
            calls.unlink(missing_ok=True)
            result = subprocess.run(["/bin/sh", "-c", block, "post", str(argument)], capture_output=True, text=True,
                                    env={"PATH": str(path), "SELINUX": str(selinux), "RESTORECON": str(restorecon)})
            assert result.returncode == 0, f"{flavour}: {result.stderr}"    # never fails the install
            return calls.read_text().splitlines() if calls.exists() else []

        assert post(1) == [everything, cache], flavour                          # first install
        assert post(2) == [everything], flavour                                  # upgrade: not the whole cache
        assert post(1, selinux=1) == [], flavour                                 # SELinux disabled
        assert post(1, restorecon=1) == [everything, cache], flavour             # restorecon failing
        assert post(1, path=tmp_path / "empty") == [], flavour                   # no SELinux tools at all
