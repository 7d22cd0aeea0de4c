"""Certificates: `docker-mirror cert init|ensure|show`, client-setup, and what the server
says about a certificate at start."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.certs import make_pki
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
    ca, ca_key = tmp_path / "ca" / "ca.crt", tmp_path / "ca" / "ca.key"
    cert, key = tmp_path / "certs" / "server.crt", tmp_path / "private" / "server.key"
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(cert)], capture_output=True, text=True)
    assert verified.returncode == 0 and verified.stdout.strip() == f"{cert}: OK"
    assert stat.S_IMODE(ca_key.stat().st_mode) == 0o600
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
    assert first.returncode == 0 and "created CA" in first.stdout and "issued" in first.stdout, first.stderr
    assert " for dm-test-box.example.test, dm-test-box, localhost, 127.0.0.1, ::1 (serial " in first.stdout
    cert = tmp_path / "certs" / "server.crt"
    before = cert.read_bytes()
    again = cli("cert", "ensure", "--config", str(tls_config))
    assert again.returncode == 0 and "nothing to do" in again.stdout
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
