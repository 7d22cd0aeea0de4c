"""Certificates: `docker-mirror cert init|ensure|show`, client-setup, and what the server
says about a certificate at start."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.certs import make_pki
from tests.support.clients import skopeo
from tests.support.procs import free_port
from tests.support.sandbox import Sandbox

NSSWITCH = "passwd: files\ngroup: files\nshadow: files\nhosts: files\n"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dockermirror", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def tls_config(tmp_path: Path) -> Path:
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"tls": {"certificate": str(tmp_path / "certs" / "server.crt"),
                                              "key": str(tmp_path / "private" / "server.key"),
                                              "ca": str(tmp_path / "ca" / "ca.crt")}}))
    return config


def test_init_makes_a_chain_that_verifies(tmp_path: Path, tls_config: Path):
    result = cli("cert", "init", "--config", str(tls_config), "--hostname", "mirror.example.org",
                 "--hostname", "mirror", "--ip", "10.1.2.3")
    assert result.returncode == 0, result.stderr
    ca, ca_key = tmp_path / "ca" / "ca.crt", tmp_path / "ca" / "private" / "ca.key"
    cert, key = tmp_path / "certs" / "server.crt", tmp_path / "private" / "server.key"
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(cert)], capture_output=True, text=True)
    assert verified.returncode == 0 and verified.stdout.strip() == f"{cert}: OK"
    assert stat.S_IMODE(ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(ca_key.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in ca.parent.iterdir()) == ["ca.crt", "private"]   # no *.key for certs.d
    assert stat.S_IMODE(ca.stat().st_mode) == 0o644
    assert stat.S_IMODE(key.stat().st_mode) in (0o600, 0o640)   # 0640 with the docker-mirror group
    text = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-text"], capture_output=True,
                          text=True).stdout
    assert "DNS:mirror.example.org, DNS:mirror, IP Address:10.1.2.3" in text
    assert "TLS Web Server Authentication" in text
    shown = cli("cert", "show", "--config", str(tls_config))
    assert shown.returncode == 0
    assert "names:    mirror.example.org, mirror, 10.1.2.3" in shown.stdout
    assert "issuer:   CN=docker-mirror CA" in shown.stdout and "expires in 82" in shown.stdout

    # init again: same CA, new certificate (a renewal)
    ca_before = ca.read_bytes()
    serial_before = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-serial"],
                                   capture_output=True, text=True).stdout
    assert cli("cert", "init", "--config", str(tls_config), "--hostname", "mirror").returncode == 0
    assert ca.read_bytes() == ca_before
    assert subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-serial"], capture_output=True,
                          text=True).stdout != serial_before


def test_ensure_only_acts_when_nothing_is_there(tmp_path: Path, tls_config: Path):
    # The default names are this host's: give the command a host name and /etc/hosts of the
    # test's own (a UTS and mount namespace), so the result does not depend on the machine.
    names = Sandbox(tmp_path, hostname="dm-test-box", etc={"nsswitch.conf": NSSWITCH},
                    hosts="127.0.0.1\tlocalhost\n127.0.1.1\tdm-test-box.example.test dm-test-box\n")
    first = names.run([sys.executable, "-m", "dockermirror", "cert", "ensure", "--config", str(tls_config)],
                      capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and "created a private CA" in first.stdout and "issued" in first.stdout, \
        first.stderr
    assert " for dm-test-box.example.test, dm-test-box, localhost, 127.0.0.1, ::1 (serial " in first.stdout
    assert (f"docker-mirror: name: dm-test-box.example.test (this host's FQDN: hostname: is not set in {tls_config}; "
            "set it to the name clients use)") in first.stdout
    cert = tmp_path / "certs" / "server.crt"
    before = cert.read_bytes()
    again = cli("cert", "ensure", "--config", str(tls_config))
    assert again.returncode == 0 and f"TLS certificate {cert} exists already" in again.stdout
    assert cert.read_bytes() == before


def test_client_setup(tmp_path: Path, tls_config: Path):
    assert cli("cert", "init", "--config", str(tls_config), "--hostname", "mirror.example.org").returncode == 0
    ca = (tmp_path / "ca" / "ca.crt").read_text()
    # the target named (without --for it would be this machine's own system)
    tls_out = cli("client-setup", "--config", str(tls_config), "--host", "mirror.example.org:5000",
                  "--for", "el9").stdout
    assert ca.strip() in tls_out
    assert "/etc/docker/certs.d/mirror.example.org:5000/ca.crt" in tls_out
    assert '{"registry-mirrors": ["https://mirror.example.org:5000"]}' in tls_out
    assert '[host."https://mirror.example.org:5000"]' in tls_out
    assert 'server = "https://registry-1.docker.io"' in tls_out
    assert "update-ca-trust" in tls_out and "update-ca-certificates" not in tls_out
    assert 'location = "mirror.example.org:5000/docker.io"' in tls_out and "insecure" not in tls_out
    debian = cli("client-setup", "--config", str(tls_config), "--host", "mirror.example.org:5000",
                 "--for", "debian").stdout
    assert "update-ca-certificates" in debian and "update-ca-trust" not in debian
    plain = tmp_path / "plain.yml"
    plain.write_text("listen: 0.0.0.0:5123\nhostname: box.lan\ntls:\n  enabled: false\n")
    plain_out = cli("client-setup", "--config", str(plain)).stdout
    assert '"insecure-registries": ["box.lan:5123"]' in plain_out
    assert "insecure = true" in plain_out and "BEGIN CERTIFICATE" not in plain_out


@pytest.mark.parametrize("case, outcome", [
    ("expired", "error"), ("not yet valid", "error"), ("expires in 10 days", "warning"),
    ("other hostname", "warning"),
])
def test_certificate_checks_at_start(tmp_path: Path, case: str, outcome: str):
    kwargs = {"expired": {"start_days": -40, "days": -1}, "not yet valid": {"start_days": 2, "days": 30},
              "expires in 10 days": {"days": 10}, "other hostname": {"names": ("elsewhere.example",)}}[case]
    pki = make_pki(tmp_path / "pki", **kwargs)
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{free_port()}", "hostname": "mirror.example.org",
        "tls": {"enabled": True, "certificate": str(pki.certificate), "key": str(pki.key)},
        "upstream": {"url": "http://127.0.0.1:9"}, "cache": {"dir": str(tmp_path / "cache")}}))
    proc = subprocess.Popen([sys.executable, "-m", "dockermirror", "serve", "--config", str(config)],
                            stderr=subprocess.PIPE, text=True)
    try:
        if outcome == "error":
            _, err = proc.communicate(timeout=20)
            assert proc.returncode == 1
            expected = "expired on" if case == "expired" else "is not valid before"
            assert f"docker-mirror: TLS certificate {pki.certificate} {expected}" in err
            assert "Traceback" not in err
            return
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "Application startup complete" in line:
                break
        warnings = [line for line in lines if " WARNING " in line]
        if case == "expires in 10 days":
            assert any(f"TLS certificate {pki.certificate} expires in 9 day(s)" in w
                       or f"TLS certificate {pki.certificate} expires in 10 day(s)" in w for w in warnings), lines
        else:
            assert any("is not valid for mirror.example.org (its names: elsewhere.example, 127.0.0.1, ::1)" in w
                       for w in warnings), lines
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(15)


def listing(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every file and directory under root: mode and content."""
    return {str(path.relative_to(root)): (path.lstat().st_mode, path.read_bytes() if path.is_file() else None)
            for path in sorted(root.rglob("*"))}


def in_mount_namespace(script: str, *args: str) -> subprocess.CompletedProcess:
    """``script`` (sh, with "$@" = args) in a mount namespace of its own: its mounts vanish with it."""
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-euc", script, "sh", *args],
                          capture_output=True, text=True, timeout=60)


def test_init_on_a_read_only_key_directory_leaves_no_ca(tmp_path: Path, tls_config: Path):
    # the CA's directory is writable; the server key's is a read-only mount (also for root)
    (tmp_path / "private").mkdir()
    before = listing(tmp_path)
    result = in_mount_namespace('mount --bind "$1" "$1"; mount -o remount,bind,ro "$1"; shift; exec "$@"',
                                str(tmp_path / "private"), sys.executable, "-m", "dockermirror", "cert", "init",
                                "--config", str(tls_config), "--hostname", "mirror.example.org")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"docker-mirror: {tmp_path}/private/server.key: Read-only file system: "
                             "nothing was changed\n")
    assert listing(tmp_path) == before


def test_init_on_a_full_disk_keeps_the_old_ca_certificate_and_key(tmp_path: Path, tls_config: Path):
    assert cli("cert", "init", "--config", str(tls_config), "--hostname", "old.example.org").returncode == 0
    certs_dir = tmp_path / "certs"
    old = (certs_dir / "server.crt").read_bytes()
    before = listing(tmp_path)
    # the certificate's directory becomes a full file system (one page, which the old certificate
    # fills): the new CA-signed key is written, the new certificate cannot be
    script = """
        dir=$1; shift
        old=$(cat "$dir/server.crt")
        mount -t tmpfs -o size=4k,mode=0755 full "$dir"
        printf '%s\\n' "$old" > "$dir/server.crt"
        status=0; "$@" || status=$?
        echo "status $status"
        ls -A "$dir"
        cat "$dir/server.crt"
    """
    result = in_mount_namespace(script, str(certs_dir), sys.executable, "-m", "dockermirror", "cert", "init",
                                "--config", str(tls_config), "--hostname", "new.example.org")
    assert result.stderr == (f"docker-mirror: {certs_dir}/server.crt: No space left on device: "
                             "nothing was changed\n")
    status, listed, certificate = result.stdout.split("\n", 2)
    assert (status, listed) == ("status 1", "server.crt")    # no temporary file left on the full disk
    assert certificate.encode() == old                         # the old certificate, byte for byte
    assert listing(tmp_path) == before          # the old key, CA and CA key as they were


def test_a_client_cert_dir_with_ca_key_fails_and_a_copy_of_the_new_ca_directory_works(
        tmp_path: Path, make_mirror, upstream):
    """Why the CA key moved to private/: skopeo (containers/image, as podman and dockerd's
    certs.d) takes every *.key in a cert directory for half of a client key pair."""
    config = tmp_path / "admin.yml"
    tls = {"certificate": str(tmp_path / "server.crt"), "key": str(tmp_path / "server.key"),
           "ca": str(tmp_path / "ca" / "ca.crt")}
    config.write_text(yaml.safe_dump({"tls": tls}))
    assert cli("cert", "init", "--config", str(config), "--hostname", "localhost", "--ip", "127.0.0.1").returncode == 0
    mirror = make_mirror(tls={"enabled": True, **tls})
    seeded = upstream.seeded["busybox"]
    source = f"docker://{mirror.address}/{seeded.repo}:{seeded.tag}"

    copied = tmp_path / "copied"
    shutil.copytree(tmp_path / "ca", copied)                    # the CA directory as it is now
    assert skopeo("inspect", "--raw", "--cert-dir", str(copied), source, parent=tmp_path).stdout.startswith("{")

    old_layout = tmp_path / "old-layout"                        # as it was: ca.key beside ca.crt
    old_layout.mkdir()
    shutil.copy(tmp_path / "ca" / "ca.crt", old_layout)
    shutil.copy(tmp_path / "ca" / "private" / "ca.key", old_layout)
    with pytest.raises(AssertionError) as failed:
        skopeo("inspect", "--raw", "--cert-dir", str(old_layout), source, parent=tmp_path)
    assert "missing client certificate ca.cert for key ca.key" in str(failed.value)
